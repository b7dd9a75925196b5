"""COCO evaluation, drawn: AP per stage, precision / recall curves, the worst images.

Inputs are COCO ground truth (a ``pycocotools.coco.COCO``), COCO results lists (one per stage, as
:func:`istr_viz.evaluate.predict_stage_results` gives them), the metrics dict of
:func:`istr_viz.evaluate.evaluate_results` and :class:`~istr_viz.predictor.Prediction` objects;
nothing here runs a model.

Arrays:

- :func:`pr_curves`: COCOeval's interpolated precision at its 101 recall points, per IoU threshold
  and category (area "all", 100 detections per image), as :class:`PRCurves`.
- :func:`image_errors`: per image, the detections above a score threshold matched one-to-one to
  the ground truth of their class (IoU >= 0.5): true and false positives, misses, F1;
  :func:`worst_images` sorts them worst first.

Figures:

- :func:`plot_stage_ap`: box and mask AP, AP50 and AP75 against the stage.
- :func:`plot_pr_curves`: a panel per IoU threshold, a line per category and their mean.
- :func:`plot_pr_by_stage`: one line per stage (mean over categories) at one IoU threshold.
- :func:`plot_prediction_gallery`: a panel per image, detections over the image with the ground
  truth dashed (the worst images, for example).
- :func:`plot_mask_ap_ceilings`: the model's mask AP beside what caps it
  (:func:`istr_viz.ceilings.mask_ap_ceilings`), a bar per row.
- :func:`plot_error_breakdown`: AP50 and AP10 with and without classes, and the instances missed
  (:func:`istr_viz.breakdown.breakdown_both`).
"""

from __future__ import annotations

import contextlib
import copy
import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pycocotools.mask as mask_utils
from matplotlib import colormaps
from matplotlib.figure import Figure
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from istr_viz.evaluate import IOU_TYPES
from istr_viz.viz.figures import hide_unused, new_figure
from istr_viz.viz.stages import draw_stage
from istr_viz.viz.trajectories import draw_ground_truth, fit_to_image

AP_KEYS = ("AP", "AP50", "AP75")
IOU_TYPE_NAMES = {"bbox": "box", "segm": "mask"}
IOU_TYPE_TITLES = {t: f"{name} AP" for t, name in IOU_TYPE_NAMES.items()}


# ----------------------------------------------------------------------------- arrays


@dataclass
class PRCurves:
    """Interpolated precision of one results list, as COCOeval accumulates it.

    precision: (T, R, K) float, NaN for a category without ground truth; recall: (R,) the recall
    points 0, 0.01, ..., 1; iou_thresholds: (T,) 0.5, 0.55, ..., 0.95; category_ids: (K,).
    """

    precision: np.ndarray
    recall: np.ndarray
    iou_thresholds: np.ndarray
    category_ids: list[int]
    iou_type: str

    def iou_index(self, iou: float) -> int:
        """Index of the IoU threshold ``iou`` (one of ``iou_thresholds``)."""
        hits = np.flatnonzero(np.isclose(self.iou_thresholds, iou))
        if not len(hits):
            raise ValueError(f"IoU threshold {iou} is not one of "
                             f"{np.round(self.iou_thresholds, 2).tolist()}")
        return int(hits[0])

    def mean(self, iou: float) -> np.ndarray:
        """(R,) precision at IoU ``iou`` averaged over the categories with ground truth (their
        area under the curve is COCO's AP at that IoU); zeros when no category has any."""
        block = self.precision[self.iou_index(iou)]  # (R, K)
        has_gt = ~np.isnan(block).all(axis=0)
        if not has_gt.any():
            return np.zeros(len(self.recall))
        return block[:, has_gt].mean(axis=1)


def _quiet(fn, *args):
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


