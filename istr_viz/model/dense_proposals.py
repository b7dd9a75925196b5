"""Initial query boxes picked from the image (``ModelConfig.proposal_init="dense"``; not in ISTR).

ISTR starts every image from the same Q learned boxes. Here the two dense 1x1 heads on the FPN
(``aux_semantic``: each cell's class or background; ``aux_dense_box``: each cell's distances to
its instance's box sides) propose the boxes instead, as two-stage DETRs do: every cell that is a
local maximum (3 x 3) of its foreground probability, and at least ``min_score``, proposes the box it
predicts; the best
``pre_nms`` of an image go through NMS (IoU ``nms_iou``, as an RPN's proposals do) and the best Q
left become the stage-1 boxes, best first. Slots that no cell fills keep the learned boxes. The
boxes are detached: the heads learn from their own losses, the stages from theirs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import batched_nms


@dataclass
class DenseProposals:
    """Per image, Q proposals from the dense heads, best first.

    boxes_xyxy: (B, Q, 4) pixels, clipped to each image. features: (B, Q, D) the FPN feature of
    the cell that proposed each box (zeros where ``filled`` is False). scores: (B, Q) foreground
    probability (0 where not filled). filled: (B, Q) bool, False for slots no cell filled.
    """

    boxes_xyxy: Tensor
    features: Tensor
    scores: Tensor
    filled: Tensor


def cell_boxes(box_logits: Tensor, stride: int) -> Tensor:
    """(B, 4, h, w) log distances in strides to the left, top, right, bottom sides -> (B, h, w, 4)
    xyxy pixel boxes around each cell's centre pixel (``istr_viz.losses.dense_box_loss``'s
    frame; the log distances are clamped at 10 as there)."""
    B, _, h, w = box_logits.shape
    ltrb = box_logits.float().clamp(max=10).exp().permute(0, 2, 3, 1) * stride  # (B, h, w, 4)
    ys = torch.arange(h, device=box_logits.device, dtype=torch.float32) * stride + stride // 2
    xs = torch.arange(w, device=box_logits.device, dtype=torch.float32) * stride + stride // 2
    cy, cx = ys[None, :, None].expand(B, h, w), xs[None, None, :].expand(B, h, w)
    return torch.stack([cx - ltrb[..., 0], cy - ltrb[..., 1], cx + ltrb[..., 2],
                        cy + ltrb[..., 3]], dim=-1)


def select_dense_proposals(features: list[Tensor], semantic_logits: list[Tensor],
                           box_logits: list[Tensor], strides: tuple[int, ...],
                           image_sizes: Tensor, num: int, pre_nms: int = 1000,
                           nms_iou: float = 0.7, min_score: float = 0.05) -> DenseProposals:
    """Pick ``num`` proposals per image from the dense heads' maps (see the module docstring).

    Args:
        features: FPN maps, one (B, D, h_l, w_l) per level.
        semantic_logits: one (B, C + 1, h_l, w_l) map per level, the last channel background.
        box_logits: one (B, 4, h_l, w_l) map per level (:func:`cell_boxes`).
        strides: each level's stride in pixels.
        image_sizes: (B, 2) [H, W] valid size of each image.
        num: Q, proposals per image.
    """
    B = image_sizes.shape[0]
    all_scores, all_boxes, all_feats = [], [], []
    sizes = image_sizes.to(torch.float32)
    for feat, sem, box, stride in zip(features, semantic_logits, box_logits, strides):
        h, w = sem.shape[-2:]
        with torch.no_grad():
            fg = 1.0 - sem.detach().float().softmax(dim=1)[:, -1]  # (B, h, w)
            peak = fg == F.max_pool2d(fg[:, None], 3, stride=1, padding=1)[:, 0]
            rows = torch.arange(h, device=fg.device) * stride
            cols = torch.arange(w, device=fg.device) * stride
            inside = ((rows[None, :, None] < sizes[:, None, None, 0])
                      & (cols[None, None, :] < sizes[:, None, None, 1]))
            score = torch.where(peak & inside & (fg >= min_score), fg, torch.full_like(fg, -1.0))
            boxes = cell_boxes(box.detach(), stride)
        all_scores.append(score.flatten(1))
        all_boxes.append(boxes.flatten(1, 2))
        all_feats.append(feat.flatten(2).transpose(1, 2))  # (B, h*w, D)
    scores, boxes = torch.cat(all_scores, 1), torch.cat(all_boxes, 1)  # (B, N), (B, N, 4)
    feats = torch.cat(all_feats, 1)  # (B, N, D)
    D = feats.shape[-1]
    out_boxes = boxes.new_zeros(B, num, 4)
    out_scores = scores.new_zeros(B, num)
    out_index = torch.zeros(B, num, dtype=torch.long, device=scores.device)
    filled = torch.zeros(B, num, dtype=torch.bool, device=scores.device)
    with torch.no_grad():
        for b in range(B):
            H, W = sizes[b].tolist()
            top = scores[b].topk(min(pre_nms, scores.shape[1])).indices
            top = top[scores[b, top] >= 0]  # peaks inside the image, at least min_score
            cand = boxes[b, top]
            cand = torch.stack([cand[:, 0].clamp(0, W), cand[:, 1].clamp(0, H),
                                cand[:, 2].clamp(0, W), cand[:, 3].clamp(0, H)], dim=1)
            ok = (cand[:, 2] - cand[:, 0] >= 1) & (cand[:, 3] - cand[:, 1] >= 1)
            top, cand = top[ok], cand[ok]
            keep = batched_nms(cand, scores[b, top], torch.zeros_like(top), nms_iou)[:num]
            n = keep.numel()
            out_boxes[b, :n], out_scores[b, :n] = cand[keep], scores[b, top[keep]]
            out_index[b, :n], filled[b, :n] = top[keep], True
    picked = torch.gather(feats, 1, out_index[..., None].expand(B, num, D))
    picked = picked * filled[..., None].to(picked.dtype)
    return DenseProposals(out_boxes, picked, out_scores, filled)
