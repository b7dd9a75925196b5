"""The ISTR model: learned queries refined by K stages; ``forward`` returns every stage."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Protocol

import torch
from torch import Tensor, nn

from istr_viz.boxes import denormalize_boxes, normalize_boxes
from istr_viz.config import ModelConfig, first_mask_roi_stage
from istr_viz.errors import ConfigError, NonFiniteError
from istr_viz.model.activations import library_elu_for, set_elu_kernel
from istr_viz.model.backbone import build_backbone
from istr_viz.model.denoising import make_denoising_queries
from istr_viz.model.outputs import ISTROutput, StageOutput
from istr_viz.model.pooler import RoIPooler
from istr_viz.model.stage import RefinementStage


class MaskCodec(Protocol):
    """What the model, matcher and losses use of a mask basis (``istr_viz.basis.MaskBasis``)."""

    dim: int  # M
    mask_size: int  # S

    def encode(self, masks: Tensor, *, noise: bool) -> Tensor:
        """(N, S, S) {0, 1} box-relative masks -> (N, M) codes."""

    def decode(self, codes: Tensor) -> Tensor:
        """(N, M) codes -> (N, S, S) probabilities, differentiable, on the codes' device."""


def valid_mask(image_sizes: Tensor, height: int, width: int) -> Tensor:
    """(B, 2) [H, W] -> (B, 1, height, width) bool, True inside each image's valid region."""
    rows = torch.arange(height, device=image_sizes.device)
    cols = torch.arange(width, device=image_sizes.device)
    inside_r = rows[None, :] < image_sizes[:, :1]  # (B, height)
    inside_c = cols[None, :] < image_sizes[:, 1:]  # (B, width)
    return (inside_r[:, :, None] & inside_c[:, None, :])[:, None]