def pr_curves(gt: COCO, results: Sequence[dict], iou_type: str = "segm",
              image_ids: Sequence[int] | None = None) -> PRCurves:
    """Precision / recall curves of ``results`` against ``gt`` (COCOeval's ``eval["precision"]``
    at area "all" and 100 detections per image). ``image_ids`` restricts the evaluation, as in
    :func:`istr_viz.evaluate.coco_eval`; with no results every curve with ground truth is 0."""
    if iou_type not in IOU_TYPES:
        raise ValueError(f"iou_type must be one of {IOU_TYPES}, got {iou_type!r}")
    cat_ids = sorted(gt.getCatIds())
    params = COCOeval(iouType=iou_type).params
    recall, ious = np.asarray(params.recThrs), np.asarray(params.iouThrs)
    if not results:  # loadRes([]) raises: no detections, precision 0 wherever there is GT
        ids = list(image_ids) if image_ids is not None else []
        has_gt = np.array([bool(gt.getAnnIds(imgIds=ids, catIds=[c], iscrowd=False))
                           for c in cat_ids], dtype=bool)
        precision = np.where(has_gt, 0.0, np.nan)[None, None, :]
        precision = np.broadcast_to(precision, (len(ious), len(recall), len(cat_ids))).copy()
        return PRCurves(precision, recall, ious, cat_ids, iou_type)
    # as coco_eval does: a mask is rated by its own area, so segm results go in without boxes
    drop = "segmentation" if iou_type == "bbox" else "bbox"
    results = [{k: v for k, v in r.items() if k != drop} for r in results]
    ev = COCOeval(gt, _quiet(gt.loadRes, copy.deepcopy(results)), iou_type)
    if image_ids is not None:
        ev.params.imgIds = sorted(image_ids)
    _quiet(ev.evaluate)
    _quiet(ev.accumulate)
    precision = np.asarray(ev.eval["precision"][:, :, :, 0, -1], dtype=float)  # (T, R, K)
    precision[precision < 0] = np.nan  # COCOeval's -1: no ground truth in that category
    return PRCurves(precision, recall, ious, [int(c) for c in ev.params.catIds], iou_type)


@dataclass
class ImageErrors:
    """One image's detections above a score threshold against its ground truth."""

    image_id: int
    true_positives: int
    false_positives: int
    misses: int  # ground-truth instances no detection matched

    @property
    def f1(self) -> float:
        """2 TP / (2 TP + FP + misses); 1.0 for an image without ground truth or detections."""
        denom = 2 * self.true_positives + self.false_positives + self.misses
        return 1.0 if denom == 0 else 2 * self.true_positives / denom

    @property
    def errors(self) -> int:
        return self.false_positives + self.misses

    def describe(self) -> str:
        """One line for a title: ``image 17: 2 TP, 1 FP, 1 missed (F1 0.57)``."""
        return (f"image {self.image_id}: {self.true_positives} TP, {self.false_positives} FP, "
                f"{self.misses} missed (F1 {self.f1:.2f})")


def _ious(gt: COCO, dets: list[dict], anns: list[dict], iou_type: str) -> np.ndarray:
    """(D, G) IoU of detections and annotations; against a crowd annotation, the share of the
    detection inside it (COCO's rule)."""
    if not dets or not anns:
        return np.zeros((len(dets), len(anns)))
    crowd = [int(bool(a.get("iscrowd", 0))) for a in anns]
    if iou_type == "bbox":
        return np.asarray(mask_utils.iou([d["bbox"] for d in dets], [a["bbox"] for a in anns],
                                         crowd), dtype=float).reshape(len(dets), len(anns))
    return np.asarray(mask_utils.iou([gt.annToRLE(d) for d in dets],
                                     [gt.annToRLE(a) for a in anns], crowd),
                      dtype=float).reshape(len(dets), len(anns))


