"""Where a model's AP goes: the same detections scored again with their class errors corrected,
at a loose IoU, and the instances that no detection touches.

A low AP alone does not say whether a model finds the objects but names them wrongly, names them
right but places them loosely, or never finds them. Every AP here comes from the same COCOeval as
:mod:`istr_viz.evaluate` (per category, then averaged), with one of these changes:

- ``*_classes_corrected``: each query keeps one detection, that of its best-scoring class. If it
  does not already match an instance (or crowd region) of that class at IoU 0.5, it takes the
  class of the one it overlaps most, when that overlap is at least IoU 0.1. As in TIDE (Bolya et
  al., ECCV 2020), which fixes one error type and scores again, the rise over the plain AP is what
  class errors cost: detections on an object but in the wrong class's ranking, and a query's
  extra low-scored classes.
- ``AP10``: the AP at IoU 0.1 (COCO's lowest threshold is 0.5), where a detection that only
  touches its instance counts. AP50 to AP10 is what coarse placement costs; AP (IoU 0.50:0.95) to
  AP50 what fine placement costs.
- ``missed``: the share of the non-crowd instances that no detection overlaps by IoU 0.1 or more,
  whatever its class and score (every detection given; ``predict_stage_results`` gives the top
  100 of an image).
  These the model never found: no relabelling or re-placing of its detections reaches them.

Results are COCO results lists as :func:`istr_viz.evaluate.coco_eval` takes. A query is known by
its ``"query"`` entry (:func:`istr_viz.evaluate.predict_stage_results` writes it), else by its box
and mask: results of a model with a box per class count each class as its own query.
"""

from __future__ import annotations

import json
from collections import defaultdict

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval, Params

from istr_viz.evaluate import IOU_TYPES, run_cocoeval

LOOSE_IOU = 0.1
# COCOeval's own thresholds (0.50:0.95) with the loose one in front
THRESHOLDS = np.concatenate([[LOOSE_IOU], Params(iouType="segm").iouThrs])
CORRECTED = "_classes_corrected"
BREAKDOWN_KEYS = ("AP", "AP50", "AP10", "AP" + CORRECTED, "AP50" + CORRECTED,
                  "AP10" + CORRECTED, "missed")


def _query_key(r: dict) -> tuple:
    if "query" in r:
        return r["image_id"], int(r["query"])
    seg = r.get("segmentation")
    if isinstance(seg, dict) and isinstance(seg.get("counts"), bytes):
        seg = {**seg, "counts": seg["counts"].decode("ascii")}
    return r["image_id"], json.dumps([r.get("bbox"), seg], sort_keys=True)


def best_class_per_query(results: list[dict]) -> list[dict]:
    """Of the results of one query (one ``image_id`` and ``query``, or one box and mask), only the
    best-scoring one: one detection per query, labelled with its best class."""
    best: dict[tuple, dict] = {}
    for r in results:
        key = _query_key(r)
        if key not in best or r["score"] > best[key]["score"]:
            best[key] = r
    return list(best.values())


def _overlaps(gt: COCO, image_id: int, dets: list[dict], anns: list[dict], iou_type: str
              ) -> np.ndarray:
    """(D, G) overlap of the detections ``dets`` with the annotations ``anns`` of one image, as
    COCOeval measures it: IoU, and for a crowd region the share of the detection inside it."""
    if not dets or not anns:
        return np.zeros((len(dets), len(anns)))
    if iou_type == "bbox":
        d, g = [r["bbox"] for r in dets], [a["bbox"] for a in anns]
    else:  # annToRLE reads polygons, uncompressed and compressed RLE at the image's size
        d = [gt.annToRLE({"image_id": image_id, "segmentation": r["segmentation"]}) for r in dets]
        g = [gt.annToRLE(a) for a in anns]
    crowd = [int(bool(a.get("iscrowd", 0))) for a in anns]
    return np.asarray(mask_utils.iou(d, g, crowd), dtype=np.float64).reshape(len(d), len(g))


def _by_image(results: list[dict]) -> dict[int, list[dict]]:
    by_image = defaultdict(list)
    for r in results:
        by_image[r["image_id"]].append(r)
    return by_image


def _instances(gt: COCO, image_id: int) -> list[dict]:
    return [a for a in gt.imgToAnns.get(image_id, []) if not a.get("iscrowd", 0)]


def _corrected_class(category_id: int, overlaps: np.ndarray, anns: list[dict]) -> int:
    """The class a detection of ``category_id`` takes: its own when it already matches a region
    of its class at IoU 0.5 or when nothing overlaps it by :data:`LOOSE_IOU`, else the class of
    the region it overlaps most. ``overlaps`` (G,) against the image's annotations ``anns``."""
    if not len(overlaps) or overlaps.max() < LOOSE_IOU:
        return category_id
    own = [v for v, a in zip(overlaps, anns) if a["category_id"] == category_id]
    if own and max(own) >= 0.5:
        return category_id
    return anns[int(overlaps.argmax())]["category_id"]


def correct_classes(gt: COCO, results: list[dict], iou_type: str) -> list[dict]:
    """One detection per query (:func:`best_class_per_query`), each with its class error
    corrected: a detection that does not match a region of its own class (IoU 0.5) takes the
    class of the annotation it overlaps most by ``iou_type`` overlap, when that is at least
    :data:`LOOSE_IOU` (a crowd region too, which COCOeval then ignores it on)."""
    corrected = []
    for image_id, dets in _by_image(best_class_per_query(results)).items():
        anns = gt.imgToAnns.get(image_id, [])
        overlaps = _overlaps(gt, image_id, dets, anns, iou_type)
        for r, row in zip(dets, overlaps):
            corrected.append(dict(r, category_id=_corrected_class(r["category_id"], row, anns)))
    return corrected


