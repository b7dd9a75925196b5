"""The peer a user would pick instead of ISTR: torchvision's Mask R-CNN on ISTR's own backbone.

Used by ``benchmarks/equal_budget.py`` to compare the two at the same wall-clock training budget.
The peer gets what ISTR gets: the same ResNet + FPN (the preset's norm, BatchNorm or GroupNorm,
all layers trainable, from scratch), the same pixels (istr_viz's transforms do the scale jitter
and the flip; torchvision's own resize is switched off), bf16 autocast where the CPU has it, the
same threads and batch size, and the CPU kernels: its RoI pooling goes through ISTR's RoIAlign
kernels (``CpuRoIAlign``: the sparse-matrix one in training, the separable one in inference), its
SGD is the fused one as ISTR's AdamW is, and the shared ResNet body max-pools channels-last.
Its anchors are scaled to the small images (16-256 px instead of 32-512 px), and its heads are
sized for a CPU (``PeerHeads``: fewer proposals and sampled RoIs, heads as wide as the FPN) so that
it gets through as many images per minute as it can; ``PeerHeads.torchvision_defaults()`` gives
torchvision's own sizes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import MultiScaleRoIAlign
# private helpers of MultiScaleRoIAlign, so that the levels are exactly torchvision's; torchvision is
# pinned (environment.yml, pyproject.toml) and tests/test_baseline.py compares the two poolers
from torchvision.ops.poolers import _convert_to_roi_format, _filter_input, _setup_scales

from istr_viz.config import Config
from istr_viz.data.batching import IterationBatchSampler, SeededDataset
from istr_viz.data.coco import CocoDataset
from istr_viz.model.backbone import (IMAGENET_MEAN, IMAGENET_STD, ResNetBody, norm_layer_for,
                                     separable_output_convs)
from istr_viz.model.roi_align import flatten_maps, separable_roi_align, sparse_roi_align
from istr_viz.postprocess import mask_to_rle, paste_masks, rescale_boxes
from istr_viz.runtime import autocast_dtype

ANCHOR_SIZES = ((16,), (32,), (64,), (128,), (256,))  # P2..P5 and the pooled P6


class CpuRoIAlign(MultiScaleRoIAlign):
    """torchvision's ``MultiScaleRoIAlign`` (same levels, ``aligned=False``) with ISTR's CPU
    kernels, each pooler with the faster one for its boxes, as ISTR's pooler does
    (``istr_viz.model.pooler``): :func:`istr_viz.model.roi_align.sparse_roi_align` when
    gradients flow (training), :func:`~istr_viz.model.roi_align.separable_roi_align` when they do
    not (inference; returned NCHW in the maps' dtype, as torchvision's) if ``separable_inference``
    (else torchvision's kernel there); on other devices torchvision's own ``forward``. Square
    outputs only.

    The separable kernel's cost grows with each box's extent in cells, torchvision's does not:
    on the peer's 150 proposals (mostly on P2, large windows) it was the slower one (12.0 against
    8.3 ms an image), on its ~34 detections' 14 x 14 mask RoIs the faster (6.4 against 7.2 ms;
    ``benchmarks/results_log.md``, session 18), so the peer pools each with the faster kernel.
    At 240 px in session 31 torchvision's was the faster for its mask RoIs too (1.5-4% of the
    peer's image); the equal-budget timing now tries both there and keeps the faster.
    """

    def __init__(self, featmap_names: list[str], output_size: int, sampling_ratio: int,
                 separable_inference: bool = True):
        super().__init__(featmap_names, output_size, sampling_ratio)
        self.separable_inference = separable_inference
        if self.output_size[0] != self.output_size[1]:
            raise ValueError(f"CpuRoIAlign pools square outputs only, got {output_size}")

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor],
                image_shapes: list[tuple[int, int]]) -> Tensor:
        features = _filter_input(x, self.featmap_names)
        if features[0].device.type != "cpu" or (
                not features[0].requires_grad and not self.separable_inference):
            return super().forward(x, boxes, image_shapes)
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = _setup_scales(features, image_shapes,
                                                         self.canonical_scale, self.canonical_level)
        rois = _convert_to_roi_format(boxes)
        levels = self.map_levels(boxes)
        size = self.output_size[0]
        if not features[0].requires_grad:  # inference: every box in one call
            scales = torch.tensor(self.scales, dtype=torch.float32, device=rois.device)[levels]
            pooled = separable_roi_align(flatten_maps(features), rois, levels, scales, size,
                                         self.sampling_ratio, aligned=False)
            return pooled.to(features[0].dtype).contiguous()
        pooled = features[0].new_zeros((len(rois), features[0].shape[1], size, size))
        for level, (feature, scale) in enumerate(zip(features, self.scales)):
            idx = torch.nonzero(levels == level).squeeze(1)
            if idx.numel():
                pooled[idx] = sparse_roi_align(feature, rois[idx], size, scale,
                                               self.sampling_ratio, aligned=False).to(pooled.dtype)
        return pooled


@dataclass(frozen=True)
class PeerHeads:
    """How big Mask R-CNN's RPN and RoI heads are. The defaults suit ~200 px images with a few
    objects on a CPU; torchvision's are for COCO on a GPU (``torchvision_defaults``).

    ``None`` widths mean "as wide as the FPN" (``cfg.model.hidden_dim``).
    """

    rpn_pre_nms_top_n_train: int = 600
    rpn_post_nms_top_n_train: int = 300
    rpn_pre_nms_top_n_test: int = 300
    rpn_post_nms_top_n_test: int = 150
    box_batch_size_per_image: int = 128  # RoIs sampled per image for the box and mask losses
    box_head_width: int = 512  # the two fully connected layers
    mask_head_width: int | None = None  # the four 3x3 convolutions and the deconvolution

    @classmethod
    def torchvision_defaults(cls) -> PeerHeads:
        return cls(2000, 2000, 1000, 1000, 512, 1024, 256)


def build_mask_rcnn(cfg: Config, num_classes: int, heads: PeerHeads = PeerHeads()) -> MaskRCNN:
    """torchvision's Mask R-CNN for ``num_classes`` classes (plus background) on the backbone that
    ``cfg.model`` gives ISTR (ResNet depth, stem width, norm, FPN width = ``hidden_dim``), with
    RPN and RoI heads of the sizes in ``heads``."""
    m = cfg.model
    body = ResNetBody(m.backbone, m.backbone_base_channels, m.norm, m.zero_init_residual)
    fpn_norm = norm_layer_for(m.norm) if m.norm == "gn" else None
    backbone = BackboneWithFPN(body, {f"layer{i}": str(i - 1) for i in range(1, 5)},
                               body.out_channels, m.hidden_dim, norm_layer=fpn_norm)
    if m.fpn_output_conv == "separable":  # the same FPN as ISTR's
        separable_output_convs(backbone.fpn)
    anchors = AnchorGenerator(ANCHOR_SIZES, ((0.5, 1.0, 2.0),) * len(ANCHOR_SIZES))
    width = heads.mask_head_width or m.hidden_dim
    model = MaskRCNN(
        backbone, rpn_anchor_generator=anchors,
        min_size=cfg.data.test_min_size, max_size=cfg.data.test_max_size,
        image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD),
        rpn_pre_nms_top_n_train=heads.rpn_pre_nms_top_n_train,
        rpn_post_nms_top_n_train=heads.rpn_post_nms_top_n_train,
        rpn_pre_nms_top_n_test=heads.rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_test=heads.rpn_post_nms_top_n_test,
        box_batch_size_per_image=heads.box_batch_size_per_image,
        box_roi_pool=CpuRoIAlign(["0", "1", "2", "3"], 7, 2,  # torchvision's levels
                                 separable_inference=False),
        mask_roi_pool=CpuRoIAlign(["0", "1", "2", "3"], 14, 2),
        box_head=TwoMLPHead(m.hidden_dim * 7 * 7, heads.box_head_width),
        box_predictor=FastRCNNPredictor(heads.box_head_width, num_classes + 1),
        mask_head=MaskRCNNHeads(m.hidden_dim, (width,) * 4, 1, norm_layer=fpn_norm),
        mask_predictor=MaskRCNNPredictor(width, width, num_classes + 1))
    model.transform.resize = _no_resize  # the data pipeline has resized already
    return model


def _no_resize(image: Tensor, target: dict | None = None) -> tuple[Tensor, dict | None]:
    return image, target


def to_torchvision_targets(targets: list[dict]) -> list[dict]:
    """istr_viz dataset targets -> torchvision's: labels from 1 (0 is background), uint8 masks."""
    return [{"boxes": t["boxes_xyxy"].float(), "labels": t["labels"].long() + 1,
             "masks": t["masks"].to(torch.uint8)} for t in targets]


