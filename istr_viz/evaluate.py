"""COCO box and mask AP for the final output AND every refinement stage, with pycocotools' COCOeval.

Results files use the data set's own image and category ids. An image, or a whole data set, with
no detections is a normal case (``COCO.loadRes([])`` fails, so it is handled here: AP = 0).
"""

from __future__ import annotations

import contextlib
import copy
import io
from dataclasses import dataclass, field

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval, Params

IOU_TYPES = ("bbox", "segm")
SUMMARY_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


@dataclass
class StageResults:
    """COCO results lists of every stage for a set of images: ``per_stage[k-1]`` is stage k."""

    per_stage: list[list[dict]]
    image_ids: list[int] = field(default_factory=list)

    @property
    def num_stages(self) -> int:
        return len(self.per_stage)


def _quiet(fn, *args, **kwargs):
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args, **kwargs)


def run_cocoeval(gt: COCO, results: list[dict], iou_type: str, image_ids: list[int] | None = None,
                 iou_thresholds: np.ndarray | None = None) -> COCOeval | None:
    """COCOeval of ``results`` against ``gt``, evaluated and accumulated (``None`` when there are
    no results: ``COCO.loadRes([])`` raises). ``iou_thresholds`` replace COCOeval's 0.50:0.95;
    :func:`summarise` then refuses the evaluator (read ``ev.eval`` instead)."""
    if iou_type not in IOU_TYPES:
        raise ValueError(f"iou_type must be one of {IOU_TYPES}, got {iou_type!r}")
    if not results:
        return None
    # loadRes takes a result's area from its "bbox" whenever one is present, and COCOeval sorts
    # detections into the small / medium / large ranges by that area: a mask must be rated by
    # its own area (as the ground truth is), so segm results go in without their boxes.
    drop = "segmentation" if iou_type == "bbox" else "bbox"
    results = [{k: v for k, v in r.items() if k != drop} for r in results]
    dt = _quiet(gt.loadRes, copy.deepcopy(results))
    ev = COCOeval(gt, dt, iou_type)
    if iou_thresholds is not None:
        ev.params.iouThrs = np.asarray(iou_thresholds, dtype=np.float64)
    if image_ids is not None:
        ev.params.imgIds = sorted(image_ids)
    _quiet(ev.evaluate)
    _quiet(ev.accumulate)
    return ev


def summarise(ev: COCOeval | None, gt: COCO) -> tuple[dict, dict[int, float]]:
    """The summary ({"AP", "AP50", "AP75", "APs", "APm", "APl"}, 0..1, COCOeval's own numbers with
    its -1 for "no ground truth" turned into 0) and the AP of each category id that has ground
    truth, of an evaluator from :func:`run_cocoeval` (``None``: no detections, AP 0)."""
    if ev is None:
        return ({k: 0.0 for k in SUMMARY_KEYS},
                {c: 0.0 for c in sorted(gt.getCatIds()) if gt.getAnnIds(catIds=[c])})
    default = Params(iouType=ev.params.iouType).iouThrs
    if len(ev.params.iouThrs) != len(default) or not np.allclose(ev.params.iouThrs, default):
        raise ValueError("summarise needs COCOeval's own IoU thresholds 0.50:0.95, got "
                         f"{ev.params.iouThrs.tolist()}")
    _quiet(ev.summarize)
    summary = {k: max(0.0, float(v)) for k, v in zip(SUMMARY_KEYS, ev.stats[:6])}
    precision = ev.eval["precision"]  # (T, R, K, A, M): IoUs, recalls, categories, areas, maxDets
    per_cat = {}
    for k_idx, cat_id in enumerate(ev.params.catIds):
        p = precision[:, :, k_idx, 0, -1]
        if (p > -1).any():
            per_cat[int(cat_id)] = float(p[p > -1].mean())
    return summary, per_cat


