"""RoIAlign as a sparse matrix product, for training on the CPU.

torchvision's ``roi_align`` is the reference and what inference uses. Its CPU backward scatters
every sample into the feature map one value at a time, and in a ``shapes-cpu`` training step it
was the largest single cost (141 of ~630 ms per iteration, ``python -m cProfile``). The same
operator is a sparse matrix ``A`` of bilinear weights, (R * P * P, B * H * W), applied to the
feature map laid out as (B * H * W, C): the forward is ``A @ F`` and the backward ``A.T @ G``,
both one sparse-dense product over contiguous channel rows. ``benchmarks/bench_kernels.py``
times the two; tests/test_roi_align.py checks outputs and gradients against torchvision.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
from torch import Tensor


def _axis_samples(coords: Tensor, size: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Bilinear corners of sample coordinates along one axis, as torchvision's kernel does.

    Args:
        coords: (R, N) sample positions in feature cells (pixel centres at integers).
        size: the axis' length.

    Returns:
        low, high (R, N) long indices, their weights w_low, w_high (R, N), and valid (R, N)
        bool (False for samples more than one cell outside the map: they count as zero).
    """
    valid = (coords >= -1.0) & (coords <= size)  # False for NaN too
    coords = torch.where(valid, coords, torch.zeros_like(coords)).clamp(min=0)  # indices in range
    low = coords.floor().long()
    at_edge = low >= size - 1
    low = torch.where(at_edge, torch.full_like(low, size - 1), low)
    high = torch.where(at_edge, low, low + 1)
    frac = torch.where(at_edge, torch.zeros_like(coords), coords - low.to(coords.dtype))
    return low, high, 1 - frac, frac, valid


def roi_align_matrix(rois: Tensor, batch: int, height: int, width: int, output_size: int,
                     spatial_scale: float, sampling_ratio: int,
                     aligned: bool = True) -> tuple[Tensor, Tensor]:
    """The RoIAlign weights of ``rois`` on a (batch, C, height, width) map, as sparse CSR.

    Args:
        rois: (R, 5) [batch index, x1, y1, x2, y2] in image pixels.
        output_size: P; sampling_ratio: s samples per bin side (s * s averaged per bin).
        aligned: torchvision's flag: True shifts the box by half a cell (ISTR, detectron2's
            ROIAlignV2); False does not and makes every box at least one cell wide (Mask R-CNN).

    Returns:
        (A, A_t): A (R * P * P, batch * height * width) with rows ordered RoI, bin row, bin
        column; A_t its transpose. Each row of A holds the cells its 4 * s * s bilinear corners
        touch (repeats summed); the weights of a row sum to the fraction of valid samples.
    """
    R, P, s = rois.shape[0], output_size, sampling_ratio
    rois = rois.float()
    offset = 0.5 if aligned else 0.0
    x1, y1 = rois[:, 1] * spatial_scale - offset, rois[:, 2] * spatial_scale - offset
    box_w = rois[:, 3] * spatial_scale - offset - x1
    box_h = rois[:, 4] * spatial_scale - offset - y1
    if not aligned:
        box_w, box_h = box_w.clamp(min=1.0), box_h.clamp(min=1.0)
    steps = (torch.arange(P * s, dtype=torch.float32, device=rois.device) + 0.5) / s  # (P*s,)
    ys = y1[:, None] + steps[None] * (box_h / P)[:, None]  # (R, P*s), bin-major
    xs = x1[:, None] + steps[None] * (box_w / P)[:, None]
    y_lo, y_hi, wy_lo, wy_hi, y_ok = (t.reshape(R, P, 1, s, 1, 1) for t in _axis_samples(ys, height))
    x_lo, x_hi, wx_lo, wx_hi, x_ok = (t.reshape(R, 1, P, 1, s, 1) for t in _axis_samples(xs, width))
    # (R, P_y, P_x, s_y, s_x, 4): the 4 corners of every sample of every output bin
    y_idx = torch.cat([y_lo, y_lo, y_hi, y_hi], dim=-1)
    x_idx = torch.cat([x_lo, x_hi, x_lo, x_hi], dim=-1)
    weight = torch.cat([wy_lo, wy_lo, wy_hi, wy_hi], dim=-1) * \
        torch.cat([wx_lo, wx_hi, wx_lo, wx_hi], dim=-1) * (y_ok & x_ok).float() / (s * s)
    base = rois[:, 0].long().reshape(R, 1, 1, 1, 1, 1) * (height * width)
    cols = (base + y_idx * width + x_idx).reshape(-1)
    values = weight.reshape(-1)
    return _csr_pair(cols, values, 4 * s * s, batch * height * width)


