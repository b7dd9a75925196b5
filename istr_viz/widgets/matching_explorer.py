"""An ipywidgets explorer of Hungarian matching: which query owns which GT instance, per stage.

Pick a data set image and a stage: it shows the image with every GT instance linked to its
matched query (:func:`~istr_viz.viz.matching.plot_assignments`), the cost terms with the
assignment framed (:func:`~istr_viz.viz.matching.plot_cost_terms`), the assignment table, and,
once per image, how the owners change across stages (churn and timeline).

The model runs once per image (:func:`istr_viz.inspect.match_image`, kept per image index);
the stage slider only redraws.
"""

from __future__ import annotations

import html

import ipywidgets as widgets
import numpy as np
import torch

from istr_viz.config import LossConfig
from istr_viz.inspect import ImageMatches, assignment_churn, assignment_table, match_image
from istr_viz.viz.figures import figure_to_png
from istr_viz.viz.matching import (
    ASSIGNMENT_COLUMNS,
    assignment_rows,
    plot_assignment_history,
    plot_assignments,
    plot_cost_terms,
)
from istr_viz.widgets.stage_explorer import stage_controls


def _cell(value) -> str:
    return "" if value is None else html.escape(str(value))


def rows_to_html(columns: list[str], rows: list[list]) -> str:
    """A plain HTML table (what ``widgets.HTML`` shows)."""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in row) + "</tr>"
                   for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


class MatchingExplorer:
    """Interactive view of the per-stage Hungarian matching of ``model`` on ``dataset``.

    Args:
        model: an ISTR model (its ``basis`` encodes the GT masks for the mask cost).
        dataset: a ``CocoDataset`` with the evaluation transform (see ``match_image``).
        loss_cfg: cost weights (default ``LossConfig()``); device: where to run the model.
        queries / num_top: the rows of the cost panels (``"matched+top"``: matched queries plus
            the ``num_top`` cheapest others; None: all).
        index, stage: shown first (stage default: the last); dpi: resolution of the views.

    Display ``explorer.widget``. State after each change: ``index``, ``stage``,
    ``image_matches`` (:class:`~istr_viz.inspect.ImageMatches`), ``match`` (the shown stage's
    ``Match``), ``churn``, ``rows`` (``ASSIGNMENT_COLUMNS`` table), ``assignment_figure`` /
    ``assignment_png``, ``cost_figure`` / ``cost_png`` and ``history_figure`` / ``history_png``.
    """

    def __init__(self, model: torch.nn.Module, dataset, loss_cfg: LossConfig | None = None,
                 device: str | torch.device | None = None, queries: str | None = "matched+top",
                 num_top: int = 5, index: int = 0, stage: int | None = None, dpi: float = 80):
        if len(dataset) == 0:
            raise ValueError("the data set has no images")
        self.model, self.dataset, self.loss_cfg, self.device = model, dataset, loss_cfg, device
        self.queries, self.num_top, self.dpi = queries, num_top, dpi
        self.index = int(np.clip(index, 0, len(dataset) - 1))
        self._cache: dict[int, ImageMatches] = {}
        self._load_image()
        k = self.image_matches.num_stages
        self.stage = k if stage is None else int(np.clip(stage, 1, k))
        self._build_controls()
        self._redraw_history()
        self._redraw()

    def _load_image(self) -> None:
        """Match the current image (the model runs once per image index)."""
        if self.index not in self._cache:
            self._cache[self.index] = match_image(self.model, self.dataset, self.index,
                                                  self.device, self.loss_cfg)
        self.image_matches = self._cache[self.index]
        self.churn = assignment_churn(self.image_matches.matches)

    # -- layout

    def _build_controls(self) -> None:
        names = [self.dataset.image_path(i).name for i in range(len(self.dataset))]
        self.image_picker = widgets.Dropdown(options=[(n, i) for i, n in enumerate(names)],
                                             value=self.index, description="image")
        self.stage_slider, self.play, self.play_link = stage_controls(
            self.image_matches.num_stages, self.stage)
        self.assignment_image = widgets.Image(format="png")
        self.cost_image = widgets.Image(format="png")
        self.history_image = widgets.Image(format="png")
        self.summary = widgets.HTML()
        self.table = widgets.HTML()
        self.image_picker.observe(self._on_image, names="value")
        self.stage_slider.observe(self._on_stage, names="value")

    @property
    def widget(self) -> widgets.VBox:
        """The whole explorer, to display as a cell's last expression."""
        return widgets.VBox([
            widgets.HBox([self.image_picker, self.play, self.stage_slider]), self.summary,
            widgets.HBox([self.assignment_image, self.history_image]), self.cost_image,
            self.table,
        ])

    # -- callbacks

    def _on_image(self, change: dict) -> None:
        self.index = int(change["new"])
        self._load_image()
        self._redraw_history()
        self._redraw()

    def _on_stage(self, change: dict) -> None:
        self.stage = int(change["new"])
        self._redraw()

    # -- drawing

    def _redraw_history(self) -> None:
        im = self.image_matches
        self.history_figure = plot_assignment_history(
            self.churn, assignment_table(im.matches), im.num_queries)
        self.history_png = figure_to_png(self.history_figure, self.dpi)
        self.history_image.value = self.history_png

    def _redraw(self) -> None:
        im = self.image_matches
        self.match = im.match(self.stage)
        self.assignment_figure = plot_assignments(im, self.stage)
        self.assignment_png = figure_to_png(self.assignment_figure, self.dpi)
        self.assignment_image.value = self.assignment_png
        gt_names = [im.class_names[int(c)] for c in im.gt_labels]
        self.cost_figure = plot_cost_terms(self.match, self.queries, self.num_top, gt_names)
        self.cost_png = figure_to_png(self.cost_figure, self.dpi)
        self.cost_image.value = self.cost_png
        self.rows = assignment_rows(im, self.stage)
        self.table.value = rows_to_html(ASSIGNMENT_COLUMNS, self.rows)
        changed = self.churn[self.stage - 2] if self.stage > 1 else 0
        self.summary.value = (f"image {self.index} (id {im.image_id}): stage {self.stage} of "
                              f"{im.num_stages}, {self.match.num_matched} of {im.num_gt} GT "
                              f"matched, {changed} changed owner since the previous stage")


__all__ = ["MatchingExplorer", "rows_to_html"]
