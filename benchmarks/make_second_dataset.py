"""Write a second COCO instance-segmentation data set, unlike ``make-shapes``, for generalisation.

    python benchmarks/make_second_dataset.py --out DIR [--train 1200] [--val 150] [--seed 0]
                                             [--difficulty full|plain|plain-look|few-large]

``DIR/train/`` and ``DIR/val/`` each get ``annotations.json`` and ``images/``. Where the built-in
shapes (``istr_viz/data/shapes.py``) are tidy, this set has the quirks of real COCO files:

- Classes heart, crescent, arrow, hexagon, letter (polygon letters and font glyphs, some with
  holes) and donut-pair (two linked rings, two holes), with **non-contiguous, unsorted category
  ids** 11, 4, 27, 90, 58, 33, and a listed category ("kite", id 72) that has no instance.
- **Non-square images** of 200-360 x 150-300 pixels; many small objects (log-uniform radii: about
  65% of the instances are COCO-small); objects cut by the image border; occlusion.
- Backgrounds: scikit-image photos as aspect-true crops with treatments the built-in set lacks
  (posterised, false colour, mirrored mosaic, defocus, channel swap), or procedural Voronoi cells,
  fractal noise, wood rings, polka dots, bricks and blobs; unlabelled clutter (lines, arcs).
- Fills: radial gradient, outlined, photo texture, dots, translucent; drop shadows; vignette,
  gamma, motion blur and sensor noise.
- About 40% **grayscale JPEGs** (mode "L"), the rest RGB JPEG (some with an EXIF orientation tag:
  the stored pixels are rotated, the annotation matches the displayed image) or RGB PNG.
- **Crowd regions**: every 7th image (and no other) gets a cluster of tiny same-class shapes
  annotated once with ``iscrowd: 1`` as an uncompressed RLE (``counts`` a list of ints).
- Segmentations: **polygons** (the drawn polygon itself, which is also what is painted, so the
  mask is exact) for shapes without holes that are inside the image and not occluded; compressed
  RLE of the visible mask for occluded ones, border-cut ones and shapes with holes.
- Image ids are unique scattered integers, annotation ids likewise, annotations are shuffled, and
  every 30th image has no annotation. There is no ``amodal_area`` (real COCO has none).

``--difficulty`` takes the scene apart, to tell what costs a model its AP here (the format quirks,
the classes, the backgrounds and occlusion stay in every variant):

- ``full`` (the default): everything above; the files are those of the script before the option.
- ``plain``: the built-in set's object counts and sizes (1-8 objects an image; radii log-uniform
  from max(4 px, 2.5% of the short side) for every class, as ``make-shapes`` draws them, which for
  donut pairs and glyphs is below this set's own floors of 9 and 7 px on the smaller images) and
  a plain look, plainer than either set's (solid fills; no clutter, shadows or camera effects).
- ``plain-look``: this set's counts and sizes with the plain look.
- ``few-large``: this set's look with the built-in counts and sizes.

Image ``i`` of a split draws from ``default_rng([seed, split, i])``: the same arguments give the
same files, and the val set does not depend on ``--train``. The script does not import istr_viz
(only numpy, scipy, Pillow, pycocotools and scikit-image), so the data owes nothing to the code
it tests.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pycocotools import mask as mask_utils
from scipy.ndimage import binary_dilation, binary_erosion, gaussian_filter, uniform_filter1d

# File order (unsorted on purpose); "kite" is listed but never drawn.
CATEGORIES = (
    {"id": 11, "name": "heart"}, {"id": 4, "name": "crescent"}, {"id": 27, "name": "arrow"},
    {"id": 90, "name": "hexagon"}, {"id": 58, "name": "letter"}, {"id": 33, "name": "donut-pair"},
    {"id": 72, "name": "kite"},
)
DRAWN = ("heart", "crescent", "arrow", "hexagon", "letter", "donut-pair")
CAT_ID = {c["name"]: c["id"] for c in CATEGORIES}
WIDTH_RANGE, HEIGHT_RANGE = (200, 360), (150, 300)
MAX_INSTANCES = 12
MIN_VISIBLE_PX, MIN_VISIBLE_FRACTION = 10, 0.3
GRAY_SHARE, PNG_SHARE, EXIF_SHARE = 0.4, 0.3, 0.1  # PNG and EXIF: shares of the RGB images
CROWD_EVERY, CROWD_AT = 7, 2  # image i has a crowd region when i % 7 == 2
EMPTY_EVERY, EMPTY_AT = 30, 5  # and no annotation at all when i % 30 == 5
PHOTO_BACKGROUND_SHARE = 0.5
JPEG_QUALITY = 90
# scikit-image samples that ship with the package; the first two are not in the built-in set.
PHOTO_NAMES = (
    "stereo_motorcycle", "colorwheel", "astronaut", "brick", "camera", "cell", "chelsea", "clock",
    "coffee", "coins", "grass", "gravel", "hubble_deep_field", "immunohistochemistry", "moon",
    "page", "retina", "rocket", "text",
)
IMAGE_KINDS = ("gray-jpeg", "rgb-png", "rgb-jpeg", "rgb-jpeg-exif")
PHOTO_TREATMENTS = ("posterise", "false-colour", "mosaic", "defocus", "channel-swap", "plain")
PROCEDURAL = ("voronoi", "fractal", "wood", "polka", "bricks", "blobs")
FILLS = ("solid", "radial", "outlined", "photo", "dots", "translucent")
GLYPHS = "ABDPQRS&KMWXY@%"
LETTERS = "LTHEFZ"
_SPLIT_CODES = {"train": 0, "val": 1}
_ID_PRIME = 999_983  # image ids: an affine permutation of the index modulo this prime
_ID_OFFSET = {"train": 1_000_000, "val": 3_000_000}


@dataclass
class _Instance:
    """One drawn object: class name, visible mask (H, W) bool, amodal in-image mask (H, W) bool,
    and its outline (N, 2) xy in COCO pixel coordinates when the mask is exactly that polygon."""

    name: str
    visible: np.ndarray
    amodal: np.ndarray
    polygon: np.ndarray | None


@dataclass(frozen=True)
class Difficulty:
    """What makes a scene hard: objects an image, the smallest radius (pixels, or a share of the
    image's short side), and the look (fills, clutter, drop shadows, camera effects)."""

    max_instances: int = MAX_INSTANCES
    min_radius_px: float = 3.5  # polygon classes; letters' glyphs 7, donut pairs 9
    min_radius_share: float = 0.0  # when > 0: max(4 px, share x short side) for every class
    fills: tuple[str, ...] = FILLS
    clutter: bool = True
    shadows: bool = True
    camera: bool = True


_PLAIN_COUNTS = dict(max_instances=8, min_radius_share=0.025)
_PLAIN_LOOK = dict(fills=("solid",), clutter=False, shadows=False, camera=False)
DIFFICULTIES = {
    "full": Difficulty(),
    "plain": Difficulty(**_PLAIN_COUNTS, **_PLAIN_LOOK),
    "plain-look": Difficulty(**_PLAIN_LOOK),
    "few-large": Difficulty(**_PLAIN_COUNTS),
}


@dataclass
class _Look:
    """Per-image rendering context: the source photos and whether the image ends up grayscale."""

    photos: list[np.ndarray]
    gray: bool
    difficulty: Difficulty = DIFFICULTIES["full"]


# ----------------------------------------------------------------------------- entry point
def make_dataset(out: str | Path, num_train: int = 1200, num_val: int = 150, seed: int = 0,
                 verbose: bool = True, difficulty: str = "full") -> dict:
    """Write ``out/train`` and ``out/val``; returns ``{split: {"images", "annotations",
    "crowd", "empty_images"}}``. Raises ValueError for a negative count or seed, or a
    ``difficulty`` not in :data:`DIFFICULTIES`."""
    for name, value in (("num_train", num_train), ("num_val", num_val), ("seed", seed)):
        if int(value) != value or value < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"difficulty must be one of {', '.join(DIFFICULTIES)}, got {difficulty!r}")
    photos = load_photos()
    summary = {}
    for split, count in (("train", int(num_train)), ("val", int(num_val))):
        start = time.perf_counter()
        summary[split] = _write_split(Path(out) / split, split, count, int(seed), photos,
                                      difficulty)
        if verbose:
            print(f"{split}: {summary[split]} in {time.perf_counter() - start:.1f} s", flush=True)
    return summary


