"""ISTR set loss (v1 ``SetCriterion``): free loss functions plus a criterion that loops over stages.

Each stage is matched on its own (deep supervision) and gets the same five weighted terms:

    loss_class       sigmoid focal loss over all Q x C logits (unmatched queries: all-zero targets);
                     or, with ``loss.class_loss="varifocal"``, the varifocal loss, whose matched
                     target is the box IoU the query reached rather than 1
    loss_l1          L1 on matched xyxy boxes divided by the image (w, h, w, h)
    loss_giou        1 - GIoU of matched pixel boxes
    loss_mask_embed  MSE between predicted and GT embedding, summed, / M
    loss_mask_dice   dice (squared sums, eps 1e-5) of the decoded S x S mask vs the GT crop

With ``loss.mask_overlap_iou`` > 0 (training-only, not in ISTR) the two mask terms also cover the
unmatched queries whose boxes overlap a GT box (:func:`overlap_pairs`), each instance's terms
averaged over its queries.

Every term is a sum over the batch divided by the number of GT instances (clamped >= 1). Losses
and matching run in fp32 with autocast off, even when the model runs under bf16 autocast.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import (box_iou, clip_boxes_to_image, generalized_box_iou_loss,
                             sigmoid_focal_loss)

from istr_viz.boxes import image_scale_xyxy
from istr_viz.config import LossConfig
from istr_viz.errors import ConfigError
from istr_viz.matcher import (Match, MatchTarget, crop_gt_masks, hungarian_match, no_autocast,
                              prepare_target)
from istr_viz.model.istr import MaskCodec
from istr_viz.model.outputs import ISTROutput, StageOutput

LOSS_TERMS = ("loss_class", "loss_l1", "loss_giou", "loss_mask_embed", "loss_mask_dice")


def focal_class_loss(logits: Tensor, target_classes: Tensor, num_instances: float,
                     alpha: float = 0.25, gamma: float = 2.0,
                     query_mask: Tensor | None = None) -> Tensor:
    """Sigmoid focal loss summed over all logits, / ``num_instances``.

    Args:
        logits: (B, Q, C).
        target_classes: (B, Q) long; the matched GT class, or C for an unmatched query.
        query_mask: optional (B, Q) bool; queries where it is False are left out (the padding
            slots of the denoising queries).
    """
    C = logits.shape[-1]
    onehot = F.one_hot(target_classes, C + 1)[..., :C].float()  # (B, Q, C)
    if query_mask is None:
        loss = sigmoid_focal_loss(logits.float(), onehot, alpha=alpha, gamma=gamma,
                                  reduction="sum")
    else:
        loss = (sigmoid_focal_loss(logits.float(), onehot, alpha=alpha, gamma=gamma,
                                   reduction="none") * query_mask[..., None].float()).sum()
    return loss / num_instances


def varifocal_class_loss(logits: Tensor, target_scores: Tensor, num_instances: float,
                         alpha: float = 0.25, gamma: float = 2.0,
                         query_mask: Tensor | None = None) -> Tensor:
    """Varifocal loss (Zhang et al., VarifocalNet, CVPR 2021) summed over all logits,
    / ``num_instances``: an IoU-aware class score, so that the ranking of detections follows how
    well they are placed.

    A logit with target ``q > 0`` (the matched class of a matched query, ``q`` the IoU it reached)
    gets ``q * BCE(p, q)``, smallest at ``p = q``; every other logit gets the focal loss of a
    negative, ``(1 - alpha) * p ** gamma * BCE(p, 0)``, the same as :func:`focal_class_loss`'s
    (``alpha`` is the focal loss's positive weight, so the paper's 0.75 on negatives is
    ``1 - 0.25``).

    Args:
        logits: (B, Q, C).
        target_scores: (B, Q, C) in [0, 1]; 0 everywhere but at matched (query, class) pairs.
        query_mask: optional (B, Q) bool; queries where it is False are left out.
    """
    logits, q = logits.float(), target_scores.float()
    p = logits.sigmoid()
    bce = F.binary_cross_entropy_with_logits(logits, q, reduction="none")
    positive = q > 0
    weight = torch.where(positive, q, (1 - alpha) * p.pow(gamma))
    loss = weight * bce
    if query_mask is not None:
        loss = loss * query_mask[..., None].float()
    return loss.sum() / num_instances


def box_losses(pred_xyxy: Tensor, gt_xyxy: Tensor, image_scale: Tensor,
               num_instances: float) -> dict[str, Tensor]:
    """L1 on normalised xyxy and 1 - GIoU over N matched pairs: pred (N, 4), gt (N, 4) pixels,
    image_scale (N, 4) [W, H, W, H]. Returns {"l1", "giou"}, each a sum / ``num_instances``."""
    if pred_xyxy.shape[0] == 0:
        zero = pred_xyxy.sum() * 0
        return {"l1": zero, "giou": zero}
    pred, gt = pred_xyxy.float(), gt_xyxy.float()
    l1 = (pred / image_scale - gt / image_scale).abs().sum()
    giou = generalized_box_iou_loss(pred, gt, reduction="sum")
    return {"l1": l1 / num_instances, "giou": giou / num_instances}


def dice_loss(probs: Tensor, targets: Tensor, eps: float = 1e-5) -> Tensor:
    """(N, S, S) probabilities p and {0, 1} targets g -> (N,) dice loss
    1 - 2 sum(pg) / (sum(p^2) + sum(g^2) + eps) (ISTR's squared form, not DETR's +1 smoothing)."""
    p, g = probs.flatten(1).float(), targets.flatten(1).float()
    return 1 - 2 * (p * g).sum(1) / ((p * p).sum(1) + (g * g).sum(1) + eps)


def mask_losses(pred_embed: Tensor, gt_embed: Tensor, pred_masks: Tensor, gt_crops: Tensor,
                num_instances: float, embed_weights: Tensor | None = None,
                pair_weights: Tensor | None = None) -> dict[str, Tensor]:
    """Embedding MSE (/ M) and dice over N (query, GT) pairs: embeds (N, M), decoded masks and
    GT crops (N, S, S); ``embed_weights`` (M,) weights each component's squared error, and
    ``pair_weights`` (N,) each pair (both default 1).
    Returns {"mask_embed", "mask_dice"}, each a (weighted) sum / ``num_instances``."""
    if pred_embed.shape[0] == 0:
        zero = pred_embed.sum() * 0
        return {"mask_embed": zero, "mask_dice": zero}
    M = pred_embed.shape[-1]
    squared = (pred_embed.float() - gt_embed.float()) ** 2  # (N, M)
    if embed_weights is not None:
        squared = squared * embed_weights.to(squared.device, squared.dtype)
    dice = dice_loss(pred_masks, gt_crops)  # (N,)
    if pair_weights is None:
        mse, dice = squared.sum() / M, dice.sum()
    else:
        mse, dice = (squared.sum(1) * pair_weights).sum() / M, (dice * pair_weights).sum()
    return {"mask_embed": mse / num_instances, "mask_dice": dice / num_instances}


def overlap_pairs(boxes_xyxy: Tensor, gt_boxes_xyxy: Tensor, matched_query_idx: Tensor,
                  min_iou: float) -> tuple[Tensor, Tensor]:
    """The unmatched queries of one image whose boxes overlap a GT box by ``min_iou`` or more,
    each with the GT it overlaps most (``loss.mask_overlap_iou``).

    Args:
        boxes_xyxy: (Q, 4) the queries' (detached) boxes.
        gt_boxes_xyxy: (G, 4) the image's GT boxes.
        matched_query_idx: (K,) the queries the one-to-one match already gave a GT; left out.
        min_iou: the IoU a box needs, in (0, 1].

    Returns:
        query_idx (E,) and gt_idx (E,), long, ascending in query.
    """
    device = boxes_xyxy.device
    if gt_boxes_xyxy.shape[0] == 0 or boxes_xyxy.shape[0] == 0:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return empty, empty
    best_iou, best_gt = box_iou(boxes_xyxy.float(), gt_boxes_xyxy.float()).max(1)  # (Q,)
    keep = best_iou >= min_iou
    keep[matched_query_idx.to(device)] = False
    query_idx = torch.nonzero(keep).squeeze(1)
    return query_idx, best_gt[query_idx]


def _cell_centres(height: int, width: int, stride: int, image_hw: tuple[int, int]
                  ) -> tuple[Tensor, Tensor]:
    """Row and column pixel indices (h,), (w,) of a level's cell centres, clamped to the image."""
    H, W = image_hw
    rows = (torch.arange(height) * stride + stride // 2).clamp(max=max(H - 1, 0))
    cols = (torch.arange(width) * stride + stride // 2).clamp(max=max(W - 1, 0))
    return rows, cols


def instance_index_map(target: Mapping[str, Tensor], height: int, width: int, stride: int
                       ) -> Tensor:
    """The (h, w) long map of which instance each cell of an FPN level shows, -1 for none.

    Each cell takes the pixel at its centre in the (padded) image and the last instance whose
    mask covers it (later annotations are drawn on top). Padding cells are -1.
    """
    H, W = (int(v) for v in target["size"])
    rows, cols = _cell_centres(height, width, stride, (H, W))
    out = torch.full((height, width), -1, dtype=torch.long)
    masks = target["masks"].cpu()
    if masks.shape[0]:
        sampled = masks[:, rows][:, :, cols].bool()  # (G, h, w)
        for g in range(sampled.shape[0]):
            out[sampled[g]] = g
    inside_r = (torch.arange(height) * stride) < H
    inside_c = (torch.arange(width) * stride) < W
    out[~(inside_r[:, None] & inside_c[None, :])] = -1
    return out


def semantic_target_map(target: Mapping[str, Tensor], height: int, width: int, stride: int,
                        num_classes: int, ignore_index: int = -100) -> Tensor:
    """The (h, w) long class map of one image at one FPN level for the auxiliary semantic head.

    Each cell takes the class of the instance at its centre (:func:`instance_index_map`),
    ``num_classes`` for background, and ``ignore_index`` on crowd regions and padding.
    ``height``, ``width``: the level's map size.
    """
    H, W = (int(v) for v in target["size"])
    rows, cols = _cell_centres(height, width, stride, (H, W))
    index = instance_index_map(target, height, width, stride)
    labels = target["labels"].cpu().long()
    out = torch.full((height, width), num_classes, dtype=torch.long)
    out[index >= 0] = labels[index[index >= 0]]
    crowd = target.get("crowd_mask")
    if crowd is not None and crowd.numel():
        out[crowd.cpu()[rows][:, cols].bool()] = ignore_index
    inside_r = (torch.arange(height) * stride) < H
    inside_c = (torch.arange(width) * stride) < W
    out[~(inside_r[:, None] & inside_c[None, :])] = ignore_index
    return out


def dense_box_loss(logits: Sequence[Tensor], targets: Sequence[Mapping[str, Tensor]],
                   strides: Sequence[int]) -> Tensor:
    """Mean over FPN levels (those with instance cells) of the mean 1 - GIoU between the box
    each instance cell predicts and its instance's GT box (FCOS-style, training only). Cells
    outside every instance (background, crowd regions, padding) give no loss.

    Args:
        logits: one (B, 4, h_l, w_l) map per level: log distances, in strides, from the cell
            centre to the left, top, right and bottom box sides.
        targets: the batch's dataset target dicts (``masks``, ``boxes_xyxy``, ``size``).
        strides: each level's stride in pixels.
    """
    per_level = []
    for level_logits, stride in zip(logits, strides):
        h, w = level_logits.shape[-2:]
        device = level_logits.device
        preds, gts = [], []
        for b, t in enumerate(targets):
            index = instance_index_map(t, h, w, stride).to(device)
            cells = torch.nonzero(index >= 0)  # (P, 2) row, col
            if cells.shape[0] == 0:
                continue
            ltrb = level_logits[b, :, cells[:, 0], cells[:, 1]].float().t()  # (P, 4)
            ltrb = ltrb.clamp(max=10).exp() * stride
            # the pixel each cell was labelled from (instance_index_map), so it is inside its box
            rows, cols = _cell_centres(h, w, stride, (int(t["size"][0]), int(t["size"][1])))
            cx = cols.to(device, torch.float32)[cells[:, 1]]
            cy = rows.to(device, torch.float32)[cells[:, 0]]
            preds.append(torch.stack([cx - ltrb[:, 0], cy - ltrb[:, 1],
                                      cx + ltrb[:, 2], cy + ltrb[:, 3]], 1))
            gts.append(t["boxes_xyxy"].to(device).float()[index[cells[:, 0], cells[:, 1]]])
        if preds:
            per_level.append(generalized_box_iou_loss(torch.cat(preds), torch.cat(gts),
                                                      reduction="mean"))
    if not per_level:
        return logits[0].sum() * 0
    return torch.stack(per_level).mean()


def semantic_loss(logits: Sequence[Tensor], targets: Sequence[Mapping[str, Tensor]],
                  strides: Sequence[int]) -> Tensor:
    """Mean over FPN levels of the pixel cross-entropy of the auxiliary semantic head.

    Args:
        logits: one (B, C + 1, h_l, w_l) map per level (last channel = background).
        targets: the batch's dataset target dicts.
        strides: each level's stride in pixels.
    """
    total = 0.0
    for level_logits, stride in zip(logits, strides):
        B, C1, h, w = level_logits.shape
        target = torch.stack([semantic_target_map(t, h, w, stride, C1 - 1) for t in targets])
        total = total + F.cross_entropy(level_logits.float(), target.to(level_logits.device),
                                        ignore_index=-100)
    return total / len(logits)


def repeat_target(target: MatchTarget, repeats: int) -> MatchTarget:
    """The GT of one image listed ``repeats`` times (G -> repeats x G instances), so that the
    Hungarian assignment gives every instance up to ``repeats`` queries (one-to-many)."""
    if repeats == 1:
        return target
    return MatchTarget(labels=target.labels.repeat(repeats),
                       boxes_xyxy=target.boxes_xyxy.repeat(repeats, 1),
                       image_size=target.image_size,
                       mask_crops=target.mask_crops.repeat(repeats, 1, 1),
                       mask_embed=target.mask_embed.repeat(repeats, 1), masks=target.masks)


def denoising_matches(gt_index: Tensor) -> list[Match]:
    """The fixed assignment of the denoising queries: (B, N) GT index per query (-1 = padding)
    -> one ``Match`` per image (no costs: nothing is optimised)."""
    matches = []
    for row in gt_index.cpu():
        query_idx = torch.nonzero(row >= 0).squeeze(1)
        empty = torch.zeros(len(row), 0)
        matches.append(Match(query_idx, row[query_idx], empty, {}, {}))
    return matches


def fold_repeated_match(match: Match, num_gt: int) -> Match:
    """A match against a repeated target (:func:`repeat_target`) expressed in the original GT
    indices: ``gt_idx`` modulo G, cost and terms restricted to the first copy, (Q, G)."""
    if num_gt == 0:
        return match
    return Match(query_idx=match.query_idx, gt_idx=match.gt_idx % num_gt,
                 cost=match.cost[:, :num_gt],
                 terms={k: v[:, :num_gt] for k, v in match.terms.items()}, weights=match.weights)


class CriterionResult(NamedTuple):
    """``total`` = sum of ``losses`` (already weighted), keys ``"stage{k}/loss_*"`` with k from 1;
    ``matches[k][b]`` the ``Match`` of stage k + 1, image b; with the auxiliary semantic and
    dense box heads also ``"aux/loss_semantic"`` and ``"aux/loss_dense_box"``."""

    total: Tensor
    losses: dict[str, Tensor]
    matches: list[list[Match]]


def embedding_weights(basis: MaskCodec, weighting: str) -> Tensor | None:
    """(M,) weights of the embedding MSE's components, or None for equal weights.

    ``"variance"`` on a whitened basis: the squared whitening scale (the explained variance,
    floored as :meth:`MaskBasis.code_scale` floors it) over its mean, so that the weighted MSE
    is the squared error in the space the basis was fitted in (PCA is orthonormal there), scaled
    so that predicting the mean code still costs 1 per component on average. Codes that are not
    whitened (the ``"binary"`` recipe, the DCT codec) already live in that space: equal weights.
    """
    if weighting == "uniform" or not getattr(basis, "whiten", False):
        return None
    variance = basis.code_scale().float().cpu() ** 2
    return variance / variance.mean()


class SetCriterion:
    """Match every stage and sum its weighted losses.

    Args:
        loss_cfg: weights and options (``LossConfig``).
        basis: the mask basis (``encode``, ``decode``, ``dim``, ``mask_size``).
    """

    def __init__(self, loss_cfg: LossConfig, basis: MaskCodec):
        if loss_cfg.mask_target_boxes not in ("gt", "pred"):
            raise ConfigError(f"mask_target_boxes must be 'gt' or 'pred', got "
                              f"{loss_cfg.mask_target_boxes!r}", entry="loss.mask_target_boxes")
        self.cfg = loss_cfg
        self.basis = basis
        self.cost_weights = loss_cfg.cost_weights()
        self.embed_weights = embedding_weights(basis, loss_cfg.embed_weighting)

    def __call__(self, output: ISTROutput, targets: Sequence[Mapping[str, Tensor]],
                 num_instances: float | None = None, num_processes: int = 1) -> CriterionResult:
        """
        Args:
            output: the model's ``ISTROutput``.
            targets: one dataset target dict per image (``boxes_xyxy``, ``labels``, ``masks``,
                ``size``); crowd regions are never targets.
            num_instances: the normaliser of the set losses; default the batch's GT count. Under
                DDP the engine passes the count summed over processes, so that each process
                holds its share of one global sum. Clamped to >= 1.
            num_processes: the semantic and dense box losses, means over this process's pixels,
                are divided by it, so that it too is a share: summed over processes it is the mean of their
                pixel means (the global pixel mean when the processes' images have as many
                valid pixels, as plain DDP averaging would give).
        """
        device = output.final.logits.device
        with no_autocast(device):
            prepared = [prepare_target(t, self.basis, device) for t in targets]
            if num_instances is None:
                num_instances = float(sum(t.num_gt for t in prepared))
            num_instances = max(float(num_instances), 1.0)
            losses: dict[str, Tensor] = {}
            matches = []
            for k, stage in enumerate(output.stages, start=1):
                repeats = self.cfg.o2m_k if k <= self.cfg.o2m_stages else 1
                stage_matches = self.match(stage, prepared, repeats)
                for name, value in self.stage_losses(stage, prepared, stage_matches,
                                                     num_instances, overlap=True).items():
                    losses[f"stage{k}/{name}"] = value
                matches.append(stage_matches)
            if output.dn_stages is not None:
                groups = max(1, output.dn_gt_index.shape[1] // max(t.num_gt for t in prepared))
                dn_matches = denoising_matches(output.dn_gt_index)
                for k, stage in enumerate(output.dn_stages, start=1):
                    for name, value in self.stage_losses(
                            stage, prepared, dn_matches, num_instances * groups,
                            query_mask=output.dn_gt_index >= 0).items():
                        losses[f"stage{k}/dn_{name}"] = value
            if output.semantic_logits is not None and self.cfg.semantic_weight > 0:
                losses["aux/loss_semantic"] = self.cfg.semantic_weight * semantic_loss(
                    output.semantic_logits, targets, output.semantic_strides) / num_processes
            if output.dense_box_logits is not None and self.cfg.dense_box_weight > 0:
                losses["aux/loss_dense_box"] = self.cfg.dense_box_weight * dense_box_loss(
                    output.dense_box_logits, targets, output.semantic_strides) / num_processes
        return CriterionResult(torch.stack(list(losses.values())).sum(), losses, matches)

    def match(self, stage: StageOutput, targets: Sequence[MatchTarget],
              repeats: int = 1) -> list[Match]:
        """One ``Match`` per image of this stage; ``repeats`` > 1 matches one-to-many."""
        matches, Q = [], stage.logits.shape[1]
        for i, t in enumerate(targets):
            r = max(1, min(repeats, Q // max(t.num_gt, 1)))  # every copy must find a query
            match = hungarian_match(stage.logits[i], stage.boxes_xyxy[i], stage.mask_embed[i],
                                    repeat_target(t, r), self.cost_weights,
                                    self.cfg.focal_alpha, self.cfg.focal_gamma)
            matches.append(match if r == 1 else fold_repeated_match(match, t.num_gt))
        return matches

    def stage_losses(self, stage: StageOutput, targets: Sequence[MatchTarget],
                     matches: Sequence[Match], num_instances: float,
                     query_mask: Tensor | None = None, overlap: bool = False
                     ) -> dict[str, Tensor]:
        """The five weighted losses of one stage (keys in ``LOSS_TERMS``); ``query_mask``
        (B, Q) bool leaves queries out of the class loss (denoising padding); ``overlap`` also
        trains the masks of the queries that overlap an instance (``loss.mask_overlap_iou``)."""
        cfg, device = self.cfg, stage.logits.device
        B, Q, C = stage.logits.shape
        batch_idx = torch.cat([torch.full_like(m.query_idx, b) for b, m in enumerate(matches)])
        batch_idx = batch_idx.to(device)  # (N,) over all matched pairs of the batch
        query_idx = torch.cat([m.query_idx for m in matches]).to(device)  # (N,)
        gt_idx = [m.gt_idx.to(device) for m in matches]  # per image
        target_classes = torch.full((B, Q), C, dtype=torch.long, device=device)  # C = unmatched
        target_classes[batch_idx, query_idx] = torch.cat([t.labels[g] for t, g in
                                                          zip(targets, gt_idx)])

        pred_boxes = stage.boxes_xyxy[batch_idx, query_idx].float()  # (N, 4)
        gt_boxes = torch.cat([t.boxes_xyxy[g] for t, g in zip(targets, gt_idx)])
        scales = torch.cat([image_scale_xyxy(t.image_size).expand(len(g), 4)
                            for t, g in zip(targets, gt_idx)]).to(device)
        boxes = box_losses(pred_boxes, gt_boxes, scales, num_instances)

        mask_batch, mask_query, mask_gt, pair_weights = batch_idx, query_idx, gt_idx, None
        if overlap and cfg.mask_overlap_iou > 0:
            mask_batch, mask_query, mask_gt, pair_weights = self.mask_pairs(stage, targets,
                                                                            matches)
        pred_embed = stage.mask_embed[mask_batch, mask_query].float()  # (N', M)
        mask_boxes = stage.boxes_xyxy[mask_batch, mask_query].detach().float()  # (N', 4)
        gt_crops, gt_embed = self.mask_targets(targets, mask_gt, mask_boxes, mask_batch)
        pred_masks = self.basis.decode(pred_embed)  # (N', S, S) probabilities, fp32
        masks = mask_losses(pred_embed, gt_embed, pred_masks, gt_crops, num_instances,
                            self.embed_weights, pair_weights)

        if cfg.class_loss == "varifocal":
            iou = box_iou(pred_boxes.detach(), gt_boxes.float()).diagonal()  # (N,)
            scores = torch.zeros_like(stage.logits, dtype=torch.float32)
            scores[batch_idx, query_idx, target_classes[batch_idx, query_idx]] = iou.clamp(min=1e-3)
            loss_class = varifocal_class_loss(stage.logits, scores, num_instances,
                                              cfg.focal_alpha, cfg.focal_gamma, query_mask)
        else:
            loss_class = focal_class_loss(stage.logits, target_classes, num_instances,
                                          cfg.focal_alpha, cfg.focal_gamma, query_mask)
        return {"loss_class": cfg.class_weight * loss_class,
                "loss_l1": cfg.l1_weight * boxes["l1"],
                "loss_giou": cfg.giou_weight * boxes["giou"],
                "loss_mask_embed": cfg.mask_embed_weight * masks["mask_embed"],
                "loss_mask_dice": cfg.mask_dice_weight * masks["mask_dice"]}

    def mask_pairs(self, stage: StageOutput, targets: Sequence[MatchTarget],
                   matches: Sequence[Match]) -> tuple[Tensor, Tensor, list[Tensor], Tensor]:
        """The (query, GT) pairs whose masks are trained with ``loss.mask_overlap_iou``: per
        image the matched pairs, then :func:`overlap_pairs`.

        Returns batch_idx (N',) and query_idx (N',), gt_idx (one tensor per image), and
        pair weights (N',): for a GT with m matched queries (1; k on a one-to-many stage) and
        n pairs in all, m / n, so that its mask loss is m times the mean over its queries and
        keeps the weight the match gives it.
        """
        device = stage.logits.device
        batches, queries, gts, weights = [], [], [], []
        for b, (t, m) in enumerate(zip(targets, matches)):
            extra_q, extra_g = overlap_pairs(stage.boxes_xyxy[b].detach(), t.boxes_xyxy,
                                             m.query_idx, self.cfg.mask_overlap_iou)
            q = torch.cat([m.query_idx.to(device), extra_q])
            g = torch.cat([m.gt_idx.to(device), extra_g])
            minlength = max(t.num_gt, 1)
            matched = torch.bincount(m.gt_idx.to(device), minlength=minlength).float()
            count = torch.bincount(g, minlength=minlength).float()
            batches.append(torch.full_like(q, b))
            queries.append(q)
            gts.append(g)
            weights.append(matched[g] / count[g])
        return torch.cat(batches), torch.cat(queries), gts, torch.cat(weights)

    def mask_targets(self, targets: Sequence[MatchTarget], gt_idx: Sequence[Tensor],
                     pred_boxes: Tensor, batch_idx: Tensor) -> tuple[Tensor, Tensor]:
        """GT crops (N, S, S) and embeddings (N, M) of the matched instances.

        Crops use the GT boxes (v1) or, with ``mask_target_boxes="pred"``, the detached
        predicted boxes clipped to the image (v2). Embeddings are re-encoded with fresh noise
        when ``embed_target_noise`` (v1), else the noise-free matcher encodings are reused.
        """
        S = self.basis.mask_size
        if self.cfg.mask_target_boxes == "gt":
            crops = torch.cat([t.mask_crops[g] for t, g in zip(targets, gt_idx)])
        else:
            per_image = []
            for b, (t, g) in enumerate(zip(targets, gt_idx)):
                size = (int(t.image_size[0]), int(t.image_size[1]))
                boxes = clip_boxes_to_image(pred_boxes[batch_idx == b], size)
                per_image.append(crop_gt_masks(t.masks[g], boxes, S).float())
            crops = torch.cat(per_image)
        if self.cfg.embed_target_noise or self.cfg.mask_target_boxes == "pred":
            embed = self.basis.encode(crops, noise=self.cfg.embed_target_noise).float()
        else:
            embed = torch.cat([t.mask_embed[g] for t, g in zip(targets, gt_idx)])
        return crops, embed
