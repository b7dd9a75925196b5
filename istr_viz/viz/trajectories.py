"""How queries move through the refinement stages of a :class:`~istr_viz.predictor.Prediction`.

- :func:`plot_box_trajectories`: each query's box centre from its learned proposal through every
  stage (one line per query, a marker per stage), with its proposal box dotted and final box solid.
- :func:`plot_score_heatmap`: queries x stages heatmap of each query's best class probability.
- :func:`plot_query_through_stages`: one query alone, one panel per stage, its input box dotted.
- :func:`plot_stage_view`: one stage with optional masks, boxes, trajectories, ground truth and a
  highlighted query (what :class:`~istr_viz.widgets.StageExplorer` shows).

A query keeps its colour everywhere (``query_colors``). Boxes are pixels of ``prediction.image``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle

from istr_viz.postprocess import paste_masks
from istr_viz.viz.draw import draw_boxes, draw_image, draw_masks, query_colors
from istr_viz.viz.figures import hide_unused, new_figure
from istr_viz.viz.stages import draw_stage

STAGE_MARKERS = "osD^v<>ph*"  # marker of stage k is STAGE_MARKERS[(k - 1) % 10]
GT_COLOR = (1.0, 1.0, 1.0)  # ground-truth boxes: white, dashed


# ----------------------------------------------------------------------------- arrays


def query_trajectories(prediction) -> np.ndarray:
    """(K + 1, Q, 4) pixel boxes of every query: the learned proposal, then stages 1..K."""
    boxes = [prediction.proposal_boxes_xyxy.numpy()]
    boxes += [st.query_boxes_xyxy.numpy() for st in prediction.stages]
    return np.stack(boxes).astype(float)


def box_centres(boxes_xyxy: np.ndarray) -> np.ndarray:
    """(..., 4) xyxy -> (..., 2) centres (x, y)."""
    boxes_xyxy = np.asarray(boxes_xyxy, dtype=float)
    return (boxes_xyxy[..., :2] + boxes_xyxy[..., 2:]) / 2


def score_matrix(prediction) -> np.ndarray:
    """(Q, K) best class probability of every query at every stage."""
    return np.stack([st.query_scores.numpy() for st in prediction.stages], axis=1)


def top_queries(prediction, score_threshold: float = 0.4, max_queries: int = 20,
                stage: int | None = None) -> np.ndarray:
    """Queries of the detections of ``stage`` (default the last) scoring >= ``score_threshold``,
    best first, each once, at most ``max_queries``: (N,) int."""
    det = prediction.detections(stage, score_threshold)
    order = np.argsort(-det.scores.numpy(), kind="stable")
    queries = det.queries.numpy()[order]
    _, first = np.unique(queries, return_index=True)
    return queries[np.sort(first)][:max_queries]


def _resolve_queries(prediction, queries: Sequence[int] | np.ndarray | None,
                     score_threshold: float, max_queries: int) -> np.ndarray:
    if queries is None:
        return top_queries(prediction, score_threshold, max_queries)
    queries = np.asarray(queries, dtype=np.int64).reshape(-1)
    num_queries = len(prediction.proposal_boxes_xyxy)
    if len(queries) and (queries.min() < 0 or queries.max() >= num_queries):
        raise ValueError(f"queries must lie in 0..{num_queries - 1}, got {queries.tolist()}")
    return queries


def check_stage(prediction, stage: int) -> int:
    """``stage`` counted from 1 (-1 = the last) as an index 1..K; ValueError outside."""
    k = prediction.num_stages if stage == -1 else int(stage)
    if not 1 <= k <= prediction.num_stages:
        raise ValueError(f"stage must be in 1..{prediction.num_stages}, got {stage}")
    return k


# ----------------------------------------------------------------------------- primitives


def draw_trajectories(ax: Axes, prediction, queries: Sequence[int] | np.ndarray,
                      last_stage: int | None = None, final_boxes: bool = True,
                      proposal_boxes: bool = False) -> list[Line2D]:
    """Draw on ``ax`` each query's box centre from its proposal to stage ``last_stage``.

    One Line2D per query (colour = query colour) with a marker per stage (``STAGE_MARKERS``);
    the proposal centre is a hollow square. ``final_boxes`` draws the box at ``last_stage``
    (solid) and ``proposal_boxes`` the learned proposal box (dotted). Returns the lines.
    """
    last = prediction.num_stages if last_stage in (None, -1) else int(last_stage)
    queries = np.asarray(queries, dtype=np.int64).reshape(-1)
    colors = query_colors(len(prediction.proposal_boxes_xyxy))[queries]
    centres = box_centres(query_trajectories(prediction)[: last + 1, queries])  # (last+1, N, 2)
    lines = [ax.plot(centres[:, i, 0], centres[:, i, 1], "-", color=colors[i], lw=1.5,
                     alpha=0.9)[0] for i in range(len(queries))]
    if len(queries):
        ax.scatter(centres[0, :, 0], centres[0, :, 1], s=30, marker="s", facecolors="none",
                   edgecolors=colors, linewidths=1.2, zorder=3)  # the proposals
        for k in range(1, last + 1):  # one scatter per stage, each with its own marker
            ax.scatter(centres[k, :, 0], centres[k, :, 1], s=22, c=colors, zorder=3,
                       marker=STAGE_MARKERS[(k - 1) % len(STAGE_MARKERS)], edgecolors="black",
                       linewidths=0.5)
    if proposal_boxes and len(queries):
        draw_boxes(ax, prediction.proposal_boxes_xyxy.numpy()[queries], colors, linewidth=1.0,
                   linestyle=":")
    if final_boxes and len(queries):
        boxes = prediction.stage(last).query_boxes_xyxy.numpy()[queries]
        draw_boxes(ax, boxes, colors, [f"q{q}" for q in queries], linewidth=1.5)
    return lines


def draw_query_highlight(ax: Axes, prediction, stage: int, query: int, show_mask: bool = True,
                         input_box: bool = False) -> Rectangle:
    """Highlight ``query`` at ``stage`` on ``ax``: a thick box in its colour labelled with its
    best class and score, its mask (pasted at the box, >= 0.5) and, with ``input_box``, the box
    it started the stage from (dotted: the proposal for stage 1). Returns the box patch."""
    k = check_stage(prediction, stage)
    num_queries = len(prediction.proposal_boxes_xyxy)
    if not 0 <= query < num_queries:
        raise ValueError(f"query must lie in 0..{num_queries - 1}, got {query}")
    st = prediction.stage(k)
    color = query_colors(num_queries)[query : query + 1]
    box = st.query_boxes_xyxy[query : query + 1]
    if show_mask:
        h, w = prediction.size
        draw_masks(ax, paste_masks(st.query_mask_probs[query : query + 1], box, h, w).numpy(),
                   color, alpha=0.55)
    if input_box:
        draw_boxes(ax, query_trajectories(prediction)[k - 1, query : query + 1], color,
                   linewidth=1.2, linestyle=":")
    label = (f"q{query} {prediction.class_names[int(st.query_labels[query])]} "
             f"{float(st.query_scores[query]):.2f}")
    (patch,) = draw_boxes(ax, box.numpy(), color, [label], linewidth=3.0)
    return patch


def draw_ground_truth(ax: Axes, boxes_xyxy: np.ndarray, labels: Sequence[str] | None = None
                      ) -> list[Rectangle]:
    """Ground-truth boxes (N, 4) pixels, dashed white, one patch each."""
    boxes_xyxy = np.asarray(boxes_xyxy, dtype=float).reshape(-1, 4)
    colors = np.tile(np.asarray(GT_COLOR), (len(boxes_xyxy), 1))
    return draw_boxes(ax, boxes_xyxy, colors, labels, linewidth=1.2, linestyle="--")


def fit_to_image(ax: Axes, size: tuple[int, int]) -> None:
    """Limit ``ax`` to an (H, W) image and clip its texts to it, so that lines, boxes and labels
    running off the image neither widen the view nor upset the figure's layout."""
    h, w = size
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)
    for text in ax.texts:
        text.set_clip_on(True)