def image_errors(gt: COCO, results: Sequence[dict], score_threshold: float = 0.4,
                 iou_threshold: float = 0.5, iou_type: str = "segm",
                 image_ids: Sequence[int] | None = None) -> list[ImageErrors]:
    """Per image (``image_ids``, default all of ``gt``'s), the results scoring >=
    ``score_threshold`` matched greedily, best score first, to the unmatched ground truth of
    their category with the highest IoU >= ``iou_threshold``. A detection on a crowd region is
    neither right nor wrong (ignored); one matching nothing is a false positive."""
    if iou_type not in IOU_TYPES:
        raise ValueError(f"iou_type must be one of {IOU_TYPES}, got {iou_type!r}")
    ids = list(image_ids) if image_ids is not None else sorted(gt.getImgIds())
    by_image: dict[int, list[dict]] = {i: [] for i in ids}
    for r in results:
        if r["score"] >= score_threshold and r["image_id"] in by_image:
            by_image[r["image_id"]].append(r)
    out = []
    for image_id in ids:
        anns = gt.loadAnns(gt.getAnnIds(imgIds=[image_id]))
        dets = sorted(by_image[image_id], key=lambda r: -r["score"])
        iou = _ious(gt, dets, anns, iou_type)
        crowd = np.array([bool(a.get("iscrowd", 0)) for a in anns], dtype=bool)
        taken = np.zeros(len(anns), dtype=bool)
        tp = fp = 0
        for d, det in enumerate(dets):
            same = np.array([a["category_id"] == det["category_id"] for a in anns], dtype=bool)
            close = same & (iou[d] >= iou_threshold)
            free = close & ~crowd & ~taken
            if free.any():
                taken[np.flatnonzero(free)[np.argmax(iou[d][free])]] = True
                tp += 1
            elif not (close & crowd).any():
                fp += 1
        out.append(ImageErrors(int(image_id), tp, fp, int((~crowd).sum()) - tp))
    return out


def worst_images(errors: Sequence[ImageErrors], num: int = 6) -> list[ImageErrors]:
    """The ``num`` images with the lowest F1 (more errors first among equal F1), perfect ones
    left out."""
    imperfect = [e for e in errors if e.errors > 0]
    return sorted(imperfect, key=lambda e: (e.f1, -e.errors, e.image_id))[:num]


# ----------------------------------------------------------------------------- figures


def plot_stage_ap(metrics: dict, keys: Sequence[str] = AP_KEYS,
                  panel_size: tuple[float, float] = (3.8, 2.8)) -> Figure:
    """Box AP and mask AP (in percent) against the refinement stage: one panel per type, one
    line per key of ``keys`` (``"AP"``, ``"AP50"``, ...). ``metrics``: ``evaluate_results``'
    dict, its ``per_stage`` entries numbered from 1."""
    stages = [e["stage"] for e in metrics["per_stage"]]
    if not stages:
        raise ValueError("metrics hold no stages (metrics['per_stage'] is empty)")
    fig, axes = new_figure(1, len(IOU_TYPES), panel_size)
    for ax, iou_type in zip(axes.flat, IOU_TYPES):
        for i, key in enumerate(keys):
            values = [100 * e[iou_type][key] for e in metrics["per_stage"]]
            ax.plot(stages, values, marker="os^Dv"[i % 5], label=key)
        ax.set_title(IOU_TYPE_TITLES[iou_type], fontsize=9)
        ax.set_xlabel("stage")
        ax.set_ylabel("percent")
        ax.set_xticks(stages)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return fig


