"""Drawing primitives on a matplotlib Axes: boxes, masks and labels over an image.

One stable colour per query (:func:`query_colors`): a query keeps its colour through all stages.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.patches import Rectangle


def query_colors(num: int) -> np.ndarray:
    """(num, 3) RGB in [0, 1]: colour of query q is row q, the same in every figure."""
    base = np.asarray(colormaps["tab20"].colors)
    extra = np.asarray(colormaps["tab20b"].colors)
    palette = np.concatenate([base, extra])
    return palette[np.arange(num) % len(palette)]


def draw_image(ax: Axes, image: np.ndarray, title: str | None = None) -> Axes:
    """Show an (H, W, 3) uint8 image without ticks."""
    ax.imshow(image)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9)
    return ax


def draw_boxes(ax: Axes, boxes_xyxy: np.ndarray, colors: np.ndarray,
               labels: Sequence[str] | None = None, linewidth: float = 1.5,
               linestyle: str = "-") -> list[Rectangle]:
    """Draw (N, 4) pixel boxes as rectangles (one patch each) with optional text labels."""
    boxes_xyxy = np.asarray(boxes_xyxy, dtype=float).reshape(-1, 4)
    if len(colors) < len(boxes_xyxy):
        raise ValueError(f"{len(boxes_xyxy)} boxes but only {len(colors)} colours")
    patches = []
    for i, (x0, y0, x1, y1) in enumerate(boxes_xyxy):
        rect = Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=colors[i],
                         linewidth=linewidth, linestyle=linestyle)
        ax.add_patch(rect)
        patches.append(rect)
        if labels is not None:
            ax.text(x0, y0, labels[i], fontsize=6, color="white", va="bottom",
                    bbox={"facecolor": colors[i], "alpha": 0.8, "pad": 1, "edgecolor": "none"})
    return patches


def masks_overlay(masks: np.ndarray, colors: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """(H, W, 4) RGBA layer painting (N, H, W) bool masks in their colours (later masks on top)."""
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim != 3:
        raise ValueError(f"masks must be (N, H, W), got {masks.shape}")
    layer = np.zeros((*masks.shape[1:], 4))
    for i, m in enumerate(masks):
        layer[m, :3] = colors[i][:3]
        layer[m, 3] = alpha
    return layer


def draw_masks(ax: Axes, masks: np.ndarray, colors: np.ndarray, alpha: float = 0.45) -> None:
    """Overlay (N, H, W) bool masks on the image already drawn on ``ax``."""
    if len(masks):
        ax.imshow(masks_overlay(masks, colors, alpha), interpolation="nearest")


__all__ = ["draw_boxes", "draw_image", "draw_masks", "masks_overlay", "query_colors"]
