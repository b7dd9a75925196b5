"""Training curves from ``metrics.jsonl`` records: total loss, each term split by stage, val AP.

:class:`LiveTrainingPlot` redraws the same figure in a notebook while training runs: pass it to
``istr_viz.engine.train(..., on_log=live)``.
"""

from __future__ import annotations

import re
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from istr_viz.viz.figures import new_figure

_STAGE_KEY = re.compile(r"^stage(\d+)/loss_(\w+)$")


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Moving average over ``window`` points (shorter at the start)."""
    values = np.asarray(values, dtype=float)
    if window <= 1 or len(values) == 0:
        return values
    c = np.cumsum(np.insert(values, 0, 0.0))
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(0, idx - window)
    return (c[idx] - c[lo]) / (idx - lo)


def plot_training_curves(records: list[dict], smoothing: int = 20) -> Figure:
    """Total loss, one panel per loss term with a line per stage, and val AP when present.

    ``records``: the dicts of ``metrics.jsonl`` (see :func:`istr_viz.engine.read_metrics`).
    """
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval" in r]
    terms: dict[str, dict[int, list[tuple[int, float]]]] = defaultdict(lambda: defaultdict(list))
    for r in train:
        for key, value in r.items():
            m = _STAGE_KEY.match(key)
            if m:
                terms[m.group(2)][int(m.group(1))].append((r["iter"], value))
    panels = 1 + len(terms) + (1 if evals else 0)
    ncols = min(panels, 3)
    fig, axes = new_figure(-(-panels // ncols), ncols, (3.6, 2.6))
    ax = axes.flat[0]
    if train:
        it = np.array([r["iter"] for r in train])
        ax.plot(it, [r["loss"] for r in train], alpha=0.3, color="C0")
        ax.plot(it, smooth([r["loss"] for r in train], smoothing), color="C0")
    ax.set_title("total loss")
    ax.set_xlabel("iteration")
    for i, (name, by_stage) in enumerate(sorted(terms.items()), start=1):
        ax = axes.flat[i]
        for stage, points in sorted(by_stage.items()):
            its, vals = zip(*points)
            ax.plot(its, smooth(vals, smoothing), label=f"stage {stage}")
        ax.set_title(name)
        ax.set_xlabel("iteration")
        if i == 1:
            ax.legend(fontsize=6)
    if evals:
        ax = axes.flat[panels - 1]
        its = [r["iter"] for r in evals]
        ax.plot(its, [r["eval"]["segm_AP"] for r in evals], "o-", label="mask AP")
        ax.plot(its, [r["eval"]["bbox_AP"] for r in evals], "s-", label="box AP")
        ax.set_title("val AP")
        ax.set_xlabel("iteration")
        ax.legend(fontsize=6)
    for ax in axes.flat[panels:]:
        ax.set_visible(False)
    return fig


class LiveTrainingPlot:
    """A loss plot that redraws itself in place while ``train`` runs: ``train(..., on_log=live)``.

    Each call appends one ``metrics.jsonl`` record; the figure (:func:`plot_training_curves`) is
    redrawn at most once every ``min_interval_s`` seconds (drawing costs far more than a record),
    and always after an evaluation record. The first draw creates one display (``display(image)``
    must return a handle with ``update(image)``; default: IPython's ``display(..., display_id=True)``)
    and every later draw replaces it. Call :meth:`finish` after training for the last state.

    State: ``records``, ``figure`` (the last drawn) and ``draws`` (how many times it was drawn).
    """

    def __init__(self, smoothing: int = 20, min_interval_s: float = 5.0, dpi: float | None = 80,
                 display: Callable[[Any], Any] | None = None):
        self.smoothing, self.min_interval_s, self.dpi = smoothing, min_interval_s, dpi
        self.records: list[dict] = []
        self.figure: Figure | None = None
        self.draws = 0
        self._display = display
        self._handle = None
        self._last_draw = -float("inf")

    def __call__(self, record: dict) -> None:
        self.records.append(record)
        if "eval" in record or time.monotonic() - self._last_draw >= self.min_interval_s:
            self.redraw()

    def redraw(self) -> Figure:
        """Draw the curves of every record so far into the display."""
        from istr_viz.viz.figures import show

        self.figure = plot_training_curves(self.records, self.smoothing)
        image = show(self.figure, self.dpi)
        if self._handle is None:
            self._handle = self._show_first(image)
        else:
            self._handle.update(image)
        self.draws += 1
        self._last_draw = time.monotonic()
        return self.figure

    def finish(self) -> Figure:
        """Draw the final state (the last records may not be drawn yet) and return the figure."""
        return self.redraw()

    def _show_first(self, image: Any) -> Any:
        if self._display is not None:
            return self._display(image)
        from IPython.display import display  # local import: IPython is only there in notebooks

        return display(image, display_id=True)


__all__ = ["LiveTrainingPlot", "plot_training_curves", "smooth"]
