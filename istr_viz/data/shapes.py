"""The built-in synthetic instance-segmentation data set (``make-shapes``), written in COCO format.

Each image is a square RGB PNG: a background (a random crop of a photo or texture shipped with
scikit-image, or a procedural noise / gradient / stripes / checker pattern), then 1 to 8 shapes
painted in z-order (later shapes cover earlier ones). Classes include non-convex shapes (star,
cross) and a shape with a hole (ring). Shapes get random sizes (COCO small, medium and large),
rotations, aspect distortions, colours and fill textures (solid, stripes, noise, gradient).

Annotations are the *visible* masks as compressed RLE, so masks of one image never overlap. A
shape is only painted if afterwards it and every shape below it keep at least
:data:`MIN_VISIBLE_PX` pixels and :data:`MIN_VISIBLE_FRACTION` of their amodal area; so every
painted pixel of a shape belongs to an annotation. Each annotation has a non-standard field
``amodal_area``: the shape's pixel count inside the image before later shapes covered it.

Output is deterministic: image ``i`` of a split draws from ``default_rng([seed, split, i])``, so
the same arguments give byte-identical ``annotations.json`` and identical pixels, and the val set
does not depend on ``num_train``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils
from scipy.ndimage import gaussian_filter

from istr_viz.errors import ConfigError

CLASS_NAMES = ("circle", "square", "triangle", "star", "cross", "ring")  # category ids 1..6
# scikit-image samples that ship with the package (no download); a missing one is skipped.
PHOTO_NAMES = (
    "astronaut", "brick", "camera", "cell", "chelsea", "clock", "coffee", "coins", "grass",
    "gravel", "hubble_deep_field", "immunohistochemistry", "moon", "page", "retina", "rocket",
    "text",
)
PROCEDURAL_BACKGROUNDS = ("noise", "gradient", "stripes", "checker")
FILL_TEXTURES = ("solid", "stripes", "noise", "gradient")
MAX_INSTANCES = 8
MIN_VISIBLE_PX = 12
MIN_VISIBLE_FRACTION = 0.25
EMPTY_EVERY = 50  # image i of a split is empty when i % 50 == 25: exactly 2% of the images
PHOTO_PROBABILITY = 0.6  # share of photo backgrounds; the rest are procedural
MIN_SIZE = 32
_SPLIT_CODES = {"train": 0, "val": 1}


@dataclass
class _Instance:
    """One painted shape: its category id, visible mask (H, W) bool and amodal pixel count."""

    category_id: int
    visible: np.ndarray
    amodal_area: int


def make_shapes(
    out_dir: str | Path,
    num_train: int = 2000,
    num_val: int = 200,
    size: int = 256,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Write the synthetic data set root ``out_dir`` with ``train/`` and ``val/`` (COCO format).

    Each split gets ``images/NNNNNN.png`` (``size`` x ``size`` RGB) and ``annotations.json``.
    Existing files of the same names are overwritten. Returns a summary:
    ``{"root", "classes", "train": {"images", "annotations", "empty_images"}, "val": {...}}``.
    Raises :class:`ConfigError` for negative counts or seed, or ``size`` below 32.
    """
    for name, value, low in (("num_train", num_train, 0), ("num_val", num_val, 0),
                             ("seed", seed, 0), ("size", size, MIN_SIZE)):
        if int(value) != value or value < low:
            raise ConfigError(f"must be an integer >= {low}, got {value!r}", entry=name)
    from tqdm.auto import tqdm

    root = Path(out_dir)
    photos = load_photos()
    summary: dict = {"root": str(root), "classes": list(CLASS_NAMES)}
    with tqdm(total=num_train + num_val, desc="make-shapes", disable=not progress) as bar:
        for split, count in (("train", num_train), ("val", num_val)):
            summary[split] = _write_split(root / split, split, int(count), int(size), int(seed),
                                          photos, bar.update)
    return summary


def load_photos() -> list[np.ndarray]:
    """The :data:`PHOTO_NAMES` images that load offline, each (H, W, 3) uint8 RGB."""
    import skimage.data

    photos = []
    for name in PHOTO_NAMES:
        try:
            img = np.asarray(getattr(skimage.data, name)())
        except Exception:  # noqa: BLE001 - a sample that needs a download (pooch) is skipped
            continue
        if img.dtype == np.uint8 and img.ndim == 2:
            img = np.repeat(img[:, :, None], 3, axis=2)
        if img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3:
            photos.append(img)
    return photos


