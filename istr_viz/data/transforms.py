"""Joint image / box / mask transforms: resize (shorter side, capped longer side), flip, jitter.

Every random choice is drawn from torch (the global RNG, or a ``torch.Generator`` passed per call),
so a run's augmentation is reproducible and resumable. The parameters are drawn here and applied
with ``torchvision.transforms.v2.functional`` ops, and each target records what was done
(``flipped``, ``scale`` [sy, sx], ``size``, ``orig_size``) so that :func:`undo_mask_transform`
and :func:`undo_box_transform` bring predictions back to the original image.

A target is the dict of :class:`~istr_viz.data.coco.CocoDataset`: ``boxes_xyxy`` (G, 4) pixels,
``masks`` (G, H, W) bool, ``crowd_boxes_xyxy`` (Gc, 4), ``crowd_mask`` (H, W) bool, per-instance
``labels`` / ``ann_ids`` / ``area`` (G,), and ``size`` / ``orig_size`` (2,) int64 [H, W].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.ops import clip_boxes_to_image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from istr_viz.errors import ConfigError

# Target keys holding one row per instance: kept aligned when instances are dropped.
INSTANCE_KEYS = ("boxes_xyxy", "boxes_cxcywh", "labels", "masks", "ann_ids", "area")


@dataclass(frozen=True)
class TransformConfig:
    """Resize/flip settings. Training draws ``min_size`` uniformly from the tuple per sample (scale
    jitter; write a range as ``tuple(range(480, 801, 32))``); evaluation uses ``max(min_size)``."""

    min_size: tuple[int, ...] = (800,)  # target length of the shorter side
    max_size: int = 1333  # cap on the longer side (aspect ratio is always kept)
    flip_prob: float = 0.5  # horizontal flip probability in training

    def __post_init__(self) -> None:
        if not self.min_size or any(int(s) != s or s <= 0 for s in self.min_size):
            raise ConfigError(f"min_size must be positive integers, got {self.min_size!r}")
        if self.max_size <= 0:
            raise ConfigError(f"max_size must be positive, got {self.max_size!r}")
        if not 0.0 <= self.flip_prob <= 1.0:
            raise ConfigError(f"flip_prob must be in [0, 1], got {self.flip_prob!r}")


def resized_size(height: int, width: int, min_size: int, max_size: int) -> tuple[int, int]:
    """(H, W) with the shorter side ``min_size``, shrunk so that the longer side <= ``max_size``."""
    scale = min_size / min(height, width)
    if max(height, width) * scale > max_size:
        scale = max_size / max(height, width)
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


def resize_flip(image: Tensor, target: dict, min_size: int, max_size: int,
                flip: bool) -> tuple[Tensor, dict]:
    """Resize ``image`` (3, H, W) and its target to ``resized_size``, then flip horizontally if
    ``flip``. Image: bilinear with antialias; masks: nearest; boxes: scaled, flipped and clipped.
    Instances whose mask becomes empty are dropped. Returns a new target (the input is unchanged).
    """
    h, w = image.shape[-2:]
    new_h, new_w = resized_size(h, w, min_size, max_size)
    sy, sx = new_h / h, new_w / w
    image = F.resize(image, [new_h, new_w], interpolation=InterpolationMode.BILINEAR,
                     antialias=True)
    out = dict(target)
    out.pop("boxes_cxcywh", None)  # stale; the dataset recomputes it from boxes_xyxy
    out["masks"] = _resize_masks(target["masks"], new_h, new_w)
    out["crowd_mask"] = _resize_masks(target["crowd_mask"][None], new_h, new_w)[0]
    factors = torch.tensor([sx, sy, sx, sy], dtype=torch.float32)
    out["boxes_xyxy"] = target["boxes_xyxy"] * factors
    out["crowd_boxes_xyxy"] = target["crowd_boxes_xyxy"] * factors
    if flip:
        image = F.horizontal_flip(image)
        out["masks"], out["crowd_mask"] = out["masks"].flip(-1), out["crowd_mask"].flip(-1)
        out["boxes_xyxy"] = _flip_boxes(out["boxes_xyxy"], new_w)
        out["crowd_boxes_xyxy"] = _flip_boxes(out["crowd_boxes_xyxy"], new_w)
    for key in ("boxes_xyxy", "crowd_boxes_xyxy"):
        out[key] = clip_boxes_to_image(out[key], (new_h, new_w))
    out["size"] = torch.tensor([new_h, new_w], dtype=torch.int64)
    out["scale"] = target.get("scale", torch.ones(2)) * torch.tensor([sy, sx])
    out["flipped"] = bool(target.get("flipped", False)) != flip
    return image, drop_empty_instances(out)


def _resize_masks(masks: Tensor, height: int, width: int) -> Tensor:
    """(N, h, w) bool -> (N, height, width) bool, nearest (pixel-centre) sampling."""
    return F.resize(masks, [height, width], interpolation=InterpolationMode.NEAREST_EXACT)


def _flip_boxes(boxes_xyxy: Tensor, width: int) -> Tensor:
    """(N, 4) xyxy boxes mirrored in an image ``width`` pixels wide."""
    x1, y1, x2, y2 = boxes_xyxy.unbind(-1)
    return torch.stack([width - x2, y1, width - x1, y2], dim=-1)


def drop_empty_instances(target: dict) -> dict:
    """The target without instances whose mask has no pixel (every instance key kept aligned)."""
    keep = target["masks"].flatten(1).any(dim=1)
    if bool(keep.all()):
        return target
    return {k: (v[keep] if k in INSTANCE_KEYS else v) for k, v in target.items()}


class ResizeFlip:
    """Callable ``(image (3, H, W), target, generator=None) -> (image, target)``.

    Per call it draws the shorter-side length uniformly from ``min_sizes`` and a flip with
    probability ``flip_prob``, from ``generator`` when given, else from the global torch RNG
    (which DataLoader workers seed from the main process: reproducible with ``torch.manual_seed``).
    A generator passed here is used by every call; do not share one across DataLoader workers.
    """

    def __init__(self, min_sizes: tuple[int, ...], max_size: int, flip_prob: float = 0.0):
        self.min_sizes = tuple(int(s) for s in min_sizes)
        self.max_size = int(max_size)
        self.flip_prob = float(flip_prob)

    def __repr__(self) -> str:
        return (f"ResizeFlip(min_sizes={self.min_sizes}, max_size={self.max_size}, "
                f"flip_prob={self.flip_prob})")

    def draw(self, generator: torch.Generator | None = None) -> tuple[int, bool]:
        """(min_size, flip) for one sample; draws nothing when the choice is fixed."""
        min_size = self.min_sizes[0]
        if len(self.min_sizes) > 1:
            min_size = self.min_sizes[int(torch.randint(len(self.min_sizes), (1,),
                                                        generator=generator))]
        flip = False
        if self.flip_prob > 0:
            flip = bool(torch.rand((), generator=generator) < self.flip_prob)
        return min_size, flip

    def __call__(self, image: Tensor, target: dict,
                 generator: torch.Generator | None = None) -> tuple[Tensor, dict]:
        min_size, flip = self.draw(generator)
        return resize_flip(image, target, min_size, self.max_size, flip)


def build_transform(cfg: TransformConfig, train: bool) -> ResizeFlip:
    """Training: scale jitter over ``cfg.min_size`` and random flip; evaluation: a deterministic
    resize of the shorter side to ``max(cfg.min_size)``, no flip."""
    if train:
        return ResizeFlip(cfg.min_size, cfg.max_size, cfg.flip_prob)
    return ResizeFlip((max(cfg.min_size),), cfg.max_size, 0.0)


def undo_mask_transform(mask: Tensor, target: dict, threshold: float = 0.5) -> Tensor:
    """Masks of the transformed image back on the original image.

    ``mask``: (H, W) or (N, H, W), bool or probabilities, at the transformed size ``target["size"]``
    (any padding beyond it is cropped). Unflips, resizes bilinearly (antialiased) to
    ``target["orig_size"]`` and thresholds (> ``threshold``). Returns (H0, W0) or (N, H0, W0) bool.
    """
    h, w = (int(v) for v in target["size"])
    h0, w0 = (int(v) for v in target["orig_size"])
    single = mask.ndim == 2
    masks = (mask[None] if single else mask)[..., :h, :w].float()
    if target.get("flipped", False):
        masks = masks.flip(-1)
    if masks.shape[0] == 0:
        out = masks.new_zeros((0, h0, w0), dtype=torch.bool)
    else:
        out = F.resize(masks, [h0, w0], interpolation=InterpolationMode.BILINEAR,
                       antialias=True) > threshold
    return out[0] if single else out


def undo_box_transform(boxes_xyxy: Tensor, target: dict) -> Tensor:
    """(N, 4) xyxy pixel boxes of the transformed image -> (N, 4) on the original image, clipped."""
    h, w = (int(v) for v in target["size"])
    boxes = _flip_boxes(boxes_xyxy, w) if target.get("flipped", False) else boxes_xyxy
    sy, sx = (float(v) for v in target["scale"])
    boxes = boxes / torch.tensor([sx, sy, sx, sy], dtype=boxes.dtype, device=boxes.device)
    return clip_boxes_to_image(boxes, tuple(int(v) for v in target["orig_size"]))