def train_mask_rcnn(model: MaskRCNN, dataset: CocoDataset, minutes: float, lr: float,
                    batch_size: int = 4, warmup_iters: int = 100, momentum: float = 0.9,
                    weight_decay: float = 1e-4, amp: bool = True, seed: int = 0,
                    checkpoints: tuple[float, ...] = (),
                    on_checkpoint: Callable[[float, int], None] | None = None,
                    progress: bool = True, num_workers: int = 0,
                    groups: list[int] | None = None, clip_grad_norm: float = 0.0) -> dict:
    """Train for ``minutes`` of wall-clock training time (SGD with momentum, linear warm-up, x0.1
    at 80% of the time, the usual Mask R-CNN recipe). The clock counts everything a training
    step costs, data loading included, as ISTR's budget does; evaluation time does not count.

    ``on_checkpoint(minutes_done, iteration)`` is called (with the clock stopped) when the training
    time passes each value of ``checkpoints`` (minutes); ``minutes_done`` is the measured time.
    Returns {"iterations", "minutes", "diverged"}; a non-finite loss stops the run with
    ``diverged`` True. ``groups`` (one int per image, e.g. landscape or portrait) keeps each batch
    within one group, as ISTR's ``data.group_by_orientation`` does (the same batch sampler).
    ``clip_grad_norm`` > 0 clips the gradients' global L2 norm to it before each step, as ISTR's
    ``train.clip_grad_norm`` does (0: off, torchvision's reference recipe). The result also holds
    ``grad_norm_max``, the largest norm seen before clipping, and ``clipped``, the share of steps
    whose norm was over the limit.
    """
    from tqdm.auto import tqdm

    if groups is not None and len(set(groups)) > 1:
        endless = 10**12  # iterations: the clock ends the run
        sampler = IterationBatchSampler(len(dataset), batch_size, seed, 0, endless, groups=groups)
        loader = DataLoader(SeededDataset(dataset), batch_sampler=sampler, collate_fn=list,
                            num_workers=num_workers)
    else:
        generator = torch.Generator().manual_seed(seed)
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, collate_fn=list,
                            generator=generator, drop_last=True, num_workers=num_workers)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay,
                                fused=True)  # as ISTR's AdamW
    amp_dtype = autocast_dtype(torch.device("cpu"), amp)
    budget_s, trained_s, iteration = minutes * 60, 0.0, 0
    norm_max, clipped = 0.0, 0
    pending = sorted(c for c in checkpoints if 0 < c < minutes)
    bar = tqdm(total=round(budget_s), desc=f"mask-rcnn lr {lr:g}", unit="s", disable=not progress)
    model.train()
    t_last = time.perf_counter()  # the clock runs from the end of the last step: loading counts
    while trained_s < budget_s:
        for samples in loader:
            factor = min(1.0, 0.001 + iteration / max(1, warmup_iters))
            factor *= 0.1 if trained_s >= 0.8 * budget_s else 1.0
            for g in optimizer.param_groups:
                g["lr"] = lr * factor
            images = [img for img, _ in samples]
            targets = to_torchvision_targets([t for _, t in samples])
            with torch.autocast("cpu", dtype=amp_dtype or torch.float32,
                                enabled=amp_dtype is not None):
                losses = model(images, targets)
            loss = sum(v.float() for v in losses.values())
            if not math.isfinite(loss.item()):
                bar.close()
                return {"iterations": iteration, "minutes": trained_s / 60, "diverged": True,
                        "grad_norm_max": norm_max, "clipped": clipped / max(1, iteration)}
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            # the norm before clipping (an infinite limit only measures it)
            norm = torch.nn.utils.clip_grad_norm_(params, clip_grad_norm or math.inf).item()
            norm_max = max(norm_max, norm)
            clipped += bool(clip_grad_norm) and norm > clip_grad_norm
            optimizer.step()
            iteration += 1
            now = time.perf_counter()
            trained_s += now - t_last
            t_last = now
            bar.update(round(trained_s) - bar.n)
            bar.set_postfix(loss=f"{loss.item():.3f}", grad=f"{norm:.3g}", it=iteration)
            while pending and trained_s >= pending[0] * 60:
                if on_checkpoint is not None:
                    on_checkpoint(trained_s / 60, iteration)
                    model.train()
                pending.pop(0)
                t_last = time.perf_counter()  # the evaluation is off the clock
            if trained_s >= budget_s:
                break
    bar.close()
    return {"iterations": iteration, "minutes": trained_s / 60, "diverged": False,
            "grad_norm_max": norm_max, "clipped": clipped / max(1, iteration)}


