"""Per-stage pictures of a :class:`~istr_viz.predictor.Prediction`: one panel per refinement stage."""

from __future__ import annotations

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from istr_viz.viz.draw import draw_boxes, draw_image, draw_masks, query_colors
from istr_viz.viz.figures import hide_unused, new_figure


def draw_stage(ax: Axes, prediction, stage: int | None, score_threshold: float = 0.4,
               show_masks: bool = True, show_boxes: bool = True,
               max_labels: int | None = None) -> int:
    """Draw one stage's detections above ``score_threshold`` over the image; returns how many.

    Colours follow the query each detection came from, so a query has one colour in every stage.
    Each box is labelled with its query, class and score, unless there are more than
    ``max_labels`` (None: no limit) of them: then the boxes go unlabelled (text is what makes a
    crowded panel slow to draw, and unreadable).
    """
    det = prediction.detections(stage, score_threshold)
    colors = query_colors(len(prediction.proposal_boxes_xyxy))[det.queries.numpy()]
    k = stage if stage not in (None, -1) else prediction.num_stages
    draw_image(ax, prediction.image, f"stage {k}: {len(det)} detections")
    if show_masks and len(det):
        draw_masks(ax, prediction.detection_masks(stage, score_threshold).numpy(), colors)
    if show_boxes:
        labels = None if max_labels is not None and len(det) > max_labels else [
            f"q{int(q)} {prediction.class_names[int(c)]} {s:.2f}"
            for q, c, s in zip(det.queries, det.labels, det.scores.tolist())]
        draw_boxes(ax, det.boxes_xyxy.numpy(), colors, labels)
    return len(det)


def plot_stage_grid(prediction, score_threshold: float = 0.4, ncols: int | None = None,
                    panel_size: float = 3.0, max_labels: int | None = None) -> Figure:
    """One panel per refinement stage (stage 1 first), detections above ``score_threshold``
    (boxes unlabelled in a panel with more than ``max_labels``, see :func:`draw_stage`)."""
    k = prediction.num_stages
    ncols = ncols or min(k, 3)
    nrows = -(-k // ncols)
    fig, axes = new_figure(nrows, ncols, (panel_size, panel_size))
    for i in range(k):
        draw_stage(axes.flat[i], prediction, i + 1, score_threshold, max_labels=max_labels)
    hide_unused(axes, k)
    return fig


def stage_counts(prediction, score_threshold: float) -> np.ndarray:
    """(K,) number of detections above the threshold at each stage."""
    return np.array([len(prediction.detections(k, score_threshold))
                     for k in range(1, prediction.num_stages + 1)])


__all__ = ["draw_stage", "plot_stage_grid", "stage_counts"]
