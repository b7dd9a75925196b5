"""Validation of COCO instances files, before pycocotools sees them.

File-level problems raise :class:`~istr_viz.errors.DataError` (file + entry). Each annotation is
checked on its own (known image and category, ``iscrowd`` 0/1/true/false, a segmentation that
pycocotools reads correctly, a box with area); :func:`valid_annotations` returns the usable ones,
normalised (``iscrowd`` as 0/1, missing ``area``/``bbox`` computed from the mask), and a
``{"file", "entry", "reason"}`` record for each one skipped.
"""

from __future__ import annotations

import json
import math
import operator
from pathlib import Path
from typing import Any

import numpy as np
import pycocotools.mask as mask_utils

from istr_viz.errors import DataError


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise DataError("annotation file not found", file=path)
    try:
        data = json.loads(path.read_bytes())
    except json.JSONDecodeError as e:
        raise DataError(f"invalid JSON: {e.msg}", path, f"line {e.lineno} column {e.colno}") from e
    except (UnicodeDecodeError, OSError) as e:
        raise DataError(f"cannot read the annotation file: {e}", path) from e
    if not isinstance(data, dict):
        raise DataError("not a COCO instances file: the top level must be a JSON object", path)
    return data


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def index_images(images: list, ann_file: Path) -> dict[int, dict]:
    """``{id: image}`` in file order; raises on a malformed entry or a duplicate id."""
    out: dict[int, dict] = {}
    for i, img in enumerate(images):
        where = f"images[{i}]"
        if not isinstance(img, dict) or not _is_int(img.get("id")):
            raise DataError("an image entry needs an integer 'id'", ann_file, where)
        where = f"image id={img['id']}"
        if not isinstance(img.get("file_name"), str) or not img["file_name"]:
            raise DataError("'file_name' must be a non-empty string", ann_file, where)
        for key in ("height", "width"):
            if not _is_int(img.get(key)) or img[key] <= 0:
                raise DataError(f"'{key}' must be a positive integer", ann_file, where)
        if img["id"] in out:
            raise DataError("duplicate image id", ann_file, where)
        out[img["id"]] = img
    return out


def index_categories(categories: list, ann_file: Path) -> list[dict]:
    """Categories sorted by id; raises on a malformed entry or a duplicate id."""
    seen: set[int] = set()
    for i, cat in enumerate(categories):
        if not isinstance(cat, dict) or not _is_int(cat.get("id")):
            raise DataError("a category needs an integer 'id'", ann_file, f"categories[{i}]")
        if not isinstance(cat.get("name"), str):
            raise DataError("'name' must be a string", ann_file, f"category id={cat['id']}")
        if cat["id"] in seen:
            raise DataError("duplicate category id", ann_file, f"category id={cat['id']}")
        seen.add(cat["id"])
    return sorted(categories, key=lambda c: c["id"])


def valid_annotations(anns: list, images: dict[int, dict], categories: list[dict],
                      ann_file: Path, strict: bool) -> tuple[list[dict], list[dict]]:
    """The usable annotations (``iscrowd`` made 0/1, ``area``/``bbox`` filled) and skip records."""
    cat_ids = {c["id"] for c in categories}
    valid, skipped, seen = [], [], set()
    for i, ann in enumerate(anns):
        has_id = isinstance(ann, dict) and _is_int(ann.get("id"))
        entry = f"annotation id={ann['id']}" if has_id else f"annotations[{i}]"
        if not has_id:
            reason = "an annotation needs an integer 'id'"
        elif ann["id"] in seen:
            reason = "duplicate annotation id"
        else:
            reason = _annotation_problem(ann, images, cat_ids)
        if reason is None:
            seen.add(ann["id"])
            valid.append(ann)
            continue
        if strict:
            raise DataError(reason, ann_file, entry)
        skipped.append({"file": str(ann_file), "entry": entry, "reason": reason})
    return valid, skipped


def _annotation_problem(ann: dict, images: dict[int, dict], cat_ids: set[int]) -> str | None:
    """Why ``ann`` cannot be used, or None (then ``ann`` is normalised in place)."""
    image_id, cat_id = ann.get("image_id"), ann.get("category_id")
    if not _is_int(image_id) or image_id not in images:
        return f"unknown image_id {image_id!r}"
    if not _is_int(cat_id) or cat_id not in cat_ids:
        return f"unknown category_id {cat_id!r}"
    crowd = ann.get("iscrowd", 0)
    if crowd not in (0, 1) or not isinstance(crowd, (int, bool)):
        return f"iscrowd must be 0, 1, true or false, not {crowd!r}"
    h, w = images[image_id]["height"], images[image_id]["width"]
    if "segmentation" not in ann:
        return "missing segmentation"
    problem = _segmentation_problem(ann["segmentation"], h, w)
    if problem is not None:
        return problem
    ann["iscrowd"] = int(crowd)
    if "bbox" not in ann or "area" not in ann:
        rle = _segmentation_rle(ann["segmentation"], h, w)
        ann.setdefault("area", float(mask_utils.area(rle)))
        ann.setdefault("bbox", mask_utils.toBbox(rle).tolist())
    area = ann["area"]
    if not isinstance(area, (int, float)) or isinstance(area, bool) or not area >= 0:
        return f"area must be a non-negative number, not {area!r}"
    return _bbox_problem(ann["bbox"], h, w)


