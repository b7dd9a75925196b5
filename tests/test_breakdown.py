"""Where the AP goes: the plain AP, the AP with class errors corrected, at IoU 0.1, and the share
of instances that no detection touches, on ground truth made into results and broken one way
each."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

import coco_factory as cf
from istr_viz.breakdown import (BREAKDOWN_KEYS, best_class_per_query, breakdown_both,
                                correct_classes, error_breakdown, format_breakdown, missed_share)
from istr_viz.data.coco import load_annotations
from istr_viz.evaluate import coco_eval, ground_truth_as_results, run_cocoeval, summarise


@pytest.fixture(scope="module")
def quirky_gt(tmp_path_factory) -> COCO:
    paths = cf.write_quirky_coco(tmp_path_factory.mktemp("quirky"))
    return load_annotations(paths.ann_file).coco


def _rect_gt(images: dict[int, list[tuple]], width: int = 120, height: int = 90) -> COCO:
    """Images of rectangles ``(x0, y0, x1, y1, category_id[, iscrowd])`` (categories 3, 7)."""
    dataset = {"images": [], "annotations": [],
               "categories": [{"id": 3, "name": "square"}, {"id": 7, "name": "circle"}]}
    for image_id, rects in images.items():
        dataset["images"].append({"id": image_id, "width": width, "height": height,
                                  "file_name": f"{image_id}.png"})
        for x0, y0, x1, y1, cat, *crowd in rects:
            mask = np.zeros((height, width), dtype=bool)
            mask[y0:y1, x0:x1] = True
            dataset["annotations"].append({
                "id": len(dataset["annotations"]) + 1, "image_id": image_id, "category_id": cat,
                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": float(mask.sum()),
                "iscrowd": int(bool(crowd and crowd[0])), "segmentation": cf.compressed_rle(mask)})
    gt = COCO()
    gt.dataset = dataset
    gt.createIndex()
    return gt


@pytest.fixture(scope="module")
def apart_gt() -> COCO:
    """Rectangles of two classes far apart in three images: a detection moved or relabelled
    cannot land on a neighbour."""
    rects = [(5, 5, 35, 30, 3), (70, 10, 110, 40, 7), (20, 55, 50, 85, 3)]
    return _rect_gt({i: rects[:i] for i in (1, 2, 3)})


def _perfect(gt: COCO) -> list[dict]:
    """The ground truth as results, one query each, with scores that interleave across images."""
    results = ground_truth_as_results(gt)
    for i, r in enumerate(results):
        r["score"], r["query"] = 0.9 - 0.05 * i, i
    return results


def _other_class(cat_id: int) -> int:
    return {3: 7, 7: 42, 42: 3}[cat_id]


def _shifted(results: list[dict], fraction: float) -> list[dict]:
    """Boxes moved right by ``fraction`` of their width: IoU (1 - f) / (1 + f) with their own."""
    moved = copy.deepcopy(results)
    for r in moved:
        r["bbox"][0] += fraction * r["bbox"][2]
    return moved


def test_perfect_results_lose_nothing(quirky_gt):
    for iou_type in ("bbox", "segm"):
        b = error_breakdown(quirky_gt, _perfect(quirky_gt), iou_type)
        assert set(b) == set(BREAKDOWN_KEYS)
        assert all(b[k] == pytest.approx(1.0) for k in BREAKDOWN_KEYS if k != "missed")
        assert b["missed"] == pytest.approx(0.0)


def test_plain_ap_and_ap50_are_cocoevals_own(quirky_gt):
    """Imperfect results (boxes and masks off by a few pixels, a third of them dropped, a wrong
    class): the breakdown's plain AP and AP50 are exactly COCOeval's."""
    rng = np.random.default_rng(0)
    results = []
    for r in _perfect(quirky_gt)[1:]:
        r["bbox"] = [v + d for v, d in zip(r["bbox"], rng.integers(-3, 4, 4))]
        mask = np.roll(mask_utils.decode(r["segmentation"]), tuple(rng.integers(-2, 3, 2)),
                       axis=(0, 1))
        r["segmentation"] = cf.compressed_rle(mask.astype(bool))
        results.append(r)
    results[0]["category_id"] = _other_class(results[0]["category_id"])
    for iou_type in ("bbox", "segm"):
        b = error_breakdown(quirky_gt, results, iou_type)
        summary = coco_eval(quirky_gt, results, iou_type)[0]
        assert 0 < summary["AP"] < summary["AP50"] < 1  # a test that can tell the slices apart
        assert b["AP"] == pytest.approx(summary["AP"], abs=1e-12)
        assert b["AP50"] == pytest.approx(summary["AP50"], abs=1e-12)


def test_placement_one_threshold_at_a_time(apart_gt):
    # IoU 0.69 / 1.31 = 0.53: counts at 0.5 only, so AP over 0.50:0.95 is 1/10
    b = error_breakdown(apart_gt, _shifted(_perfect(apart_gt), 0.31), "bbox")
    assert b["AP50"] == pytest.approx(1.0) and b["AP10"] == pytest.approx(1.0)
    assert b["AP"] == pytest.approx(0.1)
    # IoU 1/3: neither at 0.5 nor above, still at 0.1
    b = error_breakdown(apart_gt, _shifted(_perfect(apart_gt), 0.5), "bbox")
    assert b["AP50"] == 0.0 and b["AP"] == 0.0
    assert b["AP10"] == pytest.approx(1.0) and b["AP10_classes_corrected"] == pytest.approx(1.0)
    assert b["missed"] == 0.0


def test_wrong_classes_are_corrected(apart_gt):
    wrong = _perfect(apart_gt)
    for r in wrong:
        r["category_id"] = {3: 7, 7: 3}[r["category_id"]]
    for iou_type in ("bbox", "segm"):
        b = error_breakdown(apart_gt, wrong, iou_type)
        assert b["AP"] == 0.0 and b["AP10"] == 0.0
        assert b["AP_classes_corrected"] == pytest.approx(1.0)
        assert b["AP10_classes_corrected"] == pytest.approx(1.0)
        assert b["missed"] == 0.0


def test_a_false_positive_on_background_is_not_a_class_error(apart_gt):
    """A top-scoring detection on nothing costs the same with or without the correction (a
    class-agnostic AP, pooling both classes into one ranking, would not)."""
    results = _perfect(apart_gt)
    results.append({"image_id": 3, "category_id": 3, "score": 0.99, "query": 99,
                    "bbox": [80.0, 60.0, 20.0, 20.0]})
    b = error_breakdown(apart_gt, results, "bbox")
    assert b["AP"] < 1.0
    assert b["AP_classes_corrected"] == pytest.approx(b["AP"])


def _box(image_id: int, cat: int, score: float, xyxy, query: int) -> dict:
    x0, y0, x1, y1 = xyxy
    return {"image_id": image_id, "category_id": cat, "score": score, "query": query,
            "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]}


def test_a_right_detection_is_never_relabelled():
    """A square inside a larger circle's box: the square's detection overlaps the circle's box
    more (IoU 0.71) than the square's (0.62), yet it already matches its own class at IoU 0.5,
    so it keeps it."""
    gt = _rect_gt({1: [(20, 20, 50, 50, 3), (15, 15, 60, 60, 7)]})
    dets = [_box(1, 3, 0.9, (17, 17, 55, 55), 0), _box(1, 7, 0.8, (15, 15, 60, 60), 1)]
    assert [r["category_id"] for r in correct_classes(gt, dets, "bbox")] == [3, 7]
    b = error_breakdown(gt, dets, "bbox")
    assert b["AP_classes_corrected"] == pytest.approx(b["AP"])


def test_only_an_overlap_of_0_1_or_more_moves_a_class():
    gt = _rect_gt({1: [(0, 0, 40, 40, 7)]})
    barely = _box(1, 3, 0.9, (36, 36, 60, 60), 0)  # IoU 16 / (1600 + 576 - 16) < 0.1
    near = _box(1, 3, 0.9, (20, 0, 60, 40), 1)  # IoU 800 / 2400 = 1/3
    assert [r["category_id"] for r in correct_classes(gt, [barely, near], "bbox")] == [3, 7]


def test_a_wrong_class_on_a_crowd_region_is_corrected_to_be_ignored():
    gt = _rect_gt({1: [(0, 0, 30, 30, 3), (60, 40, 110, 85, 7, True)]})
    dets = [_box(1, 3, 0.8, (0, 0, 30, 30), 0), _box(1, 3, 0.9, (70, 50, 100, 80), 1)]
    assert [r["category_id"] for r in correct_classes(gt, dets, "bbox")] == [3, 7]
    b = error_breakdown(gt, dets, "bbox")
    assert b["AP"] < 1.0 and b["AP_classes_corrected"] == pytest.approx(1.0)
    assert b["missed"] == 0.0  # the crowd region is no instance to miss


def test_a_query_keeps_one_class(quirky_gt):
    """Each query also reports a wrong class at a higher score (the same box and mask): the
    correction keeps the query's best class and corrects it, so nothing is lost."""
    results = _perfect(quirky_gt)
    doubled = []
    for r in results:
        twin = copy.deepcopy(r)
        twin["category_id"], twin["score"] = _other_class(r["category_id"]), r["score"] + 0.04
        doubled += [r, twin]
    kept = best_class_per_query(doubled)
    assert sorted(d["score"] for d in kept) == pytest.approx(sorted(r["score"] + 0.04
                                                                    for r in results))
    b = error_breakdown(quirky_gt, doubled, "segm")
    assert b["AP"] < 1.0  # the wrong class outranks the right one in each image
    assert b["AP_classes_corrected"] == pytest.approx(1.0)


