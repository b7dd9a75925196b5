"""COCO instance-segmentation data: validated annotations, a torch Dataset and batching.

``load_annotations`` reads a COCO instances JSON once, checks it and builds the pycocotools index
from the annotations that are usable. File-level problems (missing file, invalid JSON, not a COCO
instances file, duplicate ids) raise :class:`~istr_viz.errors.DataError`; a bad annotation is
skipped and recorded in ``CocoAnnotations.skipped`` (or raises with ``strict=True``), so a mask is
never silently wrong. Crowd regions (``iscrowd``) are kept as ignore regions, never as targets.

Category ids (any integers, in any order) map to contiguous labels ``0..C-1`` by sorted id, and
back with ``label_to_cat_id``. Image ids are the file's own ids.
"""

from __future__ import annotations

import contextlib
import io
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image, ImageOps
from pycocotools.coco import COCO
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.ops import box_convert, clip_boxes_to_image
from torchvision.transforms.v2.functional import pil_to_tensor

from istr_viz.data.transforms import drop_empty_instances
from istr_viz.data.validate import index_categories, index_images, read_json, valid_annotations
from istr_viz.errors import DataError

Transform = Callable[..., "tuple[Tensor, dict]"]


# ----------------------------------------------------------------------------- annotations


@dataclass
class CocoAnnotations:
    """A validated COCO instances file. ``coco`` indexes only the usable annotations."""

    ann_file: Path
    coco: COCO
    categories: list[dict]  # {"id", "name"}, sorted by id
    class_names: list[str]
    cat_id_to_label: dict[int, int]  # data set category id -> contiguous label 0..C-1
    label_to_cat_id: list[int]
    image_ids: list[int]  # every image, in file order, including those without annotations
    skipped: list[dict] = field(default_factory=list)  # {"file", "entry", "reason"}

    @property
    def num_classes(self) -> int:
        return len(self.categories)

    def image_info(self, image_id: int) -> dict:
        """The image entry (``file_name``, ``height``, ``width``, ...) of ``image_id``."""
        return self.coco.imgs[image_id]

    def instance_anns(self, image_id: int) -> list[dict]:
        """Valid non-crowd annotations of ``image_id`` (the training targets)."""
        return [a for a in self.coco.imgToAnns.get(image_id, []) if not a["iscrowd"]]

    def crowd_anns(self, image_id: int) -> list[dict]:
        """Valid crowd annotations of ``image_id`` (ignore regions, never targets)."""
        return [a for a in self.coco.imgToAnns.get(image_id, []) if a["iscrowd"]]

    def ann_to_mask(self, ann: dict) -> np.ndarray:
        """(H, W) uint8 {0, 1} mask of one annotation at its image's annotated size."""
        return self.coco.annToMask(ann)


def load_annotations(ann_file: str | Path, strict: bool = False) -> CocoAnnotations:
    """Read and validate a COCO instances file (no image is read).

    Raises :class:`DataError` for a missing file, invalid JSON, a file that is not a COCO instances
    file and duplicate image or category ids. An unusable annotation is skipped and recorded in
    ``skipped``; with ``strict=True`` it raises instead.
    """
    ann_file = Path(ann_file)
    data = read_json(ann_file)  # the checks live in istr_viz.data.validate
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DataError(f"not a COCO instances file: '{key}' must be a list", ann_file, key)
    images = index_images(data["images"], ann_file)
    categories = index_categories(data["categories"], ann_file)
    valid, skipped = valid_annotations(data["annotations"], images, categories, ann_file, strict)
    dataset = {k: v for k, v in data.items() if k not in ("images", "annotations", "categories")}
    dataset.update(images=list(images.values()), annotations=valid, categories=categories)
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints progress
        coco.createIndex()
    return CocoAnnotations(
        ann_file=ann_file,
        coco=coco,
        categories=[{"id": c["id"], "name": c["name"]} for c in categories],
        class_names=[c["name"] for c in categories],
        cat_id_to_label={c["id"]: i for i, c in enumerate(categories)},
        label_to_cat_id=[c["id"] for c in categories],
        image_ids=list(images),
        skipped=skipped,
    )


# ----------------------------------------------------------------------------- images


