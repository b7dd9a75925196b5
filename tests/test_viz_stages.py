"""istr_viz.viz.trajectories and istr_viz.viz.attention: what each figure draws is the prediction.

The tiny model and data come from ``tiny_viz`` (shared with the other viz and explorer tests).
"""

from __future__ import annotations

import matplotlib.colors as mcolors
import numpy as np
import pytest
import torch
from tiny_viz import (K, Q, dataset, panels, patches_with, rect_xyxy, tiny_model,  # noqa: F401
                      tiny_predictor)

from istr_viz.viz.attention import attention_queries, plot_attention, plot_attention_grid
from istr_viz.viz.draw import query_colors
from istr_viz.viz.figures import figure_to_array
from istr_viz.viz.trajectories import (
    box_centres,
    plot_box_trajectories,
    plot_query_through_stages,
    plot_score_heatmap,
    plot_stage_view,
    query_trajectories,
    score_matrix,
    top_queries,
)

# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def prediction(dataset):
    predictor = tiny_predictor(tiny_model(dataset.num_classes), dataset)
    return predictor.predict(dataset.image_path(0))


# ----------------------------------------------------------------------------- trajectories


def test_query_trajectories_start_at_the_proposals(prediction):
    traj = query_trajectories(prediction)
    assert traj.shape == (K + 1, Q, 4)
    np.testing.assert_allclose(traj[0], prediction.proposal_boxes_xyxy.numpy())
    for k in range(1, K + 1):
        np.testing.assert_allclose(traj[k], prediction.stage(k).query_boxes_xyxy.numpy())
    np.testing.assert_allclose(box_centres([[0, 0, 4, 2], [2, 2, 6, 10]]), [[2, 1], [4, 6]])


def test_box_trajectories_draw_one_path_per_query(prediction):
    queries = [1, 4, 6]
    fig = plot_box_trajectories(prediction, queries=queries)
    ax = fig.axes[0]
    assert len(ax.lines) == len(queries)
    traj = query_trajectories(prediction)
    colors = query_colors(Q)
    for line, q in zip(ax.lines, queries):
        xy = np.column_stack(line.get_data())
        np.testing.assert_allclose(xy, box_centres(traj[:, q]), atol=1e-4)  # proposal..stage K
        assert mcolors.same_color(line.get_color(), colors[q])
    final = patches_with(ax, "-")
    proposals = patches_with(ax, ":")
    assert len(final) == len(proposals) == len(queries)
    np.testing.assert_allclose([rect_xyxy(p) for p in final], traj[K, queries], atol=1e-4)
    np.testing.assert_allclose([rect_xyxy(p) for p in proposals], traj[0, queries], atol=1e-4)
    image = figure_to_array(fig)
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3


def test_box_trajectories_default_to_the_final_top_detections(prediction):
    det = prediction.detections(None)
    threshold = float(det.scores[5])  # the 6 best (query, class) pairs pass
    expected = []
    for q in det.queries[:6].tolist():
        if q not in expected:
            expected.append(q)
    np.testing.assert_array_equal(top_queries(prediction, threshold), expected)
    ax = plot_box_trajectories(prediction, score_threshold=threshold).axes[0]
    assert len(ax.lines) == len(expected)
    assert len(plot_box_trajectories(prediction, score_threshold=1.01).axes[0].lines) == 0
    assert len(top_queries(prediction, 0.0, max_queries=2)) == 2


def test_score_heatmap_is_queries_by_stages(prediction):
    fig = plot_score_heatmap(prediction)
    shown = panels(fig)[0].images[0].get_array()
    assert shown.shape == (Q, K)
    for k in range(1, K + 1):
        np.testing.assert_allclose(shown[:, k - 1], prediction.stage(k).query_scores.numpy())
    np.testing.assert_allclose(score_matrix(prediction), shown)
    part = panels(plot_score_heatmap(prediction, queries=[2, 5]))[0].images[0].get_array()
    np.testing.assert_allclose(part, shown[[2, 5]])