def coco_eval(gt: COCO, results: list[dict], iou_type: str, image_ids: list[int] | None = None
              ) -> tuple[dict, dict[int, float]]:
    """Run COCOeval on ``results`` against ``gt``: :func:`summarise` of :func:`run_cocoeval`."""
    return summarise(run_cocoeval(gt, results, iou_type, image_ids), gt)


def best_f1_threshold(ev: COCOeval | None, iou: float = 0.5) -> dict | None:
    """The score threshold that maximises F1 of the detections at IoU ``iou`` (one of COCOeval's
    thresholds 0.50, 0.55, ..., 0.95), by COCOeval's own matching (per image and category, greedy
    by score, crowd regions and their detections ignored, all object sizes, at most
    ``maxDets[-1]`` detections an image and category).

    Keeping the detections scoring ``>= threshold`` gives the returned precision and recall.
    Returns ``{"threshold", "f1", "precision", "recall", "iou"}``, or ``None`` without detections,
    without ground truth, or when no detection matches (F1 0 everywhere). Scores of a focal and
    of a varifocal class loss sit on different scales, so a display threshold chosen for one
    model is wrong for the other: this one follows the model.
    """
    if ev is None or not ev.evalImgs:
        return None
    found = np.flatnonzero(np.isclose(ev.params.iouThrs, iou))
    if not len(found):
        raise ValueError(f"iou must be one of COCOeval's thresholds "
                         f"{[round(float(v), 2) for v in ev.params.iouThrs]}, got {iou}")
    t = int(found[0])
    scores, hits, num_gt = [], [], 0
    for entry in ev.evalImgs:
        if entry is None or entry["aRng"] != ev.params.areaRng[0]:
            continue
        num_gt += int((~np.asarray(entry["gtIgnore"], dtype=bool)).sum())
        keep = ~np.asarray(entry["dtIgnore"][t], dtype=bool)
        scores.append(np.asarray(entry["dtScores"], dtype=np.float64)[keep])
        hits.append(np.asarray(entry["dtMatches"][t])[keep] > 0)
    scores = np.concatenate(scores) if scores else np.zeros(0)
    if not len(scores) or num_gt == 0:
        return None
    order = np.argsort(-scores, kind="stable")
    scores, tp = scores[order], np.cumsum(np.concatenate(hits)[order])
    kept = np.arange(1, len(scores) + 1)
    precision, recall = tp / kept, tp / num_gt
    f1 = 2 * tp / (kept + num_gt)  # 2PR / (P + R), with no 0 / 0 where nothing matches yet
    # a threshold keeps every detection of its score: only the last of equal scores is a cut
    cuts = np.flatnonzero(np.append(scores[1:] < scores[:-1], True))
    best = int(cuts[np.argmax(f1[cuts])])
    if f1[best] <= 0:
        return None
    return {"threshold": float(scores[best]), "f1": float(f1[best]),
            "precision": float(precision[best]), "recall": float(recall[best]),
            "iou": float(ev.params.iouThrs[t])}