def test_queries_are_told_apart_by_their_index_or_their_shape(apart_gt):
    box = [5.0, 5.0, 30.0, 25.0]
    mask_a, mask_b = np.zeros((90, 120), bool), np.zeros((90, 120), bool)
    mask_a[5:30, 5:35], mask_b[5:20, 5:20] = True, True
    two_queries = [{"image_id": 1, "category_id": 3, "score": 0.9, "bbox": box, "query": 0},
                   {"image_id": 1, "category_id": 7, "score": 0.8, "bbox": box, "query": 1}]
    assert len(best_class_per_query(two_queries)) == 2  # clamped to the same box: two queries
    rle_b = mask_utils.encode(np.asfortranarray(mask_b))  # counts as bytes, as pycocotools gives
    two_masks = [{"image_id": 1, "category_id": 3, "score": 0.9, "bbox": box,
                  "segmentation": cf.compressed_rle(mask_a)},
                 {"image_id": 1, "category_id": 7, "score": 0.8, "bbox": box,
                  "segmentation": rle_b}]
    assert len(best_class_per_query(two_masks)) == 2
    same = [dict(two_masks[0]), dict(two_masks[0], category_id=7, score=0.5)]
    assert [r["score"] for r in best_class_per_query(same)] == [0.9]
    assert correct_classes(apart_gt, same, "segm")[0]["category_id"] == 3