def load_image(path: str | Path) -> Image.Image:
    """The image at ``path`` as an RGB PIL image, EXIF orientation applied.

    Grayscale, palette, RGBA (alpha dropped) and 16-bit images all become 8-bit RGB. Raises
    :class:`DataError` naming the file when it is missing, truncated or not an image.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError("image file not found", file=path)
    try:
        with Image.open(path) as img:
            img.load()
            return _to_rgb(ImageOps.exif_transpose(img))
    except Image.DecompressionBombError as e:
        raise DataError(f"image too large to decode safely: {e}", file=path) from e
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as e:  # PIL: "broken"
        raise DataError(f"cannot read image: {e}", file=path) from e


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode.startswith("I") or img.mode == "F":  # 16/32-bit integer or float grayscale
        values = np.asarray(img, dtype=np.float64)
        if img.mode == "F" and values.max(initial=0) <= 1.0:
            values = values * 255.0
        elif img.mode.startswith("I;16") or values.max(initial=0) > 255:
            values = values / 257.0
        img = Image.fromarray(np.clip(values + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode in ("P", "PA", "LA", "La", "RGBa") or "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


# ----------------------------------------------------------------------------- dataset


class CocoDataset(Dataset):
    """COCO images with their instance targets: ``ds[i] -> (image, target)``.

    ``image``: (3, H, W) float32 RGB in [0, 1] after ``transform``. ``target`` holds ``image_id``
    (the file's id), ``orig_size`` [H0, W0], ``size`` [H, W], ``boxes_xyxy`` (G, 4) pixels,
    ``boxes_cxcywh`` (G, 4) normalised by (W, H), ``labels`` (G,) contiguous, ``masks`` (G, H, W)
    bool, ``ann_ids`` (G,), ``area`` (G,) COCO area in the original image, ``crowd_boxes_xyxy``
    (Gc, 4), ``crowd_mask`` (H, W) bool (ignore region), ``flipped`` bool and ``scale`` [sy, sx].

    ``transform(image uint8 (3, H0, W0), target, generator=None) -> (image, target)``, e.g. from
    :func:`~istr_viz.data.transforms.build_transform`. Pass ``annotations`` to reuse a loaded file.
    """

    def __init__(self, ann_file: str | Path, images_dir: str | Path,
                 transform: Transform | None = None, annotations: CocoAnnotations | None = None):
        self.images_dir = Path(images_dir)
        if not self.images_dir.is_dir():
            raise DataError("image folder not found", file=self.images_dir)
        self.annotations = annotations if annotations is not None else load_annotations(ann_file)
        self.transform = transform

    @property
    def class_names(self) -> list[str]:
        return self.annotations.class_names

    @property
    def num_classes(self) -> int:
        return self.annotations.num_classes

    def __len__(self) -> int:
        return len(self.annotations.image_ids)

    def __getitem__(self, index: int) -> tuple[Tensor, dict]:
        return self.get(index)

    def image_path(self, index: int) -> Path:
        info = self.annotations.image_info(self.annotations.image_ids[index])
        return self.images_dir / info["file_name"]

    def load_image(self, index: int) -> Image.Image:
        """The untransformed RGB image, checked against the annotated size."""
        image_id = self.annotations.image_ids[index]
        info = self.annotations.image_info(image_id)
        path = self.image_path(index)
        img = load_image(path)
        if img.size != (info["width"], info["height"]):
            reason = (f"image is {img.width} x {img.height} pixels but the annotation file says "
                      f"{info['width']} x {info['height']}")
            raise DataError(reason, path, f"image id={image_id}")
        return img

    def get(self, index: int, generator: torch.Generator | None = None) -> tuple[Tensor, dict]:
        """``ds[index]``, drawing the transform's randomness from ``generator`` when given."""
        image = pil_to_tensor(self.load_image(index))  # (3, H0, W0) uint8
        target = self.raw_target(index)
        if self.transform is not None:
            image, target = self.transform(image, target, generator=generator)
        target = drop_empty_instances(target)
        h, w = image.shape[-2:]
        target["size"] = torch.tensor([h, w], dtype=torch.int64)
        scale = torch.tensor([w, h, w, h], dtype=torch.float32)
        target["boxes_cxcywh"] = box_convert(target["boxes_xyxy"], "xyxy", "cxcywh") / scale
        return image.float() / 255.0, target

    def raw_target(self, index: int) -> dict:
        """The target of image ``index`` at its original size (no transform)."""
        ann = self.annotations
        image_id = ann.image_ids[index]
        info = ann.image_info(image_id)
        h0, w0 = info["height"], info["width"]
        instances, crowds = ann.instance_anns(image_id), ann.crowd_anns(image_id)
        masks = stack_ann_masks(ann.coco, instances, h0, w0)
        return {
            "image_id": image_id,
            "orig_size": torch.tensor([h0, w0], dtype=torch.int64),
            "size": torch.tensor([h0, w0], dtype=torch.int64),
            "boxes_xyxy": ann_boxes_xyxy(instances, h0, w0),
            "labels": torch.tensor([ann.cat_id_to_label[a["category_id"]] for a in instances],
                                   dtype=torch.int64),
            "masks": masks,
            "ann_ids": torch.tensor([a["id"] for a in instances], dtype=torch.int64),
            "area": torch.tensor([float(a["area"]) for a in instances], dtype=torch.float32),
            "crowd_boxes_xyxy": ann_boxes_xyxy(crowds, h0, w0),
            "crowd_mask": stack_ann_masks(ann.coco, crowds, h0, w0).any(dim=0),
            "flipped": False,
            "scale": torch.ones(2, dtype=torch.float32),
        }


def stack_ann_masks(coco: COCO, anns: list[dict], h: int, w: int) -> Tensor:
    """(N, H, W) bool masks of ``anns`` of one H x W image of ``coco`` (N may be 0)."""
    if not anns:
        return torch.zeros((0, h, w), dtype=torch.bool)
    return torch.from_numpy(np.stack([coco.annToMask(a) for a in anns]).astype(bool))


def ann_boxes_xyxy(anns: list[dict], h: int, w: int) -> Tensor:
    """(N, 4) float32 xyxy pixel boxes of ``anns`` (COCO xywh), clipped to the image."""
    xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
    return clip_boxes_to_image(box_convert(xywh, "xywh", "xyxy"), (h, w))


# ----------------------------------------------------------------------------- batching


@dataclass
class Batch:
    """Images padded to one size; ``targets`` keep each image's own (unpadded) size."""

    images: Tensor  # (B, 3, Hp, Wp) float32, zero-padded at the bottom and right
    image_sizes: Tensor  # (B, 2) int64 valid [H, W] of each image
    targets: list[dict]

    def __len__(self) -> int:
        return len(self.targets)

    def valid_mask(self) -> Tensor:
        """(B, Hp, Wp) bool, True on the image, False on padding."""
        _, _, hp, wp = self.images.shape
        rows = torch.arange(hp, device=self.images.device)[None, :, None]
        cols = torch.arange(wp, device=self.images.device)[None, None, :]
        sizes = self.image_sizes.to(self.images.device)
        return (rows < sizes[:, 0, None, None]) & (cols < sizes[:, 1, None, None])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        """The batch with every tensor (images and targets) on ``device``."""
        def move(v: Any) -> Any:
            return v.to(device, non_blocking=non_blocking) if torch.is_tensor(v) else v
        return Batch(move(self.images), move(self.image_sizes),
                     [{k: move(v) for k, v in t.items()} for t in self.targets])


def collate(batch: list[tuple[Tensor, dict]], size_divisor: int = 32) -> Batch:
    """Stack ``(image (3, H, W), target)`` pairs, zero-padding to a multiple of ``size_divisor``."""
    if not batch:
        raise ValueError("collate needs at least one (image, target) pair")
    sizes = torch.tensor([img.shape[-2:] for img, _ in batch], dtype=torch.int64).reshape(-1, 2)
    hp, wp = (int(math.ceil(int(s) / size_divisor) * size_divisor)
              for s in sizes.max(dim=0).values)
    images = torch.zeros((len(batch), 3, hp, wp), dtype=torch.float32)
    for i, (img, _) in enumerate(batch):
        images[i, :, : img.shape[-2], : img.shape[-1]] = img
    return Batch(images, sizes, [t for _, t in batch])

