"""COCO data: validated annotations, the Dataset and batching, joint transforms, check-data.

Light to import (torch, torchvision, pycocotools, PIL; no plotting). Shape letters: G instances
of one image, H W image, B batch.
"""

from __future__ import annotations

from istr_viz.data.check import check_dataset, check_images, format_summary
from istr_viz.data.coco import (
    Batch,
    CocoAnnotations,
    CocoDataset,
    collate,
    load_annotations,
    load_image,
)
from istr_viz.data.layout import DatasetPaths, default_data_root, split_paths
from istr_viz.data.transforms import (
    ResizeFlip,
    TransformConfig,
    build_transform,
    undo_box_transform,
    undo_mask_transform,
)

__all__ = [
    "Batch",
    "CocoAnnotations",
    "CocoDataset",
    "DatasetPaths",
    "ResizeFlip",
    "TransformConfig",
    "build_transform",
    "check_dataset",
    "check_images",
    "collate",
    "default_data_root",
    "format_summary",
    "load_annotations",
    "load_image",
    "split_paths",
    "undo_box_transform",
    "undo_mask_transform",
]
