"""Query denoising (DN-DETR, Li et al., CVPR 2022), a training-only aid; inference is ISTR's.

During training, ``groups`` noised copies of every ground-truth box join the learned proposals as
extra queries. Their query features are a label embedding (of a label that is sometimes flipped),
and each is supervised to reconstruct its own instance, with no Hungarian matching. An attention
mask keeps the learned queries from seeing them (so the learned queries learn what they would at
test time) and keeps the groups from seeing each other. The stated benefit is a stable target for
every query early in training, when the bipartite matching still flips from one step to the next.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class DenoisingQueries:
    """The denoising part of a batch, N = groups x (most instances in one image of the batch).

    Attributes:
        boxes_xyxy: (B, N, 4) noised GT boxes in pixels, clipped to the image; padding slots
            (images with fewer instances) hold the whole image.
        labels: (B, N) long, the (sometimes flipped) class whose embedding is the query feature.
        gt_index: (B, N) long, the GT instance each query reconstructs; -1 on padding slots.
        attn_mask: (B, Q + N, Q + N) bool, True where a query may *not* attend to another.
    """

    boxes_xyxy: Tensor
    labels: Tensor
    gt_index: Tensor
    attn_mask: Tensor


def noise_boxes(boxes_xyxy: Tensor, scale: float, image_size: Tensor,
                generator: torch.Generator | None = None) -> Tensor:
    """Move every corner of (N, 4) pixel boxes by up to ``scale`` x half the box's width / height
    (uniformly, independently), clip to the [H, W] ``image_size`` and keep at least 1 px sides."""
    wh = (boxes_xyxy[:, 2:] - boxes_xyxy[:, :2]).repeat(1, 2) / 2  # (N, 4)
    jitter = torch.rand(boxes_xyxy.shape, generator=generator, device=boxes_xyxy.device) * 2 - 1
    noised = boxes_xyxy + jitter * wh * scale
    H, W = (float(v) for v in image_size)
    x0, y0 = noised[:, 0].clamp(0, W - 1), noised[:, 1].clamp(0, H - 1)
    x1 = torch.maximum(noised[:, 2].clamp(max=W), x0 + 1)
    y1 = torch.maximum(noised[:, 3].clamp(max=H), y0 + 1)
    return torch.stack([x0, y0, x1, y1], dim=1)


def make_denoising_queries(targets: Sequence[Mapping[str, Tensor]], num_queries: int,
                           groups: int, num_classes: int, box_noise: float = 0.4,
                           label_noise: float = 0.2, generator: torch.Generator | None = None
                           ) -> DenoisingQueries | None:
    """Build the denoising queries of a batch from its dataset target dicts (``boxes_xyxy``,
    ``labels``, ``size``); None when no image has an instance.

    Group g of image b occupies slots [g * Gmax, (g + 1) * Gmax) after the ``num_queries``
    learned queries; slot g * Gmax + i reconstructs instance i (padding beyond its count).
    """
    device = targets[0]["boxes_xyxy"].device
    counts = [int(t["labels"].numel()) for t in targets]
    gmax = max(counts, default=0)
    if gmax == 0 or groups < 1:
        return None
    B, N, Q = len(targets), groups * gmax, num_queries
    boxes = torch.zeros(B, N, 4, device=device)
    labels = torch.zeros(B, N, dtype=torch.long, device=device)
    gt_index = torch.full((B, N), -1, dtype=torch.long, device=device)
    for b, t in enumerate(targets):
        H, W = (float(v) for v in t["size"])
        boxes[b] = torch.tensor([0.0, 0.0, W, H], device=device)
        G = counts[b]
        if G == 0:
            continue
        gt_boxes = t["boxes_xyxy"].float().to(device).repeat(groups, 1)  # (groups * G, 4)
        gt_labels = t["labels"].long().to(device).repeat(groups)
        flip = torch.rand(gt_labels.shape, generator=generator, device=device) < label_noise
        random_labels = torch.randint(num_classes, gt_labels.shape, generator=generator,
                                      device=device)
        slots = (torch.arange(groups, device=device)[:, None] * gmax
                 + torch.arange(G, device=device)[None]).flatten()
        boxes[b, slots] = noise_boxes(gt_boxes, box_noise, t["size"], generator)
        labels[b, slots] = torch.where(flip, random_labels, gt_labels)
        gt_index[b, slots] = torch.arange(G, device=device).repeat(groups)

    L = Q + N
    mask = torch.zeros(L, L, dtype=torch.bool, device=device)
    mask[:Q, Q:] = True  # the learned queries never see the denoising ones
    group_of = torch.arange(N, device=device) // gmax
    mask[Q:, Q:] = group_of[:, None] != group_of[None, :]  # nor do the groups see each other
    mask = mask.expand(B, L, L).clone()
    mask[:, :, Q:] |= (gt_index < 0)[:, None, :]  # nobody attends to a padding slot
    return DenoisingQueries(boxes, labels, gt_index, mask)


__all__ = ["DenoisingQueries", "make_denoising_queries", "noise_boxes"]
