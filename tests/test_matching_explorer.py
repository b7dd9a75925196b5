"""MatchingExplorer: the stage slider shows that stage's matching; the model runs once per image."""

from __future__ import annotations

import ipywidgets
import pytest
from tiny_viz import K, dataset, forward_calls, model, tiny_model  # noqa: F401 (fixtures)

from istr_viz.inspect import assignment_churn, assignment_table, match_image
from istr_viz.viz.figures import figure_to_png
from istr_viz.viz.matching import (
    assignment_rows,
    plot_assignment_history,
    plot_assignments,
    plot_cost_terms,
)
from istr_viz.widgets import MatchingExplorer

DPI = 40


def gt_names(image_matches) -> list[str]:
    return [image_matches.class_names[int(c)] for c in image_matches.gt_labels]


def test_stage_change_shows_the_matching_of_that_stage(model, dataset):
    explorer = MatchingExplorer(model, dataset, index=1, dpi=DPI)
    assert explorer.stage == K and explorer.stage_slider.max == K
    assert isinstance(explorer.widget, ipywidgets.VBox)
    expected = match_image(model, dataset, 1)
    explorer.stage_slider.value = 2
    im = explorer.image_matches
    assert explorer.stage == 2 and explorer.match is im.matches[1]
    assert explorer.match.query_idx.tolist() == expected.matches[1].query_idx.tolist()
    assert explorer.match.gt_idx.tolist() == expected.matches[1].gt_idx.tolist()
    assert explorer.assignment_png == figure_to_png(plot_assignments(expected, 2), DPI)
    assert bytes(explorer.assignment_image.value) == explorer.assignment_png
    terms = plot_cost_terms(expected.matches[1], "matched+top", 5, gt_names(expected))
    assert explorer.cost_png == figure_to_png(terms, DPI)
    assert explorer.rows == assignment_rows(expected, 2)
    assert explorer.table.value.count("<tr>") == 1 + expected.num_gt
    history = plot_assignment_history(assignment_churn(expected.matches),
                                      assignment_table(expected.matches), expected.num_queries)
    assert explorer.history_png == figure_to_png(history, DPI)
    assert explorer.churn == assignment_churn(expected.matches)


def test_image_picker_runs_the_model_once_per_image(model, dataset, forward_calls):
    explorer = MatchingExplorer(model, dataset, index=0, stage=1, dpi=DPI)
    assert forward_calls == [1] and explorer.stage == 1
    explorer.image_picker.value = 3
    assert forward_calls == [1, 1]
    assert explorer.image_matches.index == 3
    assert explorer.image_matches.image_id == int(dataset[3][1]["image_id"])
    assert explorer.assignment_png == figure_to_png(plot_assignments(explorer.image_matches, 1),
                                                    DPI)
    explorer.image_picker.value = 0  # seen before: no new run
    explorer.stage_slider.value = 3
    assert forward_calls == [1, 1] and explorer.match is explorer.image_matches.matches[2]
