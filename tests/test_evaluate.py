"""istr_viz.evaluate: COCO AP per stage checked against hand-computed values and pycocotools itself.

Oracles: ground truth fed back as detections (AP = 1 at every stage), squares shifted so that every
IoU is known exactly (AP = the share of the thresholds 0.50:0.05:0.95 below that IoU), and an
independent COCOeval run on the results file that ``evaluate_model`` writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import nn

from coco_factory import QUIRKY_CATEGORIES, QUIRKY_IMAGE_IDS, write_quirky_coco
from istr_viz.basis import MaskBasis
from istr_viz.config import ModelConfig, get_preset
from istr_viz.data.coco import CocoDataset, collate, load_annotations
from istr_viz.data.instance_masks import crop_masks_to_boxes, synthetic_instance_masks
from istr_viz.data.layout import DatasetPaths
from istr_viz.data.shapes import make_shapes
from istr_viz.data.transforms import build_transform
from istr_viz.engine import transform_configs
from istr_viz.evaluate import (SUMMARY_KEYS, StageResults, best_f1_threshold, coco_eval,
                               evaluate_model, evaluate_results, format_stage_table,
                               ground_truth_as_results, run_cocoeval)
from istr_viz.model import build_model
from istr_viz.model.outputs import ISTROutput, StageOutput

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)  # COCOeval's
RECALL_THRESHOLDS = np.linspace(0.0, 1.0, 101)  # COCOeval's


def ap_at_iou(iou: float) -> float:
    """AP of a category whose every detection hits its own object with IoU ``iou`` (precision 1
    wherever it matches): the share of the IoU thresholds that ``iou`` reaches."""
    assert np.abs(IOU_THRESHOLDS - iou).min() > 0.01, "IoU too close to a threshold"
    return float(np.mean(iou >= IOU_THRESHOLDS))


@pytest.fixture(scope="module")
def quirky(tmp_path_factory) -> DatasetPaths:
    return write_quirky_coco(tmp_path_factory.mktemp("quirky"))


@pytest.fixture(scope="module")
def quirky_ann(quirky):
    return load_annotations(quirky.ann_file)


# ------------------------------------------------------------------------- ground truth as results


def _assert_perfect(summary: dict) -> None:
    """AP, AP50 and AP75 are 1; each size range is 1 where it has ground truth, else 0."""
    for key in ("AP", "AP50", "AP75"):
        assert summary[key] == pytest.approx(1.0, abs=1e-9), key
    for key in ("APs", "APm", "APl"):
        assert summary[key] == pytest.approx(1.0, abs=1e-9) or summary[key] == 0.0, key


def test_ground_truth_as_results_scores_one_at_every_stage_on_the_quirky_set(quirky_ann):
    gt = quirky_ann.coco
    results = ground_truth_as_results(gt)
    assert len(results) == 10  # the valid non-crowd instances, crowd regions left out
    assert {r["category_id"] for r in results} == {3, 7, 42}  # the file's own ids
    metrics = evaluate_results(gt, StageResults([results] * 3))
    assert [e["stage"] for e in metrics["per_stage"]] == [1, 2, 3]
    for entry in metrics["per_stage"]:
        for iou_type in ("bbox", "segm"):
            _assert_perfect(entry[iou_type])
    # the quirky set has small (the 20 x 20 square), medium and large (the r=58 circle) instances
    for key in ("APs", "APm", "APl"):
        assert metrics["segm"][key] == pytest.approx(1.0)
    ids = [c["id"] for c in metrics["per_category"]]
    assert ids == [3, 7, 42]  # 19 has no instance: no AP for it
    for c in metrics["per_category"]:
        assert c["name"] == QUIRKY_CATEGORIES[c["id"]]
        assert c["bbox_AP"] == pytest.approx(1.0) and c["segm_AP"] == pytest.approx(1.0)


def test_each_stage_is_scored_on_its_own_results(quirky_ann):
    gt = quirky_ann.coco
    results = ground_truth_as_results(gt)
    metrics = evaluate_results(gt, StageResults([results, [], results[:5], results]))
    aps = [e["segm"]["AP"] for e in metrics["per_stage"]]
    assert aps[0] == pytest.approx(1.0) and aps[3] == pytest.approx(1.0)
    assert aps[1] == 0.0
    assert 0.0 < aps[2] < 1.0
    assert metrics["segm"]["AP"] == pytest.approx(1.0)  # the final stage is the last one


def test_ground_truth_as_results_scores_one_on_make_shapes(tmp_path):
    make_shapes(tmp_path, num_train=0, num_val=4, size=64, seed=3, progress=False)
    ann = load_annotations(tmp_path / "val" / "annotations.json")
    results = ground_truth_as_results(ann.coco)
    assert len(results) == len(ann.coco.getAnnIds()) > 4
    metrics = evaluate_results(ann.coco, StageResults([results, results]))
    for entry in metrics["per_stage"]:
        _assert_perfect(entry["bbox"])
        _assert_perfect(entry["segm"])


def test_image_ids_restrict_the_evaluation(quirky_ann):
    gt = quirky_ann.coco
    only_1001 = ground_truth_as_results(gt, image_ids=[1001])
    assert {r["image_id"] for r in only_1001} == {1001} and len(only_1001) == 3
    restricted = evaluate_results(gt, StageResults([only_1001], image_ids=[1001]))
    assert restricted["bbox"]["AP"] == pytest.approx(1.0)
    everything = evaluate_results(gt, StageResults([only_1001]))
    assert everything["bbox"]["AP"] < 0.7  # the other images' instances are missed


# ----------------------------------------------------------------------------- hand-computed AP


SIDE = 40  # every instance is a SIDE x SIDE square
SHIFT_A, SHIFT_B = 9, 4  # category "a": IoU 31/49 = 0.633; "b": IoU 36/44 = 0.818
SQUARES = {  # image id -> [(category id, x0, y0)]
    11: [(5, 10, 10), (9, 100, 20)],
    12: [(5, 60, 30), (9, 110, 70)],
    13: [(5, 20, 60)],
    14: [],  # no instance
}
HEIGHT, WIDTH = 120, 160


def _square_mask(x0: int, y0: int) -> np.ndarray:
    mask = np.zeros((HEIGHT, WIDTH), np.uint8)
    mask[y0:y0 + SIDE, x0:x0 + SIDE] = 1
    return mask


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


@pytest.fixture(scope="module")
def squares_gt(tmp_path_factory) -> COCO:
    """Axis-aligned squares; category ids 2, 5 and 9 (2 has no instance); image 14 is empty."""
    anns, ann_id = [], 1
    for image_id, squares in SQUARES.items():
        for cat, x0, y0 in squares:
            anns.append({"id": ann_id, "image_id": image_id, "category_id": cat, "iscrowd": 0,
                         "segmentation": _rle(_square_mask(x0, y0)), "area": float(SIDE * SIDE),
                         "bbox": [float(x0), float(y0), float(SIDE), float(SIDE)]})
            ann_id += 1
    data = {"images": [{"id": i, "file_name": f"{i}.png", "height": HEIGHT, "width": WIDTH}
                       for i in SQUARES],
            "annotations": anns,
            "categories": [{"id": 9, "name": "b"}, {"id": 2, "name": "unused"},
                           {"id": 5, "name": "a"}]}
    path = tmp_path_factory.mktemp("squares") / "annotations.json"
    path.write_text(json.dumps(data))
    return load_annotations(path).coco


def _detection(image_id: int, cat: int, x0: int, y0: int, score: float) -> dict:
    return {"image_id": image_id, "category_id": cat, "score": score,
            "bbox": [float(x0), float(y0), float(SIDE), float(SIDE)],
            "segmentation": _rle(_square_mask(x0, y0))}


def _shifted_detections() -> list[dict]:
    """Every square found once, moved by SHIFT_A or SHIFT_B pixels (along x or y, either sign)."""
    dets, n = [], 0
    for image_id, squares in SQUARES.items():
        for cat, x0, y0 in squares:
            shift = SHIFT_A if cat == 5 else SHIFT_B
            dx, dy = [(shift, 0), (0, shift), (-shift, 0), (0, -shift)][n % 4]
            dets.append(_detection(image_id, cat, x0 + dx, y0 + dy, 0.9 - 0.01 * n))
            n += 1
    return dets


def test_shifted_boxes_and_masks_give_the_hand_computed_ap(squares_gt):
    # a square moved by s overlaps its original by (SIDE - s) x SIDE of a union (SIDE + s) x SIDE
    iou_a = (SIDE - SHIFT_A) / (SIDE + SHIFT_A)
    iou_b = (SIDE - SHIFT_B) / (SIDE + SHIFT_B)
    ap_a, ap_b = ap_at_iou(iou_a), ap_at_iou(iou_b)
    assert (ap_a, ap_b) == (pytest.approx(0.3), pytest.approx(0.7))  # 0.50-0.60 and 0.50-0.80
    for iou_type in ("bbox", "segm"):
        summary, per_cat = coco_eval(squares_gt, _shifted_detections(), iou_type)
        assert summary["AP"] == pytest.approx((ap_a + ap_b) / 2, abs=1e-12)
        assert summary["AP50"] == pytest.approx(1.0, abs=1e-12)
        assert summary["AP75"] == pytest.approx((0.0 + 1.0) / 2, abs=1e-12)  # only "b" reaches 0.75
        assert summary["APm"] == pytest.approx(summary["AP"], abs=1e-12)  # 1600 px: all medium
        assert summary["APs"] == 0.0 and summary["APl"] == 0.0  # no ground truth there
        assert per_cat == {5: pytest.approx(ap_a, abs=1e-12), 9: pytest.approx(ap_b, abs=1e-12)}


def test_a_false_positive_ranked_first_costs_the_hand_computed_precision(squares_gt):
    # one detection of "a" on the empty image, scored above all others: with N = 3 objects of "a"
    # the precision at recall k / N is k / (k + 1), so the interpolated precision is N / (N + 1)
    fp = _detection(14, 5, 10, 10, 0.99)
    summary, per_cat = coco_eval(squares_gt, [fp, *_shifted_detections()], "bbox")
    n = 3
    ap_a = ap_at_iou(31 / 49) * n / (n + 1)
    assert per_cat[5] == pytest.approx(ap_a, abs=1e-12)
    assert per_cat[9] == pytest.approx(0.7, abs=1e-12)
    assert summary["AP"] == pytest.approx((ap_a + 0.7) / 2, abs=1e-12)
    assert summary["AP50"] == pytest.approx((n / (n + 1) + 1.0) / 2, abs=1e-12)


def test_a_false_positive_ranked_last_costs_nothing(squares_gt):
    fp = _detection(14, 5, 10, 10, 0.001)  # after every true positive: interpolation hides it
    summary, _ = coco_eval(squares_gt, [*_shifted_detections(), fp], "segm")
    assert summary["AP"] == pytest.approx(0.5, abs=1e-12)


def test_an_image_without_detections_among_others(squares_gt):
    # image 13 holds one of the three objects of "a": recall stops at 2/3, so the precision is 1
    # at the recall thresholds 0, 0.01, ..., 0.66 (67 of the 101) and 0 above
    dets = [d for d in _shifted_detections() if d["image_id"] != 13]
    summary, per_cat = coco_eval(squares_gt, dets, "segm")
    share = np.sum(RECALL_THRESHOLDS <= 2 / 3) / RECALL_THRESHOLDS.size
    assert share == pytest.approx(67 / 101)
    assert per_cat[5] == pytest.approx(0.3 * share, abs=1e-12)
    assert per_cat[9] == pytest.approx(0.7, abs=1e-12)
    assert summary["AP"] == pytest.approx((0.3 * share + 0.7) / 2, abs=1e-12)


def test_mask_results_are_sorted_into_size_ranges_by_their_mask_area(tmp_path):
    # One small object (20 x 20) found exactly, plus a false positive ranked first whose mask is
    # small (10 x 10) but whose box is large: for masks the false positive is a small detection
    # and halves the small-object AP; for boxes it is a large one and leaves it whole.
    h = w = 100
    gt_mask = np.zeros((h, w), np.uint8)
    gt_mask[10:30, 10:30] = 1
    fp_mask = np.zeros((h, w), np.uint8)
    fp_mask[60:70, 60:70] = 1
    data = {"images": [{"id": 1, "file_name": "a.png", "height": h, "width": w}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0,
                             "segmentation": _rle(gt_mask), "area": 400.0,
                             "bbox": [10.0, 10.0, 20.0, 20.0]}],
            "categories": [{"id": 1, "name": "thing"}]}
    (tmp_path / "a.json").write_text(json.dumps(data))
    gt = load_annotations(tmp_path / "a.json").coco
    results = [
        {"image_id": 1, "category_id": 1, "score": 0.9, "bbox": [0.0, 0.0, 100.0, 100.0],
         "segmentation": _rle(fp_mask)},
        {"image_id": 1, "category_id": 1, "score": 0.5, "bbox": [10.0, 10.0, 20.0, 20.0],
         "segmentation": _rle(gt_mask)},
    ]
    segm, _ = coco_eval(gt, results, "segm")
    assert segm["AP"] == pytest.approx(0.5) and segm["APs"] == pytest.approx(0.5)
    bbox, _ = coco_eval(gt, results, "bbox")
    assert bbox["AP"] == pytest.approx(0.5) and bbox["APs"] == pytest.approx(1.0)


# ----------------------------------------------------------------------------- no detections


def test_no_detections_give_zero_without_a_crash(squares_gt):
    for iou_type in ("bbox", "segm"):
        summary, per_cat = coco_eval(squares_gt, [], iou_type)
        assert summary == {k: 0.0 for k in SUMMARY_KEYS}
        assert per_cat == {5: 0.0, 9: 0.0}
    with pytest.raises(ValueError, match="iou_type"):
        coco_eval(squares_gt, [], "keypoints")

    metrics = evaluate_results(squares_gt, StageResults([[], []]))
    assert [e["stage"] for e in metrics["per_stage"]] == [1, 2]
    assert all(e[t]["AP"] == 0.0 for e in metrics["per_stage"] for t in ("bbox", "segm"))
    assert [(c["id"], c["name"], c["bbox_AP"], c["segm_AP"]) for c in metrics["per_category"]] \
        == [(5, "a", 0.0, 0.0), (9, "b", 0.0, 0.0)]

    metrics = evaluate_results(squares_gt, StageResults([]))  # no stage at all
    assert metrics["per_stage"] == [] and metrics["bbox"]["AP"] == 0.0
    assert metrics["segm"] == {k: 0.0 for k in SUMMARY_KEYS}
    assert format_stage_table(metrics).count("\n") == 1  # header and rule only


def test_format_stage_table_numbers_stages_from_one(squares_gt):
    dets = _shifted_detections()
    metrics = evaluate_results(squares_gt, StageResults([[], dets]))
    lines = format_stage_table(metrics).splitlines()
    assert len(lines) == 4
    rows = [line.replace("|", " ").split() for line in lines[2:]]
    assert [row[0] for row in rows] == ["1", "2"]
    assert [float(v) for v in rows[0][1:]] == [0.0] * 6
    assert [float(v) for v in rows[1][1:]] == [50.0, 100.0, 50.0, 50.0, 100.0, 50.0]


# ----------------------------------------------------------------------------- evaluate_model

TINY = ModelConfig(backbone="resnet18", backbone_base_channels=8, norm="gn", num_queries=10,
                   num_stages=2, hidden_dim=32, dim_dynamic=8, dim_feedforward=64, num_heads=2)


def tiny_config():
    preset = get_preset("shapes-cpu")
    return dataclasses.replace(preset, model=TINY, data=dataclasses.replace(
        preset.data, test_min_size=64, test_max_size=96))


@pytest.fixture(scope="module")
def basis() -> MaskBasis:
    return MaskBasis.fit(synthetic_instance_masks(200, 28, seed=0), dim=16, seed=0)


def independent_summary(ann_file: Path, results: list[dict], iou_type: str) -> dict:
    """COCOeval on the raw annotation file and a results list, as the COCO API documents it
    (mask results carry no box, so their area is the mask's)."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ann_file))
        if iou_type == "segm":
            results = [{k: v for k, v in r.items() if k != "bbox"} for r in results]
        ev = COCOeval(gt, gt.loadRes(results), iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {k: max(0.0, float(v)) for k, v in zip(SUMMARY_KEYS, ev.stats[:6])}


def test_evaluate_model_agrees_with_cocoeval_on_its_results_file(quirky, quirky_ann, basis,
                                                                 tmp_path):
    torch.manual_seed(0)
    model = build_model(TINY, len(quirky_ann.class_names), basis)
    out = tmp_path / "sub" / "results.json"
    # no device given: the model's own (where CUDA exists too, the inputs must not go there)
    metrics = evaluate_model(model, quirky, tiny_config(), progress=False, results_out=out,
                             batch_size=4)
    results = json.loads(out.read_text())
    q, c = TINY.num_queries, len(quirky_ann.class_names)
    assert len(results) == len(QUIRKY_IMAGE_IDS) * q * c  # top-100 of Q x C = 40 pairs per image
    assert {r["image_id"] for r in results} == set(QUIRKY_IMAGE_IDS)
    assert {r["category_id"] for r in results} == set(QUIRKY_CATEGORIES)  # 3, 7, 19, 42
    assert [e["stage"] for e in metrics["per_stage"]] == [1, 2]
    for iou_type in ("bbox", "segm"):
        expected = independent_summary(quirky.ann_file, results, iou_type)
        for key in SUMMARY_KEYS:
            assert metrics[iou_type][key] == pytest.approx(expected[key], abs=1e-12), key
    assert [c["id"] for c in metrics["per_category"]] == [3, 7, 42]
    assert [c["name"] for c in metrics["per_category"]] == ["square", "circle", "triangle"]
    assert model.training  # the model's mode is given back


class OracleModel(nn.Module):
    """Answers with the ground truth of the eval-transformed data set, image by image in order:
    stage 1 with every box shrunk about its centre to IoU 0.625, stage 2 with the exact boxes.
    Query g < G holds instance g (logit +8 for its class, -8 elsewhere); the rest are empty."""

    def __init__(self, targets: list[dict], num_classes: int, mask_size: int, num_queries: int):
        super().__init__()
        self.targets, self.seen = targets, 0
        self.c, self.s, self.q = num_classes, mask_size, num_queries
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the model a device

    def forward(self, images, image_sizes, return_attention=False):
        B = len(image_sizes)
        targets = self.targets[self.seen:self.seen + B]
        self.seen += B
        logits = torch.full((B, self.q, self.c), -8.0)
        exact = torch.tensor([0.0, 0.0, 1.0, 1.0]).repeat(B, self.q, 1)
        masks = torch.zeros((B, self.q, self.s, self.s))
        for i, t in enumerate(targets):
            g = len(t["labels"])
            logits[i, torch.arange(g), t["labels"]] = 8.0
            exact[i, :g] = t["boxes_xyxy"]
            masks[i, :g] = crop_masks_to_boxes(t["masks"], t["boxes_xyxy"], self.s).float()
        centre, half = (exact[..., :2] + exact[..., 2:]) / 2, (exact[..., 2:] - exact[..., :2]) / 2
        shrunk = torch.cat([centre - half * 0.625 ** 0.5, centre + half * 0.625 ** 0.5], -1)
        stages = [StageOutput(logits, b, b, torch.zeros(B, self.q, 1), masks)
                  for b in (shrunk, exact)]
        return ISTROutput(stages, exact, image_sizes, torch.zeros(B, self.q, 1))


def eval_targets(quirky, cfg) -> list[dict]:
    """The targets of the quirky set under the evaluation transform of ``cfg``, in file order."""
    dataset = CocoDataset(quirky.ann_file, quirky.images_dir,
                          transform=build_transform(transform_configs(cfg)[1], train=False))
    assert collate([dataset[0]]).images.shape[-2:] == (64, 96)  # the small test size is used
    return [dataset[i][1] for i in range(len(dataset))]


def test_evaluate_model_maps_oracle_answers_back_to_each_image_and_category(quirky, quirky_ann,
                                                                           tmp_path):
    cfg = tiny_config()
    targets = eval_targets(quirky, cfg)
    assert sum(len(t["labels"]) for t in targets) == 10  # no instance lost to the resize
    model = OracleModel(targets, len(quirky_ann.class_names), 28, num_queries=12)
    out = tmp_path / "results.json"
    metrics = evaluate_model(model, quirky, cfg, progress=False, results_out=out, batch_size=4)
    assert model.seen == len(targets)
    stage1, stage2 = metrics["per_stage"]
    assert stage1["stage"] == 1 and stage2["stage"] == 2
    assert stage1["bbox"]["AP"] == pytest.approx(ap_at_iou(0.625), abs=1e-9)  # 0.3
    assert stage2["bbox"]["AP"] == pytest.approx(1.0, abs=1e-9)  # boxes back at full size exactly
    assert stage2["segm"]["AP50"] == pytest.approx(1.0, abs=1e-9)
    results = json.loads(out.read_text())
    for iou_type in ("bbox", "segm"):
        expected = independent_summary(quirky.ann_file, results, iou_type)
        for key in SUMMARY_KEYS:
            assert metrics[iou_type][key] == pytest.approx(expected[key], abs=1e-12), key
    assert {c["id"]: c["bbox_AP"] for c in metrics["per_category"]} == {
        3: pytest.approx(1.0), 7: pytest.approx(1.0), 42: pytest.approx(1.0)}


def test_evaluate_model_on_the_first_images_scores_only_those(quirky, quirky_ann, tmp_path):
    cfg = tiny_config()
    model = OracleModel(eval_targets(quirky, cfg), len(quirky_ann.class_names), 28, 12)
    out = tmp_path / "results.json"
    metrics = evaluate_model(model, quirky, cfg, max_images=2, progress=False, results_out=out,
                             batch_size=1)
    assert model.seen == 2
    assert {r["image_id"] for r in json.loads(out.read_text())} == set(QUIRKY_IMAGE_IDS[:2])
    assert metrics["bbox"]["AP"] == pytest.approx(1.0, abs=1e-9)  # the other images left out
    assert [c["id"] for c in metrics["per_category"]] == [3, 7, 42]


# ----------------------------------------------------------------------------- best_f1_threshold

def _exact(image_id: int, cat: int, score: float) -> dict:
    """A detection lying exactly on the ground-truth square of ``cat`` in ``image_id``."""
    (x0, y0), = [(x, y) for c, x, y in SQUARES[image_id] if c == cat]
    return _detection(image_id, cat, x0, y0, score)


def test_best_f1_threshold_cuts_where_precision_and_recall_balance(squares_gt):
    # 5 objects; ranked: hit, hit, miss, hit, hit, miss, miss, hit. F1 after each cut:
    # 1/3, 4/7, 1/2, 2/3, 4/5 (P = R = 0.8), 8/11, 2/3, 10/13: best at the fifth, score 0.5
    dets = [_exact(11, 5, 0.9), _exact(11, 9, 0.8), _detection(14, 5, 10, 10, 0.7),
            _exact(12, 5, 0.6), _exact(12, 9, 0.5), _detection(14, 9, 60, 10, 0.3),
            _detection(14, 5, 100, 60, 0.2), _exact(13, 5, 0.1)]
    for iou_type in ("bbox", "segm"):
        best = best_f1_threshold(run_cocoeval(squares_gt, dets, iou_type))
        assert best == {"threshold": pytest.approx(0.5), "f1": pytest.approx(0.8),
                        "precision": pytest.approx(0.8), "recall": pytest.approx(0.8), "iou": 0.5}


def test_best_f1_threshold_keeps_equal_scores_together_and_follows_the_iou(squares_gt):
    # a miss tied with two hits: a threshold cannot keep the hits and drop the miss. COCOeval
    # lists its results category by category (5, then 9), so the miss (category 9) comes last
    # among the three 0.8s: cutting between equal scores would give P = 1, R = 3/5
    dets = [_exact(11, 5, 0.9), _exact(11, 9, 0.8), _exact(12, 5, 0.8),
            _detection(14, 9, 10, 10, 0.8)]
    best = best_f1_threshold(run_cocoeval(squares_gt, dets, "segm"))
    assert best["threshold"] == pytest.approx(0.8)
    assert (best["precision"], best["recall"]) == (pytest.approx(3 / 4), pytest.approx(3 / 5))
    # the shifted squares overlap by 0.633 ("a") and 0.818 ("b"): all hits at IoU 0.5; at 0.75
    # only the two of "b" (ranked 2nd and 4th of 5), and the best cut is at the last of them
    shifted = _shifted_detections()
    ev = run_cocoeval(squares_gt, shifted, "segm")
    assert best_f1_threshold(ev)["f1"] == pytest.approx(1.0)
    at_75 = best_f1_threshold(ev, iou=0.75)
    assert at_75["iou"] == 0.75 and at_75["recall"] == pytest.approx(2 / 5)
    assert at_75["threshold"] == pytest.approx(min(d["score"] for d in shifted if d["category_id"] == 9))


def test_best_f1_threshold_without_detections_is_none_and_evaluate_results_records_it(squares_gt):
    assert best_f1_threshold(run_cocoeval(squares_gt, [], "segm")) is None
    misses = [_detection(14, 5, 10, 10, 0.8), _detection(14, 9, 60, 10, 0.7)]
    assert best_f1_threshold(run_cocoeval(squares_gt, misses, "segm")) is None  # F1 0 everywhere
    ev = run_cocoeval(squares_gt, _shifted_detections(), "segm")
    for iou in (0.3, 0.52, 2.0):
        with pytest.raises(ValueError, match="one of COCOeval's thresholds"):
            best_f1_threshold(ev, iou=iou)
    assert evaluate_results(squares_gt, StageResults([[]]))["score_threshold"] is None
    dets = [_exact(11, 5, 0.9), _detection(14, 5, 10, 10, 0.7)]
    metrics = evaluate_results(squares_gt, StageResults([[], dets]))  # the final stage's masks
    assert metrics["score_threshold"]["threshold"] == pytest.approx(0.9)
    assert metrics["score_threshold"]["recall"] == pytest.approx(1 / 5)
