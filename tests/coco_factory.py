"""Write small COCO data sets with every quirk real files have, and one bad input per function.

``write_quirky_coco(folder)`` writes ``folder/annotations.json`` + ``folder/images/`` holding:
polygons, a multi-polygon, compressed RLE (``counts`` a string), uncompressed RLE (``counts`` a
list), crowd regions (one ``"iscrowd": true`` RLE, one ``"iscrowd": 1`` polygon), ``iscrowd``
written as ``false`` and ``0``, unsorted non-contiguous category ids [42, 7, 3, 19] (19 has no
instance), image ids 1001, 17, 5, 230, 64, 88 in that order, and images that are grayscale JPEG,
RGBA PNG, palette PNG, RGB JPEG without annotations, 16-bit grayscale PNG and an RGB JPEG stored
rotated with EXIF orientation 6. Sizes are non-square (240 x 160, 130 x 200, ...). Instance areas
span COCO's small, medium and large ranges. Every image is dark (about 30/255) with its instances painted bright
(> 150/255), so a test can check that image and masks line up. Each ``bbox``/``area`` is computed
from the mask that pycocotools rasterises, so boxes and masks agree.

Every ``write_*`` bad-input function writes the quirky set and then breaks one thing, returning a
:class:`BadCase` that says which file and entry a ``DataError`` or a ``skipped`` record must name.
``write_quirky_root(root)`` writes a data set root (``train/`` + ``val/``) for CLI tests.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
from PIL import Image

from istr_viz.data.layout import DatasetPaths

# What the quirky set holds (checked by the tests; keep in sync with write_quirky_coco).
QUIRKY_IMAGE_IDS = [1001, 17, 5, 230, 64, 88]  # file order
QUIRKY_CATEGORIES = {3: "square", 7: "circle", 19: "unused", 42: "triangle"}  # id -> name
QUIRKY_INSTANCES_PER_CATEGORY = {3: 4, 7: 4, 19: 0, 42: 2}
QUIRKY_NUM_INSTANCES = 10  # valid, non-crowd
QUIRKY_NUM_CROWD = 2
QUIRKY_EMPTY_IMAGE_ID = 230  # the image without annotations
QUIRKY_EXIF_IMAGE_ID = 88  # stored rotated; EXIF orientation 6 turns it upright
QUIRKY_OCCLUDED_ANN_ID = 52  # the square in image 5, half hidden by the triangle in front
QUIRKY_INSTANCES_PER_IMAGE = {1001: 3, 17: 2, 5: 2, 230: 0, 64: 1, 88: 2}

BACKGROUND = 30  # grey level of every image's background


@dataclass(frozen=True)
class BadCase:
    """A data set with one problem: the file and entry that the error or skip record names."""

    paths: DatasetPaths
    file: Path  # the file the DataError (or skip record) must name
    entry: str | None  # e.g. "annotation id=903" or "image id=17"; None for file-level problems


@dataclass
class _Instance:
    ann_id: int
    category_id: int
    segmentation: list | dict
    mask: np.ndarray  # (H, W) bool, as pycocotools rasterises ``segmentation``
    iscrowd: bool | int = 0


# ----------------------------------------------------------------------------- masks


def polygon_mask(polygons: list[list[float]], height: int, width: int) -> np.ndarray:
    """(H, W) bool mask of COCO polygons, rasterised by pycocotools."""
    rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    return mask_utils.decode(rle).astype(bool)


def circle_polygon(cx: float, cy: float, r: float, points: int = 32) -> list[float]:
    """A flat COCO polygon [x0, y0, x1, y1, ...] approximating a circle."""
    t = np.linspace(0, 2 * np.pi, points, endpoint=False)
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], 1).round(2).ravel().tolist()


def compressed_rle(mask: np.ndarray) -> dict:
    """COCO compressed RLE of a (H, W) mask: ``counts`` is a string."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO uncompressed RLE of a (H, W) mask: ``counts`` lists run lengths, column-major,
    starting with a (possibly empty) run of zeros."""
    flat = mask.astype(np.uint8).ravel(order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    edges = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(edges).tolist()
    if flat[0] == 1:
        runs = [0, *runs]
    return {"size": list(mask.shape), "counts": runs}


def _disk(cx: float, cy: float, r: float, height: int, width: int) -> np.ndarray:
    y, x = np.mgrid[:height, :width] + 0.5
    return (x - cx) ** 2 + (y - cy) ** 2 <= r * r


def _rect(x0: int, y0: int, x1: int, y1: int, height: int, width: int) -> np.ndarray:
    mask = np.zeros((height, width), bool)
    mask[y0:y1, x0:x1] = True
    return mask


# ----------------------------------------------------------------------------- the quirky images


def _poly(ann_id: int, cat: int, polys: list[list[float]], h: int, w: int,
          crowd: bool | int = False) -> _Instance:
    return _Instance(ann_id, cat, polys, polygon_mask(polys, h, w), crowd)


def _image_1001() -> tuple[dict, list[_Instance]]:
    """Grayscale JPEG 240 x 160: polygon square, two-part triangle, compressed-RLE circle,
    crowd polygon written with ``"iscrowd": 1``."""
    h, w = 160, 240
    circle = _disk(205, 110, 30, h, w)
    return {"id": 1001, "file_name": "gray.jpg", "height": h, "width": w}, [
        _poly(11, 3, [[20, 20, 90, 20, 90, 90, 20, 90]], h, w),
        _poly(12, 42, [[110, 20, 165, 20, 137, 72], [110, 92, 165, 92, 137, 150]], h, w),
        _Instance(13, 7, compressed_rle(circle), circle, False),
        _poly(14, 3, [[20, 110, 90, 110, 90, 150, 20, 150]], h, w, crowd=1),
    ]


def _image_17() -> tuple[dict, list[_Instance]]:
    """RGBA PNG 130 x 200 (portrait): uncompressed-RLE circle, polygon quad, crowd uncompressed
    RLE written with ``"iscrowd": true``."""
    h, w = 200, 130
    circle, crowd = _disk(62, 60, 40, h, w), _rect(110, 0, 130, 110, h, w)
    return {"id": 17, "file_name": "rgba.png", "height": h, "width": w}, [
        _Instance(21, 7, uncompressed_rle(circle), circle, False),
        _poly(22, 3, [[20, 120, 110, 125, 100, 190, 30, 185]], h, w),
        _Instance(23, 7, uncompressed_rle(crowd), crowd, True),
    ]


def _image_5() -> tuple[dict, list[_Instance]]:
    """Palette PNG 150 x 110: a triangle in front of a square; the square's visible part (an RLE)
    is hidden by more than 20% (bbox-overlap proxy), the triangle is not."""
    h, w = 110, 150
    triangle = [[50, 40, 140, 40, 50, 108]]
    front = polygon_mask(triangle, h, w)
    back = _rect(20, 15, 100, 95, h, w) & ~front
    return {"id": 5, "file_name": "palette.png", "height": h, "width": w}, [
        _Instance(QUIRKY_OCCLUDED_ANN_ID, 3, compressed_rle(back), back, 0),
        _poly(51, 42, triangle, h, w),
    ]


def _image_64() -> tuple[dict, list[_Instance]]:
    """16-bit grayscale PNG 128 x 128: one large circle polygon (area >= 96^2)."""
    h, w = 128, 128
    return {"id": 64, "file_name": "gray16.png", "height": h, "width": w}, [
        _poly(641, 7, [circle_polygon(64, 64, 58)], h, w),
    ]


def _image_88() -> tuple[dict, list[_Instance]]:
    """RGB JPEG shown 120 x 80 (stored 80 x 120 with EXIF orientation 6): a circle polygon on
    the left, so a reader that ignores EXIF puts it in the wrong place, and a small square
    (area < 32^2) on the right."""
    h, w = 80, 120
    return {"id": 88, "file_name": "rotated.jpg", "height": h, "width": w}, [
        _poly(881, 7, [circle_polygon(35, 40, 28)], h, w),
        _poly(882, 3, [[85, 10, 105, 10, 105, 30, 85, 30]], h, w),
    ]


def _paint(info: dict, instances: list[_Instance]) -> np.ndarray:
    """(H, W) uint8 grey image: background 30, instance k at 160 + 15 k, crowd at 230."""
    gray = np.full((info["height"], info["width"]), BACKGROUND, np.uint8)
    for k, inst in enumerate(instances):
        gray[inst.mask] = 230 if inst.iscrowd else 160 + 15 * k
    return gray


def _save_image(path: Path, gray: np.ndarray) -> None:
    """Save ``gray`` in the mode its file name calls for."""
    name = path.name
    if name == "gray.jpg":
        Image.fromarray(gray, "L").save(path, quality=95)
    elif name == "rgba.png":
        rgba = np.stack([gray, gray // 2 + 100, gray, np.full_like(gray, 128)], -1)
        rgba[..., 1] = np.where(gray == BACKGROUND, BACKGROUND, rgba[..., 1])
        Image.fromarray(rgba, "RGBA").save(path)
    elif name == "palette.png":
        levels = np.unique(gray)
        img = Image.fromarray(np.searchsorted(levels, gray).astype(np.uint8), "P")
        img.putpalette([int(v) for v in levels for _ in range(3)])
        img.save(path)
    elif name == "gray16.png":
        Image.fromarray(gray.astype(np.uint16) * 257).save(path)
    elif name == "rotated.jpg":
        upright = Image.fromarray(np.stack([gray] * 3, -1), "RGB")
        exif = Image.Exif()
        exif[0x0112] = 6  # orientation: the viewer rotates the stored pixels 90 degrees clockwise
        upright.transpose(Image.Transpose.ROTATE_90).save(path, quality=95, exif=exif)
    else:
        Image.fromarray(np.stack([gray] * 3, -1), "RGB").save(path, quality=95)


def _annotation(info: dict, inst: _Instance, iscrowd_as: object) -> dict:
    rle = mask_utils.encode(np.asfortranarray(inst.mask.astype(np.uint8)))
    return {
        "id": inst.ann_id,
        "image_id": info["id"],
        "category_id": inst.category_id,
        "segmentation": inst.segmentation,
        "area": float(inst.mask.sum()),
        "bbox": [float(v) for v in mask_utils.toBbox(rle)],
        "iscrowd": iscrowd_as,
    }


def quirky_dict_and_images() -> tuple[dict, dict[str, np.ndarray]]:
    """The quirky COCO dict and ``{file_name: (H, W) uint8 grey image}`` (not yet written)."""
    empty = {"id": QUIRKY_EMPTY_IMAGE_ID, "file_name": "empty.jpg", "height": 60, "width": 90}
    parts = [_image_1001(), _image_17(), _image_5(), (empty, []), _image_64(), _image_88()]
    anns, pictures = [], {}
    for n, (info, instances) in enumerate(parts):
        pictures[info["file_name"]] = _paint(info, instances)
        for inst in instances:
            # iscrowd spelled every way real files spell it: 0/1 and false/true
            crowd_value = inst.iscrowd if inst.iscrowd is not False else (False if n % 2 else 0)
            anns.append(_annotation(info, inst, crowd_value))
    data = {
        "info": {"description": "istr_viz quirky test set"},
        "images": [info for info, _ in parts],
        "annotations": anns,
        "categories": [{"id": i, "name": QUIRKY_CATEGORIES[i], "supercategory": "shape"}
                       for i in (42, 7, 3, 19)],  # unsorted on purpose
    }
    return data, pictures


def write_quirky_coco(folder: str | Path) -> DatasetPaths:
    """Write the quirky set to ``folder/annotations.json`` and ``folder/images/``."""
    folder = Path(folder)
    images_dir = folder / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    data, pictures = quirky_dict_and_images()
    for name, gray in pictures.items():
        _save_image(images_dir / name, gray)
    ann_file = folder / "annotations.json"
    ann_file.write_text(json.dumps(data))
    return DatasetPaths(ann_file, images_dir)


def write_quirky_root(root: str | Path) -> Path:
    """A data set root (``root/train`` and ``root/val``, both the quirky set) for CLI tests."""
    root = Path(root)
    for split in ("train", "val"):
        write_quirky_coco(root / split)
    return root


def add_amodal_areas(paths: DatasetPaths, hidden: dict[int, float]) -> None:
    """Give every annotation an ``amodal_area``: ``area / (1 - hidden[id])``, or ``area``."""
    def change(data: dict) -> None:
        for a in data["annotations"]:
            a["amodal_area"] = a["area"] / (1.0 - hidden.get(a["id"], 0.0))

    _edit(paths.ann_file, change)


def _edit(ann_file: Path, change) -> None:
    data = json.loads(ann_file.read_text())
    change(data)
    ann_file.write_text(json.dumps(data))


def with_extra_annotation(folder: str | Path, **fields) -> BadCase:
    """The quirky set plus one annotation (a valid polygon on image 1001 unless overridden)."""
    paths = write_quirky_coco(folder)
    ann = {"id": fields.pop("id"), "image_id": 1001, "category_id": 3, "iscrowd": 0,
           "segmentation": [[150, 100, 170, 100, 170, 120, 150, 120]], "area": 400.0,
           "bbox": [150.0, 100.0, 20.0, 20.0], **fields}
    _edit(paths.ann_file, lambda d: d["annotations"].append(ann))
    return BadCase(paths, paths.ann_file, f"annotation id={ann['id']}")


# ----------------------------------------------------------------------------- bad inputs


def write_missing_annotation_file(folder: str | Path) -> BadCase:
    """Images present, annotation file absent."""
    paths = write_quirky_coco(folder)
    paths.ann_file.unlink()
    return BadCase(paths, paths.ann_file, None)


def write_invalid_json(folder: str | Path) -> BadCase:
    """An annotation file cut off in the middle (the error names line and column)."""
    paths = write_quirky_coco(folder)
    text = json.dumps(json.loads(paths.ann_file.read_text()), indent=1)
    paths.ann_file.write_text(text[: len(text) // 2])
    return BadCase(paths, paths.ann_file, "line")


def write_non_coco_json(folder: str | Path, missing: str = "categories") -> BadCase:
    """Valid JSON that is no COCO instances file: key ``missing`` absent (or, with
    ``missing="list"``, a JSON list at the top)."""
    paths = write_quirky_coco(folder)
    if missing == "list":
        paths.ann_file.write_text(json.dumps([1, 2, 3]))
        return BadCase(paths, paths.ann_file, None)
    _edit(paths.ann_file, lambda d: d.pop(missing))
    return BadCase(paths, paths.ann_file, missing)


def write_duplicate_image_ids(folder: str | Path) -> BadCase:
    """Two image entries with id 17."""
    paths = write_quirky_coco(folder)
    _edit(paths.ann_file, lambda d: d["images"].append({**d["images"][1], "file_name": "x.png"}))
    return BadCase(paths, paths.ann_file, "image id=17")


def write_unknown_image_annotation(folder: str | Path) -> BadCase:
    """An annotation (id 901) on image id 999999, which the file does not list."""
    return with_extra_annotation(folder, id=901, image_id=999999)


def write_unknown_category_annotation(folder: str | Path) -> BadCase:
    """An annotation (id 902) of category id 5, which the file does not list."""
    return with_extra_annotation(folder, id=902, category_id=5)


def write_degenerate_polygon(folder: str | Path) -> BadCase:
    """An annotation (id 903) whose polygon has 4 numbers (pycocotools would read it as a box)."""
    return with_extra_annotation(folder, id=903, segmentation=[[150, 100, 170, 120]])


def write_zero_area_box(folder: str | Path) -> BadCase:
    """An annotation (id 904) with a valid polygon but a bbox of zero width."""
    return with_extra_annotation(folder, id=904, bbox=[150.0, 100.0, 0.0, 20.0])


def write_rle_size_mismatch(folder: str | Path) -> BadCase:
    """An annotation (id 905) whose RLE ``size`` is not its image's [height, width]."""
    rle = compressed_rle(_rect(10, 10, 30, 30, 50, 50))
    return with_extra_annotation(folder, id=905, segmentation=rle)


def write_truncated_image(folder: str | Path) -> BadCase:
    """``images/gray.jpg`` (image id 1001) cut to its first 400 bytes."""
    paths = write_quirky_coco(folder)
    path = paths.images_dir / "gray.jpg"
    path.write_bytes(path.read_bytes()[:400])
    return BadCase(paths, path, "image id=1001")


def write_text_as_jpg(folder: str | Path) -> BadCase:
    """``images/empty.jpg`` (image id 230) replaced by a text file."""
    paths = write_quirky_coco(folder)
    path = paths.images_dir / "empty.jpg"
    path.write_text("this is not a JPEG, just text\n")
    return BadCase(paths, path, f"image id={QUIRKY_EMPTY_IMAGE_ID}")


def write_missing_image(folder: str | Path) -> BadCase:
    """``images/palette.png`` (image id 5) deleted."""
    paths = write_quirky_coco(folder)
    path = paths.images_dir / "palette.png"
    path.unlink()
    return BadCase(paths, path, "image id=5")
