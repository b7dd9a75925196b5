"""Where the AP goes: the plain AP, the AP with class errors forgiven, at IoU 0.1, and the share
of instances missed, on the quirky set's ground truth made into results and broken one way each."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from pycocotools.coco import COCO

import coco_factory as cf
from istr_viz.breakdown import (BREAKDOWN_KEYS, best_class_per_query, breakdown_both,
                                error_breakdown, format_breakdown)
from istr_viz.data.coco import load_annotations
from istr_viz.evaluate import coco_eval, ground_truth_as_results


@pytest.fixture(scope="module")
def quirky_gt(tmp_path_factory) -> COCO:
    paths = cf.write_quirky_coco(tmp_path_factory.mktemp("quirky"))
    return load_annotations(paths.ann_file).coco


@pytest.fixture(scope="module")
def apart_gt() -> COCO:
    """Rectangles of two classes (ids 3 and 7) far apart from each other in three 120 x 90
    images: a detection moved or relabelled cannot land on a neighbour."""
    dataset = {"images": [], "annotations": [],
               "categories": [{"id": 3, "name": "square"}, {"id": 7, "name": "circle"}]}
    rects = [(5, 5, 35, 30), (70, 10, 110, 40), (20, 55, 50, 85)]
    for image_id in (1, 2, 3):
        dataset["images"].append({"id": image_id, "width": 120, "height": 90,
                                  "file_name": f"{image_id}.png"})
        for n, (x0, y0, x1, y1) in enumerate(rects[:image_id]):
            mask = np.zeros((90, 120), dtype=bool)
            mask[y0:y1, x0:x1] = True
            dataset["annotations"].append({
                "id": len(dataset["annotations"]) + 1, "image_id": image_id,
                "category_id": (3, 7)[n % 2], "bbox": [x0, y0, x1 - x0, y1 - y0],
                "area": float(mask.sum()), "iscrowd": 0, "segmentation": cf.compressed_rle(mask)})
    gt = COCO()
    gt.dataset = dataset
    gt.createIndex()
    return gt


def _perfect(gt: COCO) -> list[dict]:
    """The ground truth as results, with scores that interleave across images."""
    results = ground_truth_as_results(gt)
    for i, r in enumerate(results):
        r["score"] = 0.9 - 0.05 * i
    return results


def _other_class(cat_id: int) -> int:
    return {3: 7, 7: 42, 42: 3}[cat_id]


def test_perfect_results_lose_nothing(quirky_gt):
    for iou_type in ("bbox", "segm"):
        b = error_breakdown(quirky_gt, _perfect(quirky_gt), iou_type)
        assert set(b) == set(BREAKDOWN_KEYS)
        assert all(b[k] == pytest.approx(1.0) for k in BREAKDOWN_KEYS if k != "missed")
        assert b["missed"] == pytest.approx(0.0)
        # the plain AP is COCOeval's own, with its default thresholds
        assert b["AP"] == pytest.approx(coco_eval(quirky_gt, _perfect(quirky_gt), iou_type)[0]["AP"])


def test_wrong_classes_cost_the_plain_ap_only(apart_gt):
    wrong = _perfect(apart_gt)
    for r in wrong:
        r["category_id"] = {3: 7, 7: 3}[r["category_id"]]
    for iou_type in ("bbox", "segm"):
        b = error_breakdown(apart_gt, wrong, iou_type)
        assert b["AP"] == pytest.approx(0.0) and b["AP10"] == pytest.approx(0.0)
        assert b["AP_any_class"] == pytest.approx(1.0)
        assert b["AP10_any_class"] == pytest.approx(1.0)
        assert b["missed"] == pytest.approx(0.0)


def test_loose_boxes_count_at_iou_0_1_only(apart_gt):
    loose = _perfect(apart_gt)
    for r in loose:  # shifted by half its width: IoU (1 - 0.5) / (1 + 0.5) = 1/3
        r["bbox"][0] += 0.5 * r["bbox"][2]
    b = error_breakdown(apart_gt, loose, "bbox")
    assert b["AP50"] == pytest.approx(0.0) and b["AP"] == pytest.approx(0.0)
    assert b["AP10"] == pytest.approx(1.0) and b["AP10_any_class"] == pytest.approx(1.0)
    assert b["missed"] == pytest.approx(0.0)


def test_missed_is_the_share_of_instances_no_detection_touches(quirky_gt):
    results = _perfect(quirky_gt)
    kept = results[::2]
    for iou_type in ("bbox", "segm"):
        b = error_breakdown(quirky_gt, kept, iou_type)
        assert b["missed"] == pytest.approx(1 - len(kept) / cf.QUIRKY_NUM_INSTANCES)
    nothing = error_breakdown(quirky_gt, [], "segm")
    assert nothing["missed"] == 1.0 and nothing["AP_any_class"] == 0.0


def test_a_query_counts_once_when_classes_are_ignored(quirky_gt):
    """Each query also reports a wrong class at a higher score (the same box and mask). Ignoring
    classes without keeping one class per query would score the right class as a duplicate."""
    results = _perfect(quirky_gt)
    doubled = []
    for r in results:
        twin = copy.deepcopy(r)
        twin["category_id"], twin["score"] = _other_class(r["category_id"]), r["score"] + 0.04
        doubled += [r, twin]
    deduped = best_class_per_query(doubled)
    assert len(deduped) == len(results)
    assert sorted(d["score"] for d in deduped) == pytest.approx(sorted(r["score"] + 0.04
                                                                       for r in results))
    b = error_breakdown(quirky_gt, doubled, "segm")
    assert b["AP_any_class"] == pytest.approx(1.0)
    assert b["AP"] < 1.0  # the wrong class outranks the right one in each image


def test_table_and_bad_iou_type(quirky_gt):
    text = format_breakdown(breakdown_both(quirky_gt, _perfect(quirky_gt)[::2]))
    assert "classes ignored" in text and "50.0% by box" in text
    with pytest.raises(ValueError, match="iou_type"):
        error_breakdown(quirky_gt, _perfect(quirky_gt), "keypoints")
