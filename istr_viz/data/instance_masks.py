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
import pycocotools.mask as mask_utils
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
    mask cropped to its own box does. Rasterised by pycocotools, as COCO polygons are."""
    rng = np.random.default_rng(seed)
    is_ellipse = rng.random(n) < 0.5
    num_vertices = np.where(is_ellipse, ELLIPSE_VERTICES, rng.integers(4, 12, n))
    outlines: list[np.ndarray] = [np.empty(0)] * n
    for count in np.unique(num_vertices):
        index = np.flatnonzero(num_vertices == count)
        make = _ellipse_outlines if count == ELLIPSE_VERTICES else _star_outlines
        points = _stretch_to_box(make(len(index), int(count), rng), mask_size)  # (m, V, 2)
        for i, outline in zip(index, points, strict=True):
            outlines[i] = outline
    return _rasterise(outlines, mask_size)


ELLIPSE_VERTICES = 48  # an ellipse is drawn as a polygon with this many vertices


def _ellipse_outlines(m: int, vertices: int, rng: np.random.Generator) -> np.ndarray:
    """(m, V, 2) points on rotated ellipses with random axes."""
    a, b = rng.uniform(0.3, 1.0, (2, m, 1))
    theta = rng.uniform(0, np.pi, (m, 1))
    t = np.linspace(0, 2 * np.pi, vertices, endpoint=False)[None]
    x, y = a * np.cos(t), b * np.sin(t)
    cos, sin = np.cos(theta), np.sin(theta)
    return np.stack([x * cos - y * sin, x * sin + y * cos], axis=-1)


def _star_outlines(m: int, vertices: int, rng: np.random.Generator) -> np.ndarray:
    """(m, V, 2) star-shaped polygons: jittered angles around the origin, random radii."""
    steps = (np.arange(vertices) + rng.uniform(-0.2, 0.2, (m, vertices))) / vertices
    angles = 2 * np.pi * steps + rng.uniform(0, 2 * np.pi, (m, 1))
    radii = rng.uniform(0.4, 1.0, (m, vertices))
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=-1)


def _stretch_to_box(points: np.ndarray, size: int) -> np.ndarray:
    """(m, V, 2) outlines scaled per axis so that each one's bounding box is [0, S] x [0, S]."""
    low, high = points.min(axis=1, keepdims=True), points.max(axis=1, keepdims=True)
    return (points - low) / (high - low) * size


def _rasterise(outlines: list[np.ndarray], size: int) -> np.ndarray:
    """(N, S, S) bool masks of (V, 2) xy polygons in pixel units (pycocotools)."""
    if not outlines:
        return np.zeros((0, size, size), dtype=bool)
    rles = mask_utils.frPyObjects([o.ravel().tolist() for o in outlines], size, size)
    return np.ascontiguousarray(mask_utils.decode(rles).transpose(2, 0, 1)).astype(bool)
