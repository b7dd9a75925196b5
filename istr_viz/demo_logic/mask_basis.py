"""The Mask basis tab without gradio: a basis, masks to reconstruct, and IoU against k.

The basis is the checkpoint's own when one is served; otherwise one is fitted in a few seconds on
the train masks of the first ``max_fit_images`` data set images. The masks shown and measured are
the val split's (never fitted on), else synthetic ones when there is no data set. Everything that
does not depend on k is computed once in :func:`prepare_basis`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from istr_viz.basis import MaskBasis, dct_reconstruction_curves, reconstruction_curves
from istr_viz.data.coco import load_annotations
from istr_viz.data.instance_masks import image_instance_masks, synthetic_instance_masks
from istr_viz.demo_logic.served import DemoData, ServedModel
from istr_viz.viz.basis_plots import (
    mask_iou,
    plot_basis_components,
    plot_iou_vs_k,
    plot_reconstructions,
    reconstruct,
)
from istr_viz.viz.figures import figure_to_array

DEFAULT_DIM = 60  # components of a basis fitted for the page (ISTR's embedding length)


@dataclass
class BasisView:
    """What the tab needs: basis; masks (N, S, S) bool to reconstruct; curves
    ``{label: reconstruction curve}`` (PCA and the DCT baseline, k = 1..dim); components
    (H, W, 3) uint8 image of the mean and leading components; source (Markdown)."""

    basis: MaskBasis
    masks: np.ndarray
    curves: dict
    components: np.ndarray
    source: str


def _masks_of(ann, mask_size: int, max_images: int | None) -> np.ndarray:
    """(N, S, S) bool box-relative masks of the first ``max_images`` images of ``ann``."""
    ids = ann.image_ids if max_images is None else ann.image_ids[:max_images]
    chunks = [image_instance_masks(ann, image_id, mask_size) for image_id in ids]
    chunks = [c for c in chunks if len(c)]
    return np.concatenate(chunks) if chunks else np.zeros((0, mask_size, mask_size), bool)


def prepare_basis(served: ServedModel, data: DemoData, max_fit_images: int = 400,
                  max_masks: int = 2000, dpi: float = 80.0) -> BasisView:
    """The basis view of the served checkpoint, or of a basis fitted now on ``data``'s train
    masks (first ``max_fit_images`` images); at most ``max_masks`` masks are shown and measured."""
    # a copy: the model's own basis stays where the model is (a GPU, maybe)
    basis = MaskBasis.from_dict(served.predictor.model.basis.to_dict()) if served.ok else None
    size = basis.mask_size if basis is not None else 28
    if data.ok:
        shown = _masks_of(data.val_annotations, size, None)[:max_masks]
        shown_from = f"{len(shown)} val masks of `{data.root}`"
    else:
        shown, shown_from = synthetic_instance_masks(500, size), "500 synthetic masks (no data set)"
    if basis is not None:
        source = f"The checkpoint's own basis ({basis.dim} components, recipe `{basis.recipe}`)"
    else:
        start = time.perf_counter()
        if data.ok and data.train is not None:
            train_ann = load_annotations(data.train.ann_file)
            fit_masks = _masks_of(train_ann, size, max_fit_images)
            used = min(max_fit_images, len(train_ann.image_ids))
            fit_from = f"{len(fit_masks)} train masks of {used} train images"
        else:
            fit_masks, fit_from = shown, shown_from
        if len(fit_masks) < 2:
            fit_masks, fit_from = synthetic_instance_masks(500, size), "500 synthetic masks"
        basis = MaskBasis.fit(fit_masks, dim=min(DEFAULT_DIM, len(fit_masks) - 1), seed=0)
        source = (f"No checkpoint: a basis of {basis.dim} components fitted just now on "
                  f"{fit_from} ({time.perf_counter() - start:.1f} s)")
    if len(shown) == 0:
        shown, shown_from = synthetic_instance_masks(500, size), "500 synthetic masks"
    curves = {f"PCA ({basis.recipe})": reconstruction_curves(basis, shown),
              "DCT": dct_reconstruction_curves(shown, basis.dim)}
    components = figure_to_array(plot_basis_components(basis, num=min(16, basis.dim)), dpi)
    return BasisView(basis, shown.astype(bool), curves, components,
                     f"{source}; reconstructing {shown_from}.")


def clamp_k(k: float | int | None, dim: int) -> int:
    """A slider value as k in 1..dim (None: dim)."""
    return dim if k is None else int(min(max(round(float(k)), 1), dim))


def render_basis(view: BasisView, k: float | int | None, first: float | int = 0,
                 num: int = 8, dpi: float = 80.0) -> tuple[np.ndarray, np.ndarray, str]:
    """Masks ``first .. first + num - 1`` and their reconstructions with k components, and the
    IoU-versus-k curves with k marked: ``(reconstructions (H, W, 3), curves (H', W', 3),
    summary)``, images uint8."""
    k = clamp_k(k, view.basis.dim)
    start = int(min(max(round(float(first or 0)), 0), len(view.masks) - 1))
    masks = view.masks[start:start + num]
    recon = figure_to_array(plot_reconstructions(masks, view.basis, k, num=num), dpi)
    curves = figure_to_array(plot_iou_vs_k(view.curves, k), dpi)
    iou = mask_iou(reconstruct(view.basis, masks, k), masks)
    pca = next(iter(view.curves.values()))
    summary = (f"k = {k} of {view.basis.dim}: masks {start}..{start + len(masks) - 1}, mean IoU "
               f"{iou.mean():.3f}; over all {len(view.masks)} masks {pca['miou'][k - 1]:.3f}.")
    return recon, curves, summary


__all__ = ["BasisView", "DEFAULT_DIM", "clamp_k", "prepare_basis", "render_basis"]