def load_photos() -> list[np.ndarray]:
    """The :data:`PHOTO_NAMES` samples that load offline (both views of a stereo pair), each
    (H, W, 3) uint8 RGB; grayscale ones are repeated over three channels."""
    import skimage.data

    photos = []
    for name in PHOTO_NAMES:
        try:
            loaded = getattr(skimage.data, name)()
        except Exception:  # noqa: BLE001 - a sample that needs a download (pooch) is skipped
            continue
        for img in (loaded[:2] if isinstance(loaded, tuple) else (loaded,)):
            img = np.asarray(img)
            if img.dtype == np.uint8 and img.ndim == 2:
                img = np.repeat(img[:, :, None], 3, axis=2)
            if img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3:
                photos.append(img)
    return photos


def _image_id(split: str, index: int, seed: int) -> int:
    """Unique scattered image id of image ``index`` (< 999,983) of a split.

    An affine map then cubing, both permutations modulo the prime (3 does not divide P - 1)."""
    a = 7919 + 2 * (seed % 1000)  # never a multiple of the prime
    return _ID_OFFSET[split] + pow((a * index + 104_729 + seed) % _ID_PRIME, 3, _ID_PRIME)


def _write_split(split_dir: Path, split: str, count: int, seed: int,
                 photos: list[np.ndarray], difficulty: str = "full") -> dict:
    """Render ``count`` images of one split and write them with ``annotations.json``."""
    images_dir = split_dir / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for index in range(count):
        rng = np.random.default_rng([seed, _SPLIT_CODES[split], index])
        image_id = _image_id(split, index, seed)
        entry, anns = _write_image(rng, index, image_id, images_dir, photos,
                                   DIFFICULTIES[difficulty])
        images.append(entry)
        annotations += anns
    order = np.random.default_rng([seed, _SPLIT_CODES[split], 10**9]).permutation(len(annotations))
    data = {
        "info": {"description": "istr_viz second data set (generalisation checks)",
                 "version": "second-v1", "year": 2024, "split": split, "seed": seed,
                 **({} if difficulty == "full" else {"difficulty": difficulty})},
        "licenses": [{"id": 3, "name": "synthetic", "url": ""}],
        "images": images,
        "annotations": [annotations[i] for i in order],
        "categories": [{**c, "supercategory": "figure"} for c in CATEGORIES],
    }
    (split_dir / "annotations.json").write_text(json.dumps(data, separators=(",", ":")))
    with_instances = {a["image_id"] for a in annotations if not a["iscrowd"]}
    return {"images": count, "annotations": len(annotations),
            "crowd": sum(a["iscrowd"] for a in annotations),
            "empty_images": count - len(with_instances)}


