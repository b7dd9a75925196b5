"""StageExplorer: each control redraws exactly what the plot functions draw; the model runs once per
image."""

from __future__ import annotations

import ipywidgets
import numpy as np
import pytest
from tiny_viz import (K, dataset, forward_calls, model, patches_with,  # noqa: F401 (fixtures)
                      tiny_model, tiny_predictor)

from istr_viz.viz.figures import figure_to_png
from istr_viz.viz.trajectories import plot_query_through_stages, plot_stage_view
from istr_viz.widgets import StageExplorer

DPI = 40
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def explorer(model, dataset):
    return StageExplorer(tiny_predictor(model, dataset), dataset=dataset, score_threshold=0.03,
                         dpi=DPI)


def expected_view(explorer, **changes) -> bytes:
    """PNG of a direct ``plot_stage_view`` call with the explorer's image and ground truth."""
    target = explorer.dataset.raw_target(explorer.index)
    names = explorer.dataset.class_names
    kwargs = {"stage": K, "score_threshold": 0.03, "show_boxes": True, "show_masks": True,
              "show_trajectories": False, "gt_boxes_xyxy": target["boxes_xyxy"].numpy(),
              "gt_labels": [f"gt {names[int(c)]}" for c in target["labels"]], "highlight": -1}
    kwargs.update(changes)
    return figure_to_png(plot_stage_view(explorer.prediction, **kwargs), DPI)


def test_starts_on_the_last_stage_with_ground_truth(explorer, dataset):
    assert explorer.stage == K and explorer.stage_slider.value == K
    assert (explorer.stage_slider.min, explorer.stage_slider.max) == (1, K)
    assert explorer.png.startswith(PNG_MAGIC) and bytes(explorer.view_image.value) == explorer.png
    G = len(dataset.raw_target(0)["labels"])
    assert len(patches_with(explorer.figure.axes[0], "--")) == G
    assert explorer.query == -1 and explorer.query_png == b"" and explorer.query_figure is None
    assert isinstance(explorer.widget, ipywidgets.VBox)
    assert len(explorer.image_picker.options) == len(dataset)


def test_play_drives_the_stage_slider(explorer):
    assert (explorer.play.min, explorer.play.max) == (1, K)
    link = explorer.play_link
    assert link.source == (explorer.play, "value") and link.target == (explorer.stage_slider,
                                                                         "value")


def test_stage_slider_shows_what_plot_stage_view_draws(explorer, forward_calls):
    explorer.stage_slider.value = 1
    stage1 = explorer.png
    explorer.stage_slider.value = 3
    assert explorer.stage == 3
    assert explorer.png == expected_view(explorer, stage=3)
    assert bytes(explorer.view_image.value) == explorer.png
    assert stage1 == expected_view(explorer, stage=1) != explorer.png
    assert forward_calls == []  # the stages came from the one prediction


def test_query_picker_highlights_one_query_through_all_stages(explorer, forward_calls):
    explorer.stage_slider.value = 2
    explorer.query_picker.value = 5
    assert explorer.query == 5
    assert explorer.png == expected_view(explorer, stage=2, highlight=5)
    assert explorer.query_png == figure_to_png(plot_query_through_stages(explorer.prediction, 5),
                                               DPI)
    assert bytes(explorer.query_image.value) == explorer.query_png
    thick = [p for p in patches_with(explorer.figure.axes[0], "-") if p.get_linewidth() == 3.0]
    assert len(thick) == 1
    np.testing.assert_allclose(thick[0].get_xy(),
                               explorer.prediction.stage(2).query_boxes_xyxy[5, :2], atol=1e-4)
    explorer.query_picker.value = -1
    assert explorer.query_png == b"" and explorer.png == expected_view(explorer, stage=2)
    assert forward_calls == []


def test_toggles_and_threshold_redraw_without_running_the_model(explorer, forward_calls):
    explorer.threshold_slider.value = 0.05
    explorer.trajectories_toggle.value = True
    explorer.masks_toggle.value = False
    assert explorer.png == expected_view(explorer, score_threshold=0.05, show_trajectories=True,
                                         show_masks=False)
    explorer.gt_toggle.value = False
    assert patches_with(explorer.figure.axes[0], "--") == []
    explorer.boxes_toggle.value = False
    assert explorer.png == expected_view(explorer, score_threshold=0.05, show_trajectories=True,
                                         show_masks=False, show_boxes=False, gt_boxes_xyxy=None,
                                         gt_labels=None)
    assert forward_calls == []


def test_image_picker_runs_the_model_once_per_image(explorer, dataset, forward_calls):
    explorer.image_picker.value = 2
    assert forward_calls == [1] and explorer.index == 2
    np.testing.assert_array_equal(explorer.prediction.image, np.asarray(dataset.load_image(2)))
    np.testing.assert_array_equal(explorer.gt_boxes_xyxy, dataset.raw_target(2)["boxes_xyxy"])
    explorer.stage_slider.value = 1
    explorer.query_picker.value = 0
    assert forward_calls == [1]
    assert explorer.png == expected_view(explorer, stage=1, highlight=0)


def test_given_images_have_no_ground_truth(model, dataset):
    images = [dataset.image_path(0), np.asarray(dataset.load_image(3))]
    explorer = StageExplorer(tiny_predictor(model, dataset), images=images, dpi=DPI)
    assert explorer.gt_boxes_xyxy is None and explorer.gt_toggle.disabled
    assert [name for name, _ in explorer.image_picker.options] == [images[0].name, "image 1"]
    explorer.image_picker.value = 1
    np.testing.assert_array_equal(explorer.prediction.image, images[1])
    assert patches_with(explorer.figure.axes[0], "--") == []
    with pytest.raises(ValueError, match="exactly one"):
        StageExplorer(explorer.predictor)
