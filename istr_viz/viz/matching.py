"""Hungarian matching, drawn: cost matrices, their terms, the assignment on the image, churn.

Inputs are :class:`~istr_viz.matcher.Match` (``cost`` and ``terms`` (Q, G), ``query_idx`` /
``gt_idx``) and :class:`~istr_viz.inspect.ImageMatches` (one Match per stage, see
:func:`istr_viz.inspect.match_image`); nothing here runs a model.

- :func:`plot_cost_matrix`: queries x GT heatmap of the total cost, each assigned cell framed in
  its query's colour.
- :func:`plot_cost_terms`: the total and each weighted term (class, l1, giou, mask) side by side.
- :func:`plot_assignments`: the image with each GT instance (dashed box, mask outline) joined by a
  line to its matched query's box and mask at one stage.
- :func:`plot_churn` / :func:`plot_assignment_timeline`: how many GT instances change owner per
  stage transition, and which query owns each GT at each stage.
- :func:`assignment_rows`: the assignment of one stage as table rows (``ASSIGNMENT_COLUMNS``).

With hundreds of queries, pass ``queries="matched+top"`` to show the matched queries plus the
``num_top`` cheapest unmatched ones.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from istr_viz.viz.draw import draw_boxes, draw_image, draw_masks, query_colors
from istr_viz.viz.figures import new_figure
from istr_viz.viz.trajectories import box_centres, fit_to_image, label_query_ticks

QuerySelection = Sequence[int] | np.ndarray | str | None
UNMATCHED_COLOR = (0.6, 0.6, 0.6)
ASSIGNMENT_COLUMNS = ["gt", "gt class", "query", "query class", "score", "box IoU", "cost",
                      "class", "l1", "giou", "mask"]
TERM_COLUMNS = ASSIGNMENT_COLUMNS[7:]  # the weighted cost terms, named as in ``Match.terms``


# ----------------------------------------------------------------------------- selections


def select_queries(match, queries: QuerySelection = None, num_top: int = 5) -> np.ndarray:
    """Rows to show, sorted by query index: None = all Q; ``"matched"``; ``"matched+top"`` =
    the matched queries plus the ``num_top`` unmatched ones with the lowest cost to any GT; or
    the given indices."""
    num_queries = int(match.cost.shape[0])
    if queries is None:
        return np.arange(num_queries)
    if isinstance(queries, str):
        if queries not in ("matched", "matched+top"):
            raise ValueError(f"queries must be None, 'matched', 'matched+top' or indices, "
                             f"got {queries!r}")
        matched = match.query_idx.numpy()
        if queries == "matched" or match.cost.shape[1] == 0:
            return np.sort(matched)
        best = match.cost.numpy().min(axis=1)  # (Q,) cheapest GT of each query
        best[matched] = np.inf
        others = np.argsort(best, kind="stable")[: min(num_top, num_queries - len(matched))]
        return np.sort(np.concatenate([matched, others]))
    queries = np.asarray(queries, dtype=np.int64).reshape(-1)
    if len(queries) and (queries.min() < 0 or queries.max() >= num_queries):
        raise ValueError(f"queries must lie in 0..{num_queries - 1}, got {queries.tolist()}")
    return queries


def assigned_cells(match, rows: np.ndarray) -> list[tuple[int, int, int]]:
    """``(row position, gt, query)`` of each assigned pair whose query is among ``rows``."""
    position = {int(q): i for i, q in enumerate(rows)}
    return [(position[q], g, q) for q, g in zip(match.query_idx.tolist(), match.gt_idx.tolist())
            if q in position]


# ----------------------------------------------------------------------------- primitives


def draw_cost(ax: Axes, values: np.ndarray, rows: np.ndarray, match, title: str,
              gt_names: Sequence[str] | None = None, annotate: bool = True,
              label_rows: bool = True, cmap: str = "viridis"):
    """Draw the (Q, G) ``values`` restricted to ``rows`` as a heatmap and frame every assigned
    cell in its query's colour (one Rectangle each). ``label_rows`` writes the query labels
    (off for panels sharing rows with one on their left). Returns ``(image, rectangles)``."""
    block = np.asarray(values, dtype=float)[rows]  # (R, G)
    image = ax.imshow(block, cmap=cmap, aspect="auto", interpolation="nearest")
    num_queries = int(match.cost.shape[0])
    colors = query_colors(num_queries)
    rectangles = []
    for r, g, q in assigned_cells(match, rows):
        rect = Rectangle((g - 0.5, r - 0.5), 1, 1, fill=False, edgecolor=colors[q], linewidth=2.5)
        ax.add_patch(rect)
        rectangles.append(rect)
    if annotate and block.size and block.size <= 120:
        mid = (block.max() + block.min()) / 2
        for (r, g), v in np.ndenumerate(block):
            ax.text(g, r, f"{v:.2f}", ha="center", va="center", fontsize=5,
                    color="black" if v > mid else "white")
    num_gt = block.shape[1]
    names = [f"g{g}" if gt_names is None else f"g{g} {gt_names[g]}" for g in range(num_gt)]
    ax.set_xticks(range(num_gt), names, fontsize=6, rotation=90)
    if label_rows:
        label_query_ticks(ax, rows, num_queries, axis="y")
    else:
        ax.set_yticks([])
    ax.set_title(title, fontsize=8)
    return image, rectangles


# ----------------------------------------------------------------------------- figures


def _figure_and_ax(ax: Axes | None, size: tuple[float, float]) -> tuple[Figure, Axes]:
    if ax is not None:
        return ax.figure, ax
    fig, axes = new_figure(1, 1, size)
    return fig, axes[0, 0]


def _panel_height(num_rows: int) -> float:
    return float(np.clip(0.18 * num_rows + 1.2, 2.2, 9.0))


def plot_cost_matrix(match, queries: QuerySelection = None, num_top: int = 5,
                     gt_names: Sequence[str] | None = None, ax: Axes | None = None) -> Figure:
    """Queries x GT heatmap of the total matching cost (lower = better), every assigned cell
    framed in its query's colour. ``queries``: see :func:`select_queries`."""
    rows = select_queries(match, queries, num_top)
    fig, ax = _figure_and_ax(ax, (0.35 * match.cost.shape[1] + 2.4, _panel_height(len(rows))))
    image, _ = draw_cost(ax, match.cost.numpy(), rows, match,
                         f"total cost: {match.num_matched} assigned", gt_names)
    ax.set_ylabel("query")
    fig.colorbar(image, ax=ax, fraction=0.1)
    return fig


