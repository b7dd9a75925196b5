"""Figures without pyplot: create, fill with image panels, and turn into pixels or PNG bytes.

Every istr_viz figure is a :class:`matplotlib.figure.Figure` built here, never through
``matplotlib.pyplot``: nothing touches pyplot's global "current figure" state, so figures can be
made from Gradio worker threads and headless tests, and are freed like any other object.

- :func:`new_figure` makes the figure and its grid of axes.
- :func:`image_panel` and :func:`signed_panel` are the primitives for one (H, W) array on an Axes.
- :func:`figure_to_array` gives (H, W, 3) uint8 pixels (Gradio, tests), :func:`figure_to_png`
  PNG bytes (ipywidgets ``Image``), and :func:`show` a Jupyter-displayable image: a bare ``Figure``
  built without pyplot shows only as text in a notebook.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.image import AxesImage

SIGNED_CMAP = "RdBu_r"  # diverging: blue negative, white zero, red positive


def new_figure(nrows: int = 1, ncols: int = 1,
               size_per_panel: tuple[float, float] = (2.5, 2.5),
               **subplot_kw: Any) -> tuple[Figure, np.ndarray]:
    """A new figure with an (nrows, ncols) grid of axes and constrained layout.

    Args:
        nrows, ncols: grid shape, each at least 1.
        size_per_panel: (width, height) of one panel in inches; the figure is ``ncols * width``
            by ``nrows * height``.
        subplot_kw: passed to every ``add_subplot`` (e.g. ``projection="polar"``).

    Returns:
        ``(fig, axes)`` with ``axes`` an (nrows, ncols) object array of Axes (always 2-D).
    """
    if nrows < 1 or ncols < 1:
        raise ValueError(f"nrows and ncols must be at least 1, got {nrows} and {ncols}")
    width, height = size_per_panel
    fig = Figure(figsize=(ncols * width, nrows * height), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, subplot_kw=subplot_kw or None)
    return fig, axes


def hide_unused(axes: np.ndarray, used: int) -> None:
    """Hide the axes after the first ``used`` ones (row-major) of a grid from :func:`new_figure`."""
    for ax in axes.flat[used:]:
        ax.set_visible(False)


def image_panel(ax: Axes, image: np.ndarray, title: str | None = None, cmap: str = "gray",
                vmin: float | None = 0.0, vmax: float | None = 1.0) -> AxesImage:
    """Draw an (H, W) array (or (H, W, 3) RGB) on ``ax`` without ticks; the default limits
    suit masks and probabilities in [0, 1]. Returns the ``AxesImage``."""
    image = np.asarray(image)
    if image.ndim not in (2, 3):
        raise ValueError(f"image must have shape (H, W) or (H, W, 3), got {image.shape}")
    im = ax.imshow(image, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title is not None:
        ax.set_title(title, fontsize="small")
    return im


def signed_panel(ax: Axes, values: np.ndarray, title: str | None = None,
                 limit: float | None = None, cmap: str = SIGNED_CMAP) -> AxesImage:
    """Draw an (H, W) array of signed values with a diverging colormap centred on zero: the
    colour limits are ``(-limit, limit)``, ``limit`` defaulting to ``max |values|``."""
    values = np.asarray(values)
    if limit is None:
        limit = float(np.abs(values).max()) if values.size else 1.0
    limit = limit if limit > 0 else 1.0
    return image_panel(ax, values, title, cmap=cmap, vmin=-limit, vmax=limit)


def figure_to_array(fig: Figure, dpi: float | None = None) -> np.ndarray:
    """Render ``fig`` with the Agg backend to an (H, W, 3) uint8 RGB array.

    ``dpi`` overrides the figure's own resolution for this render only.
    """
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    old_dpi = fig.dpi
    if dpi is not None:
        fig.set_dpi(dpi)
    try:
        canvas.draw()
        rgba = np.asarray(canvas.buffer_rgba())
    finally:
        if dpi is not None:
            fig.set_dpi(old_dpi)
    return np.ascontiguousarray(rgba[..., :3])


def figure_to_png(fig: Figure, dpi: float | None = None) -> bytes:
    """The figure as PNG bytes (what an ipywidgets ``Image(format="png")`` takes)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi if dpi is not None else "figure")
    return buffer.getvalue()


def show(fig: Figure, dpi: float | None = None) -> Any:
    """Display a figure in Jupyter: make ``show(fig)`` the last expression of a cell.

    Returns an ``IPython.display.Image`` of the PNG. (A ``Figure`` made without pyplot has no
    PNG representation of its own, so left bare it prints as ``<Figure size ...>``.)
    """
    from IPython.display import Image  # local import: IPython is only there in notebooks

    return Image(data=figure_to_png(fig, dpi), format="png")