def test_missed_counts_instances_no_detection_touches():
    # two instances side by side; one detection covering both (IoU 0.5 with each) touches both,
    # though COCOeval's one-to-one matching would give it only one
    gt = _rect_gt({1: [(0, 0, 20, 20, 3), (20, 0, 40, 20, 3)], 2: [(60, 40, 90, 80, 7)]})
    wide = [{"image_id": 1, "category_id": 3, "score": 0.9, "bbox": [0.0, 0.0, 40.0, 20.0]}]
    assert missed_share(gt, wide, "bbox") == pytest.approx(1 / 3)  # image 2's instance
    assert missed_share(gt, wide, "bbox", image_ids=[1]) == 0.0
    assert missed_share(gt, [], "bbox") == 1.0
    b = error_breakdown(gt, [], "segm")
    assert b["missed"] == 1.0 and b["AP_classes_corrected"] == 0.0


def test_image_ids_restrict_every_figure(quirky_gt):
    results = _perfect(quirky_gt)
    kept_images = [1001, 17]
    only = [r for r in results if r["image_id"] in kept_images]
    for iou_type in ("bbox", "segm"):
        b = error_breakdown(quirky_gt, only, iou_type, image_ids=kept_images)
        assert b["AP"] == pytest.approx(1.0) and b["missed"] == 0.0


def test_table_and_bad_input(quirky_gt, apart_gt):
    text = format_breakdown(breakdown_both(apart_gt, _perfect(apart_gt)[::2]))
    assert "classes corrected" in text and "50.0% by box" in text
    with pytest.raises(ValueError, match="iou_type"):
        error_breakdown(quirky_gt, _perfect(quirky_gt), "keypoints")
    ev = run_cocoeval(quirky_gt, _perfect(quirky_gt), "bbox", iou_thresholds=[0.1, 0.5])
    with pytest.raises(ValueError, match="0.50:0.95"):
        summarise(ev, quirky_gt)