def plot_cost_terms(match, queries: QuerySelection = None, num_top: int = 5,
                    gt_names: Sequence[str] | None = None, panel_width: float = 2.4,
                    annotate: bool = False) -> Figure:
    """The total cost and each weighted term (``match.terms``: class, l1, giou, mask) side by
    side on the same rows, the assignment framed in every panel; each panel has its own colour
    scale and its title gives the term's weight. ``annotate`` writes each cell's value (small
    matrices only: at most 120 cells a panel)."""
    rows = select_queries(match, queries, num_top)
    panels = [("total", match.cost)] + list(match.terms.items())
    fig, axes = new_figure(1, len(panels), (panel_width, _panel_height(len(rows))))
    for i, (ax, (name, values)) in enumerate(zip(axes.flat, panels)):
        weight = match.weights.get(name)
        title = name if weight is None else f"{name} (x{weight:g})"
        image, _ = draw_cost(ax, values.numpy(), rows, match, title, gt_names, annotate,
                             label_rows=i == 0)
        fig.colorbar(image, ax=ax, fraction=0.08)
    axes[0, 0].set_ylabel("query")
    return fig


def plot_assignments(image_matches, stage: int, show_masks: bool = True,
                     ax: Axes | None = None, panel_size: float = 4.5) -> Figure:
    """The image with each GT instance (dashed box and mask outline) joined by a line to its
    matched query's box and mask at ``stage`` (from 1), all in that query's colour (GT left
    unmatched, possible only when Q < G: grey)."""
    im = image_matches
    match = im.match(stage)
    k = stage if stage != -1 else im.num_stages
    fig, ax = _figure_and_ax(ax, (panel_size, panel_size))
    draw_image(ax, im.image, f"stage {k}: {match.num_matched} of {im.num_gt} GT matched")
    colors = query_colors(im.num_queries)
    queries, gts = match.query_idx.numpy(), match.gt_idx.numpy()
    gt_colors = np.tile(np.asarray(UNMATCHED_COLOR), (im.num_gt, 1))
    gt_colors[gts] = colors[queries]
    pred_boxes = im.query_boxes_xyxy[k - 1].numpy()[queries]
    if show_masks and len(queries):
        draw_masks(ax, im.query_masks(k, queries).numpy(), colors[queries])
    gt_boxes = im.gt_boxes_xyxy.numpy()
    draw_boxes(ax, gt_boxes, gt_colors, [f"g{g} {im.class_names[int(c)]}" for g, c in
                                         enumerate(im.gt_labels.tolist())], linestyle="--")
    for g, mask in enumerate(im.gt_masks.numpy()):
        if mask.any():
            ax.contour(mask.astype(float), levels=[0.5], colors=[gt_colors[g]], linewidths=1.0)
    draw_boxes(ax, pred_boxes, colors[queries], [f"q{q}" for q in queries], linewidth=2.0)
    for q, start, end in zip(queries, box_centres(gt_boxes[gts]), box_centres(pred_boxes)):
        ax.plot([start[0], end[0]], [start[1], end[1]], "-", color=colors[q], lw=1.5,
                marker="o", markersize=3)
    fit_to_image(ax, im.size)
    return fig