def _segmentation_problem(segm: Any, h: int, w: int) -> str | None:
    if isinstance(segm, list):
        return _polygons_problem(segm, h, w)
    if isinstance(segm, dict):
        return _rle_problem(segm, h, w)
    return "segmentation must be a list of polygons or an RLE object"


def _polygons_problem(polygons: list, h: int, w: int) -> str | None:
    """Checked before pycocotools, which reads a 4-number polygon as a box (or fails)."""
    if not polygons:
        return "segmentation is an empty list of polygons"
    area, x_lo, y_lo, x_hi, y_hi = 0.0, math.inf, math.inf, -math.inf, -math.inf
    for k, poly in enumerate(polygons):
        if not isinstance(poly, list):
            return f"polygon {k} is not a flat list of numbers"
        if len(poly) < 6 or len(poly) % 2:
            return (f"polygon {k} has {len(poly)} coordinates; a polygon needs an even number of "
                    f"at least 6 (3 points)")
        x, y = poly[0::2], poly[1::2]
        try:  # plain Python: faster than numpy for polygons of a few dozen points
            twice_area = sum(map(operator.mul, x, y[1:] + y[:1])) - sum(
                map(operator.mul, y, x[1:] + x[:1]))  # shoelace
            x_lo, x_hi = min(x_lo, *x), max(x_hi, *x)
            y_lo, y_hi = min(y_lo, *y), max(y_hi, *y)
            finite = math.isfinite(twice_area + x_lo + x_hi + y_lo + y_hi)
        except TypeError:
            return f"polygon {k} is not a flat list of numbers"
        if not finite:
            return f"polygon {k} has a coordinate that is not a finite number"
        area += 0.5 * abs(twice_area)
    if area <= 0:
        return "empty mask: the polygons have zero area"
    if x_hi <= 0 or y_hi <= 0 or x_lo >= w or y_lo >= h:
        return "empty mask: the polygons lie outside the image"
    return None


def _rle_problem(rle: dict, h: int, w: int) -> str | None:
    size, counts = rle.get("size"), rle.get("counts")
    if not isinstance(size, list) or size != [h, w]:
        return f"RLE size {size!r} does not match the image's [height, width] [{h}, {w}]"
    if isinstance(counts, str):
        runs = rle_string_counts(counts)
    elif isinstance(counts, list) and all(_is_int(c) for c in counts):
        runs = np.asarray(counts, dtype=np.int64)
    else:
        return "RLE counts must be a string or a list of integers"
    if runs is None or (runs < 0).any() or int(runs.sum()) != h * w:
        return f"RLE counts do not cover the image's {h} x {w} pixels"
    if int(runs[1::2].sum()) == 0:
        return "empty mask: the RLE has no foreground pixel"
    return None


def rle_string_counts(counts: str) -> np.ndarray | None:
    """Run lengths of a COCO compressed RLE string, or None when it is malformed.

    pycocotools decodes a string whose runs do not add up to H x W into uninitialised memory, so
    the runs are checked here first. Format: 5-bit groups (char - 48), bit 0x20 = more groups
    follow, bit 0x10 of the last group = negative; from the 4th value on, each is a difference
    to the value two places before.
    """
    chars = np.frombuffer(counts.encode("ascii", "replace"), np.uint8).astype(np.int64) - 48
    if chars.size == 0:
        return np.zeros(0, np.int64)
    if chars.min() < 0 or chars.max() > 63 or chars[-1] & 0x20:
        return None
    last = (chars & 0x20) == 0  # last group of a value
    ends = np.flatnonzero(last)
    starts = np.concatenate([[0], ends[:-1] + 1])
    num_groups = ends - starts + 1
    if num_groups.max() > 12:  # more than 60 bits
        return None
    value_idx = np.concatenate([[0], np.cumsum(last[:-1])])
    shift = 5 * (np.arange(chars.size) - starts[value_idx])
    values = np.zeros(ends.size, np.int64)
    np.add.at(values, value_idx, (chars & 0x1F) << shift)
    negative = (chars[ends] & 0x10) != 0
    values[negative] -= np.left_shift(1, 5 * num_groups[negative])
    runs = values.copy()
    runs[1::2] = np.cumsum(values[1::2])
    runs[2::2] = np.cumsum(values[2::2])
    return runs


def _segmentation_rle(segm: list | dict, h: int, w: int) -> dict:
    """One compressed RLE of a validated segmentation (same steps as ``COCO.annToRLE``)."""
    if isinstance(segm, list):
        return mask_utils.merge(mask_utils.frPyObjects(segm, h, w))
    if isinstance(segm["counts"], list):
        return mask_utils.frPyObjects(segm, h, w)
    return segm


def _bbox_problem(bbox: Any, h: int, w: int) -> str | None:
    if (not isinstance(bbox, list) or len(bbox) != 4
            or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in bbox)):
        return "bbox must be a list of 4 finite numbers [x, y, width, height]"
    x, y, bw, bh = bbox
    if bw <= 0 or bh <= 0:
        return f"bbox {bbox} has zero or negative width or height"
    if x >= w or y >= h or x + bw <= 0 or y + bh <= 0:
        return f"bbox {bbox} lies outside the {w} x {h} image"
    return None
