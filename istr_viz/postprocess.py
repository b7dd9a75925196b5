"""Turn one stage's raw outputs into detections: top-k (query, class) pairs, no NMS.

Every detection keeps the index of the query it came from, so a detection can be followed back
through the stages. Masks are S x S probabilities in box coordinates; :func:`paste_masks` puts them
into the image at their boxes (bilinear sampling at pixel centres, as detectron2's paste does).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def _bilinear_weights(coords: Tensor, size: int) -> Tensor:
    """(n, L) normalised coordinates (-1 and 1 the outer edges of the first and last of ``size``
    cells, ``grid_sample``'s ``align_corners=False``) -> (n, L, size) weights of 1-D bilinear
    interpolation with zero padding, rows zero outside [-1, 1] (outside the box)."""
    pos = ((coords + 1) * size - 1) / 2  # in cells, cell centres at integers
    low = pos.floor()
    frac = pos - low
    low = low.long()
    weights = coords.new_zeros((*coords.shape, size + 2))  # a cell of padding on each side
    for index, weight in ((low, 1 - frac), (low + 1, frac)):
        weights.scatter_add_(2, (index + 1).clamp(0, size + 1)[..., None], weight[..., None])
    return weights[..., 1:-1] * (coords.abs() <= 1)[..., None]


def paste_masks(masks: Tensor, boxes_xyxy: Tensor, height: int, width: int,
                threshold: float | None = 0.5, chunk: int = 16) -> Tensor:
    """Paste box-relative masks into an image.

    masks: (N, S, S) probabilities; boxes_xyxy: (N, 4) pixels of the target image.
    Returns (N, height, width): bool when ``threshold`` is given, else float probabilities.
    Pixels outside a box are 0. Each pixel centre (x + 0.5, y + 0.5) is mapped into the box and the
    mask is sampled bilinearly there (``grid_sample``'s, ``align_corners=False``, zero padding;
    computed as two small matrix products, bilinear sampling being separable). Only each box's
    own pixel window is sampled (``chunk`` boxes of similar size at a time, in one window as large
    as the largest of them), so the cost follows the boxes' area, not the image's.
    """
    n = masks.shape[0]
    dtype = torch.bool if threshold is not None else torch.float32
    out = torch.zeros((n, height, width), dtype=dtype, device=masks.device)
    if n == 0 or height == 0 or width == 0:
        return out
    boxes = boxes_xyxy.float()
    # each box's pixel window, one pixel wider than its edges (the exact inside test is below)
    windows = torch.stack([boxes[:, 0].floor() - 1, boxes[:, 1].floor() - 1,
                           boxes[:, 2].ceil() + 1, boxes[:, 3].ceil() + 1], dim=1)
    windows = torch.maximum(torch.minimum(windows.nan_to_num(0.0), torch.tensor(
        [width, height, width, height], dtype=torch.float32, device=boxes.device)),
        torch.zeros(4, device=boxes.device)).long()
    sizes = (windows[:, 2:] - windows[:, :2]).clamp(min=0)  # (N, 2) window width, height
    sizes[~torch.isfinite(boxes).all(dim=1)] = 0  # a box with NaN / inf pastes nothing
    order = (sizes[:, 0] * sizes[:, 1]).argsort().tolist()
    sizes_list, windows_list = sizes.tolist(), windows.tolist()  # indexed per box below
    steps = torch.arange(int(sizes.max()) + 1, device=masks.device, dtype=torch.float32) + 0.5
    for start in range(0, n, chunk):
        idx = [i for i in order[start:start + chunk] if min(sizes_list[i]) > 0]
        if not idx:
            continue
        sel = torch.tensor(idx, device=masks.device)
        ww, wh = (max(sizes_list[i][axis] for i in idx) for axis in (0, 1))
        x0, y0, x1, y1 = boxes[sel].unbind(1)
        xs = windows[sel, 0:1].float() + steps[None, :ww]  # (n, ww) pixel centres
        ys = windows[sel, 1:2].float() + steps[None, :wh]  # (n, wh)
        gx = (xs - x0[:, None]) / (x1 - x0).clamp(min=1e-6)[:, None] * 2 - 1
        gy = (ys - y0[:, None]) / (y1 - y0).clamp(min=1e-6)[:, None] * 2 - 1
        # bilinear sampling with zero padding is separable: rows, then columns
        rows, cols = _bilinear_weights(gy, masks.shape[1]), _bilinear_weights(gx, masks.shape[2])
        pasted = rows @ masks[sel].float() @ cols.transpose(1, 2)  # (n, wh, ww)
        if threshold is not None:
            pasted = pasted >= threshold
        for k, i in enumerate(idx):
            c0, r0, c1, r1 = windows_list[i]
            out[i, r0:r1, c0:c1] = pasted[k, :r1 - r0, :c1 - c0]
    return out


@dataclass
class Detections:
    """Top-scoring (query, class) pairs of one stage for one image, at the original image size.

    scores (N,), labels (N,) contiguous class indices, queries (N,) the query each came from,
    boxes_xyxy (N, 4) pixels of the original image, mask_probs (N, S, S) box-relative.
    """

    scores: Tensor
    labels: Tensor
    queries: Tensor
    boxes_xyxy: Tensor
    mask_probs: Tensor

    def __len__(self) -> int:
        return int(self.scores.numel())

    def keep(self, index: Tensor) -> "Detections":
        return Detections(self.scores[index], self.labels[index], self.queries[index],
                          self.boxes_xyxy[index], self.mask_probs[index])

    def above(self, score_threshold: float) -> "Detections":
        return self.keep(self.scores >= score_threshold)

    def masks(self, height: int, width: int) -> Tensor:
        """(N, height, width) bool masks pasted at the boxes, thresholded at 0.5."""
        return paste_masks(self.mask_probs, self.boxes_xyxy, height, width)


def maskness(mask_probs: Tensor, threshold: float = 0.5) -> Tensor:
    """(N, S, S) mask probabilities -> (N,) the mean probability over the pixels at or above
    ``threshold`` (SOLOv2's maskness): near 1 for a confident mask, lower for a hesitant one;
    0 for a mask with no such pixel."""
    probs = mask_probs.float().flatten(1)
    fg = probs >= threshold
    return (probs * fg).sum(1) / fg.sum(1).clamp(min=1)


def top_detections(logits: Tensor, boxes_xyxy: Tensor, mask_probs: Tensor, top_k: int = 100,
                   maskness_power: float = 0.0) -> Detections:
    """Select the ``top_k`` (query, class) pairs by score over all Q x C pairs.

    logits (Q, C), boxes_xyxy (Q, 4), mask_probs (Q, S, S). A score is the class's sigmoid
    probability, times :func:`maskness` of the query's mask to the power ``maskness_power``
    when it is above 0 (``ModelConfig.maskness_power``). A query can appear with several classes,
    as in the official ISTR (no NMS, no threshold).
    """
    q, c = logits.shape
    scores = logits.float().sigmoid()
    if maskness_power > 0:
        scores = scores * maskness(mask_probs)[:, None] ** maskness_power
    scores = scores.flatten()
    k = min(top_k, scores.numel())
    top_scores, flat = scores.topk(k)
    queries = torch.div(flat, c, rounding_mode="floor")
    labels = flat % c
    return Detections(top_scores, labels, queries, boxes_xyxy[queries], mask_probs[queries])


def rescale_boxes(boxes_xyxy: Tensor, input_size: tuple[int, int], orig_size: tuple[int, int]
                  ) -> Tensor:
    """Map boxes from the network input's valid size (H, W) to the original (H0, W0) and clip."""
    (h, w), (h0, w0) = input_size, orig_size
    scale = torch.tensor([w0 / w, h0 / h, w0 / w, h0 / h], device=boxes_xyxy.device)
    out = boxes_xyxy.float() * scale
    out[:, 0::2] = out[:, 0::2].clamp(0, w0)
    out[:, 1::2] = out[:, 1::2].clamp(0, h0)
    return out


def mask_to_rle(mask: np.ndarray) -> dict:
    """COCO compressed RLE of an (H, W) bool mask, ``counts`` as str (JSON-ready)."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle
