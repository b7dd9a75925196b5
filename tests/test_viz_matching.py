"""istr_viz.inspect and istr_viz.viz.matching: each stage's match of one image, and its pictures."""

from __future__ import annotations

from dataclasses import replace

import matplotlib.colors as mcolors
import numpy as np
import pytest
import torch
from tiny_viz import K, Q, dataset, model, panels, patches_with, rect_xyxy, tiny_model  # noqa: F401 (fixtures)

from istr_viz.config import LossConfig
from istr_viz.data.coco import collate
from istr_viz.inspect import (
    assignment_churn,
    assignment_table,
    match_image,
    query_of_gt,
)
from istr_viz.losses import SetCriterion
from istr_viz.matcher import COST_TERMS, Match, hungarian
from istr_viz.viz.draw import query_colors
from istr_viz.viz.figures import figure_to_array
from istr_viz.viz.matching import (
    ASSIGNMENT_COLUMNS,
    UNMATCHED_COLOR,
    assignment_rows,
    plot_assignment_history,
    plot_assignment_timeline,
    plot_assignments,
    plot_churn,
    plot_cost_matrix,
    plot_cost_terms,
    select_queries,
)

WEIGHTS = {"class": 2.0, "l1": 5.0, "giou": 2.0, "mask": 2.0}


def make_match(pairs: list[tuple[int, int]], num_queries: int, num_gt: int,
               seed: int = 0) -> Match:
    """A Match with the given (query, gt) pairs and random terms summing to its cost."""
    g = torch.Generator().manual_seed(seed)
    terms = {name: torch.rand(num_queries, num_gt, generator=g) * WEIGHTS[name]
             for name in COST_TERMS}
    query_idx = torch.tensor([q for q, _ in pairs], dtype=torch.long)
    gt_idx = torch.tensor([gt for _, gt in pairs], dtype=torch.long)
    return Match(query_idx, gt_idx, torch.stack(list(terms.values())).sum(0), terms, WEIGHTS)


def optimal_match(num_queries: int, num_gt: int, seed: int = 0) -> Match:
    m = make_match([], num_queries, num_gt, seed)
    rows, cols = hungarian(m.cost)
    return Match(rows, cols, m.cost, m.terms, WEIGHTS)


@pytest.fixture(scope="module")
def image_matches(model, dataset):
    return match_image(model, dataset, 1)


# ----------------------------------------------------------------------------- assignment summaries


def test_churn_and_table_on_a_constructed_case():
    stage1 = make_match([(0, 0), (1, 1), (2, 2)], 5, 3)
    stage2 = make_match([(0, 0), (1, 2), (3, 1)], 5, 3)  # g1: 1 -> 3, g2: 2 -> 1
    stage3 = make_match([(0, 0), (1, 2), (3, 1)], 5, 3)  # unchanged
    stage4 = make_match([(1, 0), (0, 2), (3, 1)], 5, 3)  # g0: 0 -> 1, g2: 1 -> 0
    matches = [stage1, stage2, stage3, stage4]
    assert assignment_churn(matches) == [2, 0, 2]
    assert assignment_table(matches) == [
        {"gt": 0, "stage1": 0, "stage2": 0, "stage3": 0, "stage4": 1, "changes": 1},
        {"gt": 1, "stage1": 1, "stage2": 3, "stage3": 3, "stage4": 3, "changes": 1},
        {"gt": 2, "stage1": 2, "stage2": 1, "stage3": 1, "stage4": 0, "changes": 2},
    ]
    # fewer queries than GT: an instance can lose its query, which counts as a change
    a, b = make_match([(0, 0), (1, 1)], 2, 3), make_match([(0, 0), (1, 2)], 2, 3)
    np.testing.assert_array_equal(query_of_gt(a), [0, 1, -1])
    assert assignment_churn([a, b]) == [2]
    assert assignment_churn([a]) == [] and assignment_table([]) == []


def test_plot_churn_bars_are_the_churn():
    ax = plot_churn([2, 0, 5]).axes[0]
    assert [p.get_height() for p in ax.patches] == [2, 0, 5]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1\u21922", "2\u21923", "3\u21924"]


def test_assignment_timeline_colours_each_gt_by_its_owner():
    table = assignment_table([make_match([(0, 0), (1, 1)], 4, 3),
                              make_match([(3, 0), (1, 2)], 4, 3)])
    fig = plot_assignment_timeline(table, 4)
    rgb = fig.axes[0].images[0].get_array()
    assert rgb.shape == (3, 2, 3)  # G x K cells
    colors = query_colors(4)
    np.testing.assert_allclose(rgb[0, 0], colors[0])
    np.testing.assert_allclose(rgb[0, 1], colors[3])
    np.testing.assert_allclose(rgb[2, 0], 1.0)  # unmatched: white
    assert len(panels(plot_assignment_history([1], table, 4))) == 2


# ----------------------------------------------------------------------------- cost heatmaps


def test_cost_matrix_marks_every_assigned_cell():
    match = optimal_match(6, 3)
    fig = plot_cost_matrix(match)
    ax = panels(fig)[0]
    np.testing.assert_allclose(ax.images[0].get_array(), match.cost.numpy(), atol=1e-6)
    marks = patches_with(ax, "-")
    assert len(marks) == 3  # one per GT
    cells = sorted((int(round(p.get_y() + 0.5)), int(round(p.get_x() + 0.5))) for p in marks)
    assert cells == sorted(zip(match.query_idx.tolist(), match.gt_idx.tolist()))
    colors = query_colors(6)
    for p in marks:
        assert mcolors.same_color(p.get_edgecolor(), colors[int(round(p.get_y() + 0.5))])
    assert figure_to_array(fig).dtype == np.uint8


def test_matched_plus_top_keeps_matched_and_cheapest_other_queries():
    match = optimal_match(12, 3, seed=1)
    rows = select_queries(match, "matched+top", num_top=2)
    matched = set(match.query_idx.tolist())
    others = [q for q in rows.tolist() if q not in matched]
    assert matched <= set(rows.tolist()) and len(others) == 2
    best = match.cost.numpy().min(axis=1)
    cheapest = sorted((q for q in range(12) if q not in matched), key=lambda q: best[q])[:2]
    assert sorted(others) == sorted(cheapest)
    assert list(rows) == sorted(rows)
    ax = panels(plot_cost_matrix(match, "matched+top", num_top=2))[0]
    np.testing.assert_allclose(ax.images[0].get_array(), match.cost.numpy()[rows], atol=1e-6)
    assert len(patches_with(ax, "-")) == 3
    np.testing.assert_array_equal(select_queries(match, "matched"), sorted(matched))
    with pytest.raises(ValueError):
        select_queries(match, "best")


def test_cost_terms_side_by_side_with_the_assignment():
    match = optimal_match(5, 3, seed=2)
    axes = panels(plot_cost_terms(match))
    assert [ax.get_title() for ax in axes] == ["total", "class (x2)", "l1 (x5)", "giou (x2)",
                                               "mask (x2)"]
    expected = [match.cost, *[match.terms[name] for name in COST_TERMS]]
    for ax, values in zip(axes, expected):
        np.testing.assert_allclose(ax.images[0].get_array(), values.numpy(), atol=1e-6)
        assert len(patches_with(ax, "-")) == 3


# ----------------------------------------------------------------------------- match_image


def test_match_image_matches_every_stage_like_the_criterion(model, dataset, image_matches):
    im = image_matches
    image, target = dataset[1]
    G = int(target["labels"].numel())
    assert G > 0
    assert im.num_stages == K and im.num_queries == Q and im.num_gt == G
    assert im.image.shape == (*image.shape[-2:], 3) and im.image.dtype == np.uint8
    np.testing.assert_array_equal(im.image, (image.permute(1, 2, 0) * 255).round().byte())
    assert im.image_id == int(target["image_id"]) and im.class_names == dataset.class_names
    np.testing.assert_array_equal(im.gt_masks.numpy(), target["masks"].numpy())

    batch = collate([(image, target)])
    with torch.no_grad():
        output = model(batch.images, batch.image_sizes)
    result = SetCriterion(LossConfig(), model.basis)(output, batch.targets)
    for k in range(K):
        ours, theirs = im.matches[k], result.matches[k][0]
        assert ours.num_matched == min(Q, G)
        assert ours.cost.shape == (Q, G)
        np.testing.assert_array_equal(ours.query_idx, theirs.query_idx)
        np.testing.assert_array_equal(ours.gt_idx, theirs.gt_idx)
        np.testing.assert_allclose(ours.cost, theirs.cost, atol=1e-5)
        np.testing.assert_allclose(im.query_boxes_xyxy[k], output.stages[k].boxes_xyxy[0],
                                   atol=1e-5)
        probs = output.stages[k].logits[0].sigmoid()
        np.testing.assert_allclose(im.query_scores[k], probs.max(-1).values, atol=1e-6)
    assert im.match(-1) is im.matches[-1] and im.match(2) is im.matches[1]


def test_match_image_restores_train_mode_and_checks_the_index(model, dataset):
    model.train()
    try:
        again = match_image(model, dataset, 1)
        assert model.training
    finally:
        model.eval()
    assert again.num_stages == K
    with pytest.raises(IndexError):
        match_image(model, dataset, len(dataset))


def test_assignments_link_each_gt_to_its_matched_query(image_matches):
    im, stage = image_matches, 2
    match = im.match(stage)
    ax = plot_assignments(im, stage).axes[0]
    gt = patches_with(ax, "--")
    np.testing.assert_allclose([rect_xyxy(p) for p in gt], im.gt_boxes_xyxy, atol=1e-4)
    predicted = patches_with(ax, "-")
    assert len(predicted) == match.num_matched
    np.testing.assert_allclose([rect_xyxy(p) for p in predicted],
                               im.query_boxes_xyxy[stage - 1, match.query_idx], atol=1e-4)
    assert len(ax.lines) == match.num_matched
    colors = query_colors(Q)
    for line, q, g in zip(ax.lines, match.query_idx.tolist(), match.gt_idx.tolist()):
        gt_box = im.gt_boxes_xyxy[g].numpy()
        box = im.query_boxes_xyxy[stage - 1, q].numpy()
        np.testing.assert_allclose(np.column_stack(line.get_data()),
                                   [(gt_box[:2] + gt_box[2:]) / 2, (box[:2] + box[2:]) / 2],
                                   atol=1e-4)
        assert mcolors.same_color(line.get_color(), colors[q])
        assert mcolors.same_color(gt[g].get_edgecolor(), colors[q])


def test_assignments_draw_unmatched_gt_grey(image_matches):
    im = image_matches
    G = im.num_gt
    partial = make_match([(4, 0), (6, 2)], Q, G)  # as if only two GT had a query
    ax = plot_assignments(replace(im, matches=[partial]), 1).axes[0]
    gt = patches_with(ax, "--")
    assert len(gt) == G and len(ax.lines) == 2 and len(patches_with(ax, "-")) == 2
    colors = query_colors(Q)
    assert mcolors.same_color(gt[0].get_edgecolor(), colors[4])
    assert mcolors.same_color(gt[2].get_edgecolor(), colors[6])
    assert all(mcolors.same_color(gt[g].get_edgecolor(), UNMATCHED_COLOR)
               for g in range(G) if g not in (0, 2))
    rows = assignment_rows(replace(im, matches=[partial]), 1)
    assert [r[2] for r in rows] == [4, -1, 6] + [-1] * (G - 3)


def test_assignment_rows_hold_each_pair_and_its_cost_terms(image_matches):
    im, stage = image_matches, 3
    match = im.match(stage)
    rows = assignment_rows(im, stage)
    assert len(rows) == im.num_gt and all(len(r) == len(ASSIGNMENT_COLUMNS) for r in rows)
    owner = dict(zip(match.gt_idx.tolist(), match.query_idx.tolist()))
    for row in rows:
        g, q = row[0], row[2]
        assert q == owner[g]
        assert row[1] == im.class_names[int(im.gt_labels[g])]
        assert row[6] == pytest.approx(float(match.cost[q, g]), abs=1e-3)
        assert sum(row[7:]) == pytest.approx(row[6], abs=1e-3)
        assert 0.0 <= row[5] <= 1.0