def global_image_feature(features: list[Tensor], strides: tuple[int, ...],
                         image_sizes: Tensor) -> Tensor:
    """Sum over the FPN levels of each level's spatial mean over the image's valid region.

    The official ``ImgFeatExtractor`` averages over the padded map; averaging over the valid
    cells (ceil(H / s) x ceil(W / s) at stride s) makes the feature independent of the padding
    that other images in the batch impose. Returns (B, D).
    """
    total = 0
    sizes = None
    for feat, stride in zip(features, strides):
        h, w = feat.shape[-2:]
        if feat.requires_grad and torch.is_grad_enabled():
            # training: a masked sum, whose backward is one product with the mask
            cells = torch.div(image_sizes + stride - 1, stride, rounding_mode="floor")
            mask = valid_mask(cells, h, w).to(feat.dtype)  # (B, 1, h, w)
            total = total + (feat * mask).sum((2, 3)) / mask.sum((2, 3)).clamp(min=1)
            continue
        # inference: each image's valid cells as a slice, summed as (D, cells) rows, without
        # the masked copy of the map (one image, 240 px: 0.18 against 0.72 ms over the four
        # levels; in training the slices' backward writes a whole map per image, 10.2 against
        # 3.8 ms forward + backward for 4 images)
        if sizes is None:
            sizes = image_sizes.tolist()
        sums = []
        for b, (ih, iw) in enumerate(sizes):
            ch, cw = min(-(-int(ih) // stride), h), min(-(-int(iw) // stride), w)
            sums.append(feat[b, :, :ch, :cw].flatten(1).sum(1) / max(ch * cw, 1))
        total = total + torch.stack(sums)
    return total


def grid_proposals(num_queries: int, box_cells: tuple[float, ...] = (2.0,)) -> Tensor:
    """(Q, 4) normalised cxcywh boxes tiled over the image: centres on an n x n grid
    (n = ceil(sqrt(Q)), row by row, the first Q cells). A box's side is ``box_cells[k]`` cells
    (at most the image), k = (row + column) mod len(box_cells): one size everywhere, or with two
    sizes a checkerboard of large and small boxes."""
    if not box_cells or min(box_cells) <= 0:
        raise ConfigError(f"proposal box sizes must be positive cell counts, got {box_cells}",
                          entry="model.proposal_box_cells")
    n = math.ceil(math.sqrt(num_queries))
    index = torch.arange(num_queries)
    col, row = index % n, torch.div(index, n, rounding_mode="floor")
    cx, cy = (col.float() + 0.5) / n, (row.float() + 0.5) / n
    cells = torch.tensor(box_cells, dtype=torch.float32)[(row + col) % len(box_cells)]
    side = (cells / n).clamp(max=1.0)
    return torch.stack([cx, cy, side, side], dim=1)


class ISTR(nn.Module):
    """ISTR (Hu et al., CVPR 2021, code v1) for ``num_classes`` classes.

    Args:
        num_classes: C, classes without background (one sigmoid each).
        basis: the mask basis (``istr_viz.basis.MaskBasis``), used only through ``decode``,
            ``dim`` (M) and ``mask_size`` (S). An nn.Module basis becomes a submodule: it moves
            with ``model.to(device)`` and its buffers sit in ``state_dict()`` under ``basis.``.
        backbone: returns FPN maps [P2..P5] from ``backbone(images, valid_mask)``, with
            attributes ``out_channels`` (== hidden_dim) and ``strides`` (e.g. (4, 8, 16, 32)).
        num_queries: Q learned proposals. num_stages: K refinement stages (no shared weights).
        hidden_dim: D. dim_dynamic, dim_feedforward, num_heads, num_*_layers, dropout,
            pooler_resolution: the stage's sizes (``RefinementStage``).
        canonical_box_size: FPN level assignment ``floor(4 + log2(sqrt(area) / this))``.
        prior_prob: initial foreground probability of every class logit (focal prior).
        zero_box_deltas: start every stage's box-delta layer at zero (identity refinement) instead
            of the official xavier init; helps training from scratch.
        proposal_init: "image" (official) or "grid" (:func:`grid_proposals`).
        proposal_box_cells: the grid boxes' sides in grid cells (:func:`grid_proposals`).
        aux_semantic: add the training-only semantic head (``ModelConfig.aux_semantic``).
        aux_dense_box: add the training-only dense box head (``ModelConfig.aux_dense_box``).
        dn_groups, dn_box_noise, dn_label_noise: training-only query denoising
            (``istr_viz.model.denoising``); 0 groups = off.
        mask_head: "query" (v1) or "roi": where the mask embedding is read (``RefinementStage``).
        mask_roi_resolution: with "roi", 0 = the mask branch reads the stage's P x P RoI at its
            output box; R > 0 = its own R x R RoI there, from ``mask_pooler`` (one FPN level
            finer: twice the canonical box size; one sample a bin).
        mask_roi_first_stage: with R > 0, the first stage (1-based; negative counts from the
            end, -1 = the last) that reads the R x R RoI; earlier stages read the P x P one.
    """

    def __init__(self, num_classes: int, basis: MaskCodec, backbone: nn.Module,
                 num_queries: int = 100, num_stages: int = 6, hidden_dim: int = 256,
                 dim_dynamic: int = 64, dim_feedforward: int = 2048, num_heads: int = 8,
                 num_cls_layers: int = 3, num_reg_layers: int = 3, num_mask_layers: int = 3,
                 dropout: float = 0.0,
                 pooler_resolution: int = 7, canonical_box_size: float = 224.0,
                 prior_prob: float = 0.01, zero_box_deltas: bool = False,
                 proposal_init: str = "image", proposal_box_cells: tuple[float, ...] = (2.0,),
                 aux_semantic: bool = False, aux_dense_box: bool = False,
                 dn_groups: int = 0, dn_box_noise: float = 0.4, dn_label_noise: float = 0.2,
                 mask_head: str = "query", mask_roi_resolution: int = 0,
                 mask_roi_first_stage: int = 1):
        super().__init__()
        if backbone.out_channels != hidden_dim:
            raise ConfigError(f"backbone gives {backbone.out_channels} channels but hidden_dim "
                              f"is {hidden_dim}; they must be equal", entry="model.hidden_dim")
        first_fine = first_mask_roi_stage(mask_roi_first_stage, num_stages)
        if mask_roi_resolution and first_fine is None:
            raise ValueError(f"mask_roi_first_stage must be in 1..{num_stages} or "
                             f"-{num_stages}..-1, got {mask_roi_first_stage}")
        self.num_classes, self.num_queries = num_classes, num_queries
        self.basis = basis
        self.backbone = backbone
        self.pooler = RoIPooler(tuple(backbone.strides), pooler_resolution, 2, canonical_box_size)
        # a box's level is floor(4 + log2(size / canonical)): twice the canonical size puts
        # every box one level finer (down to P2)
        self.mask_pooler = (RoIPooler(tuple(backbone.strides), mask_roi_resolution, 1,
                                      canonical_box_size * 2) if mask_roi_resolution else None)
        self.proposal_boxes = nn.Embedding(num_queries, 4)  # cxcywh normalised
        self.query_embed = nn.Embedding(num_queries, hidden_dim)  # N(0, 1), as in the official code
        self.stages = nn.ModuleList(
            RefinementStage(num_classes, basis.dim, hidden_dim, dim_dynamic, dim_feedforward,
                            num_heads, num_cls_layers, num_reg_layers, num_mask_layers, dropout,
                            pooler_resolution, mask_head=mask_head,
                            mask_roi_resolution=(mask_roi_resolution
                                                 if first_fine and k >= first_fine else 0))
            for k in range(1, num_stages + 1))
        with torch.no_grad():
            if proposal_init == "grid":
                self.proposal_boxes.weight.copy_(grid_proposals(num_queries, proposal_box_cells))
            else:
                self.proposal_boxes.weight[:, :2] = 0.5
                self.proposal_boxes.weight[:, 2:] = 1.0
        for stage in self.stages:
            stage.reset_parameters(prior_prob, zero_box_deltas)
        # one 1x1 conv shared by all FPN levels: C classes + background
        self.semantic_head = nn.Conv2d(hidden_dim, num_classes + 1, 1) if aux_semantic else None
        # one 1x1 conv shared by all FPN levels: log distances (in strides) to the 4 box sides
        self.dense_box_head = nn.Conv2d(hidden_dim, 4, 1) if aux_dense_box else None
        if self.dense_box_head is not None:
            nn.init.normal_(self.dense_box_head.weight, std=0.01)
            nn.init.constant_(self.dense_box_head.bias, math.log(2.0))  # 2 strides to each side
        self.dn_groups, self.dn_box_noise, self.dn_label_noise = dn_groups, dn_box_noise, dn_label_noise
        self.label_embed = nn.Embedding(num_classes, hidden_dim) if dn_groups > 0 else None

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def initial_queries(self, features: list[Tensor], image_sizes: Tensor
                        ) -> tuple[Tensor, Tensor, Tensor]:
        """Stage-1 inputs: boxes (B, Q, 4) pixels (the learned proposals scaled to each valid
        image), query features (B, Q, D) = global image feature + learned embedding, and the
        global image feature (B, D) itself (the denoising queries start from it too)."""
        B = image_sizes.shape[0]
        boxes_cxcywh = self.proposal_boxes.weight[None].expand(B, -1, -1)  # (B, Q, 4)
        boxes_xyxy = denormalize_boxes(boxes_cxcywh, image_sizes)
        image_feat = global_image_feature(features, self.backbone.strides, image_sizes)  # (B, D)
        return boxes_xyxy, image_feat[:, None, :] + self.query_embed.weight[None], image_feat

    def decode_masks(self, mask_embed: Tensor) -> Tensor:
        """(B, Q, M) embeddings -> (B, Q, S, S) probabilities through the basis."""
        B, Q, M = mask_embed.shape
        S = self.basis.mask_size
        return self.basis.decode(mask_embed.reshape(B * Q, M)).view(B, Q, S, S)

    def forward(self, images: Tensor, image_sizes: Tensor, return_attention: bool = False,
                targets: Sequence[Mapping[str, Tensor]] | None = None,
                final_only: bool = False) -> ISTROutput:
        """Run the backbone and all K stages.

        Args:
            images: (B, 3, Hp, Wp) RGB float in [0, 1], zero-padded (``collate`` pads to 32).
            image_sizes: (B, 2) [H, W] valid size of each image; boxes are predicted in this
                frame, so pass the size before padding.
            return_attention: fill ``StageOutput.attn`` with (B, Q, Q) attention weights.
            targets: the batch's dataset target dicts; used only in training with
                ``dn_groups`` > 0, to add the denoising queries (``ISTROutput.dn_stages``).
            final_only: inference when only the detections matter: stages 1..K-1 refine the
                boxes and queries without their class and mask heads, and ``stages`` holds
                the last stage alone (``final``), the same values as with all stages. Not in
                training (every stage is supervised).

        Returns:
            ``ISTROutput`` with all stages (the last alone with ``final_only``), in train and
            eval mode alike (no loss inside).
        """
        if final_only and self.training:
            raise ValueError("final_only is for inference: training supervises every stage "
                             "(call model.eval() first)")
        image_sizes = image_sizes.to(images.device)
        features = self.backbone(images, valid_mask(image_sizes, *images.shape[-2:]))
        boxes, queries, image_feat = self.initial_queries(features, image_sizes)
        out = ISTROutput(stages=[], proposal_boxes_xyxy=boxes, image_sizes=image_sizes,
                         query_features_init=queries)
        if self.semantic_head is not None and self.training:
            out.semantic_logits = [self.semantic_head(f) for f in features]
        if self.dense_box_head is not None and self.training:
            out.dense_box_logits = [self.dense_box_head(f) for f in features]
        if self.training and (self.semantic_head is not None or self.dense_box_head is not None):
            out.semantic_strides = tuple(self.backbone.strides)
        Q, attn_mask = self.num_queries, None
        dn = None
        if self.label_embed is not None and self.training and targets is not None:
            dn = make_denoising_queries(targets, Q, self.dn_groups, self.num_classes,
                                        self.dn_box_noise, self.dn_label_noise)
        if dn is not None:
            boxes = torch.cat([boxes, dn.boxes_xyxy.to(boxes.dtype)], dim=1)
            queries = torch.cat([queries, image_feat[:, None] + self.label_embed(dn.labels)], dim=1)
            attn_mask = dn.attn_mask.repeat_interleave(self.stages[0].self_attn.num_heads, 0)
            out.dn_stages, out.dn_gt_index = [], dn.gt_index
        roi = None  # features pooled at ``boxes``, when the previous stage has them
        # the maps in the pooling kernel's dtype and layout, converted once rather than at each
        # of the K (+ 1) poolings
        pool_features = self.pooler.prepare(features)
        for k, stage in enumerate(self.stages, start=1):
            try:
                heads = not final_only or k == self.num_stages
                result = stage(pool_features, boxes, queries, self.pooler, return_attention,
                               attn_mask, roi, heads=heads, mask_pooler=self.mask_pooler,
                               next_roi=k < self.num_stages)
            except NonFiniteError as err:  # the stage's boxes: say which stage
                raise NonFiniteError(f"stage{k} {err.reason}") from None
            boxes = result.boxes_xyxy.detach()  # features are not detached
            queries, roi = result.query_features, result.output_roi
            if not heads:
                continue
            parts = [(out.stages, slice(0, Q))]
            if dn is not None:
                parts.append((out.dn_stages, slice(Q, None)))
            for dest, part in parts:
                dest.append(StageOutput(
                    logits=result.logits[:, part], boxes_xyxy=result.boxes_xyxy[:, part],
                    boxes_cxcywh=normalize_boxes(result.boxes_xyxy[:, part], image_sizes),
                    mask_embed=result.mask_embed[:, part],
                    masks=self.decode_masks(result.mask_embed[:, part]),
                    attn=result.attn))
        return out


def build_model(cfg: ModelConfig, num_classes: int, basis: MaskCodec) -> ISTR:
    """Build an ISTR from a ``ModelConfig``: every part is constructed here, top to bottom."""
    backbone = build_backbone(cfg.backbone, out_channels=cfg.hidden_dim, norm=cfg.norm,
                              base_channels=cfg.backbone_base_channels,
                              pretrained_path=cfg.pretrained_path,
                              fpn_output_conv=cfg.fpn_output_conv,
                              zero_init_residual=cfg.zero_init_residual)
    model = ISTR(num_classes, basis, backbone, num_queries=cfg.num_queries,
                  num_stages=cfg.num_stages, hidden_dim=cfg.hidden_dim,
                  dim_dynamic=cfg.dim_dynamic, dim_feedforward=cfg.dim_feedforward,
                  num_heads=cfg.num_heads, num_cls_layers=cfg.num_cls_layers,
                  num_reg_layers=cfg.num_reg_layers, num_mask_layers=cfg.num_mask_layers,
                  dropout=cfg.dropout, pooler_resolution=cfg.pooler_resolution,
                  canonical_box_size=cfg.canonical_box_size, prior_prob=cfg.prior_prob,
                  zero_box_deltas=cfg.zero_box_deltas, proposal_init=cfg.proposal_init,
                  proposal_box_cells=cfg.proposal_box_cells, aux_semantic=cfg.aux_semantic,
                  aux_dense_box=cfg.aux_dense_box,
                  dn_groups=cfg.dn_groups, dn_box_noise=cfg.dn_box_noise,
                  dn_label_noise=cfg.dn_label_noise, mask_head=cfg.mask_head,
                  mask_roi_resolution=cfg.mask_roi_resolution,
                  mask_roi_first_stage=cfg.mask_roi_first_stage)
    set_elu_kernel(model, library_elu_for(cfg.elu))
    return model