def plot_churn(churn: Sequence[int], num_gt: int | None = None, ax: Axes | None = None
               ) -> Figure:
    """Bar per stage transition k -> k + 1: how many GT instances change their matched query
    (``istr_viz.inspect.assignment_churn``); ``num_gt`` sets the y limit when given."""
    churn = [int(c) for c in churn]
    fig, ax = _figure_and_ax(ax, (max(2.4, 0.6 * len(churn) + 1.2), 2.4))
    labels = [f"{k}\u2192{k + 1}" for k in range(1, len(churn) + 1)]
    ax.bar(range(len(churn)), churn, color="tab:orange", width=0.7)
    ax.set_xticks(range(len(churn)), labels, fontsize=7)
    ax.set_xlabel("stage transition", fontsize=7)
    ax.set_ylabel("GT changing query", fontsize=7)
    top = num_gt if num_gt else max(churn, default=0)
    ax.set_ylim(0, max(top, 1))
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.set_title(f"assignment churn: {sum(churn)} changes", fontsize=8)
    return fig


def plot_assignment_timeline(table: Sequence[dict], num_queries: int, ax: Axes | None = None
                             ) -> Figure:
    """GT x stages grid from ``istr_viz.inspect.assignment_table``: each cell coloured by (and
    labelled with) the query matched to that GT at that stage; white = unmatched."""
    stages = sorted((key for key in (table[0] if table else {}) if key.startswith("stage")),
                    key=lambda key: int(key[5:]))
    owners = np.array([[row[s] for s in stages] for row in table], dtype=np.int64)
    owners = owners.reshape(len(table), len(stages))  # (G, K)
    colors = query_colors(num_queries)
    rgb = np.ones((*owners.shape, 3))
    rgb[owners >= 0] = colors[owners[owners >= 0]]
    fig, ax = _figure_and_ax(ax, (0.5 * len(stages) + 1.6, _panel_height(len(table))))
    ax.imshow(rgb, aspect="auto", interpolation="nearest")
    for (g, s), q in np.ndenumerate(owners):
        ax.text(s, g, f"q{q}" if q >= 0 else "-", ha="center", va="center", fontsize=6)
    ax.set_xticks(range(len(stages)), [s[5:] for s in stages], fontsize=7)
    ax.set_yticks(range(len(table)), [f"g{row['gt']}" for row in table], fontsize=7)
    ax.set_xlabel("stage", fontsize=7)
    ax.set_title("matched query per GT", fontsize=8)
    return fig


def plot_assignment_history(churn: Sequence[int], table: Sequence[dict], num_queries: int
                            ) -> Figure:
    """:func:`plot_churn` next to :func:`plot_assignment_timeline` (``churn`` and ``table`` from
    ``istr_viz.inspect.assignment_churn`` / ``assignment_table`` of the same image)."""
    fig, axes = new_figure(1, 2, (3.2, _panel_height(len(table)) + 0.4))
    plot_churn(churn, len(table), ax=axes[0, 0])
    plot_assignment_timeline(table, num_queries, ax=axes[0, 1])
    return fig


# ----------------------------------------------------------------------------- table


def _area(boxes_xyxy: np.ndarray) -> np.ndarray:
    return np.clip(boxes_xyxy[:, 2:] - boxes_xyxy[:, :2], 0, None).prod(axis=1)


def _box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of paired (N, 4) xyxy boxes: (N,)."""
    lt, rb = np.maximum(a[:, :2], b[:, :2]), np.minimum(a[:, 2:], b[:, 2:])
    inter = np.clip(rb - lt, 0, None).prod(axis=1)
    return inter / np.maximum(_area(a) + _area(b) - inter, 1e-9)


def assignment_rows(image_matches, stage: int) -> list[list]:
    """One row per GT instance at ``stage`` (from 1), columns ``ASSIGNMENT_COLUMNS``: GT index and
    class, matched query (-1: none), its best class and score, box IoU, the total cost and each
    weighted term of the pair. Plain Python values, ready for a DataFrame or ``gr.Dataframe``."""
    im = image_matches
    match = im.match(stage)
    k = stage if stage != -1 else im.num_stages
    owner = dict(zip(match.gt_idx.tolist(), match.query_idx.tolist()))
    rows = []
    for g in range(im.num_gt):
        gt_class = im.class_names[int(im.gt_labels[g])]
        q = owner.get(g, -1)
        if q < 0:
            rows.append([g, gt_class, -1, "", None, None, None, None, None, None, None])
            continue
        iou = _box_iou(im.query_boxes_xyxy[k - 1, q][None].numpy(),
                       im.gt_boxes_xyxy[g][None].numpy())[0]
        terms = [round(float(match.terms[name][q, g]), 4) for name in TERM_COLUMNS]
        rows.append([g, gt_class, q, im.class_names[int(im.query_labels[k - 1, q])],
                     round(float(im.query_scores[k - 1, q]), 4), round(float(iou), 4),
                     round(float(match.cost[q, g]), 4), *terms])
    return rows


__all__ = [
    "ASSIGNMENT_COLUMNS", "assigned_cells", "assignment_rows", "draw_cost",
    "plot_assignment_history", "plot_assignment_timeline", "plot_assignments", "plot_churn",
    "plot_cost_matrix", "plot_cost_terms", "select_queries",
]