def _write_image(rng: np.random.Generator, index: int, image_id: int, images_dir: Path,
                 photos: list[np.ndarray],
                 difficulty: Difficulty = DIFFICULTIES["full"]) -> tuple[dict, list[dict]]:
    """Render, save and annotate one image: its ``images`` entry and its annotations."""
    w = int(rng.integers(WIDTH_RANGE[0], WIDTH_RANGE[1] + 1))
    h = int(rng.integers(HEIGHT_RANGE[0], HEIGHT_RANGE[1] + 1))
    h -= int(h == w)  # never square
    kind = _image_kind(rng)
    look = _Look(photos, kind == "gray-jpeg", difficulty)
    empty = index % EMPTY_EVERY == EMPTY_AT
    with_crowd = not empty and index % CROWD_EVERY == CROWD_AT
    num = 0 if empty else int(rng.integers(1, difficulty.max_instances + 1))
    pixels, instances, crowd = _render(rng, h, w, look, num, with_crowd)
    file_name = save_image(pixels, kind, f"{image_id:012d}", images_dir)
    entry = {"id": image_id, "file_name": file_name, "height": h, "width": w, "license": 3,
             "date_captured": f"2024-{1 + index % 12:02d}-{1 + index % 28:02d} 12:00:00"}
    anns = [_annotation(image_id * 100 + k, image_id, inst) for k, inst in enumerate(instances)]
    if crowd is not None:
        anns.append(_crowd_annotation(image_id * 100 + 99, image_id, *crowd))
    return entry, anns


def _image_kind(rng: np.random.Generator) -> str:
    """One of :data:`IMAGE_KINDS`: 40% grayscale JPEG; of the rest 30% PNG, and 10% of the
    JPEGs EXIF-rotated."""
    if rng.random() < GRAY_SHARE:
        return "gray-jpeg"
    if rng.random() < PNG_SHARE:
        return "rgb-png"
    return "rgb-jpeg-exif" if rng.random() < EXIF_SHARE else "rgb-jpeg"


def save_image(pixels: np.ndarray, kind: str, stem: str, images_dir: Path) -> str:
    """Save (H, W, 3) uint8 as one of :data:`IMAGE_KINDS`; returns the file name.

    ``rgb-jpeg-exif`` stores the pixels turned 90 degrees counter-clockwise with EXIF orientation
    6, so a reader that applies the orientation (as ``istr_viz`` does) sees ``pixels``."""
    img = Image.fromarray(pixels)
    if kind == "gray-jpeg":
        img.convert("L").save(images_dir / f"{stem}.jpg", quality=JPEG_QUALITY)
        return f"{stem}.jpg"
    if kind == "rgb-png":
        img.save(images_dir / f"{stem}.png", compress_level=1)
        return f"{stem}.png"
    exif = Image.Exif()
    if kind == "rgb-jpeg-exif":
        img = img.transpose(Image.Transpose.ROTATE_90)
        exif[0x0112] = 6  # viewers turn the stored pixels 90 degrees clockwise
    img.save(images_dir / f"{stem}.jpg", quality=JPEG_QUALITY, exif=exif)
    return f"{stem}.jpg"


