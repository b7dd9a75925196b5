"""The one inference entry point: image in, every stage's predictions out, at the image's own size.

Notebooks, widgets, the CLI ``predict`` command and the app all use :class:`Predictor`. It caches
the last image's :class:`Prediction`, so a stage slider or a threshold change redraws without
running the model again.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

from istr_viz.postprocess import Detections, mask_to_rle, paste_masks, rescale_boxes, top_detections
from istr_viz.runtime import default_device


@dataclass
class StagePrediction:
    """One refinement stage for one image, in original-image pixels.

    detections: the top-k (query, class) pairs; query_boxes_xyxy (Q, 4), query_scores (Q,) best class
    probability, query_labels (Q,), query_mask_probs (Q, S, S): every query whatever its rank, so a
    query can be followed through the stages; attn (Q, Q) self-attention weights or None.
    """

    detections: Detections
    query_boxes_xyxy: Tensor
    query_scores: Tensor
    query_labels: Tensor
    query_mask_probs: Tensor
    attn: Tensor | None = None


@dataclass
class Prediction:
    """Every stage's predictions for one image. Stages are numbered from 1 in ``stage(k)``."""

    image: np.ndarray  # (H0, W0, 3) uint8 RGB, the image as given
    stages: list[StagePrediction]
    proposal_boxes_xyxy: Tensor  # (Q, 4) the learned initial boxes in original pixels
    class_names: list[str]
    category_ids: list[int]
    input_size: tuple[int, int]  # (H, W) the network saw
    _mask_cache: dict = field(default_factory=dict, repr=False)

    @property
    def size(self) -> tuple[int, int]:
        return int(self.image.shape[0]), int(self.image.shape[1])

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def stage(self, k: int | None = None) -> StagePrediction:
        """Stage ``k`` counted from 1; None or -1 is the last (the final answer)."""
        if k is None or k == -1:
            return self.stages[-1]
        if not 1 <= k <= self.num_stages:
            raise IndexError(f"stage {k} out of range 1..{self.num_stages}")
        return self.stages[k - 1]

    def detections(self, stage: int | None = None, score_threshold: float = 0.0) -> Detections:
        return self.stage(stage).detections.above(score_threshold)

    def detection_masks(self, stage: int | None = None, score_threshold: float = 0.0) -> Tensor:
        """(N, H0, W0) bool masks of the detections above the threshold (cached per stage)."""
        key = (stage if stage not in (None, -1) else self.num_stages, score_threshold)
        if key not in self._mask_cache:
            det = self.detections(stage, score_threshold)
            self._mask_cache[key] = det.masks(*self.size)
        return self._mask_cache[key]

    def to_records(self, stage: int | None = None, score_threshold: float = 0.0,
                   with_masks: bool = True) -> list[dict]:
        """Detections as plain dicts: query, category_id, category_name, score, bbox (xywh), RLE."""
        det = self.detections(stage, score_threshold)
        masks = self.detection_masks(stage, score_threshold).numpy() if with_masks else None
        records = []
        for i in range(len(det)):
            x0, y0, x1, y1 = det.boxes_xyxy[i].tolist()
            label = int(det.labels[i])
            rec = {
                "query": int(det.queries[i]),
                "category_id": self.category_ids[label],
                "category_name": self.class_names[label],
                "score": round(float(det.scores[i]), 5),
                "bbox": [round(v, 2) for v in (x0, y0, x1 - x0, y1 - y0)],
            }
            if masks is not None:
                rec["segmentation"] = mask_to_rle(masks[i])
            records.append(rec)
        return records

    def to_coco_results(self, image_id: int, stage: int | None = None,
                        score_threshold: float = 0.0) -> list[dict]:
        """COCO results (boxes and RLE masks) with the data set's own image and category ids."""
        return [
            {"image_id": int(image_id), "category_id": r["category_id"], "score": r["score"],
             "bbox": r["bbox"], "segmentation": r["segmentation"]}
            for r in self.to_records(stage, score_threshold)
        ]


def image_to_array(image: str | Path | Image.Image | np.ndarray) -> np.ndarray:
    """Any image (file path, PIL image of any mode, HW / HWC array) as (H, W, 3) uint8 RGB.

    Converted exactly as the data sets read their files (``istr_viz.data.coco.load_image``):
    EXIF orientation applied, alpha dropped, 16-bit values divided by 257, so a picture gives the
    model the same pixels whether it comes as a path, a PIL image or an array.
    """
    from istr_viz.data.coco import _to_rgb, load_image

    if isinstance(image, (str, Path)):
        return np.asarray(load_image(Path(image)))
    if isinstance(image, Image.Image):
        return np.asarray(_to_rgb(ImageOps.exif_transpose(image)))
    array = np.asarray(image)
    if array.dtype == np.uint16:  # 16-bit, as a 16-bit PNG reads
        array = (array / 257.0).round().astype(np.uint8)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise ValueError(f"expected an (H, W), (H, W, 3) or (H, W, 4) image, got {array.shape}")
    return _to_uint8(array[:, :, :3])  # alpha dropped


