"""Multi-level RoIAlign over P2..P5 as detectron2's ``ROIPooler`` with ``ROIAlignV2``.

``torchvision.ops.MultiScaleRoIAlign`` calls ``roi_align`` with ``aligned=False`` and a slightly
different level formula, so this small pooler is used instead. The operator is the same on
every path, the kernel is chosen for speed: when gradients flow on the CPU (training), each level
pools with :func:`istr_viz.model.roi_align.sparse_roi_align` (a faster backward); without them on
the CPU (inference), every box in one call with :func:`~istr_viz.model.roi_align.separable_roi_align`
where its windows are small (``SEPARABLE_MAX_CANONICAL``), else each level with torchvision's
``roi_align``, as on other devices.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torchvision.ops import roi_align

from istr_viz.model.roi_align import FlatMaps, flatten_maps, separable_roi_align, sparse_roi_align


def assign_fpn_levels(boxes_xyxy: Tensor, min_level: int = 2, max_level: int = 5,
                      canonical_size: float = 224.0, canonical_level: int = 4) -> Tensor:
    """(R, 4) pixel boxes -> (R,) long FPN level in [min_level, max_level].

    level = floor(canonical_level + log2(sqrt(area) / canonical_size + 1e-8)). For small images a
    smaller ``canonical_size`` moves boxes to coarser levels. A box with a NaN coordinate gets
    ``min_level`` (every box gets a level, so every pooled row is written).
    """
    wh = (boxes_xyxy[:, 2:] - boxes_xyxy[:, :2]).float().clamp(min=0)
    sizes = torch.sqrt(wh[:, 0] * wh[:, 1])
    levels = torch.floor(canonical_level + torch.log2(sizes / canonical_size + 1e-8))
    return levels.nan_to_num(float(min_level)).clamp(min_level, max_level).long()


# The separable kernel gathers each box's window of cells, and a box that lands on its own level
# spans canonical / 16 to canonical / 8 cells a side there: up to a canonical size of 64 every such
# window fits the kernel's shared small-window group (8 cells), beyond it torchvision's kernel,
# whose cost follows the samples alone, is the faster. Measured on whole forward passes (one
# thread, bf16, the built-in val images; benchmarks/results_log.md, session 31): canonical 56
# (ship9) separable 2% faster; canonical 112 with a 224 mask pooler (ship13) torchvision's 4.6-5.9%
# (a 20-minute model of ship13's architecture, whose boxes differ, timed level with either).
SEPARABLE_MAX_CANONICAL = 64.0


class RoIPooler(nn.Module):
    """Pool a fixed-size feature per box from the FPN level its size selects (no parameters).

    ``separable_inference``: whether CPU inference uses the separable kernel (default: when
    ``canonical_size`` <= ``SEPARABLE_MAX_CANONICAL``); either way the same values up to float
    rounding. Maps that another pooler's ``prepare`` flattened for the separable kernel are pooled
    with it either way (ISTR's mask pooler reads the maps its box pooler prepared).
    """

    def __init__(self, strides: tuple[int, ...] = (4, 8, 16, 32), output_size: int = 7,
                 sampling_ratio: int = 2, canonical_size: float = 224.0,
                 separable_inference: bool | None = None):
        super().__init__()
        self.strides = tuple(strides)
        self.levels = tuple(int(round(math.log2(s))) for s in self.strides)
        self.output_size = output_size
        self.sampling_ratio = sampling_ratio
        self.canonical_size = canonical_size
        self.separable_inference = (canonical_size <= SEPARABLE_MAX_CANONICAL
                                    if separable_inference is None else separable_inference)

    @staticmethod
    def _sparse(feat: Tensor) -> bool:
        """Whether pooling ``feat`` uses the sparse-matrix kernel (CPU training)."""
        return feat.requires_grad and feat.device.type == "cpu"

    def _separable(self, feat: Tensor) -> bool:
        """Whether pooling ``feat`` uses the separable kernel (CPU inference, small windows)."""
        return self.separable_inference and not feat.requires_grad and feat.device.type == "cpu"

    def prepare(self, features: list[Tensor]) -> list[Tensor] | FlatMaps:
        """The maps as the kernel reads them, in float32 (pooling runs in fp32, as torchvision's
        ``roi_align`` autocasts): for the separable kernel all levels as one channels-last matrix
        (:class:`~istr_viz.model.roi_align.FlatMaps`), for CPU training channels-last maps (the
        sparse kernel's (B*H*W, C) matrix is then a view), else NCHW maps. A forward pass that
        pools the same maps several times converts them once here; ``forward`` takes raw maps
        too, at the cost of a conversion per call."""
        if self._separable(features[0]):
            return flatten_maps(features)
        return [f.float().contiguous(memory_format=torch.channels_last) if self._sparse(f)
                else f.float().contiguous() for f in features]

    def forward(self, features: list[Tensor] | FlatMaps, boxes_xyxy: Tensor) -> Tensor:
        """
        Args:
            features: one (B, D, h_l, w_l) map per stride in ``self.strides``, or what
                ``prepare`` made of them.
            boxes_xyxy: (B, Q, 4) pixel boxes.

        Returns:
            (B * Q, D, P, P) float32 pooled features, P = ``output_size``, rows ordered image
            by image (as torchvision's roi_align autocasts, pooling always runs in fp32).
        """
        B, Q, _ = boxes_xyxy.shape
        flat = boxes_xyxy.reshape(B * Q, 4).float()  # fp32 even under bf16 autocast
        batch_idx = torch.arange(B, device=flat.device).repeat_interleave(Q)
        rois = torch.cat([batch_idx[:, None].to(flat.dtype), flat], dim=1)  # (B*Q, 5)
        levels = assign_fpn_levels(flat, self.levels[0], self.levels[-1], self.canonical_size)
        if not isinstance(features, FlatMaps) and self._separable(features[0]):
            features = flatten_maps(features)
        if isinstance(features, FlatMaps):
            maps = torch.bucketize(levels, torch.tensor(self.levels, device=flat.device))
            scales = 1.0 / torch.tensor(self.strides, dtype=torch.float32,
                                        device=flat.device)[maps]
            return separable_roi_align(features, rois, maps, scales, self.output_size,
                                       self.sampling_ratio)
        out = None  # (B*Q, D, P, P), each level's rows written in place (no concatenate + reorder)
        for feat, stride, level in zip(features, self.strides, self.levels):
            idx = torch.nonzero(levels == level).squeeze(1)
            if idx.numel() == 0:
                continue
            feat = feat.float()
            if self._sparse(feat):
                pooled = sparse_roi_align(feat, rois[idx], self.output_size, 1.0 / stride,
                                          self.sampling_ratio)
            else:
                pooled = roi_align(feat, rois[idx], self.output_size, spatial_scale=1.0 / stride,
                                   sampling_ratio=self.sampling_ratio, aligned=True)
            if idx.numel() == rois.shape[0]:  # every box on this level
                return pooled
            if out is None:
                out = pooled.new_empty((rois.shape[0], *pooled.shape[1:]))
            out[idx] = pooled
        if out is None:  # no boxes
            return flat.new_zeros((0, features[0].shape[1], self.output_size, self.output_size))
        return out
