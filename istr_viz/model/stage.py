"""One ISTR refinement stage (``RCNNHead`` of the official ``head.py``), with no weights shared.

Per query: RoI pool at its current box -> self-attention among the image's queries -> dynamic
instance interaction (``DynamicConv``) -> FFN -> three MLP branches predicting class logits, box
deltas (applied to the stage's input boxes) and the mask embedding. ELU everywhere, post-norm.

The mask embedding comes from the query's features, pooled at the stage's *input* box, yet the
decoded mask is pasted into its *output* box (ISTR v1). With ``mask_head="roi"`` (not in v1; after
v2, which pools the output box for its mask head) the stage also pools a P x P RoI at its own
detached output box, encodes it (``RoIMaskEncoder``), adds it to the query's features and
predicts the embedding from the sum: the mask head sees the frame its mask is drawn in. That RoI
is the next stage's input RoI, so only the last stage pools once more. Pair it with
``LossConfig.mask_target_boxes="pred"``, the targets cropped to that same box. One difference
remains: the RoI is pooled at the box as predicted, while the targets are cropped, and the masks
pasted, at the box clipped to the image, so for a box over the border the cells do not line up.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from istr_viz.boxes import DEFAULT_DELTA_WEIGHTS, DEFAULT_SCALE_CLAMP, apply_deltas
from istr_viz.config import MASK_HEADS
from istr_viz.errors import NonFiniteError
from istr_viz.model.activations import ELU
from istr_viz.model.pooler import RoIPooler


def mlp_branch(dim: int, num_layers: int) -> nn.Sequential:
    """``num_layers`` x [Linear(D, D, no bias), LayerNorm, ELU]."""
    layers: list[nn.Module] = []
    for _ in range(num_layers):
        layers += [nn.Linear(dim, dim, bias=False), nn.LayerNorm(dim), ELU()]
    return nn.Sequential(*layers)


class DynamicConv(nn.Module):
    """Dynamic instance interaction: each query generates two matrices for its RoI feature."""

    def __init__(self, hidden_dim: int, dim_dynamic: int, pooler_resolution: int):
        super().__init__()
        self.hidden_dim, self.dim_dynamic = hidden_dim, dim_dynamic
        self.dynamic_layer = nn.Linear(hidden_dim, 2 * hidden_dim * dim_dynamic)
        self.norm1 = nn.LayerNorm(dim_dynamic)
        self.norm2 = nn.LayerNorm(hidden_dim)
        self.activation = ELU()
        self.out_layer = nn.Linear(hidden_dim * pooler_resolution**2, hidden_dim)
        self.norm3 = nn.LayerNorm(hidden_dim)

    def forward(self, query: Tensor, roi: Tensor) -> Tensor:
        """query (N, D), roi (N, P*P, D) -> (N, D), N = B * Q."""
        D, E = self.hidden_dim, self.dim_dynamic
        params = self.dynamic_layer(query)  # (N, 2*D*E)
        param1 = params[:, : D * E].view(-1, D, E)
        param2 = params[:, D * E :].view(-1, E, D)
        x = self.activation(self.norm1(roi @ param1))  # (N, P*P, E)
        x = self.activation(self.norm2(x @ param2))  # (N, P*P, D)
        return self.activation(self.norm3(self.out_layer(x.flatten(1))))  # (N, D)


class RoIMaskEncoder(nn.Module):
    """Encode the RoI pooled at a query's output box as one vector (``mask_head="roi"``).

    Each of the P x P cells goes through Linear(D, E) -> LN -> ELU, with E = ``dim_dynamic``.
    The cells are then flattened in order, which keeps where the object lies inside the box, and
    go through Linear(P*P*E, D) -> LN -> ELU.

    Every query uses the same weights. A ``DynamicConv`` would have each query generate its own,
    at several times the cost. Measured on ``shapes-cpu``, the training step grows by 7-15% with
    this encoder and by 35-55% with a ``DynamicConv`` (benchmarks/results_log.md, session 14).
    """

    def __init__(self, hidden_dim: int, dim_reduced: int, pooler_resolution: int):
        super().__init__()
        self.reduce = nn.Linear(hidden_dim, dim_reduced)
        self.norm1 = nn.LayerNorm(dim_reduced)
        self.activation = ELU()
        self.out_layer = nn.Linear(dim_reduced * pooler_resolution**2, hidden_dim)
        self.norm2 = nn.LayerNorm(hidden_dim)

    def forward(self, roi: Tensor) -> Tensor:
        """roi (N, P*P, D) -> (N, D)."""
        x = self.activation(self.norm1(self.reduce(roi)))  # (N, P*P, E)
        return self.activation(self.norm2(self.out_layer(x.flatten(1))))


class RoIMaskConvEncoder(nn.Module):
    """Encode an R x R RoI pooled at a query's output box as one vector
    (``ModelConfig.mask_roi_resolution`` = R).

    A 3 x 3 stride-2 conv (padding 1) from D to E = ``dim_dynamic`` channels -> LN -> ELU over
    each of the ceil(R / 2)^2 cells (any R >= 2), which are then flattened in order (where the
    object lies inside the box is kept) and go through Linear(ceil(R/2)^2 * E, D) -> LN -> ELU,
    as in ``RoIMaskEncoder``.
    """

    def __init__(self, hidden_dim: int, dim_reduced: int, resolution: int):
        super().__init__()
        self.conv = nn.Conv2d(hidden_dim, dim_reduced, 3, stride=2, padding=1)
        self.norm1 = nn.LayerNorm(dim_reduced)
        self.activation = ELU()
        cells = (resolution + 1) // 2
        self.out_layer = nn.Linear(dim_reduced * cells * cells, hidden_dim)
        self.norm2 = nn.LayerNorm(hidden_dim)

    def forward(self, roi: Tensor) -> Tensor:
        """roi (N, D, R, R) -> (N, D)."""
        x = self.activation(self.norm1(self.conv(roi).permute(0, 2, 3, 1)))  # (N, r, r, E)
        return self.activation(self.norm2(self.out_layer(x.flatten(1))))


class StageResult(NamedTuple):
    """What one stage returns (``ISTR`` decodes masks and assembles ``StageOutput``)."""

    query_features: Tensor  # (B, Q, D) obj features, the next stage's queries
    logits: Tensor | None  # (B, Q, C); None when the stage ran without its heads
    boxes_xyxy: Tensor  # (B, Q, 4) pixels
    mask_embed: Tensor | None  # (B, Q, M); None when the stage ran without its heads
    attn: Tensor | None  # (B, Q, Q) self-attention weights averaged over heads
    # (B*Q, P*P, D) RoI features at the detached output boxes (mask_head="roi"), which are the
    # next stage's input boxes: it takes them instead of pooling the same boxes again; None
    # from the last stage (``next_roi=False``) when its mask branch reads its own finer RoI
    output_roi: Tensor | None = None


class RefinementStage(nn.Module):
    """One stage. Call ``reset_parameters(prior_prob)`` after construction (``ISTR`` does)."""

    def __init__(self, num_classes: int, mask_dim: int, hidden_dim: int = 256,
                 dim_dynamic: int = 64, dim_feedforward: int = 2048, num_heads: int = 8,
                 num_cls_layers: int = 3, num_reg_layers: int = 3, num_mask_layers: int = 3,
                 dropout: float = 0.0, pooler_resolution: int = 7,
                 delta_weights: tuple[float, float, float, float] = DEFAULT_DELTA_WEIGHTS,
                 scale_clamp: float = DEFAULT_SCALE_CLAMP, mask_head: str = "query",
                 mask_roi_resolution: int = 0):
        super().__init__()
        if mask_head not in MASK_HEADS:
            raise ValueError(f"mask_head must be one of {MASK_HEADS}, got {mask_head!r}")
        D = hidden_dim
        self.self_attn = nn.MultiheadAttention(D, num_heads, dropout=dropout, batch_first=True)
        self.norm1 = nn.LayerNorm(D)
        self.dynamic_conv = DynamicConv(D, dim_dynamic, pooler_resolution)
        self.norm2 = nn.LayerNorm(D)
        self.ffn = nn.Sequential(nn.Linear(D, dim_feedforward), ELU(),
                                 nn.Dropout(dropout), nn.Linear(dim_feedforward, D))
        self.norm3 = nn.LayerNorm(D)
        self.dropout = nn.Dropout(dropout)
        self.cls_branch = mlp_branch(D, num_cls_layers)
        self.reg_branch = mlp_branch(D, num_reg_layers)
        self.mask_branch = mlp_branch(D, num_mask_layers)
        # mask_head="roi": a RoI pooled at the output box joins the query before the mask branch
        # (its own finer RoI with mask_roi_resolution > 0, ``ISTR.mask_pooler``)
        if mask_roi_resolution and mask_head != "roi":
            raise ValueError("mask_roi_resolution needs mask_head='roi'")
        self.mask_roi_resolution = mask_roi_resolution
        self.mask_roi_encoder: nn.Module | None = None
        if mask_head == "roi" and mask_roi_resolution:
            self.mask_roi_encoder = RoIMaskConvEncoder(D, dim_dynamic, mask_roi_resolution)
        elif mask_head == "roi":
            self.mask_roi_encoder = RoIMaskEncoder(D, dim_dynamic, pooler_resolution)
        self.mask_norm = nn.LayerNorm(D) if mask_head == "roi" else None
        self.class_logits = nn.Linear(D, num_classes)
        self.bbox_deltas = nn.Linear(D, 4)
        self.mask_embed = nn.Linear(D, mask_dim)
        self.delta_weights = delta_weights
        self.scale_clamp = scale_clamp

    def reset_parameters(self, prior_prob: float = 0.01, zero_box_deltas: bool = False) -> None:
        """Official init: xavier_uniform_ on every weight with dim > 1, class bias at the prior.

        ``zero_box_deltas``: start the box-delta layer at zero, so every stage initially returns its
        input boxes (as Deformable DETR does); the official xavier init makes untrained stages
        compound large random deltas, boxes many times the image, which slows training from scratch.
        """
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        nn.init.constant_(self.class_logits.bias, -math.log((1 - prior_prob) / prior_prob))
        if zero_box_deltas:
            nn.init.zeros_(self.bbox_deltas.weight)
            nn.init.zeros_(self.bbox_deltas.bias)

    def forward(self, features: list[Tensor], boxes_xyxy: Tensor, query_features: Tensor,
                pooler: RoIPooler, return_attention: bool = False,
                attn_mask: Tensor | None = None, roi: Tensor | None = None,
                heads: bool = True, mask_pooler: RoIPooler | None = None,
                next_roi: bool = True) -> StageResult:
        """
        Args:
            features: FPN maps [P2..P5], each (B, D, h_l, w_l).
            boxes_xyxy: (B, Q, 4) this stage's input boxes in pixels (detached by the caller).
            query_features: (B, Q, D) this stage's input queries.
            pooler: the shared ``RoIPooler``.
            return_attention: also return the (B, Q, Q) head-averaged self-attention weights.
            attn_mask: optional (B * num_heads, Q, Q) bool, True where a query may not attend
                (the training-only denoising queries, ``istr_viz.model.denoising``).
            roi: optional (B*Q, P*P, D) features already pooled at ``boxes_xyxy`` (the previous
                stage's ``output_roi``); pooled here when None.
            heads: False skips the class and mask heads (``logits`` and ``mask_embed`` are then
                None): an intermediate stage at inference, when only the last stage's
                predictions are wanted, refines the boxes and queries and nothing more.
            mask_pooler: the R x R pooler of the mask branch's own RoI (``ISTR.mask_pooler``);
                required when the stage was built with ``mask_roi_resolution`` R > 0.
            next_roi: whether a next stage takes ``output_roi``. False (the last stage) skips
                that pooling where the mask branch does not read it either (its own R x R RoI).
        """
        B, Q, D = query_features.shape
        if roi is None:
            roi = pooler(features, boxes_xyxy).flatten(2).transpose(1, 2)  # (B*Q, P*P, D)

        attn_out, attn = self.self_attn(query_features, query_features, query_features,
                                        need_weights=return_attention, attn_mask=attn_mask,
                                        average_attn_weights=True)
        x = self.norm1(query_features + self.dropout(attn_out))  # (B, Q, D)

        inter = self.dynamic_conv(x.reshape(B * Q, D), roi).view(B, Q, D)
        x = self.norm2(x + self.dropout(inter))
        x = self.norm3(x + self.dropout(self.ffn(x)))  # (B, Q, D) obj features

        deltas = self.bbox_deltas(self.reg_branch(x))  # (B, Q, 4)
        boxes = apply_deltas(deltas.reshape(B * Q, 4).float(), boxes_xyxy.reshape(B * Q, 4),
                             self.delta_weights, self.scale_clamp).view(B, Q, 4)
        if not torch.isfinite(boxes).all():  # the next pooling (here or the next stage) can't
            raise NonFiniteError("predicted non-finite boxes")
        out_roi = None
        # pooled at the output boxes: the next stage's input RoI, and the mask branch's unless it
        # reads its own finer one
        if self.mask_roi_encoder is not None and (
                next_roi or (heads and not self.mask_roi_resolution)):
            out_roi = pooler(features, boxes.detach()).flatten(2).transpose(1, 2)  # (B*Q, P*P, D)
        if not heads:
            return StageResult(x, None, boxes, None, attn if return_attention else None, out_roi)
        logits = self.class_logits(self.cls_branch(x))  # (B, Q, C)
        mask_feat = x
        if self.mask_roi_encoder is not None:
            if self.mask_roi_resolution:
                if mask_pooler is None:
                    raise ValueError("this stage reads its own mask RoI: pass mask_pooler")
                mask_roi = mask_pooler(features, boxes.detach())  # (B*Q, D, R, R)
                encoded = self.mask_roi_encoder(mask_roi).view(B, Q, D)
            else:
                encoded = self.mask_roi_encoder(out_roi).view(B, Q, D)
            mask_feat = self.mask_norm(x + self.dropout(encoded))
        mask_embed = self.mask_embed(self.mask_branch(mask_feat))  # (B, Q, M)
        return StageResult(x, logits, boxes, mask_embed, attn if return_attention else None,
                           out_roi)
