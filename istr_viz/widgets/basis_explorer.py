"""An ipywidgets explorer of a mask basis: reconstruct one mask at any k, and walk a component.

Top part: pick an instance and k; it shows the mask, its reconstruction
``decode(encode(mask, k, noise=False))``, the error and the code coefficients (kept ones in
colour, dropped ones grey). Bottom part: pick a component j and a coefficient in standard
deviations; it shows ``decode(c * e_j)``, i.e. what moving from the mean along component j does.

Each view is rendered once per change to PNG into a ``widgets.Image``; the arrays shown are kept
in attributes (``reconstruction``, ``walk_mask``, ...) so tests can drive the controls and check
them without a browser.
"""

from __future__ import annotations

import ipywidgets as widgets
import numpy as np
from matplotlib.figure import Figure
from torch import Tensor

from istr_viz.basis import MaskBasis, binarise_masks
from istr_viz.viz.basis_plots import (
    encode_masks,
    mask_iou,
    mean_mask,
    reconstruct,
    walk_code,
    walk_component,
)
from istr_viz.viz.figures import figure_to_png, image_panel, new_figure, signed_panel

MAX_SIGMAS = 4.0  # range of the walk's coefficient slider, in standard deviations


class BasisExplorer:
    """Interactive view of ``basis`` on ``masks`` (N, S, S); display ``explorer.widget``.

    Controls (ipywidgets, each observed by a named ``_on_*`` method): ``instance_slider``,
    ``k_slider`` (1..dim), ``component_picker`` (component index j, 0-based) and
    ``coefficient_slider`` (c in standard deviations of component j).

    State after each change: ``instance``, ``k``, ``mask`` (S, S) bool, ``code`` (dim,) the full
    code of the mask, ``reconstruction`` (S, S) probabilities at k, ``error`` (S, S)
    ``reconstruction - mask``, ``iou``; ``component``, ``coefficient``, ``walk_coefficients``
    (dim,) the code ``c * e_j`` decoded (``c`` in code units), ``walk_mask`` (S, S).
    """

    def __init__(self, basis: MaskBasis, masks: np.ndarray | Tensor, k: int | None = None,
                 instance: int = 0, dpi: float = 80):
        self.basis = basis
        self.masks = binarise_masks(masks)
        if len(self.masks) == 0:
            raise ValueError("BasisExplorer needs at least one mask")
        if self.masks.shape[1] != basis.mask_size:
            raise ValueError(f"masks are {self.masks.shape[1]}x{self.masks.shape[1]}, the "
                             f"basis is {basis.mask_size}x{basis.mask_size}")
        self.dpi = dpi
        self.instance = int(np.clip(instance, 0, len(self.masks) - 1))
        self.k = basis.dim if k is None else int(np.clip(k, 1, basis.dim))
        self.component, self.coefficient = 0, 2.0
        self._mean = mean_mask(basis)
        self._build_controls()
        self._update_reconstruction()
        self._update_walk()

    # -- layout

    def _build_controls(self) -> None:
        style = {"description_width": "initial"}
        self.instance_slider = widgets.IntSlider(
            value=self.instance, min=0, max=len(self.masks) - 1, description="instance",
            continuous_update=False, style=style)
        self.k_slider = widgets.IntSlider(
            value=self.k, min=1, max=self.basis.dim, description="k (components kept)",
            continuous_update=False, style=style)
        self.component_picker = widgets.Dropdown(
            options=[(f"PC{j + 1}", j) for j in range(self.basis.dim)], value=self.component,
            description="component")
        self.coefficient_slider = widgets.FloatSlider(
            value=self.coefficient, min=-MAX_SIGMAS, max=MAX_SIGMAS, step=0.25,
            description="coefficient (sd)", continuous_update=False, style=style)
        self.reconstruction_image = widgets.Image(format="png")
        self.walk_image = widgets.Image(format="png")
        self.summary = widgets.HTML()
        self.instance_slider.observe(self._on_instance, names="value")
        self.k_slider.observe(self._on_k, names="value")
        self.component_picker.observe(self._on_component, names="value")
        self.coefficient_slider.observe(self._on_coefficient, names="value")

    @property
    def widget(self) -> widgets.VBox:
        """The whole explorer, to display as a cell's last expression."""
        walk_title = widgets.HTML("<b>Walk along a component</b>: decode(c &middot; e<sub>j"
                                  "</sub>), c in standard deviations of component j")
        return widgets.VBox([
            widgets.HBox([self.instance_slider, self.k_slider]), self.summary,
            self.reconstruction_image, walk_title,
            widgets.HBox([self.component_picker, self.coefficient_slider]), self.walk_image,
        ])

    # -- callbacks

    def _on_instance(self, change: dict) -> None:
        self.instance = int(change["new"])
        self._update_reconstruction()

    def _on_k(self, change: dict) -> None:
        self.k = int(change["new"])
        self._update_reconstruction()

    def _on_component(self, change: dict) -> None:
        self.component = int(change["new"])
        self._update_walk()

    def _on_coefficient(self, change: dict) -> None:
        self.coefficient = float(change["new"])
        self._update_walk()

    # -- state and drawing

    def _update_reconstruction(self) -> None:
        self.mask = self.masks[self.instance]
        self.code = encode_masks(self.basis, self.mask[None])[0]  # (dim,)
        self.reconstruction = reconstruct(self.basis, self.mask[None], self.k)[0]  # (S, S)
        self.error = self.reconstruction - self.mask
        self.iou = float(mask_iou(self.reconstruction, self.mask))
        self.summary.value = (f"instance {self.instance} of {len(self.masks)}, k = {self.k} of "
                              f"{self.basis.dim}: IoU {self.iou:.3f}, mean |error| "
                              f"{np.abs(self.error).mean():.3f}")
        self.reconstruction_image.value = figure_to_png(self._reconstruction_figure())

    def _update_walk(self) -> None:
        self.walk_coefficients = walk_code(self.basis, self.component, self.coefficient)
        self.walk_mask = walk_component(self.basis, self.component, self.coefficient)
        self.walk_image.value = figure_to_png(self._walk_figure())

    def _reconstruction_figure(self) -> Figure:
        fig, axes = new_figure(1, 4, (2.2, 2.3))
        fig.set_dpi(self.dpi)
        image_panel(axes[0, 0], self.mask.astype(np.float32), f"mask {self.instance}")
        image_panel(axes[0, 1], self.reconstruction, f"k = {self.k}: IoU {self.iou:.2f}")
        signed_panel(axes[0, 2], self.error, "error (p - mask)", limit=1.0)
        ax = axes[0, 3]
        index = np.arange(1, self.basis.dim + 1)
        colors = np.where(index <= self.k, "tab:blue", "lightgray")
        ax.bar(index, self.code, color=colors, width=1.0)
        ax.axhline(0, color="black", lw=0.5)
        ax.set_title("code (grey: dropped)", fontsize="small")
        ax.tick_params(labelsize="x-small")
        return fig

    def _walk_figure(self) -> Figure:
        j, size = self.component, self.basis.mask_size
        fig, axes = new_figure(1, 4, (2.2, 2.3))
        fig.set_dpi(self.dpi)
        component = self.basis.components[j].cpu().numpy().reshape(size, size)
        image_panel(axes[0, 0], self._mean, "mean mask")
        signed_panel(axes[0, 1], component, f"PC{j + 1} (signed)")
        image_panel(axes[0, 2], self.walk_mask,
                    f"{self.coefficient:+.2f} sd along PC{j + 1}")
        signed_panel(axes[0, 3], self.walk_mask - self._mean, "change from mean", limit=1.0)
        return fig

