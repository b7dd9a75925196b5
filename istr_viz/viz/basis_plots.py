"""Pictures of a mask basis: its components, variance, reconstruction quality and codes.

Every ``plot_*`` function takes arrays or a fitted :class:`~istr_viz.basis.MaskBasis` (never a
model) and returns a new :class:`matplotlib.figure.Figure`. The small numpy helpers
(:func:`encode_masks`, :func:`reconstruct`, :func:`mean_mask`, :func:`walk_component`) are what the
plots and :class:`istr_viz.widgets.BasisExplorer` compute, so a test can compare a drawn panel
with them. Masks are (N, S, S) bool / {0, 1} arrays (box-relative, as the basis is fitted on);
codes are (N, M). Comparing recipes: functions that take ``bases`` accept one basis or a mapping
``{label: basis}``, e.g. ``{"istr": ..., "binary": ...}``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor

from istr_viz.basis import MaskBasis, binarise_masks
from istr_viz.viz.figures import hide_unused, image_panel, new_figure, signed_panel

__all__ = [
    "component_step", "decode_codes", "encode_masks", "mask_iou", "mean_mask",
    "plot_basis_components", "plot_coefficient_histograms", "plot_component_walk",
    "plot_explained_variance", "plot_iou_vs_k", "plot_recipe_comparison",
    "plot_reconstructions", "reconstruct", "walk_code", "walk_component",
]

CURVE_LABELS = {"miou": "mean IoU (decode >= 0.5)", "pixel_error": "mean |p - mask|"}


# ----------------------------------------------------------------------------- numpy helpers


def encode_masks(basis: MaskBasis, masks: np.ndarray | Tensor, k: int | None = None,
                 noise: bool = False) -> np.ndarray:
    """(N, S, S) masks -> (N, k) float32 codes (``basis.encode``; deterministic by default)."""
    tensor = torch.from_numpy(binarise_masks(masks))
    with torch.no_grad():
        return basis.encode(tensor, k=k, noise=noise).cpu().numpy()


def decode_codes(basis: MaskBasis, codes: np.ndarray | Tensor) -> np.ndarray:
    """(..., k) codes -> (..., S, S) float32 mask probabilities (``basis.decode``)."""
    tensor = torch.as_tensor(np.asarray(codes, np.float32))
    with torch.no_grad():
        return basis.decode(tensor).cpu().numpy()


def reconstruct(basis: MaskBasis, masks: np.ndarray | Tensor, k: int) -> np.ndarray:
    """(N, S, S) masks -> (N, S, S) probabilities ``decode(encode(masks, k, noise=False))``."""
    return decode_codes(basis, encode_masks(basis, masks, k))


def mask_iou(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """IoU of ``pred >= 0.5`` with ``target`` over the last two axes: (..., S, S) -> (...);
    two empty masks count 1."""
    p, t = np.asarray(pred) >= 0.5, np.asarray(target) != 0
    inter = (p & t).sum((-2, -1))
    union = (p | t).sum((-2, -1))
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def mean_mask(basis: MaskBasis) -> np.ndarray:
    """(S, S) the decoded mean, i.e. ``decode(0)``: ``sigmoid(mean)`` for the ``"istr"`` recipe,
    the clamped average mask for ``"binary"``."""
    with torch.no_grad():
        probs = basis.from_linear(basis.mean.float())
    return probs.cpu().numpy().reshape(basis.mask_size, basis.mask_size)


def component_step(basis: MaskBasis, j: int) -> float:
    """Code units in one standard deviation along component j: 1 for whitened codes
    (``"istr"``), ``sqrt(explained_variance[j])`` otherwise."""
    _check_component(basis, j)
    return 1.0 if basis.whiten else float(basis.explained_variance[j].sqrt())


def walk_code(basis: MaskBasis, j: int, sigmas: float) -> np.ndarray:
    """(dim,) the code ``c * e_j`` that sits ``sigmas`` standard deviations from the mean along
    component j (``c = sigmas * component_step(basis, j)``)."""
    code = np.zeros(basis.dim, np.float32)
    code[j] = sigmas * component_step(basis, j)
    return code


def walk_component(basis: MaskBasis, j: int, sigmas: float) -> np.ndarray:
    """(S, S) ``decode(c * e_j)``: the mask ``sigmas`` standard deviations along component j."""
    return decode_codes(basis, walk_code(basis, j, sigmas))


def _check_component(basis: MaskBasis, j: int) -> None:
    if not 0 <= j < basis.dim:
        raise ValueError(f"component index {j} must be in [0, {basis.dim})")


def _as_mapping(bases: MaskBasis | Mapping[str, MaskBasis]) -> Mapping[str, MaskBasis]:
    return {bases.recipe: bases} if isinstance(bases, MaskBasis) else bases


def _first_masks(masks: np.ndarray | Tensor, num: int) -> np.ndarray:
    binary = binarise_masks(masks)
    if len(binary) == 0:
        raise ValueError("no masks to draw")
    return binary[:num]


# ----------------------------------------------------------------------------- figures


def plot_basis_components(basis: MaskBasis, num: int = 16, ncols: int = 6) -> Figure:
    """The decoded mean mask, then the first ``num`` components as S x S images.

    Components are unit vectors in the basis's space (logits for ``"istr"``), drawn with a
    diverging colormap whose limits ``(-L, L)`` are shared by all of them (L = their largest
    magnitude), so red adds foreground and blue removes it. Titles give the explained-variance
    ratio.
    """
    num = min(num, basis.dim)
    nrows = math.ceil((num + 1) / ncols)
    fig, axes = new_figure(nrows, min(ncols, num + 1), (1.7, 1.8))
    flat = axes.flat
    image_panel(flat[0], mean_mask(basis), f"mean ({basis.recipe})")
    components = basis.components[:num].cpu().numpy()
    ratio = basis.explained_variance_ratio.cpu().numpy()
    limit = float(np.abs(components).max())
    size = basis.mask_size
    for j in range(num):
        im = signed_panel(flat[j + 1], components[j].reshape(size, size),
                          f"PC{j + 1}  {ratio[j]:.1%}", limit)
    hide_unused(axes, num + 1)
    if num:
        fig.colorbar(im, ax=list(flat[1:num + 1]), shrink=0.6, label="component weight")
    fig.suptitle(f"mask basis: mean and first {num} of {basis.dim} components")
    return fig


def plot_explained_variance(bases: MaskBasis | Mapping[str, MaskBasis],
                            k: int | None = None) -> Figure:
    """Cumulative explained-variance ratio against k, one line per basis (labelled by key).

    Each ratio is a share of the variance of the matrix that basis was fitted on: the noisy
    logits for ``"istr"`` (whose pixel noise spreads over every direction, so its curve rises
    more slowly), the {0, 1} masks for ``"binary"``. ``k`` marks a chosen embedding length.
    """
    fig, axes = new_figure(1, 1, (5.0, 3.5))
    ax = axes[0, 0]
    for label, basis in _as_mapping(bases).items():
        cumulative = np.cumsum(basis.explained_variance_ratio.double().cpu().numpy())
        marked = k is not None and 1 <= k <= len(cumulative)
        text = f"{label}  ({cumulative[k - 1]:.3f} at k={k})" if marked else label
        (line,) = ax.plot(np.arange(1, len(cumulative) + 1), cumulative, label=text)
        line.set_gid(label)
        if marked:
            ax.plot([k], [cumulative[k - 1]], "o", color=line.get_color(), label=f"_{label} at k")
    if k is not None:
        ax.axvline(k, color="gray", linestyle=":", label="_chosen k")
    ax.set(xlabel="k (components kept)", ylabel="cumulative explained variance", ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def plot_iou_vs_k(curves: Mapping[str, Mapping[str, np.ndarray]], k: int | None = None,
                  metric: str = "miou") -> Figure:
    """Reconstruction quality against k, one line per entry of ``curves``.

    Args:
        curves: ``{label: curve}`` with each curve as returned by
            :func:`istr_viz.basis.reconstruction_curves` or
            :func:`istr_viz.basis.dct_reconstruction_curves` (keys ``"k"`` and ``metric``).
        k: the chosen embedding length; marked with a dotted line and each curve's value there
            (written in the legend).
        metric: ``"miou"`` or ``"pixel_error"``.
    """
    if metric not in CURVE_LABELS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {tuple(CURVE_LABELS)}")
    if not curves:
        raise ValueError("curves is empty")
    fig, axes = new_figure(1, 1, (5.5, 3.8))
    ax = axes[0, 0]
    for label, curve in curves.items():
        ks, values = np.asarray(curve["k"]), np.asarray(curve[metric])
        text = label
        if k is not None and k in ks:
            text = f"{label}  ({values[ks == k][0]:.3f} at k={k})"
        (line,) = ax.plot(ks, values, label=text)
        line.set_gid(label)
        if k is not None and k in ks:
            ax.plot([k], values[ks == k], "o", color=line.get_color(), label=f"_{label} at k")
    if k is not None:
        ax.axvline(k, color="gray", linestyle=":", label="_chosen k")
    ax.set(xlabel="k (embedding length)", ylabel=CURVE_LABELS[metric])
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def plot_reconstructions(masks: np.ndarray | Tensor, basis: MaskBasis, k: int,
                         num: int = 8) -> Figure:
    """The first ``num`` masks (row 1), their reconstructions ``decode(encode(mask, k))`` as
    probabilities with the IoU of ``>= 0.5`` (row 2), and the error ``probability - mask``
    (row 3: red = spurious foreground, blue = missed foreground), all S x S."""
    targets = _first_masks(masks, num)
    recon = reconstruct(basis, targets, k)
    iou = mask_iou(recon, targets)
    fig, axes = new_figure(3, len(targets), (1.6, 1.7))
    for i, (target, probs) in enumerate(zip(targets, recon, strict=True)):
        image_panel(axes[0, i], target.astype(np.float32), f"mask {i}")
        image_panel(axes[1, i], probs, f"IoU {iou[i]:.2f}")
        signed_panel(axes[2, i], probs - target, None, limit=1.0)
    for row, name in enumerate(("mask", f"k = {k}", "error")):
        axes[row, 0].set_ylabel(name)
    fig.suptitle(f"reconstructions at k = {k} ({basis.recipe}); mean IoU {iou.mean():.3f}")
    return fig


def plot_recipe_comparison(bases: Mapping[str, MaskBasis], masks: np.ndarray | Tensor, k: int,
                           num: int = 8) -> Figure:
    """The first ``num`` masks (row 1), then one row of reconstructions at k per basis, each
    titled with its IoU; the row label gives the basis's mean IoU over the drawn masks."""
    targets = _first_masks(masks, num)
    fig, axes = new_figure(1 + len(bases), len(targets), (1.6, 1.7))
    for i, target in enumerate(targets):
        image_panel(axes[0, i], target.astype(np.float32), f"mask {i}")
    axes[0, 0].set_ylabel("mask")
    for row, (label, basis) in enumerate(bases.items(), start=1):
        recon = reconstruct(basis, targets, k)
        iou = mask_iou(recon, targets)
        for i, probs in enumerate(recon):
            image_panel(axes[row, i], probs, f"IoU {iou[i]:.2f}")
        axes[row, 0].set_ylabel(f"{label}\nmIoU {iou.mean():.3f}")
    fig.suptitle(f"reconstructions at k = {k}")
    return fig