def plot_mask_ap_ceilings(ceilings: dict, keys: Sequence[str] = ("AP", "AP75"),
                          panel_size: tuple[float, float] = (6.4, 2.6)) -> Figure:
    """The model's mask AP and its ceilings as horizontal bars (percent), a group per row of
    :data:`istr_viz.ceilings.CEILING_ROWS`, a bar per key of ``keys``; the model's box AP is the
    dashed line. ``ceilings``: the dict of :func:`istr_viz.ceilings.mask_ap_ceilings`."""
    from istr_viz.ceilings import CEILING_ROWS

    missing = [key for key, _ in CEILING_ROWS if key not in ceilings]
    if missing:
        raise ValueError(f"ceilings lack {missing}: pass the dict of mask_ap_ceilings")
    fig, axes = new_figure(1, 1, panel_size)
    ax = axes.flat[0]
    rows = list(reversed(CEILING_ROWS))  # the model on top
    height = 0.8 / len(keys)
    for i, key in enumerate(keys):
        y = np.arange(len(rows)) + (i - (len(keys) - 1) / 2) * height
        values = [100 * ceilings[row][key] for row, _ in rows]
        bars = ax.barh(y, values, height=height, label=f"mask {key}")
        ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=2)
    if "model_box" in ceilings:
        ax.axvline(100 * ceilings["model_box"]["AP"], color="0.3", linestyle="--", linewidth=1,
                   label="the model's box AP")
    ax.set_yticks(np.arange(len(rows)), [label for _, label in rows], fontsize=8)
    ax.set_xlim(0, 110)
    ax.set_xlabel("percent")
    ax.set_title("what caps the mask AP", fontsize=9)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=len(keys) + 1)
    return fig


def plot_error_breakdown(breakdown: dict[str, dict[str, float]],
                         title: str = "where the AP goes",
                         panel_size: tuple[float, float] = (6.4, 2.6)) -> Figure:
    """Where the AP goes, as grouped bars (percent), a group for boxes and one for masks: AP, AP50
    and AP10 as evaluated (solid) and with class errors corrected (light), and the share of
    instances that no detection touches (hatched). ``breakdown``: the dict of
    :func:`istr_viz.breakdown.breakdown_both`."""
    from istr_viz.breakdown import CORRECTED, LOOSE_IOU

    missing = [t for t in ("bbox", "segm") if t not in breakdown]
    if missing:
        raise ValueError(f"breakdown lacks {missing}: pass the dict of breakdown_both")
    bars_of = []
    for i, key in enumerate(("AP", "AP50", "AP10")):
        colour = f"C{i}"  # matplotlib's default colour cycle
        bars_of += [(key, key, colour, 1.0), (f"{key}, classes corrected", key + CORRECTED,
                                              colour, 0.45)]
    groups = ("bbox", "segm")
    width = 0.85 / (len(bars_of) + 1)
    fig, axes = new_figure(1, 1, panel_size)
    ax = axes.flat[0]
    for i, (label, key, colour, alpha) in enumerate(bars_of):
        x = np.arange(len(groups)) + (i - len(bars_of) / 2) * width
        bars = ax.bar(x, [100 * breakdown[g][key] for g in groups], width=width, label=label,
                      color=colour, alpha=alpha)
        ax.bar_label(bars, fmt="%.0f", fontsize=6, padding=1)
    x = np.arange(len(groups)) + (len(bars_of) / 2) * width
    bars = ax.bar(x, [100 * breakdown[g]["missed"] for g in groups], width=width, color="0.85",
                  hatch="//", edgecolor="0.4",
                  label=f"instances missed (no detection at IoU {LOOSE_IOU})")
    ax.bar_label(bars, fmt="%.0f", fontsize=6, padding=1)
    ax.set_xticks(np.arange(len(groups)), ["boxes", "masks"])
    ax.set_ylim(0, 110)
    ax.set_ylabel("percent")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


def _category_names(curves: PRCurves, class_names: dict[int, str] | Sequence[str] | None
                    ) -> list[str]:
    if class_names is None:
        return [str(c) for c in curves.category_ids]
    if isinstance(class_names, dict):
        return [class_names.get(c, str(c)) for c in curves.category_ids]
    if len(class_names) != len(curves.category_ids):
        raise ValueError(f"{len(class_names)} class names for {len(curves.category_ids)} "
                         f"categories {curves.category_ids}: give a dict id -> name")
    return list(class_names)


def _pr_axes(ax, title: str) -> None:
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)