# ----------------------------------------------------------------------------- figures


def _figure_and_ax(ax: Axes | None, panel_size: tuple[float, float]) -> tuple[Figure, Axes]:
    if ax is not None:
        return ax.figure, ax
    fig, axes = new_figure(1, 1, panel_size)
    return fig, axes[0, 0]


def plot_box_trajectories(prediction, queries: Sequence[int] | np.ndarray | None = None,
                          score_threshold: float = 0.4, max_queries: int = 20,
                          ax: Axes | None = None, panel_size: float = 5.0) -> Figure:
    """How each query's box moves from its learned proposal through the stages to its final box.

    ``queries`` default to those of the final stage's detections scoring >= ``score_threshold``
    (best first, at most ``max_queries``). Over the image: one line per query joining its box
    centres (hollow square = proposal, then one marker shape per stage), the proposal box dotted
    and the final box solid, all in the query's colour. Draws on ``ax`` when given.
    """
    queries = _resolve_queries(prediction, queries, score_threshold, max_queries)
    fig, ax = _figure_and_ax(ax, (panel_size, panel_size))
    draw_image(ax, prediction.image,
               f"box trajectories: {len(queries)} queries, proposal -> stage "
               f"{prediction.num_stages}")
    draw_trajectories(ax, prediction, queries, proposal_boxes=True)
    fit_to_image(ax, prediction.size)
    return fig


