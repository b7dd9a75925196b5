"""Where a model's AP goes: COCOeval run again with one kind of error forgiven at a time.

A low AP alone does not say whether a model finds the objects but names them wrongly, names them
right but places them loosely, or never finds them. Each row below is the same detections scored
by the same COCOeval as :mod:`istr_viz.evaluate`, with one rule relaxed:

- ``classes ignored``: COCOeval's class-agnostic mode (``useCats = 0``): a detection may match an
  instance of any class. A query's results for several classes share one box and mask, so each
  query keeps only its best-scoring class first (otherwise its other classes would count as
  duplicates). The rise over the plain AP is what class errors cost.
- ``AP10``: the AP at IoU 0.1 (COCO's lowest threshold is 0.5): a detection that only touches its
  instance counts. The rise from AP50 to AP10 is what coarse localisation costs.
- ``missed``: the share of the (non-crowd) instances that no detection overlaps at IoU 0.1, of any
  class and score (class-agnostic recall at 100 detections an image): objects the model never
  found. No relabelling or re-placing of detections would recover them.

This is the spirit of the COCO analysis of Hoiem et al. ("Diagnosing error in object detectors",
ECCV 2012) and of TIDE, reduced to what COCOeval itself can rescore.
"""

from __future__ import annotations

import json

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from istr_viz.evaluate import IOU_TYPES, run_cocoeval

LOOSE_IOU = 0.1
# COCOeval's own thresholds 0.50:0.95, with the loose one in front
_THRESHOLDS = np.concatenate([[LOOSE_IOU], np.linspace(0.5, 0.95, 10)])
BREAKDOWN_KEYS = ("AP", "AP50", "AP10", "AP_any_class", "AP50_any_class", "AP10_any_class",
                  "missed")


def best_class_per_query(results: list[dict]) -> list[dict]:
    """``results`` with, of the entries that share an image and a box (and mask), only the one
    with the highest score: one detection per query, labelled with its best class."""
    best: dict[tuple, dict] = {}
    for r in results:
        shape = r["bbox"] if "bbox" in r else r["segmentation"]
        key = (r["image_id"], json.dumps(shape, sort_keys=True))
        if key not in best or r["score"] > best[key]["score"]:
            best[key] = r
    return list(best.values())


def _mean_valid(values: np.ndarray) -> float:
    values = values[values > -1]
    return float(values.mean()) if values.size else 0.0


def _ap(ev: COCOeval, thresholds: slice) -> float:
    """Mean precision over the given IoU thresholds, all recalls and categories, all areas, the
    largest maxDets: COCOeval's AP for those thresholds."""
    return _mean_valid(ev.eval["precision"][thresholds, :, :, 0, -1])


def error_breakdown(gt: COCO, results: list[dict], iou_type: str,
                    image_ids: list[int] | None = None) -> dict[str, float]:
    """The AP of ``results`` (COCO results lists, as :func:`istr_viz.evaluate.coco_eval` takes)
    with class errors and coarse localisation forgiven, and the share of instances missed.

    Returns ``{"AP", "AP50", "AP10", "AP_any_class", "AP50_any_class", "AP10_any_class",
    "missed"}``, all 0..1 (AP over IoU 0.50:0.95, at 0.5 and at 0.1; ``missed`` see the module
    docstring). No detections: every AP is 0 and ``missed`` 1 (0 without ground truth).
    """
    if iou_type not in IOU_TYPES:
        raise ValueError(f"iou_type must be one of {IOU_TYPES}, got {iou_type!r}")
    if not results:
        has_gt = bool(gt.getAnnIds(imgIds=image_ids or [], iscrowd=False))
        return {**{k: 0.0 for k in BREAKDOWN_KEYS}, "missed": 1.0 if has_gt else 0.0}
    out = {}
    for use_cats, suffix, dets in ((True, "", results),
                                   (False, "_any_class", best_class_per_query(results))):
        ev = run_cocoeval(gt, dets, iou_type, image_ids, _THRESHOLDS, use_cats)
        out["AP" + suffix] = _ap(ev, slice(1, None))
        out["AP50" + suffix] = _ap(ev, slice(1, 2))
        out["AP10" + suffix] = _ap(ev, slice(0, 1))
        if not use_cats:  # recall (T, K, A, M): IoU 0.1, the one pseudo-category, all areas
            recall = ev.eval["recall"][0, :, 0, -1]
            out["missed"] = 1.0 - _mean_valid(recall) if (recall > -1).any() else 0.0
    return {k: out[k] for k in BREAKDOWN_KEYS}


def breakdown_both(gt: COCO, results: list[dict], image_ids: list[int] | None = None
                   ) -> dict[str, dict[str, float]]:
    """:func:`error_breakdown` for boxes and masks: ``{"bbox": {...}, "segm": {...}}``."""
    return {t: error_breakdown(gt, results, t, image_ids) for t in IOU_TYPES}


def format_breakdown(breakdown: dict[str, dict[str, float]]) -> str:
    """The breakdown of :func:`breakdown_both` as a text table (percent), with how to read it."""
    b, s = breakdown["bbox"], breakdown["segm"]
    head = f"{'where the AP goes (final stage)':<34} | {'box AP':>6} {'AP50':>5} {'AP10':>5} | " \
           f"{'mask AP':>7} {'AP50':>5} {'AP10':>5}"
    lines = [head, "-" * len(head)]
    for label, suffix in (("as evaluated", ""), ("classes ignored", "_any_class")):
        lines.append(
            f"{label:<34} | {100 * b['AP' + suffix]:6.1f} {100 * b['AP50' + suffix]:5.1f} "
            f"{100 * b['AP10' + suffix]:5.1f} | {100 * s['AP' + suffix]:7.1f} "
            f"{100 * s['AP50' + suffix]:5.1f} {100 * s['AP10' + suffix]:5.1f}")
    lines.append(f"instances no detection touches (IoU {LOOSE_IOU}, any class): "
                 f"{100 * b['missed']:.1f}% by box, {100 * s['missed']:.1f}% by mask")
    lines.append("read: 'classes ignored' minus 'as evaluated' = what class errors cost; AP10 "
                 "minus AP50 = what coarse placement costs")
    return "\n".join(lines)


__all__ = ["BREAKDOWN_KEYS", "LOOSE_IOU", "best_class_per_query", "breakdown_both",
           "error_breakdown", "format_breakdown"]
