"""Box-relative instance masks, the data the mask basis is fitted on.

Every valid non-crowd instance of a COCO file gives one S x S bool mask: its full-image mask
(pycocotools ``annToMask``) cropped to its box and resampled with
``torchvision.ops.roi_align(aligned=True) >= 0.5``, as detectron2's ``BitMasks.crop_and_resize``
does for ISTR's targets. ``synthetic_instance_masks`` makes box-tight ellipses and polygons for
tests, benchmarks and notebooks without data. Shape letters: G instances of one image, H W image,
N masks, S mask side.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor
from torchvision.ops import roi_align
from tqdm.auto import tqdm

from istr_viz.data.coco import CocoAnnotations

ROI_GROUP = 32  # instances resampled together (bounds memory to 32 full-image float masks)


def crop_masks_to_boxes(masks: Tensor, boxes_xyxy: Tensor, mask_size: int) -> Tensor:
    """Crop each full-image mask to its box and resample it to S x S.

    Args:
        masks: (G, H, W) bool or {0, 1} full-image masks.
        boxes_xyxy: (G, 4) pixel boxes (x0, y0, x1, y1), one per mask, in the masks' frame.
        mask_size: S.

    Returns:
        (G, S, S) bool: ``roi_align(masks, boxes, S, 1.0, sampling_ratio=0, aligned=True) >= 0.5``.
    """
    G = masks.shape[0]
    if G == 0:
        return torch.zeros((0, mask_size, mask_size), dtype=torch.bool, device=masks.device)
    index = torch.arange(G, dtype=torch.float32, device=masks.device)[:, None]
    rois = torch.cat([index, boxes_xyxy.to(masks.device, torch.float32)], dim=1)  # (G, 5)
    crops = roi_align(masks[:, None].float(), rois, mask_size, spatial_scale=1.0,
                      sampling_ratio=0, aligned=True)  # (G, 1, S, S)
    return crops[:, 0] >= 0.5


def image_instance_masks(ann: CocoAnnotations, image_id: int, mask_size: int = 28) -> np.ndarray:
    """(G, S, S) bool box-relative masks of the valid non-crowd instances of one image."""
    anns = ann.instance_anns(image_id)
    crops = []
    for start in range(0, len(anns), ROI_GROUP):
        group = anns[start:start + ROI_GROUP]
        masks = torch.from_numpy(np.stack([ann.ann_to_mask(a) for a in group]))  # (g, H, W)
        x, y, w, h = torch.tensor([a["bbox"] for a in group], dtype=torch.float32).unbind(1)
        boxes_xyxy = torch.stack([x, y, x + w, y + h], dim=1)  # (g, 4)
        crops.append(crop_masks_to_boxes(masks, boxes_xyxy, mask_size).numpy())
    if not crops:
        return np.zeros((0, mask_size, mask_size), dtype=bool)
    return np.concatenate(crops)


def iter_instance_masks(ann: CocoAnnotations, mask_size: int = 28, chunk: int = 4096,
                        progress: bool = False) -> Iterator[np.ndarray]:
    """Yield (n, S, S) bool chunks of at most ``chunk`` masks over every image, in
    ``ann.image_ids`` order: the stream for ``MaskBasis.fit_chunks`` when all masks at once would
    not fit in memory."""
    pending: list[np.ndarray] = []
    count = 0
    for image_id in tqdm(ann.image_ids, desc="instance masks", unit="img", disable=not progress):
        masks = image_instance_masks(ann, image_id, mask_size)
        pending.append(masks)
        count += len(masks)
        while count >= chunk:
            block = np.concatenate(pending)
            yield block[:chunk]
            pending, count = [block[chunk:]], count - chunk
    if count:
        yield np.concatenate(pending)


def instance_masks(ann: CocoAnnotations, mask_size: int = 28, progress: bool = True) -> np.ndarray:
    """(N, S, S) bool box-relative masks of every valid non-crowd instance of ``ann``, image by
    image in ``ann.image_ids`` order (crowd regions are never included)."""
    chunks = list(iter_instance_masks(ann, mask_size, chunk=1 << 16, progress=progress))
    if not chunks:
        return np.zeros((0, mask_size, mask_size), dtype=bool)
    return np.concatenate(chunks)


# ----------------------------------------------------------------------------- synthetic masks


def synthetic_instance_masks(n: int, mask_size: int = 28, seed: int = 0) -> np.ndarray:
    """(n, S, S) bool box-tight shapes: half rotated ellipses, half star-shaped polygons (4 to 11
    vertices), each stretched so that it touches all four sides of its box, as a ground-truth
    mask cropped to its own box does."""
    rng = np.random.default_rng(seed)
    is_ellipse = rng.random(n) < 0.5
    out = np.empty((n, mask_size, mask_size), dtype=bool)
    out[is_ellipse] = _box_tight_ellipses(int(is_ellipse.sum()), mask_size, rng)
    out[~is_ellipse] = _box_tight_polygons(int((~is_ellipse).sum()), mask_size, rng)
    return out


def _pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """(1, S, S) x and y of the pixel centres in [-1, 1] box coordinates."""
    c = (np.arange(size) + 0.5) / size * 2 - 1
    return c[None, None, :], c[None, :, None]


def _box_tight_ellipses(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """(n, S, S) rotated ellipses scaled so their bounding box is the mask's box."""
    a, b = rng.uniform(0.3, 1.0, (2, n, 1, 1))
    theta = rng.uniform(0, np.pi, (n, 1, 1))
    cos, sin = np.cos(theta), np.sin(theta)
    half_w = np.sqrt((a * cos) ** 2 + (b * sin) ** 2)  # half extents of the rotated ellipse
    half_h = np.sqrt((a * sin) ** 2 + (b * cos) ** 2)
    gx, gy = _pixel_grid(size)
    x, y = gx * half_w, gy * half_h
    return ((x * cos + y * sin) / a) ** 2 + ((y * cos - x * sin) / b) ** 2 <= 1