def plot_coefficient_histograms(codes: np.ndarray | Tensor | Mapping[str, np.ndarray | Tensor],
                                num: int = 8, bins: int = 30, ncols: int = 4,
                                normal_reference: bool = False) -> Figure:
    """Histograms of the first ``num`` code coefficients z_1..z_num of (N, M) codes.

    ``codes`` may be a mapping ``{label: codes}`` to overlay several sets (e.g. the whitened
    ``"istr"`` codes against the raw ``"binary"`` ones). ``normal_reference`` draws the
    standard normal density: whitened codes of the fitted masks have unit variance.
    """
    sets = codes if isinstance(codes, Mapping) else {"": codes}
    arrays = {label: _as_codes(value) for label, value in sets.items()}
    num = min([num, *(a.shape[1] for a in arrays.values())])
    fig, axes = new_figure(math.ceil(num / ncols), min(ncols, num), (2.4, 2.0))
    for j in range(num):
        ax = axes.flat[j]
        edges = np.histogram_bin_edges(np.concatenate([a[:, j] for a in arrays.values()]), bins)
        for label, array in arrays.items():
            column = array[:, j]
            ax.hist(column, bins=edges, density=True, alpha=0.6,
                    label=f"{label} (std {column.std():.2f})" if label else None)
        if normal_reference:
            x = np.linspace(-4, 4, 200)
            ax.plot(x, np.exp(-x**2 / 2) / math.sqrt(2 * math.pi), "k--", lw=1,
                    label="_N(0, 1)")
        title = f"z{j + 1}" if len(arrays) > 1 else f"z{j + 1}  std {arrays[''][:, j].std():.2f}"
        ax.set_title(title, fontsize="small")
        ax.tick_params(labelsize="x-small")
        if len(arrays) > 1:
            ax.legend(fontsize="xx-small")
    hide_unused(axes, num)
    fig.suptitle(f"leading code coefficients ({len(next(iter(arrays.values())))} masks)")
    return fig


def _as_codes(codes: np.ndarray | Tensor) -> np.ndarray:
    array = codes.detach().cpu().numpy() if isinstance(codes, Tensor) else np.asarray(codes)
    if array.ndim != 2 or len(array) == 0:
        raise ValueError(f"codes must have shape (N, M) with N >= 1, got {array.shape}")
    return array


def plot_component_walk(basis: MaskBasis, num: int = 4,
                        sigmas: tuple[float, ...] = (-3.0, -1.5, 0.0, 1.5, 3.0)) -> Figure:
    """What each component does: row j shows ``decode(c * e_j)`` for c at ``sigmas`` standard
    deviations (:func:`walk_component`); the middle column (c = 0) is the mean mask."""
    num = min(num, basis.dim)
    fig, axes = new_figure(num, len(sigmas), (1.5, 1.6))
    for j in range(num):
        for i, s in enumerate(sigmas):
            image_panel(axes[j, i], walk_component(basis, j, s),
                        f"{s:+g} sd" if j == 0 else None)
        axes[j, 0].set_ylabel(f"PC{j + 1}")
    fig.suptitle(f"walking from the mean along the first {num} components ({basis.recipe})")
    return fig