def plot_pr_curves(curves: PRCurves, iou_thresholds: Sequence[float] = (0.5, 0.75),
                   class_names: dict[int, str] | Sequence[str] | None = None,
                   panel_size: tuple[float, float] = (3.6, 3.0)) -> Figure:
    """One panel per IoU threshold: one precision / recall line per category with ground truth
    (labelled with its AP at that IoU) and their mean, black and dashed. ``class_names``: a dict
    category id -> name, or the names in ``curves.category_ids`` order (sorted ids: not
    necessarily a model's class order)."""
    names = _category_names(curves, class_names)
    fig, axes = new_figure(1, len(iou_thresholds), panel_size)
    for ax, iou in zip(axes.flat, iou_thresholds):
        block = curves.precision[curves.iou_index(iou)]  # (R, K)
        for k, name in enumerate(names):
            if np.isnan(block[:, k]).all():
                continue
            ax.plot(curves.recall, block[:, k], lw=1.2,
                    label=f"{name} {100 * block[:, k].mean():.0f}")
        mean = curves.mean(iou)
        ax.plot(curves.recall, mean, "k--", lw=2, label=f"mean {100 * mean.mean():.0f}")
        _pr_axes(ax, f"{IOU_TYPE_NAMES[curves.iou_type]} IoU {iou:.2f}")
        ax.legend(fontsize=6, title="AP", title_fontsize=6)
    return fig


def plot_pr_by_stage(curves_by_stage: Sequence[PRCurves], iou_threshold: float = 0.5,
                     panel_size: tuple[float, float] = (4.0, 3.2)) -> Figure:
    """One panel, one precision / recall line per stage (stage 1 light, the last dark; mean over
    categories) at ``iou_threshold``: how refinement moves the whole curve."""
    if not curves_by_stage:
        raise ValueError("curves_by_stage is empty")
    fig, axes = new_figure(1, 1, panel_size)
    ax = axes[0, 0]
    cmap = colormaps["viridis_r"]
    k = len(curves_by_stage)
    for i, curves in enumerate(curves_by_stage):
        mean = curves.mean(iou_threshold)
        ax.plot(curves.recall, mean, color=cmap(0.15 + 0.85 * i / max(1, k - 1)), lw=1.5,
                label=f"stage {i + 1} AP {100 * mean.mean():.1f}")
    iou_type = IOU_TYPE_NAMES[curves_by_stage[0].iou_type]
    _pr_axes(ax, f"{iou_type} precision / recall by stage, IoU {iou_threshold:.2f}")
    ax.legend(fontsize=6)
    return fig


def plot_prediction_gallery(predictions: Sequence, titles: Sequence[str] | None = None,
                            gt_boxes: Sequence[np.ndarray] | None = None,
                            score_threshold: float = 0.4, stage: int | None = None,
                            ncols: int = 3, panel_size: float = 3.2) -> Figure:
    """A panel per :class:`~istr_viz.predictor.Prediction`: the detections of ``stage`` (default
    the last) scoring >= ``score_threshold`` over the image, in query colours, with the image's
    ground-truth boxes ``gt_boxes[i]`` ((G, 4) pixels) dashed white, titled ``titles[i]``."""
    n = len(predictions)
    if n == 0:
        raise ValueError("no predictions to show")
    for name, seq in (("titles", titles), ("gt_boxes", gt_boxes)):
        if seq is not None and len(seq) != n:
            raise ValueError(f"{len(seq)} {name} for {n} predictions")
    ncols = max(1, min(ncols, n))
    fig, axes = new_figure(-(-n // ncols), ncols, (panel_size, panel_size))
    for i, prediction in enumerate(predictions):
        ax = axes.flat[i]
        draw_stage(ax, prediction, stage, score_threshold)
        if gt_boxes is not None:
            draw_ground_truth(ax, gt_boxes[i])
        if titles is not None:
            ax.set_title(titles[i], fontsize=8)
        fit_to_image(ax, prediction.size)
    hide_unused(axes, n)
    return fig


__all__ = [
    "ImageErrors", "PRCurves", "image_errors", "plot_error_breakdown", "plot_mask_ap_ceilings",
    "plot_pr_by_stage", "plot_pr_curves", "plot_prediction_gallery", "plot_stage_ap", "pr_curves",
    "worst_images",
]
