"""Box helpers that ``torchvision.ops`` lacks. Pure functions, no state.

Naming (used across istr_viz): ``boxes_xyxy`` are pixel (x1, y1, x2, y2) in the valid (unpadded)
image; ``boxes_cxcywh`` are (cx, cy, w, h) divided by that image's (W, H), so in [0, 1] inside the
image. Image sizes are always [H, W] (rows first), as in ``Batch.image_sizes``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchvision.ops import box_convert

DEFAULT_DELTA_WEIGHTS = (2.0, 2.0, 1.0, 1.0)
DEFAULT_SCALE_CLAMP = math.log(100000.0 / 16)


def apply_deltas(deltas: Tensor, boxes_xyxy: Tensor,
                 weights: tuple[float, float, float, float] = DEFAULT_DELTA_WEIGHTS,
                 scale_clamp: float = DEFAULT_SCALE_CLAMP) -> Tensor:
    """Decode R-CNN box deltas relative to ``boxes_xyxy`` (the stage's input boxes).

    Args:
        deltas: (N, 4) raw (dx, dy, dw, dh) as predicted, before dividing by ``weights``.
        boxes_xyxy: (N, 4) reference boxes, pixels.
        weights: (wx, wy, ww, wh); the deltas are divided by them (ISTR: 2, 2, 1, 1).
        scale_clamp: upper clamp of dw, dh before ``exp`` (keeps the boxes finite).

    Returns:
        (N, 4) xyxy pixels. Width and height stay > 0; boxes are not clipped to the image.
    """
    boxes = boxes_xyxy.to(deltas.dtype)
    widths = boxes[:, 2] - boxes[:, 0]
    heights = boxes[:, 3] - boxes[:, 1]
    ctr_x = boxes[:, 0] + 0.5 * widths
    ctr_y = boxes[:, 1] + 0.5 * heights

    wx, wy, ww, wh = weights
    dx, dy = deltas[:, 0] / wx, deltas[:, 1] / wy
    dw = (deltas[:, 2] / ww).clamp(max=scale_clamp)
    dh = (deltas[:, 3] / wh).clamp(max=scale_clamp)

    pred_ctr_x = dx * widths + ctr_x
    pred_ctr_y = dy * heights + ctr_y
    pred_w = torch.exp(dw) * widths
    pred_h = torch.exp(dh) * heights
    return torch.stack([pred_ctr_x - 0.5 * pred_w, pred_ctr_y - 0.5 * pred_h,
                        pred_ctr_x + 0.5 * pred_w, pred_ctr_y + 0.5 * pred_h], dim=-1)


def image_scale_xyxy(image_sizes: Tensor) -> Tensor:
    """(..., 2) [H, W] -> (..., 4) float [W, H, W, H], the divisor that normalises xyxy boxes."""
    wh = image_sizes.flip(-1).to(torch.float32)
    return torch.cat([wh, wh], dim=-1)


def normalize_boxes(boxes_xyxy: Tensor, image_sizes: Tensor) -> Tensor:
    """Pixel xyxy -> cxcywh normalised by each image's valid (W, H).

    Args:
        boxes_xyxy: (B, N, 4) with ``image_sizes`` (B, 2), or (N, 4) with one size (2,).
        image_sizes: [H, W] of the valid (unpadded) image(s).

    Returns:
        boxes_cxcywh of the same shape as ``boxes_xyxy``.
    """
    scale = image_scale_xyxy(image_sizes).to(boxes_xyxy.device).unsqueeze(-2)  # (..., 1, 4)
    return box_convert(boxes_xyxy / scale, in_fmt="xyxy", out_fmt="cxcywh")


def denormalize_boxes(boxes_cxcywh: Tensor, image_sizes: Tensor) -> Tensor:
    """Normalised cxcywh -> pixel xyxy; the inverse of :func:`normalize_boxes` (same shapes)."""
    scale = image_scale_xyxy(image_sizes).to(boxes_cxcywh.device).unsqueeze(-2)  # (..., 1, 4)
    return box_convert(boxes_cxcywh, in_fmt="cxcywh", out_fmt="xyxy") * scale
