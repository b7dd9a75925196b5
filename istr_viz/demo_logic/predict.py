"""The Predict tab without gradio: examples, one prediction per image, redraws at any stage.

The model runs once per image (:func:`predict_loaded` gives an :class:`ImageResult`, which the page
keeps per browser session); the stage slider, the play button and the score threshold only call
:func:`render_prediction`, which draws from that result. The overlay and the detection table come
from the same ``prediction.detections(stage, threshold)``, so the table's rows are the boxes drawn.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from istr_viz.demo_logic.images import ImageLimits, LoadedImage, from_array
from istr_viz.demo_logic.served import DemoData, ServedModel, data_image
from istr_viz.predictor import Prediction
from istr_viz.viz.figures import figure_to_array
from istr_viz.viz.stages import plot_stage_grid
from istr_viz.viz.trajectories import plot_stage_view

# Real photos shipped inside scikit-image (no download): example label -> skimage.data function.
PHOTOS = {"coins": "coins", "coffee": "coffee", "cat": "chelsea", "astronaut": "astronaut"}
DETECTION_COLUMNS = ["query", "class", "score", "x0", "y0", "x1", "y1", "mask pixels"]
DATA_PREFIX, PHOTO_PREFIX = "val ", "photo "
GRID_MAX_LABELS = 10  # a grid panel with more detections draws its boxes unlabelled


@dataclass(frozen=True)
class Example:
    """One pickable example: a val image of the data set (``index``) or a scikit-image photo."""

    label: str
    index: int | None = None  # position in the val split
    photo: str | None = None  # name of the skimage.data function


def examples(data: DemoData) -> dict[str, Example]:
    """Every example by its label: the data set's val images first (``"val 000001.png"``), then
    the scikit-image photos (``"photo coins"``)."""
    found: dict[str, Example] = {}
    if data.ok:
        ann = data.val_annotations
        for index, image_id in enumerate(ann.image_ids):
            label = DATA_PREFIX + Path(ann.image_info(image_id)["file_name"]).name
            found[label] = Example(label, index=index)
    for label, function in PHOTOS.items():
        found[PHOTO_PREFIX + label] = Example(PHOTO_PREFIX + label, photo=function)
    return found


@dataclass
class ImageResult:
    """One image and every stage's prediction for it, kept by the page between redraws.

    loaded: the image as the model saw it (``loaded.array`` (H, W, 3) uint8, notes);
    prediction: every stage at that size; gt_boxes_xyxy: (G, 4) pixels of ``loaded.array`` or
    None when the image is not from the data set; gt_labels: G class names; seconds: model time.
    """

    loaded: LoadedImage
    prediction: Prediction
    gt_boxes_xyxy: np.ndarray | None = None
    gt_labels: list[str] | None = None
    seconds: float = 0.0

    @property
    def num_stages(self) -> int:
        return self.prediction.num_stages


@dataclass
class PredictionView:
    """What one redraw shows: overlay (H, W, 3) uint8 of one stage, grid (H', W', 3) uint8 of every
    stage (None when not redrawn), rows (``DETECTION_COLUMNS``) of the detections drawn, summary
    (Markdown)."""

    overlay: np.ndarray
    grid: np.ndarray | None
    rows: list[list]
    summary: str


def load_example(example: Example, data: DemoData, limits: ImageLimits = ImageLimits()
                 ) -> tuple[LoadedImage, np.ndarray | None, list[str] | None]:
    """The example's image within ``limits`` and, for a data set image, its ground truth:
    ``(loaded, gt_boxes_xyxy (G, 4) in loaded pixels, gt class names)``; (loaded, None, None)
    for a photo."""
    if example.photo is not None:
        import skimage.data

        array = getattr(skimage.data, example.photo)()
        return from_array(array, example.label, limits), None, None
    image, boxes, labels = data_image(data, example.index)
    loaded = from_array(image, example.label, limits)
    h0, w0 = image.shape[:2]
    h, w = loaded.array.shape[:2]
    scale = np.array([w / w0, h / h0, w / w0, h / h0], dtype=np.float32)
    return loaded, boxes * scale, labels


def predict_loaded(served: ServedModel, loaded: LoadedImage,
                   gt_boxes_xyxy: np.ndarray | None = None,
                   gt_labels: list[str] | None = None) -> ImageResult:
    """Run the served model once on ``loaded.array`` (under the model's lock)."""
    if served.predictor is None:
        raise RuntimeError("no model is served")
    start = time.perf_counter()
    with served.lock:
        prediction = served.predictor.predict(loaded.array, return_attention=False)
    return ImageResult(loaded, prediction, gt_boxes_xyxy, gt_labels,
                       time.perf_counter() - start)


def clamp_stage(stage: float | int | None, num_stages: int) -> int:
    """A slider value as a stage 1..K (None: the last)."""
    if stage is None:
        return num_stages
    return int(min(max(round(float(stage)), 1), num_stages))


def with_fresh_cache(result: ImageResult) -> ImageResult:
    """``result`` sharing its tensors but with an empty mask cache: what one redraw fills, so
    that redrawing at many thresholds does not pile masks up in the state the page keeps."""
    return dataclasses.replace(result, prediction=dataclasses.replace(result.prediction,
                                                                      _mask_cache={}))


def stage_figure(result: ImageResult, stage: int, score_threshold: float,
                 panel_size: float = 5.0) -> Figure:
    """The overlay: detections of ``stage`` scoring >= ``score_threshold`` (masks and solid
    boxes in their query's colour) and the ground truth (dashed white) when known."""
    return plot_stage_view(result.prediction, stage, score_threshold,
                           gt_boxes_xyxy=result.gt_boxes_xyxy, gt_labels=result.gt_labels,
                           panel_size=panel_size)


def grid_figure(result: ImageResult, score_threshold: float, panel_size: float = 2.6) -> Figure:
    """One panel per stage at ``score_threshold`` (boxes labelled in panels with at most
    ``GRID_MAX_LABELS`` detections)."""
    return plot_stage_grid(result.prediction, score_threshold, panel_size=panel_size,
                           max_labels=GRID_MAX_LABELS)


def detection_rows(result: ImageResult, stage: int, score_threshold: float) -> list[list]:
    """The detections :func:`stage_figure` draws, best first, as ``DETECTION_COLUMNS`` rows:
    query, class, score, box x0 y0 x1 y1 (pixels of the shown image), mask area in pixels."""
    prediction = result.prediction
    det = prediction.detections(stage, score_threshold)
    areas = prediction.detection_masks(stage, score_threshold).sum(dim=(1, 2)).tolist()
    rows = []
    for i in range(len(det)):
        x0, y0, x1, y1 = (round(v, 1) for v in det.boxes_xyxy[i].tolist())
        rows.append([int(det.queries[i]), prediction.class_names[int(det.labels[i])],
                     round(float(det.scores[i]), 3), x0, y0, x1, y1, int(areas[i])])
    return rows


def render_prediction(result: ImageResult, stage: float | int | None, score_threshold: float,
                      with_grid: bool = True, dpi: float = 100.0,
                      grid_dpi: float = 80.0) -> PredictionView:
    """Redraw ``result`` at ``stage`` (clamped to 1..K) and ``score_threshold`` (clamped to
    [0, 1]); the model does not run. The grid of every stage does not depend on ``stage``:
    ``with_grid=False`` leaves it out (a stage change redraws only the overlay and the table)."""
    k = clamp_stage(stage, result.num_stages)
    threshold = float(min(max(score_threshold or 0.0, 0.0), 1.0))
    result = with_fresh_cache(result)  # one cache for the three views, dropped afterwards
    overlay = figure_to_array(stage_figure(result, k, threshold), dpi)
    grid = figure_to_array(grid_figure(result, threshold), grid_dpi) if with_grid else None
    rows = detection_rows(result, k, threshold)
    h, w = result.loaded.array.shape[:2]
    parts = [f"**{result.loaded.name}** ({w} x {h} pixels): stage {k} of {result.num_stages}, "
             f"{len(rows)} detections with score >= {threshold:.2f}"]
    if result.gt_boxes_xyxy is not None:
        parts.append(f"{len(result.gt_boxes_xyxy)} ground-truth instances (dashed white)")
    parts.append(f"model ran in {result.seconds:.2f} s")
    summary = "; ".join(parts) + "."
    if result.loaded.notes:
        summary += " Note: " + "; ".join(result.loaded.notes) + "."
    return PredictionView(overlay, grid, rows, summary)


def start_stage(stage: float | int | None, num_stages: int) -> int:
    """Where the play button starts: stage 1 when the slider is at the last stage, else where
    it is."""
    k = clamp_stage(stage, num_stages)
    return 1 if k >= num_stages else k


def next_stage(stage: float | int | None, num_stages: int) -> tuple[int, bool]:
    """One play step: ``(stage + 1, whether to keep playing)``, stopping at the last stage."""
    k = min(clamp_stage(stage, num_stages) + 1, num_stages)
    return k, k < num_stages


__all__ = ["DETECTION_COLUMNS", "Example", "GRID_MAX_LABELS", "ImageResult", "PHOTOS",
           "PredictionView", "clamp_stage", "detection_rows", "examples", "grid_figure",
           "load_example", "next_stage", "predict_loaded", "render_prediction", "stage_figure",
           "start_stage", "with_fresh_cache"]