def missed_share(gt: COCO, results: list[dict], iou_type: str,
                 image_ids: list[int] | None = None) -> float:
    """The share of non-crowd instances (of ``image_ids``, default all images) that no result
    overlaps by IoU :data:`LOOSE_IOU` or more, whatever its class or score (0 without any)."""
    image_ids = list(gt.getImgIds()) if image_ids is None else list(image_ids)
    # a query's classes share one box and mask: overlap each query once
    by_image = _by_image(best_class_per_query(results))
    total = missed = 0
    for image_id in image_ids:
        anns = _instances(gt, image_id)
        ious = _overlaps(gt, image_id, by_image.get(image_id, []), anns, iou_type)
        touched = ious.max(axis=0) >= LOOSE_IOU if len(ious) else np.zeros(len(anns), bool)
        total += len(anns)
        missed += int((~touched).sum())
    return missed / total if total else 0.0


def _ap_at(ev: COCOeval | None, thresholds: list[float]) -> float:
    """COCOeval's AP over the given IoU thresholds (all recalls and categories, area "all", the
    largest maxDets), from ``ev.eval["precision"]`` (T, R, K, A, M), -1 where undefined."""
    if ev is None:
        return 0.0
    index = [int(np.flatnonzero(np.isclose(ev.params.iouThrs, t))[0]) for t in thresholds]
    values = ev.eval["precision"][index, :, :, 0, -1]
    values = values[values > -1]
    return float(values.mean()) if values.size else 0.0


def _aps(gt: COCO, results: list[dict], iou_type: str, image_ids: list[int] | None
         ) -> tuple[float, float, float]:
    """AP (IoU 0.50:0.95), AP50 and AP10 of ``results``: one COCOeval."""
    ev = run_cocoeval(gt, results, iou_type, image_ids, iou_thresholds=THRESHOLDS)
    return _ap_at(ev, list(THRESHOLDS[1:])), _ap_at(ev, [0.5]), _ap_at(ev, [LOOSE_IOU])


def error_breakdown(gt: COCO, results: list[dict], iou_type: str,
                    image_ids: list[int] | None = None) -> dict[str, float]:
    """The AP of ``results`` as evaluated and with class errors corrected (AP over IoU 0.50:0.95,
    at 0.5 and at 0.1), and the share of instances missed; see the module docstring.

    Returns ``{"AP", "AP50", "AP10", "AP_classes_corrected", "AP50_classes_corrected",
    "AP10_classes_corrected", "missed"}``, all 0..1. ``image_ids``: score only these images.
    """
    if iou_type not in IOU_TYPES:
        raise ValueError(f"iou_type must be one of {IOU_TYPES}, got {iou_type!r}")
    if image_ids is not None:
        keep = set(image_ids)
        results = [r for r in results if r["image_id"] in keep]
    plain = _aps(gt, results, iou_type, image_ids)
    corrected = _aps(gt, correct_classes(gt, results, iou_type), iou_type, image_ids)
    values = (*plain, *corrected, missed_share(gt, results, iou_type, image_ids))
    return dict(zip(BREAKDOWN_KEYS, values))


def breakdown_both(gt: COCO, results: list[dict], image_ids: list[int] | None = None
                   ) -> dict[str, dict[str, float]]:
    """:func:`error_breakdown` for boxes and masks: ``{"bbox": {...}, "segm": {...}}``."""
    return {t: error_breakdown(gt, results, t, image_ids) for t in IOU_TYPES}


def format_breakdown(breakdown: dict[str, dict[str, float]], title: str = "where the AP goes"
                     ) -> str:
    """The breakdown of :func:`breakdown_both` as a text table (percent), with how to read it."""
    b, s = breakdown["bbox"], breakdown["segm"]
    head = (f"{title:<34} | {'box AP':>6} {'AP50':>5} {'AP10':>5} | "
            f"{'mask AP':>7} {'AP50':>5} {'AP10':>5}")
    lines = [head, "-" * len(head)]
    for label, suffix in (("as evaluated", ""), ("classes corrected", CORRECTED)):
        lines.append(
            f"{label:<34} | {100 * b['AP' + suffix]:6.1f} {100 * b['AP50' + suffix]:5.1f} "
            f"{100 * b['AP10' + suffix]:5.1f} | {100 * s['AP' + suffix]:7.1f} "
            f"{100 * s['AP50' + suffix]:5.1f} {100 * s['AP10' + suffix]:5.1f}")
    lines.append(f"instances that no detection overlaps by IoU {LOOSE_IOU} or more: "
                 f"{100 * b['missed']:.1f}% by box, {100 * s['missed']:.1f}% by mask")
    lines.append("read: 'classes corrected' minus 'as evaluated' = what class errors cost; AP50 "
                 "minus AP = fine placement; AP10 (AP at IoU 0.1) minus AP50 = coarse placement")
    return "\n".join(lines)


__all__ = ["BREAKDOWN_KEYS", "LOOSE_IOU", "THRESHOLDS", "best_class_per_query", "breakdown_both",
           "correct_classes", "error_breakdown", "format_breakdown", "missed_share"]
