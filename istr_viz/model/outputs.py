"""Typed model outputs: every stage, in training and in evaluation alike.

Indexing keeps a batch axis of length 1 (``out[i]``, ``out.image(i)``) so every documented shape
still holds; take ``[0]`` on a field for the per-image tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor


def _map_tensors(obj, fn: Callable[[Tensor], Tensor]):
    """A copy of the dataclass ``obj`` with ``fn`` applied to each tensor field (None kept)."""
    changes = {}
    for f in fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, Tensor):
            changes[f.name] = fn(value)
        elif isinstance(value, list):
            changes[f.name] = [fn(v) if isinstance(v, Tensor) else _map_tensors(v, fn)
                               for v in value]
    return replace(obj, **changes)


def _to_float32(t: Tensor) -> Tensor:
    return t.float() if t.is_floating_point() else t


def _batch_slice(index: int | slice) -> slice:
    if isinstance(index, slice):
        return index
    return slice(index, index + 1) if index != -1 else slice(-1, None)


@dataclass
class StageOutput:
    """Predictions of one refinement stage for a batch.

    Attributes:
        logits: (B, Q, C) class logits (one sigmoid per class, no background class).
        boxes_xyxy: (B, Q, 4) pixel boxes in each valid (unpadded) image.
        boxes_cxcywh: (B, Q, 4) the same boxes as cxcywh divided by the valid (W, H).
        mask_embed: (B, Q, M) predicted mask embedding (basis coefficients).
        masks: (B, Q, S, S) mask probabilities decoded through the basis, box-relative: the
            S x S grid spans the query's own box (paste into ``boxes_xyxy``).
        attn: (B, Q, Q) self-attention weights among the queries averaged over heads (row =
            attending query), or None unless ``forward(..., return_attention=True)``.
    """

    logits: Tensor
    boxes_xyxy: Tensor
    boxes_cxcywh: Tensor
    mask_embed: Tensor
    masks: Tensor
    attn: Tensor | None = None

    @property
    def scores(self) -> Tensor:
        """(B, Q, C) class probabilities, ``sigmoid(logits)``."""
        return self.logits.sigmoid()

    def to(self, device: torch.device | str) -> StageOutput:
        return _map_tensors(self, lambda t: t.to(device))

    def detach(self) -> StageOutput:
        return _map_tensors(self, Tensor.detach)

    def cpu(self) -> StageOutput:
        return _map_tensors(self, Tensor.cpu)

    def float(self) -> StageOutput:
        """Floating tensors as float32 (e.g. after bf16 autocast); keeps the autograd graph."""
        return _map_tensors(self, _to_float32)

    def __getitem__(self, index: int | slice) -> StageOutput:
        """Images ``index`` of the batch; an int keeps a batch axis of length 1."""
        s = _batch_slice(index)
        return _map_tensors(self, lambda t: t[s])


@dataclass
class ISTROutput:
    """Everything ``ISTR.forward`` returns, the same type in train and eval mode.

    Attributes:
        stages: K ``StageOutput`` in order (stage 1 first); ``final`` is the last one.
        proposal_boxes_xyxy: (B, Q, 4) the learned initial boxes in pixels (stage-1 input).
        image_sizes: (B, 2) [H, W] valid size of each image; all boxes are in this frame.
        query_features_init: (B, Q, D) stage-1 input query features.
        semantic_logits: training only, with ``ModelConfig.aux_semantic``: one (B, C + 1, h_l, w_l)
            map per FPN level (last channel = background) from the auxiliary semantic head;
            ``None`` in eval mode or without the head.
        dense_box_logits: training only, with ``ModelConfig.aux_dense_box``: one (B, 4, h_l, w_l)
            map per FPN level of log distances, in strides, from each pixel to the left, top,
            right and bottom sides of its instance's box; ``None`` otherwise.
        semantic_strides: the stride in pixels of each ``semantic_logits`` (and
            ``dense_box_logits``) map.
        dn_stages: training only, with ``ModelConfig.dn_groups``: per stage, the (B, N, ...)
            outputs of the N denoising queries (``istr_viz.model.denoising``); else None.
        dn_gt_index: (B, N) long, the GT instance each denoising query reconstructs, -1 = padding.
    """

    stages: list[StageOutput]
    proposal_boxes_xyxy: Tensor
    image_sizes: Tensor
    query_features_init: Tensor
    semantic_logits: list[Tensor] | None = None
    dense_box_logits: list[Tensor] | None = None
    semantic_strides: tuple[int, ...] = ()
    dn_stages: list[StageOutput] | None = None
    dn_gt_index: Tensor | None = None

    @property
    def final(self) -> StageOutput:
        return self.stages[-1]

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def batch_size(self) -> int:
        return self.proposal_boxes_xyxy.shape[0]

    def stacked(self, name: str) -> Tensor:
        """One ``StageOutput`` field over all stages: (K, B, ...), e.g. ``stacked("boxes_xyxy")``
        is (K, B, Q, 4) for box trajectories."""
        return torch.stack([getattr(s, name) for s in self.stages])

    def to(self, device: torch.device | str) -> ISTROutput:
        return _map_tensors(self, lambda t: t.to(device))

    def detach(self) -> ISTROutput:
        return _map_tensors(self, Tensor.detach)

    def cpu(self) -> ISTROutput:
        return _map_tensors(self, Tensor.cpu)

    def float(self) -> ISTROutput:
        """Floating tensors as float32 (e.g. after bf16 autocast); keeps the autograd graph."""
        return _map_tensors(self, _to_float32)

    def __getitem__(self, index: int | slice) -> ISTROutput:
        """Images ``index`` of the batch; an int keeps a batch axis of length 1."""
        s = _batch_slice(index)
        return _map_tensors(self, lambda t: t[s])

    def image(self, index: int) -> ISTROutput:
        """Image ``index`` alone (batch axis of length 1); same as ``self[index]``."""
        return self[index]