def test_query_through_stages_has_one_panel_per_stage(prediction):
    q = 3
    fig = plot_query_through_stages(prediction, q)
    axes = panels(fig)
    assert len(axes) == K
    traj = query_trajectories(prediction)
    for k, ax in enumerate(axes, start=1):
        thick = [p for p in patches_with(ax, "-") if p.get_linewidth() == 3.0]
        assert len(thick) == 1
        np.testing.assert_allclose(rect_xyxy(thick[0]), traj[k, q], atol=1e-4)
        (start,) = patches_with(ax, ":")  # the box the stage started from
        np.testing.assert_allclose(rect_xyxy(start), traj[k - 1, q], atol=1e-4)
        assert mcolors.same_color(thick[0].get_edgecolor(), query_colors(Q)[q])


def test_stage_view_draws_detections_ground_truth_trajectories_and_highlight(prediction):
    stage, q = 2, 5
    det = prediction.detections(stage)
    threshold = float(det.scores[3])  # 4 detections
    gt = np.array([[2.0, 3.0, 20.0, 30.0], [30.0, 30.0, 60.0, 50.0]])
    fig = plot_stage_view(prediction, stage, threshold, show_trajectories=True,
                          gt_boxes_xyxy=gt, highlight=q)
    assert len(panels(fig)) == 1
    ax = fig.axes[0]
    assert [rect_xyxy(p) for p in patches_with(ax, "--")] == gt.tolist()
    shown = prediction.detections(stage, threshold)
    assert len(shown) == 4
    assert len(patches_with(ax, "-")) == len(shown) + 1  # + the highlighted query
    queries = np.unique(shown.queries.numpy())
    assert len(ax.lines) == len(queries)
    assert all(len(line.get_xdata()) == stage + 1 for line in ax.lines)  # proposal..stage

    plain = plot_stage_view(prediction, stage, threshold, show_boxes=False).axes[0]
    assert len(plain.patches) == 0 and len(plain.lines) == 0
    only_highlight = plot_stage_view(prediction, stage, threshold, show_boxes=False,
                                     highlight=q).axes[0]
    (box,) = patches_with(only_highlight, "-")
    np.testing.assert_allclose(rect_xyxy(box), prediction.stage(stage).query_boxes_xyxy[q],
                               atol=1e-4)
    for bad in (0, K + 1):
        with pytest.raises(ValueError, match="stage"):
            plot_stage_view(prediction, bad)


# ----------------------------------------------------------------------------- attention


def test_attention_heatmap_shows_the_stage_weights(prediction):
    attn = prediction.stage(2).attn.numpy()
    shown = panels(plot_attention(prediction, 2))[0].images[0].get_array()
    assert shown.shape == (Q, Q)
    np.testing.assert_allclose(shown, attn, atol=1e-6)
    np.testing.assert_allclose(shown.sum(axis=1), 1.0, atol=1e-4)  # each row: softmax weights

    top = attention_queries(prediction, "top", 3, stage=2)
    np.testing.assert_array_equal(
        top, np.argsort(-prediction.stage(2).query_scores.numpy(), kind="stable")[:3])
    block = panels(plot_attention(prediction, 2, "top", num_top=3))[0].images[0].get_array()
    np.testing.assert_allclose(block, attn[np.ix_(top, top)], atol=1e-6)


def test_attention_grid_has_one_panel_per_stage(prediction):
    fig = plot_attention_grid(prediction, queries=[0, 2, 7])
    axes = panels(fig)
    assert len(axes) == K
    for k, ax in enumerate(axes, start=1):
        expected = prediction.stage(k).attn.numpy()[np.ix_([0, 2, 7], [0, 2, 7])]
        np.testing.assert_allclose(ax.images[0].get_array(), expected, atol=1e-6)


def test_attention_needs_recorded_weights(dataset):
    predictor = tiny_predictor(tiny_model(dataset.num_classes), dataset)
    prediction = predictor.predict(dataset.image_path(1), return_attention=False)
    with pytest.raises(ValueError, match="return_attention"):
        plot_attention(prediction, 1)


# ----------------------------------------------------------------------------- stage grid


def test_stage_grid_has_one_panel_per_stage_and_one_box_per_detection(prediction):
    from istr_viz.viz.stages import plot_stage_grid, stage_counts

    threshold = float(prediction.detections(None).scores[4])  # about five detections per stage
    fig = plot_stage_grid(prediction, threshold)
    axes = panels(fig)
    assert len(axes) == K
    counts = stage_counts(prediction, threshold)
    for k, ax in enumerate(axes, start=1):
        assert ax.get_title().startswith(f"stage {k}:")
        assert len(patches_with(ax, "-")) == counts[k - 1]