def evaluate_results(gt: COCO, stage_results: StageResults, class_names: dict[int, str] | None = None
                     ) -> dict:
    """Box and mask AP for the final stage, for every stage, and per category (final stage).

    Returns ``{"bbox": {...}, "segm": {...}, "per_stage": [{"stage": 1, "bbox": {...}, "segm": {...}},
    ...], "per_category": [{"id", "name", "bbox_AP", "segm_AP"}, ...], "score_threshold": {...}}``;
    stages numbered from 1. ``score_threshold`` is :func:`best_f1_threshold` of the final stage's
    masks (``None`` when nothing matches): the display threshold that the demo and ``predict``
    default to for this model.
    """
    image_ids = stage_results.image_ids or None
    per_stage, per_cat_final, threshold = [], {}, None
    for k, results in enumerate(stage_results.per_stage, start=1):
        entry = {"stage": k}
        for iou_type in IOU_TYPES:
            ev = run_cocoeval(gt, results, iou_type, image_ids)
            summary, per_cat = summarise(ev, gt)
            entry[iou_type] = summary
            if k == stage_results.num_stages:
                per_cat_final[iou_type] = per_cat
                if iou_type == "segm":
                    threshold = best_f1_threshold(ev)
        per_stage.append(entry)
    names = class_names or {c["id"]: c["name"] for c in gt.loadCats(gt.getCatIds())}
    cat_ids = sorted(set(per_cat_final.get("bbox", {})) | set(per_cat_final.get("segm", {})))
    per_category = [
        {"id": c, "name": names.get(c, str(c)),
         "bbox_AP": per_cat_final.get("bbox", {}).get(c, 0.0),
         "segm_AP": per_cat_final.get("segm", {}).get(c, 0.0)}
        for c in cat_ids
    ]
    final = per_stage[-1] if per_stage else {t: {k: 0.0 for k in SUMMARY_KEYS} for t in IOU_TYPES}
    return {"bbox": final["bbox"], "segm": final["segm"], "per_stage": per_stage,
            "per_category": per_category, "score_threshold": threshold}


def format_stage_table(metrics: dict) -> str:
    """The per-stage AP table as text (AP in percent)."""
    lines = [f"{'stage':>5} | {'box AP':>6} {'AP50':>6} {'AP75':>6} | {'mask AP':>7} {'AP50':>6} {'AP75':>6}"]
    lines.append("-" * len(lines[0]))
    for e in metrics["per_stage"]:
        b, s = e["bbox"], e["segm"]
        lines.append(f"{e['stage']:>5} | {100 * b['AP']:6.1f} {100 * b['AP50']:6.1f} {100 * b['AP75']:6.1f} | "
                     f"{100 * s['AP']:7.1f} {100 * s['AP50']:6.1f} {100 * s['AP75']:6.1f}")
    return "\n".join(lines)


def coco_result(image_id: int, category_id: int, score: float, box_xyxy, rle: dict,
                query: int | None = None) -> dict:
    """One COCO result: ``box_xyxy`` (4,) pixels becomes COCO's xywh ``bbox``; ``rle`` a
    compressed RLE with str counts (:func:`istr_viz.postprocess.mask_to_rle`); ``query``: the
    query that made it, kept as an extra ``"query"`` entry (COCO tools ignore it)."""
    x0, y0, x1, y1 = (float(v) for v in box_xyxy)
    result = {"image_id": image_id, "category_id": category_id, "score": float(score),
              "bbox": [x0, y0, x1 - x0, y1 - y0], "segmentation": dict(rle)}
    if query is not None:
        result["query"] = int(query)
    return result


def ground_truth_as_results(gt: COCO, image_ids: list[int] | None = None) -> list[dict]:
    """The non-crowd ground truth written as COCO results (score 1): a test oracle with AP = 1."""
    results = []
    for ann in gt.loadAnns(gt.getAnnIds(imgIds=image_ids or [], iscrowd=False)):
        rle = gt.annToRLE(ann)
        if isinstance(rle["counts"], bytes):
            rle = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
        results.append({"image_id": ann["image_id"], "category_id": ann["category_id"],
                        "bbox": [float(v) for v in ann["bbox"]], "score": 1.0,
                        "segmentation": rle})
    return results


__all__ = ["StageResults", "coco_eval", "coco_result", "evaluate_results", "format_stage_table",
           "ground_truth_as_results"]


# ----------------------------------------------------------------------------- model evaluation


