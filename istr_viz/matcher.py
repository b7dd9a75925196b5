"""Hungarian matching of one stage's queries to the ground truth (ISTR v1 ``HungarianMatcher``).

The cost of assigning query q to GT instance g is a weighted sum of named terms, each (Q, G):

    "class": focal cost at the GT class, pos - neg with alpha 0.25, gamma 2
    "l1":    L1 between xyxy boxes divided by the image (w, h, w, h)
    "giou":  -GIoU of the pixel boxes
    "mask":  -(cos(z_pred, z_gt) + 1) / 2 on mask embeddings, z_gt = basis.encode(GT crop, no noise)

Each term is checked for NaN/Inf and a ``NonFiniteCostError`` names the first bad one, instead of
scipy's "matrix contains invalid numeric entries". Everything runs without gradients in fp32.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor
from torchvision.ops import generalized_box_iou, roi_align

from istr_viz.boxes import image_scale_xyxy
from istr_viz.errors import NonFiniteError
from istr_viz.model.istr import MaskCodec
from istr_viz.model.outputs import StageOutput

COST_TERMS = ("class", "l1", "giou", "mask")


def no_autocast(device: torch.device) -> torch.autocast:
    """A context that turns autocast off, so costs and losses stay fp32 under bf16 training."""
    return torch.autocast(device_type=torch.device(device).type, enabled=False)


class NonFiniteCostError(NonFiniteError):
    """A matching cost term holds NaN or Inf (usually diverged boxes or logits)."""

    def __init__(self, term: str, count: int):
        self.term = term
        super().__init__(f"matching cost term {term!r} has {count} non-finite entries "
                         "(NaN/Inf predictions: lower the learning rate or clip gradients)")


def crop_gt_masks(masks: Tensor, boxes_xyxy: Tensor, mask_size: int) -> Tensor:
    """Crop each full-image mask to its box and resample to S x S (detectron2 ``BitMasks``).

    Args:
        masks: (G, H, W) bool or {0, 1} full-image masks.
        boxes_xyxy: (G, 4) pixel boxes, one per mask (GT boxes, or predicted boxes for the v2
            loss frame).
        mask_size: S.

    Returns:
        (G, S, S) bool: ``roi_align(aligned=True, sampling_ratio=0) >= 0.5``.
    """
    G = masks.shape[0]
    if G == 0:
        return torch.zeros((0, mask_size, mask_size), dtype=torch.bool, device=masks.device)
    rois = torch.cat([torch.arange(G, device=masks.device, dtype=torch.float32)[:, None],
                      boxes_xyxy.to(masks.device, torch.float32)], dim=1)  # (G, 5)
    crops = roi_align(masks[:, None].float(), rois, (mask_size, mask_size), spatial_scale=1.0,
                      sampling_ratio=0, aligned=True)  # (G, 1, S, S)
    return crops[:, 0] >= 0.5


@dataclass
class MatchTarget:
    """One image's ground truth, prepared once and reused by every stage.

    Attributes:
        labels: (G,) long contiguous class indices.
        boxes_xyxy: (G, 4) pixel boxes.
        image_size: (2,) [H, W] valid image size.
        mask_crops: (G, S, S) float {0, 1}, GT masks cropped to the GT boxes.
        mask_embed: (G, M) ``basis.encode(mask_crops, noise=False)``.
        masks: (G, H, W) bool full-image masks (for re-cropping in another frame).
    """

    labels: Tensor
    boxes_xyxy: Tensor
    image_size: Tensor
    mask_crops: Tensor
    mask_embed: Tensor
    masks: Tensor

    @property
    def num_gt(self) -> int:
        return int(self.labels.shape[0])


@torch.no_grad()
def prepare_target(target: Mapping[str, Tensor], basis: MaskCodec,
                   device: torch.device | str | None = None) -> MatchTarget:
    """A dataset target dict (``boxes_xyxy``, ``labels``, ``masks``, ``size``) -> ``MatchTarget``.

    Crowd regions (``crowd_*`` keys) are never targets and are ignored here.
    """
    boxes = target["boxes_xyxy"].to(device, torch.float32)
    masks = target["masks"].to(device)
    crops = crop_gt_masks(masks, boxes, basis.mask_size).float()
    with no_autocast(crops.device):
        embed = basis.encode(crops, noise=False).float()  # (G, M)
    return MatchTarget(labels=target["labels"].to(device, torch.long), boxes_xyxy=boxes,
                       image_size=target["size"].to(device), mask_crops=crops, mask_embed=embed,
                       masks=masks)


def focal_class_cost(logits: Tensor, labels: Tensor, alpha: float = 0.25,
                     gamma: float = 2.0) -> Tensor:
    """(Q, C) logits, (G,) labels -> (Q, G) focal cost pos - neg at each GT's class."""
    prob = logits[:, labels].float().sigmoid()  # (Q, G)
    neg = (1 - alpha) * prob**gamma * -(1 - prob + 1e-8).log()
    pos = alpha * (1 - prob) ** gamma * -(prob + 1e-8).log()
    return pos - neg