@torch.no_grad()
def predict_mask_rcnn(model: MaskRCNN, image: Tensor) -> dict[str, Tensor]:
    """One (3, H, W) image through a Mask R-CNN in eval mode: ``model([image])[0]``, except that
    the masks are pasted by ISTR's :func:`istr_viz.postprocess.paste_masks` (separable bilinear
    sampling over each box's window) rather than torchvision's loop over the masks, so that the
    peer gets ISTR's post-processing as well as its kernels.

    Returns boxes (N, 4) xyxy pixels, labels (N,) from 1, scores (N,), masks (N, 1, H, W) float
    probabilities (torchvision's layout).
    """
    images, _ = model.transform([image])  # normalised; never resized (``_no_resize``)
    features = model.backbone(images.tensors)
    proposals, _ = model.rpn(images, features)
    detections = model.roi_heads(features, proposals, images.image_sizes)[0][0]
    h, w = image.shape[-2:]
    # torchvision's mask targets are RoIAligned with aligned=False: the mask's cells sit half a
    # pixel right of and below where ISTR's (aligned=True) would, so its frame is the box + 0.5
    frame = detections["boxes"].float() + 0.5
    masks = paste_masks(detections["masks"][:, 0].float(), frame, h, w, threshold=None)
    return {**detections, "masks": masks[:, None]}