# ----------------------------------------------------------------------------- annotations
def _rle_fields(mask: np.ndarray) -> tuple[dict, float, list[float]]:
    """Compressed RLE (JSON-ready), area and xywh box of a (H, W) bool mask."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    bbox = [float(v) for v in mask_utils.toBbox(rle)]
    segm = {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}
    return segm, float(mask_utils.area(rle)), bbox


def _annotation(ann_id: int, image_id: int, inst: _Instance) -> dict:
    """Polygon annotation when ``inst`` is exactly its polygon and unoccluded, else RLE."""
    exact = inst.polygon is not None and np.array_equal(inst.visible, inst.amodal)
    if exact:
        flat = [round(float(v), 2) for v in inst.polygon.ravel()]
        h, w = inst.visible.shape
        rle = mask_utils.merge(mask_utils.frPyObjects([flat], h, w))
        xy = np.asarray(flat).reshape(-1, 2)
        lo, hi = xy.min(axis=0), xy.max(axis=0)
        segm: list | dict = [flat]
        area, bbox = float(mask_utils.area(rle)), [float(lo[0]), float(lo[1]),
                                                    float(hi[0] - lo[0]), float(hi[1] - lo[1])]
    else:
        segm, area, bbox = _rle_fields(inst.visible)
    return {"id": ann_id, "image_id": image_id, "category_id": CAT_ID[inst.name],
            "segmentation": segm, "area": area, "bbox": [round(v, 2) for v in bbox],
            "iscrowd": 0}


def uncompressed_rle(mask: np.ndarray) -> list[int]:
    """COCO uncompressed RLE counts of a (H, W) bool mask: column-major runs, zeros first."""
    flat = mask.ravel(order="F").astype(np.int8)
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    return ([0] + runs) if flat[0] else runs


def _crowd_annotation(ann_id: int, image_id: int, name: str, region: np.ndarray) -> dict:
    """``iscrowd: 1`` annotation of a (H, W) bool region with uncompressed RLE counts."""
    _, area, bbox = _rle_fields(region)
    segm = {"size": list(region.shape), "counts": uncompressed_rle(region)}
    return {"id": ann_id, "image_id": image_id, "category_id": CAT_ID[name],
            "segmentation": segm, "area": area, "bbox": bbox, "iscrowd": 1}


# ----------------------------------------------------------------------------- scene
def _render(rng: np.random.Generator, h: int, w: int, look: _Look, num: int,
            with_crowd: bool) -> tuple[np.ndarray, list[_Instance], tuple[str, np.ndarray] | None]:
    """Background, clutter, an optional crowd cluster, then up to ``num`` objects in z-order.

    Returns the image (H, W, 3) uint8, the instances bottom to top (visible masks pairwise
    disjoint) and ``(class name, crowd region (H, W) bool)`` or None.
    """
    canvas = _background(rng, h, w, look)
    if look.difficulty.clutter:
        _clutter(rng, canvas)
    crowd = _crowd(rng, canvas, look) if with_crowd else None
    instances: list[_Instance] = []
    for _ in range(3 * num):
        if len(instances) == num:
            break
        name = DRAWN[int(rng.integers(len(DRAWN)))]
        mask, polygon = _shape(rng, name, h, w, look.difficulty)
        amodal = int(mask.sum())
        if amodal < MIN_VISIBLE_PX or any(_too_hidden(i, mask) for i in instances):
            continue
        for inst in instances:
            inst.visible &= ~mask
        _paint(rng, canvas, mask, look)
        instances.append(_Instance(name, mask.copy(), mask, polygon))
    if crowd is not None:  # objects painted over the cluster are cut out of its region
        region = crowd[1].copy()
        for inst in instances:
            region &= ~inst.amodal
        crowd = (crowd[0], region) if region.any() else None
    if look.difficulty.camera:
        canvas = _finish(rng, canvas)
    return (np.clip(canvas, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8), instances, crowd


def _too_hidden(inst: _Instance, cover: np.ndarray) -> bool:
    """Whether ``inst`` would keep too few visible pixels under ``cover`` (H, W) bool."""
    left = int(np.count_nonzero(inst.visible & ~cover))
    return left < max(MIN_VISIBLE_PX, MIN_VISIBLE_FRACTION * int(inst.amodal.sum()))


def _crowd(rng: np.random.Generator, canvas: np.ndarray,
           look: _Look) -> tuple[str, np.ndarray]:
    """Paint 6-20 tiny shapes of one class in a cluster; returns the class and the region
    (H, W) bool they cover (their union, dilated by 2 px)."""
    h, w = canvas.shape[:2]
    name = DRAWN[int(rng.integers(4))]  # the polygon classes: tiny glyphs and rings are noise
    centre = rng.uniform([0.2 * w, 0.2 * h], [0.8 * w, 0.8 * h])
    spread = rng.uniform(12.0, 0.18 * min(h, w))
    colour = _contrasting(rng, canvas.reshape(-1, 3).mean(axis=0), look.gray)
    union = np.zeros((h, w), dtype=bool)
    for _ in range(int(rng.integers(6, 21))):
        outline = _unit_outline(rng, name)
        xy = _pose(rng, outline, rng.uniform(2.5, 5.0), centre + rng.normal(0.0, spread, 2))
        mask = _polygon_mask(xy, h, w)
        jitter = np.clip(colour + rng.normal(0.0, 0.05, 3), 0.0, 1.0).astype(np.float32)
        canvas[mask] = jitter
        union |= mask
    return name, binary_dilation(union, iterations=2)


# ----------------------------------------------------------------------------- shapes
def _circle(count: int, radius: float, centre: tuple[float, float] = (0.0, 0.0),
            start: float = 0.0, stop: float = 2.0 * np.pi) -> np.ndarray:
    """(count, 2) xy points on a circle arc from angle ``start`` to ``stop`` (end included)."""
    t = np.linspace(start, stop, count)
    return np.stack([centre[0] + radius * np.cos(t), centre[1] + radius * np.sin(t)], axis=1)


def _heart() -> np.ndarray:
    """(48, 2) heart outline, about [-1, 1]^2, point down in image coordinates."""
    t = np.linspace(0.0, 2.0 * np.pi, 48, endpoint=False)
    x = np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)) / 16.0
    return np.stack([x, y + 0.1], axis=1)


def _crescent(rng: np.random.Generator) -> np.ndarray:
    """Outline of the unit disc minus a disc of radius r2 centred at (d, 0)."""
    d, r2 = rng.uniform(0.35, 0.6), rng.uniform(0.75, 0.95)
    x = (1.0 + d * d - r2 * r2) / (2.0 * d)  # the two circles cross at (x, +-y)
    y = np.sqrt(max(1.0 - x * x, 1e-6))
    phi, psi = np.arctan2(y, x), np.arctan2(y, x - d)
    outer = _circle(32, 1.0, start=phi, stop=2.0 * np.pi - phi)
    inner = _circle(24, r2, (d, 0.0), start=2.0 * np.pi - psi, stop=psi)[1:-1]
    return np.concatenate([outer, inner])


def _arrow(rng: np.random.Generator) -> np.ndarray:
    """7-point arrow along +x: shaft half-width s, head half-width hw, head starting at x0."""
    s, hw, x0 = rng.uniform(0.15, 0.3), rng.uniform(0.45, 0.7), rng.uniform(0.1, 0.5)
    return np.array([[-1, -s], [x0, -s], [x0, -hw], [1, 0], [x0, hw], [x0, s], [-1, s]], float)


def _letter(char: str, stroke: float) -> np.ndarray:
    """Rectilinear outline of one of :data:`LETTERS` in [-0.7, 0.7] x [-1, 1]."""
    a, s, m = 0.7, stroke, stroke / 2
    outlines = {
        "L": [(-a, -1), (-a + s, -1), (-a + s, 1 - s), (a, 1 - s), (a, 1), (-a, 1)],
        "T": [(-a, -1), (a, -1), (a, -1 + s), (m, -1 + s), (m, 1), (-m, 1), (-m, -1 + s),
              (-a, -1 + s)],
        "H": [(-a, -1), (-a + s, -1), (-a + s, -m), (a - s, -m), (a - s, -1), (a, -1), (a, 1),
              (a - s, 1), (a - s, m), (-a + s, m), (-a + s, 1), (-a, 1)],
        "E": [(-a, -1), (a, -1), (a, -1 + s), (-a + s, -1 + s), (-a + s, -m), (a * 0.6, -m),
              (a * 0.6, m), (-a + s, m), (-a + s, 1 - s), (a, 1 - s), (a, 1), (-a, 1)],
        "F": [(-a, -1), (a, -1), (a, -1 + s), (-a + s, -1 + s), (-a + s, -m), (a * 0.6, -m),
              (a * 0.6, m), (-a + s, m), (-a + s, 1), (-a, 1)],
        "Z": [(-a, -1), (a, -1), (a, -1 + s), (-a + 1.6 * s, 1 - s), (a, 1 - s), (a, 1),
              (-a, 1), (-a, 1 - s), (a - 1.6 * s, -1 + s), (-a, -1 + s)],
    }
    return np.asarray(outlines[char], dtype=float)


def _unit_outline(rng: np.random.Generator, name: str) -> np.ndarray:
    """Outline (N, 2) xy about [-1, 1]^2 of a class without holes."""
    if name == "heart":
        return _heart()
    if name == "crescent":
        return _crescent(rng)
    if name == "arrow":
        return _arrow(rng)
    if name == "hexagon":
        return _circle(7, 1.0, start=rng.uniform(0, np.pi))[:-1] * rng.uniform(0.9, 1.1, (6, 1))
    if name == "letter":
        return _letter(LETTERS[int(rng.integers(len(LETTERS)))], rng.uniform(0.3, 0.45))
    raise ValueError(f"{name!r} has no polygon outline")


def _pose(rng: np.random.Generator, outline: np.ndarray, radius: float,
          centre: np.ndarray) -> np.ndarray:
    """``outline`` (N, 2) stretched (aspect), rotated, scaled by ``radius`` and moved to
    ``centre`` (2,) xy."""
    aspect = np.exp(rng.uniform(-0.35, 0.35))
    theta = rng.uniform(0.0, 2.0 * np.pi)
    rotation = np.array([[np.cos(theta), np.sin(theta)], [-np.sin(theta), np.cos(theta)]])
    linear = np.diag([np.sqrt(aspect), 1.0 / np.sqrt(aspect)]) @ rotation * radius
    return outline @ linear + centre


def _polygon_mask(xy: np.ndarray, h: int, w: int) -> np.ndarray:
    """(H, W) bool raster of a polygon (N, 2) in COCO pixel coordinates, by pycocotools (so a
    polygon annotation decodes to exactly the painted pixels)."""
    flat = [round(float(v), 2) for v in xy.ravel()]
    return mask_utils.decode(mask_utils.frPyObjects([flat], h, w))[:, :, 0].astype(bool)


def _radius(rng: np.random.Generator, h: int, w: int, low: float) -> float:
    """Object radius in pixels, log-uniform between ``low`` and 0.5 min(H, W): about 60% of the
    drawn objects are COCO-small (< 32^2 px), about 65% once occlusion is counted."""
    return float(np.exp(rng.uniform(np.log(low), np.log(0.5 * min(h, w)))))


def _shape(rng: np.random.Generator, name: str, h: int, w: int,
           difficulty: Difficulty = DIFFICULTIES["full"]) -> tuple[np.ndarray, np.ndarray | None]:
    """A placed object: its (H, W) bool mask and, when the mask is exactly a polygon inside the
    image, that polygon (N, 2) xy (else None)."""
    centre = rng.uniform([0.0, 0.0], [w, h])
    share = difficulty.min_radius_share
    floor = max(4.0, share * min(h, w)) if share > 0 else None
    if name == "donut-pair":
        return _donut_pair(rng, _radius(rng, h, w, floor or 9.0), centre, h, w), None
    if name == "letter" and rng.random() < 0.4:
        return _glyph(rng, _radius(rng, h, w, floor or 7.0), centre, h, w), None
    low = floor or difficulty.min_radius_px
    xy = _pose(rng, _unit_outline(rng, name), _radius(rng, h, w, low), centre)
    inside = bool((xy.min(axis=0) >= 0).all() and xy[:, 0].max() <= w and xy[:, 1].max() <= h)
    return _polygon_mask(xy, h, w), (np.round(xy, 2) if inside else None)


def _donut_pair(rng: np.random.Generator, radius: float, centre: np.ndarray, h: int,
                w: int) -> np.ndarray:
    """Two overlapping rings side by side (two holes), as a (H, W) bool mask."""
    theta = rng.uniform(0.0, np.pi)
    offset = 0.45 * radius * np.array([np.cos(theta), np.sin(theta)])
    outer, inner = 0.55 * radius, rng.uniform(0.22, 0.3) * radius
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    for sign in (1.0, -1.0):
        x, y = centre + sign * offset
        draw.ellipse([x - outer, y - outer, x + outer, y + outer], fill=1)
    for sign in (1.0, -1.0):
        x, y = centre + sign * offset
        draw.ellipse([x - inner, y - inner, x + inner, y + inner], fill=0)
    return np.asarray(canvas, dtype=bool)


def _glyph(rng: np.random.Generator, radius: float, centre: np.ndarray, h: int,
           w: int) -> np.ndarray:
    """A character of PIL's default font (many have holes), rotated, as a (H, W) bool mask."""
    side = int(4 * radius) + 4
    tile = Image.new("L", (side, side), 0)
    font = ImageFont.load_default(size=max(8, int(2.2 * radius)))
    char = GLYPHS[int(rng.integers(len(GLYPHS)))]
    ImageDraw.Draw(tile).text((side / 2, side / 2), char, font=font, anchor="mm", fill=255)
    tile = tile.rotate(rng.uniform(0.0, 360.0), resample=Image.Resampling.BILINEAR)
    full = Image.new("L", (w, h), 0)
    full.paste(tile, (int(centre[0]) - side // 2, int(centre[1]) - side // 2))
    return np.asarray(full) >= 128


# ----------------------------------------------------------------------------- colours, fills
def _luma(rgb: np.ndarray) -> np.ndarray:
    """Luminance (...,) of RGB (..., 3) in [0, 1] (ITU-R 601, as PIL's convert("L"))."""
    return rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _contrasting(rng: np.random.Generator, under: np.ndarray, gray: bool) -> np.ndarray:
    """A colour (3,) that stands out from ``under`` (3,): by luminance (>= 0.25) on grayscale
    images, by RGB distance (>= 0.35) on colour ones."""
    for _ in range(10):
        colour = rng.random(3).astype(np.float32)
        far = (abs(float(_luma(colour) - _luma(under))) >= 0.25 if gray
               else float(np.linalg.norm(colour - under)) >= 0.35)
        if far:
            return colour
    return np.full(3, 0.05 if _luma(under) > 0.5 else 0.95, dtype=np.float32)


def _shadow(rng: np.random.Generator, canvas: np.ndarray, mask: np.ndarray) -> None:
    """Darken ``canvas`` (H, W, 3) under a blurred, shifted copy of ``mask``, in place."""
    dy, dx = (int(v) for v in rng.integers(1, 5, 2))
    shifted = np.zeros(mask.shape, dtype=np.float32)
    shifted[dy:, dx:] = mask[:-dy, :-dx]
    shade = gaussian_filter(shifted, rng.uniform(1.0, 2.5)) * np.float32(rng.uniform(0.3, 0.5))
    canvas *= (1.0 - shade)[:, :, None]


def _paint(rng: np.random.Generator, canvas: np.ndarray, mask: np.ndarray, look: _Look) -> None:
    """Fill ``mask`` (H, W) bool of ``canvas`` (H, W, 3) in one of :data:`FILLS`, in place,
    sometimes after a drop shadow."""
    if rng.random() < 0.3 and look.difficulty.shadows:
        _shadow(rng, canvas, mask)
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    inside, region = mask[box], canvas[box]
    colour = _contrasting(rng, region[inside].mean(axis=0), look.gray)
    other = _contrasting(rng, colour, look.gray) * 0.5 + colour * 0.5
    fills = look.difficulty.fills
    style = fills[int(rng.integers(len(fills)))]
    h, w = inside.shape
    if style == "radial":
        ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
        r = np.hypot((ys - h / 2) / max(h / 2, 1), (xs - w / 2) / max(w / 2, 1))
        fill = colour + np.clip(r, 0, 1)[:, :, None] * (other - colour)
    elif style == "outlined":
        fill = np.broadcast_to(colour, (h, w, 3)).copy()
        edge = inside & ~binary_erosion(inside, iterations=int(rng.integers(1, 3)))
        fill[edge] = _contrasting(rng, colour, look.gray)
    elif style == "photo" and look.photos:  # a photo patch tinted towards the colour
        fill = 0.5 * _photo_crop(rng, h, w, look.photos) + 0.5 * colour
    elif style == "dots":
        ys, xs = np.mgrid[0:h, 0:w]
        period = int(rng.integers(3, 7))
        dots = ((ys % period) < period // 2) & ((xs % period) < period // 2)
        fill = np.where(dots[:, :, None], other, colour)
    elif style == "translucent":
        fill = 0.8 * colour + 0.2 * region
    else:
        fill = np.broadcast_to(colour, (h, w, 3))
    region[inside] = fill[inside]


# ----------------------------------------------------------------------------- backgrounds
def _background(rng: np.random.Generator, h: int, w: int, look: _Look) -> np.ndarray:
    """Background (H, W, 3) float32 in about [0, 1]: a treated photo crop or a pattern."""
    if look.photos and rng.random() < PHOTO_BACKGROUND_SHARE:
        return _photo_background(rng, h, w, look.photos)
    kind = PROCEDURAL[int(rng.integers(len(PROCEDURAL)))]
    c0, c1 = rng.random(3).astype(np.float32), rng.random(3).astype(np.float32)
    if kind == "voronoi":
        return _voronoi(rng, h, w)
    if kind == "fractal":
        t = _fractal(rng, h, w)
    elif kind == "wood":
        t = _wood(rng, h, w)
    elif kind == "polka":
        t = _polka(rng, h, w)
    elif kind == "bricks":
        t = _bricks(rng, h, w)
    else:
        t = _blobs(rng, h, w)
    return (c0 + t[:, :, None] * (c1 - c0)).astype(np.float32)


def _photo_crop(rng: np.random.Generator, h: int, w: int, photos: list[np.ndarray]) -> np.ndarray:
    """A crop of a random photo with the image's aspect ratio, resized to (H, W, 3) float32."""
    img = photos[int(rng.integers(len(photos)))]
    ph, pw = img.shape[:2]
    scale = rng.uniform(0.35, 1.0) * min(ph / h, pw / w)
    ch, cw = max(8, int(h * scale)), max(8, int(w * scale))
    y0, x0 = int(rng.integers(ph - ch + 1)), int(rng.integers(pw - cw + 1))
    crop = Image.fromarray(img[y0:y0 + ch, x0:x0 + cw]).resize((w, h), Image.Resampling.BILINEAR)
    return np.asarray(crop, dtype=np.float32) / 255.0


def _photo_background(rng: np.random.Generator, h: int, w: int,
                      photos: list[np.ndarray]) -> np.ndarray:
    """A photo crop with one of :data:`PHOTO_TREATMENTS`, (H, W, 3) float32."""
    treatment = PHOTO_TREATMENTS[int(rng.integers(len(PHOTO_TREATMENTS)))]
    if treatment == "mosaic":  # four crops, mirrored so the seams are less obvious
        hh, hw = (h + 1) // 2, (w + 1) // 2
        tiles = [_photo_crop(rng, hh, hw, photos) for _ in range(4)]
        top = np.concatenate([tiles[0], tiles[1][:, ::-1]], axis=1)
        bottom = np.concatenate([tiles[2][::-1], tiles[3][::-1, ::-1]], axis=1)
        return np.concatenate([top, bottom], axis=0)[:h, :w]
    out = _photo_crop(rng, h, w, photos)
    if treatment == "posterise":
        levels = int(rng.integers(3, 7))
        out = np.round(out * (levels - 1)) / (levels - 1)
    elif treatment == "false-colour":
        c0, c1 = rng.random(3).astype(np.float32), rng.random(3).astype(np.float32)
        out = c0 + _luma(out)[:, :, None] * (c1 - c0)
    elif treatment == "defocus":
        sigma = rng.uniform(2.0, 5.0)
        out = gaussian_filter(out, sigma=(sigma, sigma, 0.0))
    elif treatment == "channel-swap":
        out = out[:, :, rng.permutation(3)]
        channel = int(rng.integers(3))
        out[:, :, channel] = 1.0 - out[:, :, channel]  # and one channel inverted
    return out.astype(np.float32)


def _low_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Smooth noise (H, W) float32 in [0, 1]: random ``cells`` x ``cells`` grid, bicubic."""
    grid = (rng.random((cells, cells)) * 255).astype(np.uint8)
    return np.asarray(Image.fromarray(grid).resize((w, h), Image.Resampling.BICUBIC),
                      dtype=np.float32) / 255.0


def _fractal(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Multi-octave value noise (H, W) in [0, 1] (cloud / plasma look)."""
    out = np.zeros((h, w), dtype=np.float32)
    for octave in range(5):
        out += _low_noise(rng, h, w, 3 * 2**octave) * np.float32(0.5**octave)
    return (out - out.min()) / max(float(out.max() - out.min()), 1e-6)


def _wood(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Concentric rings around an off-image centre, bent by smooth noise: (H, W) in [0, 1]."""
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    cx, cy = rng.uniform(-w, 2 * w), rng.uniform(-h, 2 * h)
    r = np.hypot(xs - cx, (ys - cy) * rng.uniform(0.3, 1.0)) + 25.0 * _low_noise(rng, h, w, 4)
    return ((np.sin(r / rng.uniform(2.0, 6.0)) + 1.0) / 2.0) ** 2


def _polka(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Dots on a hexagonal lattice: (H, W) in {0, 1}."""
    period = rng.uniform(6.0, 20.0)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    row = np.floor(ys / period)
    dx = (xs + 0.5 * period * (row % 2)) % period - period / 2
    dy = ys % period - period / 2
    return (np.hypot(dx, dy) < rng.uniform(0.2, 0.4) * period).astype(np.float32)


def _bricks(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Running-bond bricks with mortar: (H, W) in [0, 1], each brick its own shade."""
    bh = int(rng.integers(8, 20))
    bw = int(bh * rng.uniform(1.8, 3.0))
    ys, xs = np.mgrid[0:h, 0:w]
    row = ys // bh
    shifted = xs + (row % 2) * (bw // 2)
    col = shifted // bw
    shade = rng.uniform(0.3, 0.9, (h // bh + 2, w // bw + 3))[row, col]
    mortar = (ys % bh < 2) | (shifted % bw < 2)
    return np.where(mortar, 0.0, shade).astype(np.float32)


def _blobs(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """scikit-image binary blobs, softened: (H, W) in [0, 1]."""
    from skimage.data import binary_blobs

    side = max(h, w)
    blobs = binary_blobs(side, blob_size_fraction=rng.uniform(0.05, 0.2),
                         volume_fraction=rng.uniform(0.3, 0.6), rng=int(rng.integers(2**31)))
    return gaussian_filter(blobs[:h, :w].astype(np.float32), 1.0)


def _voronoi(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Voronoi cells of random colours with dark borders: (H, W, 3) float32."""
    seeds = rng.uniform(0.0, 1.0, (int(rng.integers(6, 40)), 2)) * [h, w]
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    d = (ys[:, :, None] - seeds[:, 0]) ** 2 + (xs[:, :, None] - seeds[:, 1]) ** 2  # (H, W, n)
    part = np.partition(d, 1, axis=2)
    border = np.sqrt(part[:, :, 1]) - np.sqrt(part[:, :, 0]) < 1.5
    colours = rng.uniform(0.15, 0.85, (len(seeds), 3)).astype(np.float32)
    out = colours[d.argmin(axis=2)]
    out[border] *= 0.4
    return out


def _clutter(rng: np.random.Generator, canvas: np.ndarray) -> None:
    """Draw 0-4 unlabelled lines and arcs on ``canvas`` (H, W, 3), in place."""
    h, w = canvas.shape[:2]
    for _ in range(int(rng.integers(0, 5))):
        layer = Image.new("L", (w, h), 0)
        draw = ImageDraw.Draw(layer)
        x0, x1 = sorted(rng.uniform(0, w, 2))
        y0, y1 = sorted(rng.uniform(0, h, 2))
        width = int(rng.integers(1, 4))
        if rng.random() < 0.5:
            draw.line([x0, y0, x1, y1], fill=1, width=width)
        else:
            draw.arc([x0, y0, x1 + 4, y1 + 4], rng.uniform(0, 360), rng.uniform(0, 360), fill=1,
                     width=width)
        canvas[np.asarray(layer, dtype=bool)] = rng.random(3).astype(np.float32)


def _finish(rng: np.random.Generator, canvas: np.ndarray) -> np.ndarray:
    """Camera effects on (H, W, 3): vignette, gamma, motion blur, sensor noise (each sometimes)."""
    h, w = canvas.shape[:2]
    if rng.random() < 0.4:
        ys, xs = np.ogrid[0:h, 0:w]
        r2 = ((ys - h / 2) / (h / 2)) ** 2 + ((xs - w / 2) / (w / 2)) ** 2
        canvas = canvas * (1.0 - np.float32(rng.uniform(0.1, 0.35)) * r2 / 2)[:, :, None]
    if rng.random() < 0.4:
        canvas = np.clip(canvas, 0.0, 1.0) ** np.float32(rng.uniform(0.7, 1.4))
    if rng.random() < 0.15:
        canvas = uniform_filter1d(canvas, int(rng.integers(3, 6)), axis=int(rng.integers(2)))
    if rng.random() < 0.5:
        sigma = np.float32(rng.uniform(0.005, 0.04))
        canvas = canvas + rng.standard_normal(canvas.shape, dtype=np.float32) * sigma
    return canvas


# ----------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="data set root to write (train/ and val/)")
    parser.add_argument("--train", type=int, default=1200, help="training images")
    parser.add_argument("--val", type=int, default=150, help="validation images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--difficulty", default="full", choices=list(DIFFICULTIES),
                        help="full (default), or a variant with parts of the scene made plain")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        make_dataset(args.out, args.train, args.val, args.seed, difficulty=args.difficulty)
    except ValueError as e:
        parser.error(str(e))
    print(f"wrote {args.out} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
