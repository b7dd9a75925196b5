"""Self-attention among the queries of each stage (``StagePrediction.attn``, (Q, Q), head mean).

Row q is the attending query: row q holds how much q reads from every other query, so each row
sums to 1. Predict with ``Predictor.predict(image, return_attention=True)`` (the default) to have
the weights. With many queries, restrict the view to the top-scoring ones (``queries="top"``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from istr_viz.viz.figures import hide_unused, new_figure
from istr_viz.viz.trajectories import check_stage, label_query_ticks

QuerySelection = Sequence[int] | np.ndarray | str | None


def attention_matrix(prediction, stage: int) -> np.ndarray:
    """(Q, Q) attention weights of ``stage`` (from 1); ValueError when none were recorded."""
    k = check_stage(prediction, stage)
    attn = prediction.stage(k).attn
    if attn is None:
        raise ValueError("this prediction holds no attention weights: predict with "
                         "return_attention=True")
    return attn.numpy().astype(float)


def attention_queries(prediction, queries: QuerySelection = None, num_top: int = 12,
                      stage: int = -1) -> np.ndarray:
    """The query indices to show: None = all Q; ``"top"`` = the ``num_top`` queries with the
    highest best-class probability at ``stage`` (best first); or the given indices."""
    num_queries = len(prediction.proposal_boxes_xyxy)
    if queries is None:
        return np.arange(num_queries)
    if isinstance(queries, str):
        if queries != "top":
            raise ValueError(f"queries must be None, 'top' or indices, got {queries!r}")
        k = check_stage(prediction, stage)
        scores = prediction.stage(k).query_scores.numpy()
        return np.argsort(-scores, kind="stable")[:num_top]
    queries = np.asarray(queries, dtype=np.int64).reshape(-1)
    if len(queries) and (queries.min() < 0 or queries.max() >= num_queries):
        raise ValueError(f"queries must lie in 0..{num_queries - 1}, got {queries.tolist()}")
    return queries


def draw_attention(ax: Axes, attn: np.ndarray, queries: np.ndarray, num_queries: int,
                   title: str | None = None, vmax: float | None = None):
    """Draw the (N, N) block ``attn[queries][:, queries]`` of a (Q, Q) matrix on ``ax``;
    tick labels ``q{i}`` in the query colours. Returns the ``AxesImage``."""
    block = attn[np.ix_(queries, queries)]
    image = ax.imshow(block, cmap="magma", vmin=0.0, vmax=vmax, interpolation="nearest")
    label_query_ticks(ax, queries, num_queries, axis="y")
    label_query_ticks(ax, queries, num_queries, axis="x")
    ax.tick_params(axis="x", labelrotation=90)
    ax.set_ylabel("attending query", fontsize=7)
    if title:
        ax.set_title(title, fontsize=9)
    return image


def plot_attention(prediction, stage: int, queries: QuerySelection = None, num_top: int = 12,
                   ax: Axes | None = None, panel_size: float = 3.6) -> Figure:
    """Stage ``stage``'s query self-attention as a heatmap (rows attend to columns), over all
    queries or the selection (see :func:`attention_queries`, "top" ranked at this stage)."""
    attn = attention_matrix(prediction, stage)
    rows = attention_queries(prediction, queries, num_top, stage)
    if ax is None:
        fig, axes = new_figure(1, 1, (panel_size, panel_size))
        ax = axes[0, 0]
    else:
        fig = ax.figure
    image = draw_attention(ax, attn, rows, len(attn), f"stage {check_stage(prediction, stage)}"
                           f" self-attention ({len(rows)} queries)")
    fig.colorbar(image, ax=ax, fraction=0.05)
    return fig


def plot_attention_grid(prediction, queries: QuerySelection = None, num_top: int = 12,
                        ncols: int | None = None, panel_size: float = 3.0) -> Figure:
    """One attention heatmap per stage, on the same queries (``"top"``: ranked at the last
    stage) and the same colour scale."""
    k = prediction.num_stages
    rows = attention_queries(prediction, queries, num_top, -1)
    blocks = [attention_matrix(prediction, s)[np.ix_(rows, rows)] for s in range(1, k + 1)]
    vmax = max((float(b.max()) for b in blocks if b.size), default=1.0)
    ncols = ncols or min(k, 3)
    fig, axes = new_figure(-(-k // ncols), ncols, (panel_size, panel_size))
    num_queries = len(prediction.proposal_boxes_xyxy)
    for s in range(1, k + 1):
        image = draw_attention(axes.flat[s - 1], attention_matrix(prediction, s), rows,
                               num_queries, f"stage {s}", vmax=vmax)
    hide_unused(axes, k)
    fig.colorbar(image, ax=axes[:, -1].tolist(), fraction=0.05)
    return fig


__all__ = ["attention_matrix", "attention_queries", "draw_attention", "plot_attention",
           "plot_attention_grid"]