@torch.no_grad()
def mask_rcnn_results(model: MaskRCNN, dataset: CocoDataset, amp: bool = True,
                      max_images: int | None = None) -> list[dict]:
    """COCO results (boxes and RLE masks at the original image size) of ``model`` on a data set
    built with the evaluation transform; category ids from the data set."""
    model.eval()
    label_to_cat = dataset.annotations.label_to_cat_id
    amp_dtype = autocast_dtype(torch.device("cpu"), amp)
    results = []
    for index in range(len(dataset) if max_images is None else min(max_images, len(dataset))):
        image, target = dataset[index]
        with torch.autocast("cpu", dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            out = predict_mask_rcnn(model, image)
        h, w = (int(v) for v in target["size"])
        h0, w0 = (int(v) for v in target["orig_size"])
        boxes = rescale_boxes(out["boxes"].float(), (h, w), (h0, w0))
        masks = out["masks"].float()  # (N, 1, h, w) probabilities, pasted at the boxes
        if masks.shape[0]:
            masks = F.interpolate(masks, size=(h0, w0), mode="bilinear", align_corners=False)
        for j in range(boxes.shape[0]):
            x0, y0, x1, y1 = boxes[j].tolist()
            results.append({"image_id": int(target["image_id"]),
                            "category_id": label_to_cat[int(out["labels"][j]) - 1],
                            "score": float(out["scores"][j]), "bbox": [x0, y0, x1 - x0, y1 - y0],
                            "segmentation": mask_to_rle((masks[j, 0] >= 0.5).numpy())})
    return results


__all__ = ["ANCHOR_SIZES", "PeerHeads", "build_mask_rcnn", "mask_rcnn_results",
           "predict_mask_rcnn", "to_torchvision_targets", "train_mask_rcnn"]