def mask_embedding_cost(pred_embed: Tensor, gt_embed: Tensor) -> Tensor:
    """(Q, M), (G, M) -> (Q, G) in [-1, 0]: -(cosine + 1) / 2; -1 for parallel embeddings."""
    cos = F.normalize(pred_embed.float(), dim=-1) @ F.normalize(gt_embed.float(), dim=-1).T
    return -(cos + 1) / 2


@torch.no_grad()
def match_costs(logits: Tensor, boxes_xyxy: Tensor, mask_embed: Tensor, target: MatchTarget,
                weights: Mapping[str, float], alpha: float = 0.25, gamma: float = 2.0
                ) -> dict[str, Tensor]:
    """Weighted cost terms of one image, each (Q, G) float32; their sum is the matching cost.

    Args:
        logits: (Q, C), boxes_xyxy: (Q, 4) pixels, mask_embed: (Q, M) of one stage and image.
        target: the image's ``MatchTarget``.
        weights: weight per term name in ``COST_TERMS`` (``LossConfig.cost_weights()``); the
            returned terms are already multiplied by them (raw = term / weight).

    Raises:
        NonFiniteCostError: naming the first term holding NaN/Inf.
    """
    scale = image_scale_xyxy(target.image_size).to(boxes_xyxy.device)  # (4,)
    pred_boxes = boxes_xyxy.float()
    with no_autocast(boxes_xyxy.device):
        raw = {
            "class": focal_class_cost(logits, target.labels, alpha, gamma),
            "l1": torch.cdist(pred_boxes / scale, target.boxes_xyxy / scale, p=1),
            "giou": -generalized_box_iou(pred_boxes, target.boxes_xyxy),
            "mask": mask_embedding_cost(mask_embed, target.mask_embed),
        }
    terms = {name: weights[name] * raw[name] for name in COST_TERMS}
    for name, term in terms.items():
        bad = int((~torch.isfinite(term)).sum())
        if bad:
            raise NonFiniteCostError(name, bad)
    return terms


@dataclass
class Match:
    """The optimal one-to-one assignment of one stage for one image (tensors on the CPU).

    Attributes:
        query_idx: (N,) long matched queries, N = min(Q, G), sorted by query.
        gt_idx: (N,) long the GT instance of each matched query.
        cost: (Q, G) float32 total cost, equal to ``sum(terms.values())``.
        terms: name -> (Q, G) float32 weighted term (see ``COST_TERMS``).
        weights: name -> weight used, so ``terms[name] / weights[name]`` is the raw term.
    """

    query_idx: Tensor
    gt_idx: Tensor
    cost: Tensor
    terms: dict[str, Tensor]
    weights: dict[str, float]

    @property
    def num_matched(self) -> int:
        return int(self.query_idx.numel())

    def gt_of_query(self, num_queries: int) -> Tensor:
        """(Q,) long: the GT index matched to each query, -1 for unmatched queries."""
        out = torch.full((num_queries,), -1, dtype=torch.long)
        out[self.query_idx] = self.gt_idx
        return out


def hungarian(cost: Tensor) -> tuple[Tensor, Tensor]:
    """(Q, G) cost -> (rows, cols) long tensors of the minimum-cost assignment (scipy, fp32 CPU)."""
    rows, cols = linear_sum_assignment(cost.detach().float().cpu().numpy())
    return torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)


@torch.no_grad()
def hungarian_match(logits: Tensor, boxes_xyxy: Tensor, mask_embed: Tensor, target: MatchTarget,
                    weights: Mapping[str, float], alpha: float = 0.25, gamma: float = 2.0
                    ) -> Match:
    """Match one image's queries (tensors as in :func:`match_costs`) to its ground truth.

    G = 0 is a normal case: an empty match with (Q, 0) cost and terms.
    """
    terms = {k: v.cpu() for k, v in
             match_costs(logits, boxes_xyxy, mask_embed, target, weights, alpha, gamma).items()}
    cost = torch.stack(list(terms.values())).sum(0)  # (Q, G)
    if target.num_gt == 0:
        empty = torch.zeros(0, dtype=torch.long)
        return Match(empty, empty.clone(), cost, terms, dict(weights))
    rows, cols = hungarian(cost)
    return Match(rows, cols, cost, terms, dict(weights))


@torch.no_grad()
def match_batch(stage: StageOutput, targets: Sequence[Mapping[str, Tensor] | MatchTarget],
                basis: MaskCodec, weights: Mapping[str, float], alpha: float = 0.25,
                gamma: float = 2.0) -> list[Match]:
    """Match every image of one stage. ``targets`` are dataset dicts or prepared ``MatchTarget``s
    (prepare them once with :func:`prepare_target` when matching several stages)."""
    device = stage.logits.device
    matches = []
    for i, target in enumerate(targets):
        if not isinstance(target, MatchTarget):
            target = prepare_target(target, basis, device)
        matches.append(hungarian_match(stage.logits[i], stage.boxes_xyxy[i],
                                       stage.mask_embed[i], target, weights, alpha, gamma))
    return matches
