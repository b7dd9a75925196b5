"""check-data: what a COCO data set holds and what is wrong with it, before any training.

``check_dataset`` returns a plain dict (JSON-ready) and ``format_summary`` turns it into the text
that ``istr-viz check-data`` prints. Annotations that cannot be used and images that are missing
or unreadable are listed under ``skipped`` as ``{"file", "entry", "reason"}``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils

from istr_viz.data.coco import CocoAnnotations, load_annotations, load_image
from istr_viz.errors import ConfigError, DataError

OCCLUSION_THRESHOLD = 0.2  # an instance is "occluded" when more than 20% of it is hidden
SMALL_AREA, LARGE_AREA = 32**2, 96**2  # COCO's area thresholds (pixels of the original image)


def check_images(ann: CocoAnnotations, images_dir: str | Path,
                 progress: bool = False) -> list[dict]:
    """Open and fully decode every image of ``ann``; one ``{"file", "entry", "reason"}`` per image
    that is missing, unreadable or of another size than its annotation entry says."""
    from tqdm.auto import tqdm

    images_dir = Path(images_dir)
    problems = []
    for image_id in tqdm(ann.image_ids, desc="check images", disable=not progress):
        info = ann.image_info(image_id)
        path = images_dir / info["file_name"]
        entry = f"image id={image_id}"
        try:
            img = load_image(path)
        except DataError as e:
            problems.append({"file": str(path), "entry": entry, "reason": e.reason})
            continue
        if img.size != (info["width"], info["height"]):
            reason = (f"image is {img.width} x {img.height} pixels but the annotation file says "
                      f"{info['width']} x {info['height']}")
            problems.append({"file": str(path), "entry": entry, "reason": reason})
    return problems


def check_dataset(ann_file: str | Path, images_dir: str | Path, check_image_files: bool = True,
                  progress: bool = False) -> dict:
    """Summary of one data set (annotation file + image folder).

    Keys: ``images``, ``instances`` (valid non-crowd), ``crowd``, ``categories`` ([{id, name,
    instances}] sorted by id, empty ones included), ``skipped``, ``images_without_annotations``
    (no valid non-crowd instance), ``instances_per_image`` {mean, max}, ``occluded_share`` (share
    of instances more than 20% hidden), ``occlusion_method`` ("amodal_area" when every instance
    has an ``amodal_area``, else "bbox-overlap proxy": the pixels of its box covered by other
    instances' masks, over its own area) and ``size_shares`` {small, medium, large} on ``area``.
    Raises :class:`DataError` for a missing file or folder and for a file that is not COCO.
    """
    ann_file, images_dir = Path(ann_file), Path(images_dir)
    if not ann_file.is_file():
        raise DataError("annotation file not found", file=ann_file)
    if not images_dir.is_dir():
        raise DataError("image folder not found", file=images_dir)
    ann = load_annotations(ann_file)
    skipped = list(ann.skipped)
    all_anns = [a for i in ann.image_ids for a in ann.instance_anns(i)]
    use_amodal = bool(all_anns) and all(_amodal(a) is not None for a in all_anns)
    instances, counts_per_image, occluded = [], [], 0
    for image_id in ann.image_ids:
        kept, rles = _nonempty_instances(ann, image_id, skipped)
        instances += kept
        counts_per_image.append(len(kept))
        occluded += _occluded_amodal(kept) if use_amodal else _occluded_proxy(ann, kept, rles)
    crowd = sum(len(ann.crowd_anns(i)) for i in ann.image_ids)
    if check_image_files:
        skipped += check_images(ann, images_dir, progress)
    total = len(instances)
    return {
        "ann_file": str(ann.ann_file),
        "images_dir": str(images_dir),
        "images": len(ann.image_ids),
        "instances": total,
        "crowd": crowd,
        "categories": _category_counts(ann, instances),
        "skipped": skipped,
        "images_without_annotations": sum(c == 0 for c in counts_per_image),
        "instances_per_image": {
            "mean": total / len(ann.image_ids) if ann.image_ids else 0.0,
            "max": max(counts_per_image, default=0),
        },
        "occluded_share": occluded / total if total else 0.0,
        "occlusion_method": "amodal_area" if use_amodal else "bbox-overlap proxy",
        "size_shares": _size_shares([float(a["area"]) for a in instances]),
    }


def _nonempty_instances(ann: CocoAnnotations, image_id: int,
                        skipped: list[dict]) -> tuple[list[dict], list[dict]]:
    """Valid non-crowd annotations of one image whose rasterised mask has pixels, with their RLEs.
    Empty masks (found only by rasterising) are appended to ``skipped``."""
    kept, rles = [], []
    for a in ann.instance_anns(image_id):
        rle = ann.coco.annToRLE(a)
        if mask_utils.area(rle) > 0:
            kept.append(a)
            rles.append(rle)
        else:
            skipped.append({"file": str(ann.ann_file), "entry": f"annotation id={a['id']}",
                            "reason": "empty mask after rasterisation"})
    return kept, rles


def _amodal(ann: dict) -> float | None:
    value = ann.get("amodal_area")
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
    return float(value) if ok else None


def _occluded_amodal(instances: list[dict]) -> int:
    """Instances with 1 - area / amodal_area > 20%."""
    return sum(1 - float(a["area"]) / _amodal(a) > OCCLUSION_THRESHOLD for a in instances)


def _occluded_proxy(ann: CocoAnnotations, anns: list[dict], rles: list[dict]) -> int:
    """Instances of one image whose box holds other instances' mask pixels > 20% of their own
    mask area."""
    if len(anns) < 2:
        return 0
    info = ann.image_info(anns[0]["image_id"])
    boxes = np.array([a["bbox"] for a in anns], dtype=np.float64)  # (G, 4) xywh
    box_rles = mask_utils.frPyObjects(boxes, info["height"], info["width"])
    occluded = 0
    for i, (rle, box_rle) in enumerate(zip(rles, box_rles)):
        others = mask_utils.merge([r for j, r in enumerate(rles) if j != i])
        covered = mask_utils.area(mask_utils.merge([others, box_rle], intersect=True))
        occluded += int(covered > OCCLUSION_THRESHOLD * mask_utils.area(rle))
    return occluded


def _category_counts(ann: CocoAnnotations, instances: list[dict]) -> list[dict]:
    counts = dict.fromkeys(ann.label_to_cat_id, 0)
    for a in instances:
        counts[a["category_id"]] += 1
    return [{"id": c["id"], "name": c["name"], "instances": counts[c["id"]]}
            for c in ann.categories]


def _size_shares(areas: list[float]) -> dict[str, float]:
    """Shares of small (< 32^2), medium and large (>= 96^2) instances."""
    a = np.asarray(areas, dtype=np.float64)
    if a.size == 0:
        return {"small": 0.0, "medium": 0.0, "large": 0.0}
    small, large = float((a < SMALL_AREA).mean()), float((a >= LARGE_AREA).mean())
    return {"small": small, "medium": 1.0 - small - large, "large": large}


def format_summary(summary: dict) -> str:
    """The summary of :func:`check_dataset` as readable multi-line text with a per-class table."""
    s = summary
    per = s["instances_per_image"]
    sizes = s["size_shares"]
    lines = [
        f"annotations: {s.get('ann_file', '?')}",
        f"images:      {s.get('images_dir', '?')}",
        f"{s['images']} images ({s['images_without_annotations']} without annotations), "
        f"{s['instances']} instances, {s['crowd']} crowd regions",
        f"instances per image: mean {per['mean']:.2f}, max {per['max']}",
        f"sizes: small {sizes['small']:.1%}, medium {sizes['medium']:.1%}, "
        f"large {sizes['large']:.1%}",
        f"occluded > 20%: {s['occluded_share']:.1%} ({s['occlusion_method']})",
        "",
        f"{len(s['categories'])} categories:",
    ]
    width = max([len(c["name"]) for c in s["categories"]] + [4])
    lines.append(f"  {'id':>6}  {'name':<{width}}  {'instances':>9}  {'share':>6}")
    for c in s["categories"]:
        share = c["instances"] / s["instances"] if s["instances"] else 0.0
        note = "  (no instances)" if c["instances"] == 0 else ""
        lines.append(f"  {c['id']:>6}  {c['name']:<{width}}  {c['instances']:>9}  "
                     f"{share:>6.1%}{note}")
    lines += ["", f"{len(s['skipped'])} skipped:" if s["skipped"] else "nothing skipped"]
    lines += [f"  {p['file']}: {p['entry']}: {p['reason']}" for p in s["skipped"]]
    return "\n".join(lines)


def most_instances(ann: CocoAnnotations) -> int:
    """The most instances (crowd regions left out) that any image of ``ann`` holds; 0 if none."""
    return max((len(ann.instance_anns(i)) for i in ann.image_ids), default=0)


# the most queries that ``queries_for`` raises a run to: one very crowded image must not make a
# CPU model several times slower (a larger num_queries set by hand is kept)
MAX_RAISED_QUERIES = 100


def queries_for(num_queries: int, queries_per_instance: float, ann: CocoAnnotations) -> int:
    """``ModelConfig.queries_per_instance`` applied: ``num_queries``, raised to
    ceil(queries_per_instance x ``most_instances(ann)``), at most ``MAX_RAISED_QUERIES``, where
    that is more (0: unchanged)."""
    if queries_per_instance <= 0:
        return num_queries
    wanted = min(math.ceil(queries_per_instance * most_instances(ann)), MAX_RAISED_QUERIES)
    return max(num_queries, wanted)


# data.median_object_px's step: x1.25 where the median instance is at most 1 / 1.25 of the
# target. x1.25 alone cost 16% more time an iteration from the shipped model on the second data
# set (s45r125 against s44ft, one pair; the pace of two seeds of the same run differed by 17%)
# and 2.5 mask AP from scratch (s45lr against s44lr). x1.4, which brings the second set's 20 px
# almost exactly to the shipped model's 28, was ahead at 7.5 to 22.5 minutes but level at 30
# (38.7 mask AP in 1,830 iterations against x1.25's 39.4 / 37.9 / 39.0 over three seeds: s46x14,
# session 46, one run), so x1.25 stays the largest step (x1.5 was not run)
SIZE_STEP, MAX_SIZE_FACTOR = 0.25, 1.25


def median_object_px(ann: CocoAnnotations, min_sizes: tuple[int, ...], max_size: int) -> float:
    """The median instance size of ``ann`` (the square root of its area; crowd regions left out),
    in px once its image is resized to the median of ``min_sizes`` on the shorter side, at most
    ``max_size`` on the longer (the training resize); 0 where there is no instance. Empty
    ``min_sizes`` raise :class:`ConfigError`."""
    if not min_sizes:
        raise ConfigError("data.train_min_sizes is empty", entry="data.train_min_sizes")
    middle = float(np.median(min_sizes))
    sizes = []
    for image_id in ann.image_ids:
        info = ann.image_info(image_id)
        short, long = min(info["height"], info["width"]), max(info["height"], info["width"])
        scale = min(middle / max(short, 1), max_size / max(long, 1))
        sizes += [math.sqrt(a["area"]) * scale for a in ann.instance_anns(image_id)]
    return float(np.median(sizes)) if sizes else 0.0


def size_factor(target_px: float, median_px: float) -> float:
    """The factor for every training and test size, given the median instance ``median_px``
    (:func:`median_object_px`): the largest of 1, 1.25, 1.5, ... (at most ``MAX_SIZE_FACTOR``)
    that keeps it at or under ``target_px``; 1 where the rule is off (``target_px`` 0) or there
    is no instance. A median over ``target_px`` / 1.25 is left as it is."""
    if target_px <= 0 or median_px <= 0:
        return 1.0
    steps = math.floor(target_px / median_px / SIZE_STEP + 1e-9) * SIZE_STEP
    return min(max(steps, 1.0), MAX_SIZE_FACTOR)


def fit_warnings(ann: CocoAnnotations, num_queries: int, test_min_size: int,
                 test_max_size: int) -> list[str]:
    """What in a data set a configuration cannot do well, one line each (empty when nothing):
    images with more instances than the model has queries (a set predictor finds at most
    ``num_queries`` objects per image), and images that the test resize shrinks to less than
    half their shorter side (small objects lose most of their pixels)."""
    file = ann.ann_file.name
    counts = np.array([len(ann.instance_anns(i)) for i in ann.image_ids] or [0])
    warnings = []
    over = int((counts > num_queries).sum())
    if over:
        warnings.append(
            f"{file}: {over} of {len(counts)} images have more instances than the model's "
            f"{num_queries} queries (at most {counts.max()}); at most {num_queries} per image can "
            f"be found: set model.num_queries={int(counts.max()) * 2} or more (or "
            f"model.queries_per_instance)")
    shorts = np.array([min(ann.image_info(i)["height"], ann.image_info(i)["width"])
                       for i in ann.image_ids] or [0])
    longs = np.array([max(ann.image_info(i)["height"], ann.image_info(i)["width"])
                      for i in ann.image_ids] or [0])
    scale = np.minimum(test_min_size / np.maximum(shorts, 1), test_max_size / np.maximum(longs, 1))
    shrunk = float((scale < 0.5).mean())
    if shrunk > 0.5:
        median = int(np.median(shorts))
        warnings.append(
            f"{file}: {shrunk:.0%} of the images are shrunk to less than half their size (median "
            f"shorter side {median} px, test size {test_min_size}/{test_max_size}); for small "
            f"objects raise data.test_min_size / test_max_size and data.train_min_sizes / "
            f"train_max_size (slower)")
    return warnings