def _merge_repeats(keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
    """Sorted ``keys`` with their ``values``: each distinct key once, its values summed."""
    first = torch.ones_like(keys, dtype=torch.bool)
    first[1:] = keys[1:] != keys[:-1]
    group = first.cumsum(0) - 1
    summed = values.new_zeros(int(first.sum())).index_add_(0, group, values)
    return keys[first], summed


def _csr(crow: Tensor, col: Tensor, values: Tensor, size: tuple[int, int]) -> Tensor:
    """A sparse CSR matrix from a valid layout, without torch's notices (beta support; invariant
    checks off: the layout is built sorted and without repeats)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")
        return torch.sparse_csr_tensor(crow, col, values, size, check_invariants=False)


def _csr_pair(cols: Tensor, values: Tensor, per_row: int, num_cols: int) -> tuple[Tensor, Tensor]:
    """A and its transpose as valid CSR (sorted, repeats summed), where A's row r holds entries
    [r * per_row, (r + 1) * per_row) of ``cols`` / ``values``.

    The rows are already in order, so A needs only a sort within each short row, not torch's
    ``coalesce`` of the whole entry list (which took 33 ms of a ~460 ms training iteration in a
    ``python -m cProfile`` of ``istr_viz train``); ``benchmarks/bench_kernels.py`` times the
    whole operator, these matrices included.
    """
    num_rows = cols.numel() // per_row
    row_cols, order = cols.view(num_rows, per_row).sort(dim=1)
    row_values = values.view(num_rows, per_row).gather(1, order)
    rows = torch.arange(num_rows, device=cols.device).repeat_interleave(per_row)
    keys, merged = _merge_repeats(rows * num_cols + row_cols.reshape(-1), row_values.reshape(-1))
    a_rows = torch.div(keys, num_cols, rounding_mode="floor")
    a_cols = keys - a_rows * num_cols
    a_crow = torch.cat([keys.new_zeros(1), torch.bincount(a_rows, minlength=num_rows).cumsum(0)])
    t_keys, order = (a_cols * num_rows + a_rows).sort()
    t_rows = torch.div(t_keys, num_rows, rounding_mode="floor")
    t_crow = torch.cat([keys.new_zeros(1), torch.bincount(t_rows, minlength=num_cols).cumsum(0)])
    return (_csr(a_crow, a_cols, merged, (num_rows, num_cols)),
            _csr(t_crow, t_keys - t_rows * num_rows, merged[order], (num_cols, num_rows)))


class _MatrixRoIAlign(torch.autograd.Function):
    """(B*H*W, C) features -> (R*P*P, C) pooled, with the matrices precomputed (no box grads)."""

    @staticmethod
    def forward(ctx, flat: Tensor, matrix: Tensor, transposed: Tensor) -> Tensor:
        ctx.save_for_backward(transposed)
        with torch.autocast(flat.device.type, enabled=False):  # sparse mm has no bf16 kernel
            return torch.sparse.mm(matrix, flat.float())

    @staticmethod
    def backward(ctx, grad: Tensor):
        (transposed,) = ctx.saved_tensors
        with torch.autocast(grad.device.type, enabled=False):
            return torch.sparse.mm(transposed, grad.float().contiguous()), None, None


def sparse_roi_align(features: Tensor, rois: Tensor, output_size: int, spatial_scale: float,
                     sampling_ratio: int, aligned: bool = True) -> Tensor:
    """torchvision's ``roi_align`` (square output) with a sparse-matrix backward.

    Args:
        features: (B, C, H, W); pooled in float32 whatever their dtype (as torchvision's
            ``roi_align`` is under autocast).
        rois: (R, 5) [batch index, x1, y1, x2, y2] in image pixels (no gradient flows to them,
            as in ISTR, where the boxes are detached before pooling).
        sampling_ratio: a positive count (torchvision's adaptive ``-1`` is not supported).
        aligned: as torchvision's (see :func:`roi_align_matrix`).

    Returns:
        (R, C, P, P) float32 pooled features; gradients flow to ``features``.
    """
    if sampling_ratio < 1:
        raise ValueError(f"sampling_ratio must be a positive count, got {sampling_ratio}")
    B, C, H, W = features.shape
    R, P = rois.shape[0], output_size
    matrix, transposed = roi_align_matrix(rois.detach(), B, H, W, P, spatial_scale,
                                          sampling_ratio, aligned)
    # fp32, as under autocast; a view for fp32 channels-last maps (RoIPooler.prepare)
    flat = features.float().permute(0, 2, 3, 1).reshape(B * H * W, C)
    pooled = _MatrixRoIAlign.apply(flat, matrix, transposed)  # (R*P*P, C)
    return pooled.reshape(R, P, P, C).permute(0, 3, 1, 2)




def _window_weights(coords: Tensor, size: Tensor, output_size: int, sampling_ratio: int
                    ) -> tuple[Tensor, Tensor, int]:
    """One axis of RoIAlign as a small matrix over each RoI's own window of cells.

    torchvision's rules per sample: more than one cell outside the map counts as zero; otherwise
    the position is clamped to [0, size - 1] and interpolated between its floor and the next cell
    (the last cell alone at the map's end). Each RoI's window spans the cells its samples touch.

    Args:
        coords: (R, P * s) sample positions in feature cells, bin-major (s per bin).
        size: (R, 1) long, the axis' length in cells of each RoI's map.

    Returns:
        weights (R, P, n): bin p of RoI r is ``weights[r, p] @ cells[start[r] : start[r] + n]``
        (averaged over the bin's s samples), n the longest window; start (R,) long, the first
        cell of each window; extent (R,) long, each window's own length (cells past it get no
        weight).
    """
    R = coords.shape[0]
    valid = ((coords >= -1.0) & (coords <= size)).to(coords.dtype)  # 0 for NaN too
    pos = torch.minimum(coords.nan_to_num(0.0).clamp(min=0), (size - 1).to(coords.dtype))
    low = pos.floor()
    frac = pos - low
    low = low.long()
    high = torch.minimum(low + 1, size - 1)
    start = low.min(dim=1, keepdim=True).values  # (R, 1)
    extent = high.max(dim=1).values - start[:, 0] + 1  # (R,) each window's own length
    n = int(extent.max())
    weights = coords.new_zeros((R, coords.shape[1], n))
    weights.scatter_add_(2, (low - start)[..., None], ((1 - frac) * valid)[..., None])
    weights.scatter_add_(2, (high - start)[..., None], (frac * valid)[..., None])
    return weights.view(R, output_size, sampling_ratio, n).mean(dim=2), start[:, 0], extent


_GROUP = 32  # RoIs gathered at one window size at most: few calls for ISTR's queries, tight windows for
# Mask R-CNN's hundreds of proposals of every shape
_SMALL = 8  # window sides (cells) that any group may gather at: at most 8 x 8 cells a RoI


class FlatMaps(NamedTuple):
    """Feature maps as :func:`separable_roi_align` reads them (:func:`flatten_maps`)."""

    flat: Tensor  # (sum_l B * H_l * W_l, C) fp32: every cell of every map, map after map
    layout: Tensor  # (L, 3) long: [first row in ``flat``, H_l, W_l] of each map


def flatten_maps(features: list[Tensor]) -> FlatMaps:
    """Maps (B, C, H_l, W_l) -> :class:`FlatMaps`, one copy (once per forward pass)."""
    flat = torch.cat([f.float().permute(0, 2, 3, 1).reshape(-1, f.shape[1]) for f in features])
    sizes = [f.shape[0] * f.shape[2] * f.shape[3] for f in features]
    first = [sum(sizes[:k]) for k in range(len(features))]
    layout = torch.tensor([[a, f.shape[2], f.shape[3]] for a, f in zip(first, features)],
                          dtype=torch.long, device=flat.device)
    return FlatMaps(flat, layout)


def _window_groups(h_r: Tensor, w_r: Tensor) -> list[Tensor]:
    """RoI indices in groups of at most ``_GROUP``, each gathered at its largest height x its
    largest width. Windows up to ``_SMALL`` cells on a side share groups (ISTR's queries: one
    call); longer sides go by power-of-two bucket of height and of width, so that a tall window
    and a wide one never share a gather, and a group's window is under 2x any member's on a side."""
    def bucket(extent: Tensor) -> Tensor:
        return torch.where(extent <= _SMALL, 0, torch.log2(extent.float()).ceil().long())

    key = bucket(h_r) * 64 + bucket(w_r)  # extents are below 2**63 cells: 64 buckets suffice
    key, order = key.sort(stable=True)
    counts = torch.unique_consecutive(key, return_counts=True)[1].tolist()
    return [chunk for run in order.split(counts) for chunk in run.split(_GROUP)]


def separable_roi_align(maps_flat: FlatMaps, rois: Tensor, maps: Tensor,
                        scales: Tensor, output_size: int, sampling_ratio: int,
                        aligned: bool = True) -> Tensor:
    """torchvision's ``roi_align`` (square output) for inference on the CPU, every RoI from its
    own map (FPN level) in one call, as two small matrix products per RoI.

    RoIAlign samples a regular grid of points in each box and interpolates bilinearly; both the
    interpolation (with torchvision's rules at the map's edges) and the average over a bin's
    samples act on rows and columns separately. So bin (y, x) of channel c is
    ``Ay[y] @ F_c[window] @ Ax[x]``, with ``Ay`` and ``Ax`` (P, n) the axis weights over the few
    cells the box's samples touch. Each RoI's window is gathered once, (n, n, C), and the products
    run over all channels at once, where torchvision's CPU kernel interpolates one channel and
    one sample at a time, one call per map. The same values up to float rounding (tested against
    torchvision); no gradient to the boxes. Pools in fp32, as torchvision's does under autocast.

    Args:
        maps_flat: the maps as :func:`flatten_maps` gives them.
        rois: (R, 5) [batch index, x1, y1, x2, y2] in image pixels.
        maps: (R,) long, the map each RoI is pooled from; scales: (R,) its spatial scale.
        output_size, sampling_ratio, aligned: as torchvision's.

    Returns:
        (R, C, P, P) float32, a view of (R, P, P, C) memory (``flatten(2).transpose(1, 2)``
        gives the (R, P * P, C) rows without a copy).
    """
    if sampling_ratio < 1:
        raise ValueError(f"sampling_ratio must be a positive count, got {sampling_ratio}")
    flat, layout = maps_flat
    C = flat.shape[1]
    R, P, s = rois.shape[0], output_size, sampling_ratio
    if R == 0:
        return flat.new_zeros((0, P, P, C)).permute(0, 3, 1, 2)
    with torch.autocast(flat.device.type, enabled=False):
        rois = rois.detach().float()
        first, height, width = layout[maps].unbind(1)  # (R,) each
        scales = scales.float()
        offset = 0.5 if aligned else 0.0
        x1, y1 = rois[:, 1] * scales - offset, rois[:, 2] * scales - offset
        box_w, box_h = rois[:, 3] * scales - offset - x1, rois[:, 4] * scales - offset - y1
        if not aligned:
            box_w, box_h = box_w.clamp(min=1.0), box_h.clamp(min=1.0)
        steps = (torch.arange(P * s, dtype=torch.float32, device=rois.device) + 0.5) / s
        ay, y0, h_r = _window_weights(y1[:, None] + steps * (box_h / P)[:, None],
                                      height[:, None], P, s)
        ax, x0, w_r = _window_weights(x1[:, None] + steps * (box_w / P)[:, None],
                                      width[:, None], P, s)
        base = first + rois[:, 0].long() * height * width  # (R,) the row of each RoI's cell (0, 0)
        out = flat.new_empty((R, P, P, C))
        for group in _window_groups(h_r, w_r):
            h, w = int(h_r[group].max()), int(w_r[group].max())
            rows = torch.minimum(y0[group, None] + torch.arange(h, device=rois.device),
                                 height[group, None] - 1)  # (G, h)
            cols = torch.minimum(x0[group, None] + torch.arange(w, device=rois.device),
                                 width[group, None] - 1)  # (G, w)
            cells = (base[group, None, None] + rows[:, :, None] * width[group, None, None]
                     + cols[:, None])
            window = flat[cells.view(-1)].view(len(group), h, w * C)  # channels last
            by_rows = torch.bmm(ay[group, :, :h], window).view(len(group), P, w, C)
            out[group] = torch.matmul(ax[group, None, :, :w], by_rows)  # (G, P_y, P_x, C)
        return out.permute(0, 3, 1, 2)