def _write_split(split_dir: Path, split: str, num_images: int, size: int, seed: int,
                 photos: list[np.ndarray], tick: Callable[[int], object]) -> dict:
    """Render ``num_images`` images of one split and write them with ``annotations.json``."""
    images_dir = split_dir / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for index in range(num_images):
        rng = np.random.default_rng([seed, _SPLIT_CODES[split], index])
        is_empty = index % EMPTY_EVERY == EMPTY_EVERY // 2
        num_shapes = 0 if is_empty else int(rng.integers(1, MAX_INSTANCES + 1))
        pixels, instances = _render_image(rng, size, photos, num_shapes)
        image_id = index + 1
        file_name = f"{image_id:06d}.png"
        Image.fromarray(pixels).save(images_dir / file_name, compress_level=1)  # 2x faster than 6
        images.append({"id": image_id, "file_name": file_name, "height": size, "width": size})
        for inst in instances:
            annotations.append(_annotation(len(annotations) + 1, image_id, inst))
        tick(1)
    categories = [{"id": i + 1, "name": name, "supercategory": "shape"}
                  for i, name in enumerate(CLASS_NAMES)]
    info = {"description": "istr_viz synthetic shapes", "version": "shapes-v1", "split": split,
            "seed": seed, "size": size}
    data = {"info": info, "images": images, "annotations": annotations, "categories": categories}
    (split_dir / "annotations.json").write_text(json.dumps(data, separators=(",", ":")))
    empty = num_images - len({a["image_id"] for a in annotations})
    return {"images": num_images, "annotations": len(annotations), "empty_images": empty}


def _annotation(ann_id: int, image_id: int, inst: _Instance) -> dict:
    """COCO annotation of a visible mask: compressed RLE, area and xywh bbox from pycocotools."""
    rle = mask_utils.encode(np.asfortranarray(inst.visible.astype(np.uint8)))
    bbox = [float(v) for v in mask_utils.toBbox(rle)]
    segmentation = {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}
    return {"id": ann_id, "image_id": image_id, "category_id": inst.category_id,
            "segmentation": segmentation,
            "area": float(mask_utils.area(rle)), "bbox": bbox, "iscrowd": 0,
            "amodal_area": inst.amodal_area}


