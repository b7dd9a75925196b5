"""The mask AP ceilings: ground truth through the S x S crop and the basis, and a model's boxes
with perfect mask codes, scored by the same COCOeval as the model."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

import coco_factory as cf
from istr_viz.basis import MaskBasis
from istr_viz.ceilings import (ImageTruth, format_ceilings, ground_truth_through_masks,
                               mask_ap_ceilings, masks_through_crop, with_ideal_masks)
from istr_viz.data.coco import load_annotations
from istr_viz.evaluate import coco_eval, ground_truth_as_results


@pytest.fixture(scope="module")
def quirky_gt(tmp_path_factory) -> COCO:
    """The quirky set: circles, squares, polygons, crowd regions, non-contiguous category ids."""
    paths = cf.write_quirky_coco(tmp_path_factory.mktemp("quirky"))
    return load_annotations(paths.ann_file).coco


def _random_masks(n: int, size: int, seed: int) -> np.ndarray:
    """(n, size, size) bool ellipses and rectangles of random extent."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] + 0.5
    masks = []
    for i in range(n):
        cx, cy = rng.uniform(0.3, 0.7, 2) * size
        rx, ry = rng.uniform(0.15, 0.5, 2) * size
        if i % 2:
            masks.append(((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1)
        else:
            masks.append((np.abs(xx - cx) <= rx) & (np.abs(yy - cy) <= ry))
    return np.stack(masks)


def _segm_ap(gt: COCO, results: list[dict]) -> float:
    return coco_eval(gt, results, "segm")[0]["AP"]


def _rectangle_gt(size: int = 96, images=((1, [(10, 12, 40, 50), (50, 20, 90, 44)]),
                                          (2, [(3, 60, 31, 93)]))) -> COCO:
    """Images of box-filling rectangles (x0, y0, x1, y1) of one class: the S x S crop of each is
    all foreground."""
    dataset = {"images": [], "annotations": [], "categories": [{"id": 5, "name": "box"}]}
    for image_id, rects in images:
        dataset["images"].append({"id": image_id, "width": size, "height": size,
                                  "file_name": f"{image_id}.png"})
        for x0, y0, x1, y1 in rects:
            mask = np.zeros((size, size), dtype=bool)
            mask[y0:y1, x0:x1] = True
            dataset["annotations"].append({
                "id": len(dataset["annotations"]) + 1, "image_id": image_id, "category_id": 5,
                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": float(mask.sum()), "iscrowd": 0,
                "segmentation": cf.compressed_rle(mask)})
    gt = COCO()
    gt.dataset = dataset
    gt.createIndex()
    return gt


def test_image_truth_leaves_out_crowd_regions_and_clips_boxes(quirky_gt):
    truth = ImageTruth.load(quirky_gt, 1001)  # a square, a two-part triangle, a circle, a crowd
    anns = quirky_gt.imgToAnns[1001]
    assert sum(a["iscrowd"] for a in anns) == 1
    assert truth.masks.shape == (len(anns) - 1, 160, 240) and truth.masks.dtype == torch.bool
    assert sorted(truth.category_ids.tolist()) == sorted(a["category_id"] for a in anns
                                                         if not a["iscrowd"])
    assert truth.masks.flatten(1).any(dim=1).all()
    spill = _rectangle_gt(images=((1, [(60, 70, 96, 96)]),))
    spill.anns[1]["bbox"] = [60.0, 70.0, 50.0, 40.0]  # a box drawn past the image's corner
    assert ImageTruth.load(spill, 1).boxes_xyxy.tolist() == [[60.0, 70.0, 96.0, 96.0]]


def test_each_detection_takes_the_instance_it_overlaps_most():
    """Two overlapping rectangles of one class: a detection on each gets that one's mask."""
    gt = _rectangle_gt(images=((1, [(10, 10, 50, 50), (30, 30, 80, 80)]),))
    basis = MaskBasis.fit(_random_masks(300, 28, seed=6), dim=40, seed=0)
    truth = ImageTruth.load(gt, 1)
    detections = [{"image_id": 1, "category_id": 5, "score": 0.9, "bbox": [28.0, 28.0, 52.0, 52.0],
                   "segmentation": cf.compressed_rle(np.zeros((96, 96), dtype=bool))},
                  {"image_id": 1, "category_id": 5, "score": 0.8, "bbox": [9.0, 9.0, 42.0, 42.0],
                   "segmentation": cf.compressed_rle(np.zeros((96, 96), dtype=bool))}]
    out = with_ideal_masks(gt, detections, basis)
    for result, instance in zip(out, (1, 0)):
        drawn = torch.from_numpy(mask_utils.decode(result["segmentation"])).bool()
        ious = [(drawn & m).sum() / (drawn | m).sum() for m in truth.masks]
        assert int(np.argmax(ious)) == instance and ious[instance] > 0.9


def test_the_crop_of_a_box_filling_rectangle_pastes_back_exactly():
    gt = _rectangle_gt()
    results = ground_truth_through_masks(gt, mask_size=28)
    assert len(results) == 3 and {r["score"] for r in results} == {1.0}
    assert _segm_ap(gt, results) == pytest.approx(1.0)


def test_the_crop_ceiling_is_below_one_on_curved_shapes_at_a_coarse_size(quirky_gt):
    fine = _segm_ap(quirky_gt, ground_truth_through_masks(quirky_gt, mask_size=56))
    coarse = _segm_ap(quirky_gt, ground_truth_through_masks(quirky_gt, mask_size=4))
    assert coarse < fine <= 1.0
    assert fine > 0.8  # a 56 x 56 crop redraws circles and polygons almost exactly


def test_a_full_rank_basis_reproduces_the_crop_and_a_two_code_basis_loses_ap(quirky_gt):
    S = 8
    masks = _random_masks(400, S, seed=1)
    full = MaskBasis.fit(masks, dim=S * S, seed=0)
    crops = ground_truth_through_masks(quirky_gt, S)
    through_full = ground_truth_through_masks(quirky_gt, S, basis=full)
    # a full-rank code is the crop itself, up to pixels on the 0.5 boundary of the paste
    for a, b in zip(through_full, crops, strict=True):
        disagree = mask_utils.area(mask_utils.merge([a["segmentation"], b["segmentation"]])) - \
            mask_utils.area(mask_utils.merge([a["segmentation"], b["segmentation"]],
                                             intersect=True))
        assert disagree <= 0.01 * mask_utils.area(b["segmentation"])
    assert _segm_ap(quirky_gt, through_full) == pytest.approx(_segm_ap(quirky_gt, crops), abs=0.03)
    two = MaskBasis.fit(masks, dim=2, seed=0)
    assert _segm_ap(quirky_gt, ground_truth_through_masks(quirky_gt, S, basis=two)) < \
        _segm_ap(quirky_gt, crops)


def test_ideal_masks_of_the_ground_truth_score_as_the_basis_ceiling(quirky_gt):
    basis = MaskBasis.fit(_random_masks(300, 12, seed=2), dim=10, seed=0)
    truth = ground_truth_as_results(quirky_gt)
    ceiling = _segm_ap(quirky_gt, ground_truth_through_masks(quirky_gt, 12, basis=basis))
    assert ceiling < 0.99  # ten codes of a 12 x 12 crop are not the masks themselves
    for frame in ("pred", "gt"):  # detections in the ground-truth boxes: the two frames agree
        assert _segm_ap(quirky_gt, with_ideal_masks(quirky_gt, truth, basis, frame)) == \
            pytest.approx(ceiling)


def test_ideal_masks_keep_scores_boxes_classes_and_false_positives(quirky_gt):
    basis = MaskBasis.fit(_random_masks(300, 12, seed=3), dim=10, seed=0)
    truth = ground_truth_as_results(quirky_gt)
    wrong_class = dict(truth[0], category_id=19, score=0.3)  # 19 has no instance in the set
    far_away = dict(truth[1], bbox=[0.0, 0.0, 1.0, 1.0], score=0.2)
    results = [dict(r, score=0.9) for r in truth] + [wrong_class, far_away]
    before = copy.deepcopy(results)
    out = with_ideal_masks(quirky_gt, results, basis)
    assert results == before  # the input is not changed
    for a, b in zip(out, results):
        assert (a["image_id"], a["category_id"], a["score"], a["bbox"]) == \
            (b["image_id"], b["category_id"], b["score"], b["bbox"])
    assert out[-2]["segmentation"] == wrong_class["segmentation"]
    assert out[-1]["segmentation"] == far_away["segmentation"]
    assert out[0]["segmentation"] != truth[0]["segmentation"]  # redrawn through the basis
    with pytest.raises(ValueError, match="frame"):
        with_ideal_masks(quirky_gt, results, basis, "image")


def test_in_loose_boxes_the_detections_own_frame_beats_the_ground_truth_frame(quirky_gt):
    """A box 30% too large on each side: the ground truth's crop pasted into it is drawn too large,
    the crop of the detection's own box is the instance at a coarser scale."""
    basis = MaskBasis.fit(_random_masks(300, 28, seed=4), dim=40, seed=0)
    loose = []
    for r in ground_truth_as_results(quirky_gt):
        x, y, w, h = r["bbox"]
        loose.append(dict(r, bbox=[x - 0.3 * w, y - 0.3 * h, 1.6 * w, 1.6 * h]))
    own = _segm_ap(quirky_gt, with_ideal_masks(quirky_gt, loose, basis, "pred"))
    truth_frame = _segm_ap(quirky_gt, with_ideal_masks(quirky_gt, loose, basis, "gt"))
    assert own > truth_frame + 0.2


def test_mask_ap_ceilings_report_and_table(quirky_gt):
    basis = MaskBasis.fit(_random_masks(300, 28, seed=5), dim=20, seed=0)
    truth = ground_truth_as_results(quirky_gt)
    half = [dict(r, score=0.5 + 0.01 * i) for i, r in enumerate(truth) if i % 2 == 0]
    ceilings = mask_ap_ceilings(quirky_gt, half, basis)
    assert set(ceilings) == {"model_box", "model", "ideal_masks", "ideal_masks_gt_frame",
                             "basis", "crop"}
    assert ceilings["model_box"]["AP"] < 0.9  # half of the instances are missed
    assert ceilings["model"]["AP"] == pytest.approx(ceilings["model_box"]["AP"])
    assert ceilings["ideal_masks"]["AP"] <= ceilings["basis"]["AP"] + 1e-9
    assert ceilings["basis"]["AP"] <= ceilings["crop"]["AP"] + 1e-9
    assert mask_ap_ceilings(quirky_gt, [], basis)["ideal_masks"]["AP"] == 0.0
    table = format_ceilings(ceilings, 28, 20)
    assert "S = 28, M = 20" in table and len(table.splitlines()) == 7


def test_masks_through_crop_of_no_instance_is_empty():
    out = masks_through_crop(torch.zeros((0, 30, 40), dtype=torch.bool), torch.zeros((0, 4)), 28)
    assert out.shape == (0, 30, 40) and out.dtype == torch.bool