def plot_score_heatmap(prediction, queries: Sequence[int] | np.ndarray | None = None,
                       ax: Axes | None = None, panel_size: float = 3.5) -> Figure:
    """Queries x stages heatmap of each query's best class probability (rows = ``queries``,
    default all Q, in index order; row labels in the query colours)."""
    scores = score_matrix(prediction)  # (Q, K)
    rows = np.arange(len(scores)) if queries is None else _resolve_queries(prediction, queries,
                                                                           0.0, len(scores))
    fig, ax = _figure_and_ax(ax, (panel_size, panel_size))
    image = ax.imshow(scores[rows], aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0,
                      interpolation="nearest")
    k = scores.shape[1]
    ax.set_xticks(range(k), [str(s) for s in range(1, k + 1)], fontsize=7)
    ax.set_xlabel("stage")
    ax.set_ylabel("query")
    label_query_ticks(ax, rows, len(scores), axis="y")
    ax.set_title("best class probability", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.08)
    return fig


def label_query_ticks(ax: Axes, queries: np.ndarray, num_queries: int, axis: str,
                      max_labels: int = 40) -> None:
    """Label the ``axis`` ("x" or "y") ticks of a heatmap whose rows/columns are ``queries``
    with ``q{i}`` in each query's colour (every n-th label when there are over ``max_labels``)."""
    step = max(1, -(-len(queries) // max_labels))
    positions = np.arange(0, len(queries), step)
    labels = [f"q{queries[p]}" for p in positions]
    setter = ax.set_yticks if axis == "y" else ax.set_xticks
    setter(positions, labels, fontsize=6)
    ticks = ax.get_yticklabels() if axis == "y" else ax.get_xticklabels()
    colors = query_colors(num_queries)
    for tick, p in zip(ticks, positions):
        tick.set_color(colors[queries[p]])
        tick.set_fontweight("bold")


def plot_query_through_stages(prediction, query: int, panel_size: float = 2.6,
                              ncols: int | None = None) -> Figure:
    """One query through all K stages: a panel per stage with its box (thick), mask, best class
    and score, and the box it started that stage from (dotted; stage 1: the learned proposal)."""
    k = prediction.num_stages
    ncols = ncols or min(k, 6)
    fig, axes = new_figure(-(-k // ncols), ncols, (panel_size, panel_size))
    for stage in range(1, k + 1):
        ax = axes.flat[stage - 1]
        draw_image(ax, prediction.image, f"stage {stage}: q{query}")
        draw_query_highlight(ax, prediction, stage, query, input_box=True)
        fit_to_image(ax, prediction.size)
    hide_unused(axes, k)
    return fig


def plot_stage_view(prediction, stage: int, score_threshold: float = 0.4,
                    show_boxes: bool = True, show_masks: bool = True,
                    show_trajectories: bool = False,
                    gt_boxes_xyxy: np.ndarray | None = None,
                    gt_labels: Sequence[str] | None = None, highlight: int = -1,
                    ax: Axes | None = None, panel_size: float = 5.0) -> Figure:
    """One stage (from 1) with the overlays the stage explorer toggles.

    Detections of ``stage`` scoring >= ``score_threshold`` (masks and/or boxes, in query colours,
    as :func:`~istr_viz.viz.stages.draw_stage`); with ``show_trajectories`` the path of each shown
    detection's query from its proposal up to this stage; ``gt_boxes_xyxy`` (G, 4) pixels of the
    same image as dashed white boxes; ``highlight`` a query index (-1: none) drawn thick with its
    mask and input box.
    """
    k = check_stage(prediction, stage)
    fig, ax = _figure_and_ax(ax, (panel_size, panel_size))
    draw_stage(ax, prediction, k, score_threshold, show_masks=show_masks, show_boxes=show_boxes)
    if show_trajectories:
        queries = np.unique(prediction.detections(k, score_threshold).queries.numpy())
        draw_trajectories(ax, prediction, queries, last_stage=k, final_boxes=False)
    if gt_boxes_xyxy is not None:
        draw_ground_truth(ax, gt_boxes_xyxy, gt_labels)
    if highlight is not None and highlight >= 0:
        draw_query_highlight(ax, prediction, k, int(highlight), input_box=True)
    fit_to_image(ax, prediction.size)
    return fig


__all__ = [
    "box_centres", "check_stage", "draw_ground_truth", "draw_query_highlight",
    "draw_trajectories", "fit_to_image", "label_query_ticks", "plot_box_trajectories",
    "plot_query_through_stages", "plot_score_heatmap", "plot_stage_view", "query_trajectories",
    "score_matrix", "top_queries",
]
