"""An ipywidgets explorer of the refinement stages: one image, every stage, one query followed.

Controls: an image picker (a data set's images or given images), a stage slider with a Play button
linked to it, a score threshold, toggles for boxes, masks, trajectories and ground truth (data set
images only, dashed white boxes), and a query picker (-1 = none) that highlights one query in the
stage view and shows it alone through all stages.

The model runs once per image (:class:`~istr_viz.predictor.Predictor` caches the last one); every
other control only redraws. Each view is :func:`~istr_viz.viz.trajectories.plot_stage_view` /
:func:`~istr_viz.viz.trajectories.plot_query_through_stages` rendered once to PNG into a
``widgets.Image``; the state and the last figures sit in attributes, so tests drive the controls
and compare with a direct call of the same plot function.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import ipywidgets as widgets
import numpy as np
from matplotlib.figure import Figure

from istr_viz.predictor import Prediction, Predictor
from istr_viz.viz.figures import figure_to_png
from istr_viz.viz.trajectories import plot_query_through_stages, plot_stage_view

PLAY_INTERVAL_MS = 900  # time per stage when playing


def link_play(play: widgets.Play, slider: widgets.IntSlider) -> widgets.Widget:
    """Drive ``slider`` from ``play``: ``jslink`` (runs in the browser, smooth), or the kernel-side
    ``link`` where the front end lacks ``jslink``. Returns the link object."""
    try:
        return widgets.jslink((play, "value"), (slider, "value"))
    except (AttributeError, TypeError, NotImplementedError):
        return widgets.link((play, "value"), (slider, "value"))


def stage_controls(num_stages: int, value: int) -> tuple[widgets.IntSlider, widgets.Play,
                                                         widgets.Widget]:
    """A stage IntSlider 1..K, a Play button over the same range, and the link between them."""
    slider = widgets.IntSlider(value=value, min=1, max=num_stages, description="stage",
                               continuous_update=False)
    play = widgets.Play(value=value, min=1, max=num_stages, interval=PLAY_INTERVAL_MS,
                        description="play stages")
    return slider, play, link_play(play, slider)


class StageExplorer:
    """Interactive view of every stage of ``predictor`` on a data set's images or given images.

    Args:
        predictor: the :class:`~istr_viz.predictor.Predictor` to run.
        images: paths, PIL images or (H, W, 3) arrays to choose from; or
        dataset: a ``CocoDataset`` (any transform: its untransformed images are used, and its
            ground truth is drawn at the original size).
        index: the image shown first; score_threshold: the first threshold.
        dpi: resolution of the rendered views.

    Display ``explorer.widget``. State after each change: ``index``, ``prediction``, ``stage``
    (1..K), ``score_threshold``, ``show_boxes``, ``show_masks``, ``show_trajectories``,
    ``show_gt``, ``query`` (-1 = none), ``gt_boxes_xyxy`` (G, 4) or None, ``figure`` / ``png``
    (the stage view) and ``query_figure`` / ``query_png`` (None / b"" without a query).
    """

    def __init__(self, predictor: Predictor, images: Sequence | None = None, dataset=None,
                 index: int = 0, score_threshold: float = 0.4, dpi: float = 80):
        if (images is None) == (dataset is None):
            raise ValueError("give exactly one of images= or dataset=")
        if images is not None and len(images) == 0:
            raise ValueError("images is empty")
        if dataset is not None and len(dataset) == 0:
            raise ValueError("the data set has no images")
        self.predictor, self.images, self.dataset, self.dpi = predictor, images, dataset, dpi
        self.index = int(np.clip(index, 0, self._num_images() - 1))
        self.score_threshold = float(score_threshold)
        self.show_boxes, self.show_masks, self.show_trajectories = True, True, False
        self.show_gt = dataset is not None
        self.query = -1
        self.figure: Figure | None = None
        self.query_figure: Figure | None = None
        self.png, self.query_png = b"", b""
        self._load_image()
        self.stage = self.prediction.num_stages
        self._build_controls()
        self._redraw()

    # -- images

    def _num_images(self) -> int:
        return len(self.dataset) if self.dataset is not None else len(self.images)

    def _image_names(self) -> list[str]:
        if self.dataset is not None:
            return [self.dataset.image_path(i).name for i in range(len(self.dataset))]
        return [Path(im).name if isinstance(im, (str, Path)) else f"image {i}"
                for i, im in enumerate(self.images)]

    def _load_image(self) -> None:
        """Predict the current image (once: the predictor caches it) and read its ground truth."""
        if self.dataset is not None:
            image = np.asarray(self.dataset.load_image(self.index))
            target = self.dataset.raw_target(self.index)
            self.gt_boxes_xyxy = target["boxes_xyxy"].numpy()
            names = self.dataset.class_names
            self.gt_labels = [f"gt {names[int(c)]}" for c in target["labels"]]
        else:
            image = self.images[self.index]
            self.gt_boxes_xyxy, self.gt_labels = None, None
        self.prediction: Prediction = self.predictor.predict(image)

    # -- layout

    def _build_controls(self) -> None:
        k = self.prediction.num_stages
        self.image_picker = widgets.Dropdown(
            options=[(name, i) for i, name in enumerate(self._image_names())], value=self.index,
            description="image")
        self.stage_slider, self.play, self.play_link = stage_controls(k, self.stage)
        self.threshold_slider = widgets.FloatSlider(
            value=self.score_threshold, min=0.0, max=1.0, step=0.01, description="score >=",
            continuous_update=False)
        self.boxes_toggle = widgets.Checkbox(value=self.show_boxes, description="boxes")
        self.masks_toggle = widgets.Checkbox(value=self.show_masks, description="masks")
        self.trajectories_toggle = widgets.Checkbox(value=self.show_trajectories,
                                                    description="trajectories")
        self.gt_toggle = widgets.Checkbox(value=self.show_gt, description="ground truth",
                                          disabled=self.dataset is None)
        self.query_picker = widgets.Dropdown(options=self._query_options(), value=self.query,
                                             description="query")
        self.view_image = widgets.Image(format="png")
        self.query_image = widgets.Image(format="png")
        self.summary = widgets.HTML()
        self.image_picker.observe(self._on_image, names="value")
        self.stage_slider.observe(self._on_stage, names="value")
        self.threshold_slider.observe(self._on_threshold, names="value")
        self.boxes_toggle.observe(self._on_boxes, names="value")
        self.masks_toggle.observe(self._on_masks, names="value")
        self.trajectories_toggle.observe(self._on_trajectories, names="value")
        self.gt_toggle.observe(self._on_gt, names="value")
        self.query_picker.observe(self._on_query, names="value")

    def _query_options(self) -> list[tuple[str, int]]:
        num_queries = len(self.prediction.proposal_boxes_xyxy)
        return [("none", -1)] + [(f"q{q}", q) for q in range(num_queries)]

    @property
    def widget(self) -> widgets.VBox:
        """The whole explorer, to display as a cell's last expression."""
        return widgets.VBox([
            widgets.HBox([self.image_picker, self.play, self.stage_slider]),
            widgets.HBox([self.threshold_slider, self.query_picker]),
            widgets.HBox([self.boxes_toggle, self.masks_toggle, self.trajectories_toggle,
                          self.gt_toggle]),
            self.summary, self.view_image, self.query_image,
        ])

    # -- callbacks

    def _on_image(self, change: dict) -> None:
        self.index = int(change["new"])
        self._load_image()
        self._redraw()

    def _on_stage(self, change: dict) -> None:
        self.stage = int(change["new"])
        self._redraw(query_view=False)

    def _on_threshold(self, change: dict) -> None:
        self.score_threshold = float(change["new"])
        self._redraw(query_view=False)

    def _on_boxes(self, change: dict) -> None:
        self.show_boxes = bool(change["new"])
        self._redraw(query_view=False)

    def _on_masks(self, change: dict) -> None:
        self.show_masks = bool(change["new"])
        self._redraw(query_view=False)

    def _on_trajectories(self, change: dict) -> None:
        self.show_trajectories = bool(change["new"])
        self._redraw(query_view=False)

    def _on_gt(self, change: dict) -> None:
        self.show_gt = bool(change["new"])
        self._redraw(query_view=False)

    def _on_query(self, change: dict) -> None:
        self.query = int(change["new"])
        self._redraw()

    # -- drawing

    def view_kwargs(self) -> dict:
        """The arguments of ``plot_stage_view`` after ``prediction`` for the current state."""
        show_gt = self.show_gt and self.gt_boxes_xyxy is not None
        return {
            "stage": self.stage, "score_threshold": self.score_threshold,
            "show_boxes": self.show_boxes, "show_masks": self.show_masks,
            "show_trajectories": self.show_trajectories,
            "gt_boxes_xyxy": self.gt_boxes_xyxy if show_gt else None,
            "gt_labels": self.gt_labels if show_gt else None, "highlight": self.query,
        }

    def _redraw(self, query_view: bool = True) -> None:
        """Render the stage view (and, when ``query_view``, the query strip) to PNG."""
        self.figure = plot_stage_view(self.prediction, **self.view_kwargs())
        self.png = figure_to_png(self.figure, self.dpi)
        self.view_image.value = self.png
        if query_view:
            self.query_figure = (plot_query_through_stages(self.prediction, self.query)
                                 if self.query >= 0 else None)
            self.query_png = (figure_to_png(self.query_figure, self.dpi)
                              if self.query_figure is not None else b"")
            self.query_image.value = self.query_png
            self.query_image.layout.display = None if self.query >= 0 else "none"
        shown = len(self.prediction.detections(self.stage, self.score_threshold))
        self.summary.value = (f"image {self.index}: stage {self.stage} of "
                              f"{self.prediction.num_stages}, {shown} detections with score >= "
                              f"{self.score_threshold:.2f}"
                              + (f", following q{self.query}" if self.query >= 0 else ""))


__all__ = ["StageExplorer", "link_play", "stage_controls"]