def predict_stage_results(model, dataset, batch_size: int = 4, device=None, top_k: int = 100,
                          max_images: int | None = None, progress: bool = True,
                          category_ids: list[int] | None = None,
                          amp: bool = False, maskness_power: float = 0.0) -> StageResults:
    """Run ``model`` over a :class:`~istr_viz.data.coco.CocoDataset` (eval transform) and collect
    every stage's top-``top_k`` detections as COCO results at each image's original size (each
    with the ``"query"`` that made it).
    ``device``: where the model's inputs go (default: the device of the model's parameters).
    ``amp``: run the network under autocast where the device supports a low precision
    (``runtime.autocast_dtype``; bf16 on a CPU with AVX512-BF16), as a benchmark times it;
    default fp32. ``maskness_power``: how detections are scored
    (``ModelConfig.maskness_power``, :func:`istr_viz.postprocess.top_detections`)."""
    import torch
    from torch.utils.data import DataLoader, Subset
    from tqdm.auto import tqdm

    from istr_viz.data.coco import collate
    from istr_viz.postprocess import mask_to_rle, paste_masks, rescale_boxes, top_detections
    from istr_viz.runtime import autocast_dtype, default_device

    device = default_device(device) if device is not None else _model_device(model)
    amp_dtype = autocast_dtype(torch.device(device), amp)
    if max_images:
        dataset = Subset(dataset, range(min(max_images, len(dataset))))
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate, shuffle=False)
    was_training = model.training
    model.eval()
    label_to_cat = list(category_ids) if category_ids is not None else _dataset_category_ids(dataset)
    per_stage: list[list[dict]] | None = None
    image_ids = []
    with torch.no_grad():
        for batch in tqdm(loader, desc="evaluate", disable=not progress, dynamic_ncols=True):
            with torch.autocast(torch.device(device).type, dtype=amp_dtype or torch.float32,
                                enabled=amp_dtype is not None):
                out = model(batch.images.to(device), batch.image_sizes.to(device))
            if per_stage is None:
                per_stage = [[] for _ in out.stages]
            for i, target in enumerate(batch.targets):
                image_id = int(target["image_id"])
                image_ids.append(image_id)
                h, w = (int(v) for v in target["size"])
                h0, w0 = (int(v) for v in target["orig_size"])
                for k, st in enumerate(out.stages):
                    boxes = rescale_boxes(st.boxes_xyxy[i].float().cpu(), (h, w), (h0, w0))
                    mask_probs = st.masks[i].float().cpu()
                    det = top_detections(st.logits[i].float().cpu(), boxes, mask_probs, top_k,
                                         maskness_power)
                    # a query's classes share its box and mask: paste and encode each query once
                    queries, owner = torch.unique(det.queries, return_inverse=True)
                    masks = paste_masks(mask_probs[queries], boxes[queries], h0, w0).numpy()
                    rles = [mask_to_rle(m) for m in masks]
                    for j in range(len(det)):
                        per_stage[k].append(coco_result(
                            image_id, label_to_cat[int(det.labels[j])], det.scores[j],
                            det.boxes_xyxy[j].tolist(), rles[int(owner[j])],
                            query=int(det.queries[j])))
    model.train(was_training)
    return StageResults(per_stage or [], image_ids)


def _model_device(model):
    """The device of the model's first parameter (the default device for one without any)."""
    from istr_viz.runtime import default_device

    param = next(iter(model.parameters()), None)
    return param.device if param is not None else default_device(None)


def _dataset_category_ids(dataset) -> list[int]:
    base = dataset.dataset if hasattr(dataset, "indices") else dataset
    return base.annotations.label_to_cat_id


def eval_dataset(data, cfg, category_ids: list[int] | None = None):
    """The data set ``data`` (a ``DatasetPaths``) as a :class:`~istr_viz.data.coco.CocoDataset`
    with the evaluation transform of ``cfg`` (what the model sees at test time).

    ``category_ids``: a model's class index -> category id (its checkpoint's ``category_ids``);
    when given they must be the data set's, else a :class:`~istr_viz.errors.DataError` is raised.
    """
    from istr_viz.data.coco import CocoDataset, load_annotations
    from istr_viz.data.transforms import build_transform
    from istr_viz.engine import transform_configs
    from istr_viz.errors import DataError

    ann = load_annotations(data.ann_file)
    if category_ids is not None and list(category_ids) != ann.label_to_cat_id:
        raise DataError(f"the model's categories {list(category_ids)} are not the data set's "
                        f"{ann.label_to_cat_id}", file=data.ann_file)
    _, test_tf = transform_configs(cfg)
    return CocoDataset(data.ann_file, data.images_dir,
                       transform=build_transform(test_tf, train=False), annotations=ann)