def _render_image(rng: np.random.Generator, size: int, photos: list[np.ndarray],
                  num_shapes: int) -> tuple[np.ndarray, list[_Instance]]:
    """Paint up to ``num_shapes`` shapes on a random background.

    Returns the image (H, W, 3) uint8 and the painted instances bottom to top (visible masks
    (H, W) bool, pairwise disjoint). A shape that would leave itself or a shape below it too
    hidden is not painted; up to 4 tries per wanted shape are made.
    """
    canvas = _background(rng, size, photos)
    instances: list[_Instance] = []
    for _ in range(4 * num_shapes):
        if len(instances) == num_shapes:
            break
        label = int(rng.integers(len(CLASS_NAMES)))
        mask = _rasterise(*_place(rng, CLASS_NAMES[label], size), size)
        amodal = int(mask.sum())
        if amodal < MIN_VISIBLE_PX or any(_too_hidden(inst, mask) for inst in instances):
            continue
        for inst in instances:
            inst.visible &= ~mask
        _paint(rng, canvas, mask)
        instances.append(_Instance(label + 1, mask, amodal))
    canvas = _finish(rng, canvas)
    return (np.clip(canvas, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8), instances


def _too_hidden(inst: _Instance, cover: np.ndarray) -> bool:
    """Whether ``inst`` would keep too few visible pixels once ``cover`` (H, W) bool is on top."""
    left = int(np.count_nonzero(inst.visible & ~cover))
    return left < max(MIN_VISIBLE_PX, MIN_VISIBLE_FRACTION * inst.amodal_area)


# ----------------------------------------------------------------------------- geometry
def _polygon(count: int, radius: float | np.ndarray, phase: float = 0.0) -> np.ndarray:
    """Vertices (count, 2) xy at angles ``phase + 2 pi k / count``, at the radius (or radii)."""
    angles = phase + 2.0 * np.pi * np.arange(count) / count
    return np.stack([np.cos(angles), np.sin(angles)], axis=1) * np.reshape(radius, (-1, 1))


def _outline(rng: np.random.Generator, name: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Outline (N, 2) xy of one class around the origin (area about pi) and its hole or None."""
    if name == "circle":
        return _polygon(64, 1.0), None
    if name == "square":
        return _polygon(4, 1.25, np.pi / 4), None
    if name == "triangle":
        angles = np.pi / 2 + 2.0 * np.pi * np.arange(3) / 3 + rng.uniform(-0.25, 0.25, 3)
        return 1.35 * np.stack([np.cos(angles), np.sin(angles)], axis=1), None
    if name == "star":
        points = int(rng.integers(5, 7))
        radii = np.tile([1.4, 1.4 * rng.uniform(0.4, 0.55)], points)
        return _polygon(2 * points, radii, np.pi / 2), None
    if name == "cross":
        w, arm = rng.uniform(0.22, 0.4), 1.2
        turns = [np.array([[w, w], [arm, w], [arm, -w]])]  # one arm; the others are quarter turns
        for _ in range(3):
            turns.append(turns[-1] @ np.array([[0.0, -1.0], [1.0, 0.0]]))
        return np.concatenate(turns), None
    if name == "ring":
        return _polygon(64, 1.15), _polygon(64, 1.15 * rng.uniform(0.4, 0.7))
    raise ValueError(f"unknown shape {name!r}")


def _place(rng: np.random.Generator, name: str, size: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Outline and hole of a shape in pixel xy: log-uniform size, aspect, rotation, position."""
    outer, hole = _outline(rng, name)
    radius = np.exp(rng.uniform(np.log(max(4.0, 0.025 * size)), np.log(0.5 * size)))
    if hole is not None:  # keep the hole and the band at least about 2 px wide
        radius = max(radius, 6.0)
    aspect = np.exp(rng.uniform(-0.45, 0.45))
    theta = rng.uniform(0.0, 2.0 * np.pi)
    rotation = np.array([[np.cos(theta), np.sin(theta)], [-np.sin(theta), np.cos(theta)]])
    linear = np.diag([np.sqrt(aspect), 1.0 / np.sqrt(aspect)]) @ rotation * radius
    centre = rng.uniform(0.0, size, 2)
    return outer @ linear + centre, (None if hole is None else hole @ linear + centre)


def _rasterise(outer: np.ndarray, hole: np.ndarray | None, size: int) -> np.ndarray:
    """Mask (size, size) bool of a polygon (N, 2) xy minus an optional hole polygon."""
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    draw.polygon(outer.ravel().tolist(), fill=1)
    if hole is not None:
        draw.polygon(hole.ravel().tolist(), fill=0)
    return np.asarray(canvas, dtype=bool)


# ----------------------------------------------------------------------------- textures
def _coords(h: int, w: int, theta: float) -> np.ndarray:
    """Pixel positions (h, w) float32 projected on the direction ``theta``."""
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    return xs * np.float32(np.cos(theta)) + ys * np.float32(np.sin(theta))


def _gradient(rng: np.random.Generator, h: int, w: int, c0: np.ndarray,
              c1: np.ndarray) -> np.ndarray:
    """Linear blend (h, w, 3) from colour ``c0`` to ``c1`` along a random direction."""
    t = _coords(h, w, rng.uniform(0.0, 2.0 * np.pi))
    t = (t - t.min()) / max(float(t.max() - t.min()), 1.0)
    return c0 + t[:, :, None] * (c1 - c0)


def _stripes(rng: np.random.Generator, h: int, w: int, c0: np.ndarray, c1: np.ndarray,
             checker: bool = False) -> np.ndarray:
    """Hard stripes (or a rotated checkerboard) (h, w, 3) of colours ``c0``/``c1``."""
    theta = rng.uniform(0.0, np.pi)
    period = rng.uniform(3.0, max(4.0, 0.4 * max(h, w)))
    on = (_coords(h, w, theta) / period + rng.random()) % 1.0 < rng.uniform(0.3, 0.7)
    if checker:
        on ^= (_coords(h, w, theta + np.pi / 2) / period) % 1.0 < 0.5
    return np.where(on[:, :, None], c0, c1)


def _noise(rng: np.random.Generator, h: int, w: int, colour: np.ndarray,
           amount: float) -> np.ndarray:
    """``colour`` plus smooth random blotches and fine grain: (h, w, 3), spread about ``amount``."""
    cells = int(rng.integers(2, 12))
    low = (rng.random((cells, cells, 3)) * 255).astype(np.uint8)
    smooth = np.asarray(Image.fromarray(low).resize((w, h), Image.BICUBIC), dtype=np.float32)
    smooth /= 255.0
    grain = rng.standard_normal((h, w, 3), dtype=np.float32) * np.float32(0.3 * amount)
    return colour + amount * (smooth - 0.5) * 2.0 + grain


def _photo(rng: np.random.Generator, size: int, photos: list[np.ndarray]) -> np.ndarray:
    """A random photo crop resized to (size, size, 3), flipped, rotated and colour-jittered."""
    img = photos[int(rng.integers(len(photos)))]
    h, w = img.shape[:2]
    side = int(rng.uniform(0.3, 1.0) * min(h, w))
    y0, x0 = int(rng.integers(h - side + 1)), int(rng.integers(w - side + 1))
    crop = Image.fromarray(img[y0:y0 + side, x0:x0 + side]).resize((size, size), Image.BILINEAR)
    out = np.rot90(np.asarray(crop, dtype=np.float32) / 255.0, int(rng.integers(4)))
    if rng.random() < 0.5:
        out = out[:, ::-1]
    gain = rng.uniform(0.7, 1.3, 3).astype(np.float32)
    contrast = np.float32(rng.uniform(0.6, 1.2))
    return (out - 0.5) * contrast * gain + 0.5 + np.float32(rng.uniform(-0.15, 0.15))


def _background(rng: np.random.Generator, size: int, photos: list[np.ndarray]) -> np.ndarray:
    """Background (size, size, 3) float32: a photo crop or a procedural pattern."""
    if photos and rng.random() < PHOTO_PROBABILITY:
        return _photo(rng, size, photos).astype(np.float32)
    kind = PROCEDURAL_BACKGROUNDS[int(rng.integers(len(PROCEDURAL_BACKGROUNDS)))]
    c0, c1 = rng.random(3).astype(np.float32), rng.random(3).astype(np.float32)
    if kind == "noise":
        out = _noise(rng, size, size, c0, float(rng.uniform(0.1, 0.4)))
    elif kind == "gradient":
        out = _gradient(rng, size, size, c0, c1)
    else:
        out = _stripes(rng, size, size, c0, 0.5 * (c0 + c1), checker=kind == "checker")
    if rng.random() < 0.5:
        out = out + rng.standard_normal(out.shape, dtype=np.float32) * np.float32(0.04)
    return out.astype(np.float32)


def _fill_colour(rng: np.random.Generator, under: np.ndarray) -> np.ndarray:
    """A random colour (3,) at least 0.35 (Euclidean, [0, 1] RGB) from the mean of ``under``."""
    mean = under.reshape(-1, 3).mean(axis=0)
    for _ in range(8):
        colour = rng.random(3).astype(np.float32)
        if np.linalg.norm(colour - mean) >= 0.35:
            return colour
    return np.where(mean > 0.5, 0.05, 0.95).astype(np.float32)


def _paint(rng: np.random.Generator, canvas: np.ndarray, mask: np.ndarray) -> None:
    """Fill ``mask`` (H, W) bool of ``canvas`` (H, W, 3) with a textured colour, in place."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    h, w = rows[-1] + 1 - rows[0], cols[-1] + 1 - cols[0]
    inside = mask[box]
    colour = _fill_colour(rng, canvas[box][inside])
    other = np.clip(colour * rng.uniform(0.4, 0.8) + rng.uniform(0.0, 0.3), 0.0, 1.0)
    other = other.astype(np.float32)
    texture = FILL_TEXTURES[int(rng.integers(len(FILL_TEXTURES)))]
    if texture == "stripes":
        fill = _stripes(rng, h, w, colour, other)
    elif texture == "noise":
        fill = _noise(rng, h, w, colour, float(rng.uniform(0.05, 0.2)))
    elif texture == "gradient":
        fill = _gradient(rng, h, w, colour, other)
    else:
        fill = np.broadcast_to(colour, (h, w, 3))
    canvas[box][inside] = fill[inside]


def _finish(rng: np.random.Generator, canvas: np.ndarray) -> np.ndarray:
    """Whole-image camera effects on (H, W, 3): sometimes a slight blur, sometimes sensor noise."""
    if rng.random() < 0.3:
        sigma = rng.uniform(0.4, 1.0)
        canvas = gaussian_filter(canvas, sigma=(sigma, sigma, 0.0))
    if rng.random() < 0.5:
        canvas = canvas + rng.standard_normal(canvas.shape, dtype=np.float32) * np.float32(
            rng.uniform(0.005, 0.03))
    return canvas