def _to_uint8(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    if np.issubdtype(array.dtype, np.floating) and array.max(initial=0) <= 1.0:
        array = array * 255.0
    return np.clip(array, 0, 255).round().astype(np.uint8)


def input_size_for(height: int, width: int, min_size: int, max_size: int) -> tuple[int, int]:
    """(H, W) after resizing the shorter side to ``min_size`` with the longer side capped at
    ``max_size``: the evaluation transform's own size (``resized_size``)."""
    from istr_viz.data.transforms import resized_size

    return resized_size(height, width, min_size, max_size)


class Predictor:
    """Runs an ISTR model on one image at a time and keeps every stage.

    ``predict(image)`` accepts a file path, a PIL image or an array (RGB, grayscale, RGBA, palette;
    any size) and returns a :class:`Prediction` at the image's own size. The last result is cached.
    """

    def __init__(self, model: torch.nn.Module, class_names: list[str], category_ids: list[int],
                 min_size: int, max_size: int, device: str | torch.device | None = None,
                 top_k: int = 100, maskness_power: float = 0.0):
        self.device = default_device(device)
        self.model = model.to(self.device).eval()
        self.class_names = list(class_names)
        self.category_ids = list(category_ids)
        self.min_size, self.max_size, self.top_k = min_size, max_size, top_k
        self.maskness_power = maskness_power  # how detections are scored (top_detections)
        self._cache_key: str | None = None
        self._cache: Prediction | None = None

    def preprocess(self, array: np.ndarray) -> tuple[Tensor, Tensor]:
        """(1, 3, Hp, Wp) float input padded to a multiple of 32, and its valid (1, 2) size.

        The pixels are those the evaluation transform gives (uint8 resized, then / 255)."""
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms.v2 import functional as TF

        h, w = input_size_for(array.shape[0], array.shape[1], self.min_size, self.max_size)
        img = torch.from_numpy(np.array(array, copy=True)).permute(2, 0, 1)  # (3, H0, W0) uint8
        img = TF.resize(img, [h, w], interpolation=InterpolationMode.BILINEAR, antialias=True)
        img = img.float() / 255.0
        hp, wp = -(-h // 32) * 32, -(-w // 32) * 32
        batch = torch.zeros((1, 3, hp, wp))
        batch[0, :, :h, :w] = img
        return batch.to(self.device), torch.tensor([[h, w]], device=self.device)

    @torch.no_grad()
    def predict(self, image: str | Path | Image.Image | np.ndarray,
                return_attention: bool = True) -> Prediction:
        array = image_to_array(image)
        key = hashlib.sha1(array.tobytes()).hexdigest() + str(array.shape) + str(return_attention)
        if key == self._cache_key and self._cache is not None:
            return self._cache
        images, sizes = self.preprocess(array)
        output = self.model(images, sizes, return_attention=return_attention)
        prediction = self._to_prediction(array, output, (int(sizes[0, 0]), int(sizes[0, 1])))
        self._cache_key, self._cache = key, prediction
        return prediction

    def _to_prediction(self, array: np.ndarray, output, input_size: tuple[int, int]) -> Prediction:
        orig = (array.shape[0], array.shape[1])
        stages = []
        for st in output.stages:
            logits = st.logits[0].float().cpu()
            boxes = rescale_boxes(st.boxes_xyxy[0].float().cpu(), input_size, orig)
            masks = st.masks[0].float().cpu()
            probs = logits.sigmoid()
            scores, labels = probs.max(dim=1)
            attn = st.attn[0].float().cpu() if st.attn is not None else None
            stages.append(StagePrediction(
                detections=top_detections(logits, boxes, masks, self.top_k,
                                          self.maskness_power),
                query_boxes_xyxy=boxes, query_scores=scores, query_labels=labels,
                query_mask_probs=masks, attn=attn))
        proposals = rescale_boxes(output.proposal_boxes_xyxy[0].float().cpu(), input_size, orig)
        return Prediction(array, stages, proposals, self.class_names, self.category_ids, input_size)


__all__ = ["Prediction", "Predictor", "StagePrediction", "default_checkpoint", "image_to_array",
           "load_model", "model_from_checkpoint", "paste_masks", "suggested_score_threshold"]

SHIPPED_CHECKPOINT = Path(__file__).resolve().parent.parent / "checkpoints" / "istr_shapes.pt"
CHECKPOINT_ENV = "ISTR_VIZ_CHECKPOINT"  # overrides the shipped checkpoint (tests, development)


def suggested_score_threshold(metrics: dict | None, fallback: float) -> float:
    """The score threshold to show a checkpoint's detections at: the one chosen by the evaluation
    whose metrics it carries (``last.pt``: the latest, ``best.pt``: its best; best F1 of the
    final stage's masks at IoU 0.5 on the val images evaluated, ``metrics["score_threshold"]``,
    :func:`istr_viz.evaluate.best_f1_threshold`), rounded down to 0.01 so that the detection it
    was chosen at is kept; ``fallback`` for a checkpoint that records none (evaluated before
    thresholds were recorded, or whose detections matched nothing).

    Scores sit on the scale of the model's class loss: the focal loss's confidences and the
    varifocal loss's expected IoUs differ (best-F1 thresholds 0.34 and 0.60 for two models of
    the same recipe, benchmarks/results_log.md, session 21): one fixed threshold cannot suit both.
    """
    chosen = (metrics or {}).get("score_threshold") or {}
    value = chosen.get("threshold") if isinstance(chosen, dict) else None
    if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        return fallback
    return float(np.floor(value * 100 + 1e-9) / 100)


def default_checkpoint(path: str | Path | None = None, must_exist: bool = True) -> Path:
    """The checkpoint to open: ``path`` when given, else ``$ISTR_VIZ_CHECKPOINT`` when set, else
    the shipped ``checkpoints/istr_shapes.pt``.

    With ``must_exist`` a missing file raises :class:`~istr_viz.errors.CheckpointError` saying
    where it looked and how to get one (what the notebooks show when no model is there yet).
    """
    from istr_viz.errors import CheckpointError

    env = os.environ.get(CHECKPOINT_ENV)
    chosen = Path(path) if path is not None else Path(env) if env else SHIPPED_CHECKPOINT
    chosen = chosen.expanduser()
    if must_exist and not chosen.is_file():
        source = "given" if path is not None else f"from ${CHECKPOINT_ENV}" if env else "shipped"
        raise CheckpointError(
            f"no checkpoint file here (the {source} one); train one with "
            "notebooks/02_train.ipynb or `python -m istr_viz train --out runs/shapes`, then pass "
            "its last.pt (CHECKPOINT = \"runs/shapes/last.pt\" in a notebook)", file=chosen)
    return chosen


def load_model(path: str | Path, device: str | torch.device | None = None,
               test_size: int | None = None, maskness_power: float | None = None
               ) -> tuple[torch.nn.Module, Predictor]:
    """Load a checkpoint and return ``(model, predictor)`` ready to use on CPU or CUDA.

    Weights stored in half precision are brought back to fp32. ``test_size``: the shorter side
    images are resized to (default: the checkpoint's ``data.test_min_size``); it also changes
    ``predictor.config``, which ``evaluate`` reads, but the checkpoint's recorded ``metrics`` stay
    those of its own size. ``maskness_power``: how detections are scored (default: the
    checkpoint's ``model.maskness_power``), in ``predictor.config`` and ``predictor.maskness_power``.
    Raises :class:`~istr_viz.errors.CheckpointError` for a file that is not a usable checkpoint,
    :class:`~istr_viz.errors.ConfigError` for a test size below 1 or a power outside 0..16.
    """
    from istr_viz.checkpoint import load_checkpoint

    return model_from_checkpoint(load_checkpoint(path), path, device, test_size, maskness_power)


def model_from_checkpoint(ckpt: dict, path: str | Path, device: str | torch.device | None = None,
                          test_size: int | None = None, maskness_power: float | None = None
                          ) -> tuple[torch.nn.Module, Predictor]:
    """:func:`load_model` for a checkpoint already read with ``load_checkpoint`` (``path`` names
    it in messages), so that a caller reading its other entries opens the file once."""
    from istr_viz.basis import MaskBasis
    from istr_viz.config import Config
    from istr_viz.errors import CheckpointError, IstrVizError
    from istr_viz.model import build_model

    try:
        cfg = Config.from_dict(ckpt["config"])
        basis = MaskBasis.from_dict(ckpt["basis"], file=path)
        from dataclasses import replace

        # the weights come from the checkpoint: never ask for the ImageNet file again
        model = build_model(replace(cfg.model, pretrained_path=None), len(ckpt["class_names"]),
                            basis)
        state = {k: v.float() if torch.is_tensor(v) and v.dtype in (torch.float16, torch.bfloat16)
                 else v for k, v in ckpt["model"].items()}
        model.load_state_dict(state)
    except IstrVizError as err:
        raise CheckpointError(err.reason, file=path, entry=err.entry) from None
    except (RuntimeError, KeyError, TypeError, ValueError, AttributeError) as err:
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"checkpoint does not fit its own configuration ({first})",
                              file=path) from None
    if test_size is not None:
        from istr_viz.config import with_test_size

        cfg = with_test_size(cfg, test_size)
    if maskness_power is not None:
        from istr_viz.config import with_maskness_power

        cfg = with_maskness_power(cfg, maskness_power)
    predictor = Predictor(model, ckpt["class_names"], ckpt["category_ids"], cfg.data.test_min_size,
                          cfg.data.test_max_size, device=device,
                          maskness_power=cfg.model.maskness_power)
    predictor.config = cfg
    predictor.metrics = ckpt.get("metrics", {})
    predictor.checkpoint_path = Path(path)
    return predictor.model, predictor