def _box_tight_polygons(n: int, size: int, rng: np.random.Generator,
                        block: int = 128) -> np.ndarray:
    """(n, S, S) star-shaped polygons around the origin, stretched to their bounding box; the
    vertex count is drawn per block of masks."""
    out = np.empty((n, size, size), dtype=bool)
    for start in range(0, n, block):
        m = min(block, n - start)
        vertices = int(rng.integers(4, 12))
        steps = (np.arange(vertices) + rng.uniform(-0.2, 0.2, (m, vertices))) / vertices
        angles = (2 * np.pi * steps + rng.uniform(0, 2 * np.pi, (m, 1))) % (2 * np.pi)
        angles.sort(axis=1)
        radii = rng.uniform(0.4, 1.0, (m, vertices))
        out[start:start + m] = _rasterise_star(angles, radii, size)
    return out


def _rasterise_star(angles: np.ndarray, radii: np.ndarray, size: int) -> np.ndarray:
    """(m, S, S) inside-test of star polygons with vertices at (angles, radii) (both (m, V),
    angles sorted in [0, 2 pi)), the pixel grid mapped onto each polygon's bounding box."""
    m, _ = angles.shape
    vx, vy = radii * np.cos(angles), radii * np.sin(angles)  # (m, V)
    lo_x, hi_x = vx.min(1)[:, None, None], vx.max(1)[:, None, None]
    lo_y, hi_y = vy.min(1)[:, None, None], vy.max(1)[:, None, None]
    gx, gy = _pixel_grid(size)
    x = lo_x + (gx + 1) / 2 * (hi_x - lo_x)  # (m, 1, S) -> broadcast (m, S, S)
    y = lo_y + (gy + 1) / 2 * (hi_y - lo_y)
    x, y = np.broadcast_arrays(x, y)
    psi = np.arctan2(y, x).reshape(m, -1) % (2 * np.pi)  # (m, P)
    rho = np.hypot(x, y).reshape(m, -1)
    # edge j runs from vertex j to vertex j + 1 (cyclic); pixel angle psi falls in edge j
    j = (psi[:, :, None] >= angles[:, None, :]).sum(-1) - 1  # (m, P), -1 = wraps to the last
    j1 = (j + 1) % angles.shape[1]
    a0, a1 = np.take_along_axis(angles, j, 1), np.take_along_axis(angles, j1, 1)
    r0, r1 = np.take_along_axis(radii, j, 1), np.take_along_axis(radii, j1, 1)
    span = (a1 - a0) % (2 * np.pi)
    offset = (psi - a0) % (2 * np.pi)
    # distance from the origin to the edge along the pixel's ray (law of sines)
    edge = r0 * r1 * np.sin(span) / (r0 * np.sin(offset) + r1 * np.sin(span - offset))
    return (rho <= edge).reshape(m, size, size)
