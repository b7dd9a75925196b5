"""The Matching tab without gradio: one val image with ground truth, its matching at every stage.

:func:`match_sample` runs the model once per image (``istr_viz.inspect.match_image``, in the
network input frame) and the page keeps the :class:`~istr_viz.inspect.ImageMatches`; the stage
slider only calls :func:`render_matching`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from istr_viz.demo_logic.served import DemoData, ServedModel
from istr_viz.inspect import ImageMatches, assignment_churn, assignment_table, match_image
from istr_viz.viz.figures import figure_to_array
from istr_viz.viz.matching import (
    assignment_rows,
    plot_assignment_history,
    plot_assignments,
    plot_cost_terms,
)


@dataclass
class MatchingView:
    """One stage of one image: assignment (H, W, 3) uint8 (GT joined to its query), costs
    (H', W', 3) uint8 (total and weighted terms, assignment framed), rows (one per GT instance,
    ``ASSIGNMENT_COLUMNS``) and summary (Markdown)."""

    assignment: np.ndarray
    costs: np.ndarray
    rows: list[list]
    summary: str


def sample_choices(data: DemoData) -> list[tuple[str, int]]:
    """``(label, val index)`` of every val image with at least one ground-truth instance."""
    if not data.ok:
        return []
    ann = data.val_annotations
    choices = []
    for index, image_id in enumerate(ann.image_ids):
        count = len(ann.instance_anns(image_id))
        if count:
            name = Path(ann.image_info(image_id)["file_name"]).name
            choices.append((f"{name} ({count} instance{'s' if count > 1 else ''})", index))
    return choices


def matching_problem(served: ServedModel, data: DemoData) -> str:
    """Why the Matching tab cannot run (Markdown), or "" when it can."""
    if not served.ok:
        return served.message
    if not data.ok:
        return data.message
    if not data.categories_match(served.predictor):
        return ("**Matching needs the model's own categories**: the data set "
                f"`{data.root}` has {data.val_annotations.class_names}, the checkpoint "
                f"{served.predictor.class_names}.")
    return ""


def match_sample(served: ServedModel, dataset, index: int) -> ImageMatches:
    """Run the served model once on val image ``index`` of ``dataset`` (a ``CocoDataset`` with
    the checkpoint's evaluation transform) and match every stage to its ground truth, with the
    checkpoint's matching costs."""
    predictor = served.predictor
    with served.lock:
        return match_image(predictor.model, dataset, int(index), predictor.device,
                           predictor.config.loss)


def history_image(image_matches: ImageMatches, dpi: float = 80.0) -> np.ndarray:
    """(H, W, 3) uint8: churn per stage transition beside the query owning each GT per stage."""
    im = image_matches
    fig = plot_assignment_history(assignment_churn(im.matches), assignment_table(im.matches),
                                  im.num_queries)
    return figure_to_array(fig, dpi)


def render_matching(image_matches: ImageMatches, stage: float | int | None,
                    dpi: float = 90.0) -> MatchingView:
    """Draw ``stage`` (clamped to 1..K; None = the last) of ``image_matches``: the model does not
    run. The cost panels show the matched queries and the 5 cheapest others."""
    im = image_matches
    k = im.num_stages if stage is None else int(min(max(round(float(stage)), 1), im.num_stages))
    match = im.match(k)
    gt_names = [im.class_names[int(c)] for c in im.gt_labels]
    assignment = figure_to_array(plot_assignments(im, k), dpi)
    costs = figure_to_array(plot_cost_terms(match, "matched+top", 5, gt_names), dpi)
    rows = assignment_rows(im, k)
    churn = assignment_churn(im.matches)
    changed = churn[k - 2] if k > 1 else 0
    summary = (f"image id {im.image_id}: stage {k} of {im.num_stages}, {match.num_matched} of "
               f"{im.num_gt} ground-truth instances matched, {changed} changed query since the "
               "previous stage.")
    return MatchingView(assignment, costs, rows, summary)


__all__ = ["MatchingView", "history_image", "match_sample", "matching_problem",
           "render_matching", "sample_choices"]