def evaluate_model(model, data, cfg, device=None, max_images: int | None = None,
                   batch_size: int = 4, progress: bool = True, results_out=None,
                   category_ids: list[int] | None = None, ceilings: bool = False,
                   breakdown: bool = False, amp: bool = False) -> dict:
    """Per-stage COCO AP of ``model`` on the data set ``data`` (a ``DatasetPaths``).

    The ground truth is the validated annotation file (crowd regions included, as COCOeval expects).
    ``category_ids``: the model's class index -> category id (its checkpoint's ``category_ids``);
    they must be the data set's, else a :class:`DataError` is raised. ``results_out``: also write
    the final stage's COCO results list there (JSON). ``ceilings``: also report what caps the
    final stage's mask AP (``metrics["ceilings"]``, see :func:`istr_viz.ceilings.mask_ap_ceilings`).
    ``breakdown``: also report what class errors and placement cost the final stage and how many
    instances it misses (``metrics["breakdown"]``, see :mod:`istr_viz.breakdown`).
    ``amp``: the network under autocast (see :func:`predict_stage_results`); default fp32.
    """
    import json
    from pathlib import Path

    dataset = eval_dataset(data, cfg, category_ids)
    ann = dataset.annotations
    results = predict_stage_results(model, dataset, batch_size, device, max_images=max_images,
                                    progress=progress, category_ids=category_ids, amp=amp,
                                    maskness_power=cfg.model.maskness_power)
    names = dict(zip(ann.label_to_cat_id, ann.class_names))
    metrics = evaluate_results(ann.coco, results, names)
    if ceilings:
        from istr_viz.ceilings import mask_ap_ceilings

        metrics["ceilings"] = mask_ap_ceilings(
            ann.coco, results.per_stage[-1] if results.per_stage else [], model.basis,
            results.image_ids)
    if breakdown:
        from istr_viz.breakdown import breakdown_both

        metrics["breakdown"] = breakdown_both(
            ann.coco, results.per_stage[-1] if results.per_stage else [], results.image_ids)
    if results_out is not None:
        Path(results_out).parent.mkdir(parents=True, exist_ok=True)
        Path(results_out).write_text(json.dumps(results.per_stage[-1] if results.per_stage else []))
    return metrics


__all__ += ["eval_dataset", "evaluate_model", "predict_stage_results"]


def retested_checkpoint(ckpt: dict, path, test_size: int | None, data, device=None,
                        progress: bool = True, maskness_power: float | None = None) -> dict:
    """``ckpt`` (as ``load_checkpoint`` reads it) set to test at ``test_size`` px on the shorter
    side (``config.with_test_size``) and to score detections with ``maskness_power``
    (``config.with_maskness_power``), each when given, with its ``metrics`` measured again so on
    the data set ``data`` (a ``DatasetPaths``), so that the metrics a checkpoint carries (what the
    demo shows, the score threshold it picks) always describe the configuration stored with them.
    ``path`` names the checkpoint in error messages."""
    from istr_viz.predictor import model_from_checkpoint

    model, predictor = model_from_checkpoint(ckpt, path, device, test_size=test_size,
                                             maskness_power=maskness_power)
    metrics = evaluate_model(model, data, predictor.config, device=predictor.device,
                             progress=progress, category_ids=predictor.category_ids)
    return {**ckpt, "config": predictor.config.to_dict(), "metrics": metrics}


__all__ += ["retested_checkpoint"]
