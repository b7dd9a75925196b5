"""What caps mask AP: COCOeval on ground truth pushed through parts of ISTR's mask pipeline.

ISTR never predicts a full-resolution mask. Each query's mask is an S x S crop of its box, written
as M basis coefficients and pasted back into the box. Each of these steps loses some AP:

- ``crop``: every ground-truth mask cut to its own box, resampled to S x S and pasted back. This is
  the AP a perfect S x S mask head would get with perfect boxes. It is the resolution ceiling.
- ``basis``: the same crops encoded to M coefficients (the noise-free code) and decoded. This is
  the AP of perfect codes in perfect boxes, the ceiling of the basis.
- ``ideal_masks``: a model's own detections (scores, classes, boxes) with each mask replaced by the
  basis's version of the ground truth it overlaps most, cropped to the detection's own box: what a
  perfect head trained on ``loss.mask_target_boxes="pred"`` (ISTR v2) would draw. A loose box
  costs such a head nothing (the instance is clipped to the box, never drawn too large), so a
  real head, which must find the object inside an inaccurate box, stays further below it.
- ``ideal_masks_gt_frame``: the instance cropped to its own box and pasted into the detection's,
  what a perfect head trained on ``loss.mask_target_boxes="gt"`` (ISTR v1) would
  draw: every box error moves the mask with it.

The gap from the model to the ceiling of its training target is its mask head's share; the gap
from there to ``basis`` is that of the boxes and scores. The detection-based rows are not strict
upper bounds: each detection takes its instance on its own, so two may take the same one (which
cannot raise the AP: COCOeval matches one-to-one), and a detection on a crowd region that also
overlaps an instance of its class is redrawn as that instance. Every number uses the same
COCOeval as :mod:`istr_viz.evaluate`.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
from pycocotools.coco import COCO
from torch import Tensor
from torchvision.ops import box_convert, box_iou

from istr_viz.data.coco import ann_boxes_xyxy, stack_ann_masks
from istr_viz.evaluate import coco_eval, coco_result
from istr_viz.matcher import crop_gt_masks
from istr_viz.model.istr import MaskCodec
from istr_viz.postprocess import mask_to_rle, paste_masks


@dataclass
class ImageTruth:
    """One image's non-crowd ground truth at its original size, as training reads it.

    masks (G, H, W) bool, boxes_xyxy (G, 4) float pixels clipped to the image, category_ids (G,)
    long (the data set's own ids).
    """

    masks: Tensor
    boxes_xyxy: Tensor
    category_ids: Tensor

    @classmethod
    def load(cls, gt: COCO, image_id: int) -> "ImageTruth":
        info = gt.imgs[image_id]
        h, w = int(info["height"]), int(info["width"])
        anns = [a for a in gt.imgToAnns.get(image_id, []) if not a.get("iscrowd", 0)]
        return cls(stack_ann_masks(gt, anns, h, w), ann_boxes_xyxy(anns, h, w),
                   torch.tensor([a["category_id"] for a in anns], dtype=torch.long))


def load_truths(gt: COCO, image_ids: list[int]) -> dict[int, ImageTruth]:
    """:class:`ImageTruth` of each image, to read the masks once for several ceilings."""
    return {image_id: ImageTruth.load(gt, image_id) for image_id in image_ids}


def masks_through_crop(full_masks: Tensor, boxes_xyxy: Tensor, mask_size: int,
                       basis: MaskCodec | None = None,
                       paste_boxes_xyxy: Tensor | None = None) -> Tensor:
    """Crop each full mask to a box at S x S, optionally through the basis, and paste it back.

    full_masks (N, H, W) bool, boxes_xyxy (N, 4) pixels of the same image, one box per mask.
    ``basis``: its noise-free code of each crop is decoded (None: the crop itself).
    ``paste_boxes_xyxy`` (N, 4): paste into these boxes instead (default: the crop boxes).
    Returns (N, H, W) bool, thresholded at 0.5 as the model's masks are.
    """
    n, h, w = full_masks.shape
    if n == 0:
        return torch.zeros((0, h, w), dtype=torch.bool)
    crops = crop_gt_masks(full_masks, boxes_xyxy, mask_size)  # (N, S, S) bool
    probs = crops.float() if basis is None else basis.decode(basis.encode(crops, noise=False))
    paste = boxes_xyxy if paste_boxes_xyxy is None else paste_boxes_xyxy
    return paste_masks(probs.float(), paste, h, w)


def ground_truth_through_masks(gt: COCO, mask_size: int, basis: MaskCodec | None = None,
                               image_ids: list[int] | None = None,
                               truths: dict[int, ImageTruth] | None = None) -> list[dict]:
    """The non-crowd ground truth as COCO results (score 1), each mask through
    :func:`masks_through_crop` in its own box: the ``crop`` (basis None) or ``basis`` ceiling.
    ``truths``: already loaded images (:func:`load_truths`)."""
    ids = image_ids if image_ids is not None else sorted(gt.getImgIds())
    truths = truths if truths is not None else load_truths(gt, ids)
    results = []
    for image_id in ids:
        truth = truths[image_id]
        masks = masks_through_crop(truth.masks, truth.boxes_xyxy, mask_size, basis)
        for box, cat, mask in zip(truth.boxes_xyxy, truth.category_ids.tolist(), masks):
            results.append(coco_result(image_id, cat, 1.0, box.tolist(),
                                       mask_to_rle(mask.numpy())))
    return results


def with_ideal_masks(gt: COCO, results: list[dict], basis: MaskCodec, frame: str = "pred",
                     truths: dict[int, ImageTruth] | None = None) -> list[dict]:
    """``results`` (COCO results with boxes) with every mask replaced by the basis's version of
    the ground truth it should have been: the same-category non-crowd instance with the highest box
    IoU. ``frame="pred"`` crops that instance to the detection's own box (the target of
    ``loss.mask_target_boxes="pred"``); ``"gt"`` crops it to its own box (ISTR v1's target) and
    pastes the crop into the detection's box, as a perfect head trained on that target would.
    A detection that overlaps no such instance keeps its mask (it is a false positive either way).
    Scores, classes and boxes are unchanged; so is ``results``. ``truths``: already loaded images.
    """
    if frame not in ("pred", "gt"):
        raise ValueError(f"frame must be 'pred' or 'gt', got {frame!r}")
    by_image: dict[int, list[int]] = defaultdict(list)
    for i, r in enumerate(results):
        by_image[int(r["image_id"])].append(i)
    out = [dict(r) for r in results]
    for image_id, indices in by_image.items():
        truth = truths[image_id] if truths is not None and image_id in truths else \
            ImageTruth.load(gt, image_id)
        if truth.masks.shape[0] == 0:
            continue
        boxes = box_convert(torch.tensor([results[i]["bbox"] for i in indices],
                                         dtype=torch.float32).reshape(-1, 4), "xywh", "xyxy")
        cats = torch.tensor([results[i]["category_id"] for i in indices], dtype=torch.long)
        iou = box_iou(boxes, truth.boxes_xyxy)  # (D, G)
        iou[cats[:, None] != truth.category_ids[None, :]] = 0.0
        best_iou, owner = iou.max(dim=1)  # (D,) each detection's instance
        hit = (best_iou > 0).nonzero().flatten()
        if hit.numel() == 0:
            continue
        owners = owner[hit]
        crop_boxes = boxes[hit] if frame == "pred" else truth.boxes_xyxy[owners]
        masks = masks_through_crop(truth.masks[owners], crop_boxes, basis.mask_size, basis,
                                   paste_boxes_xyxy=boxes[hit])
        for j, mask in zip(hit.tolist(), masks):
            out[indices[j]]["segmentation"] = mask_to_rle(mask.numpy())
    return out


def mask_ap_ceilings(gt: COCO, results: list[dict], basis: MaskCodec,
                     image_ids: list[int] | None = None) -> dict:
    """Mask AP of a model's ``results`` (one stage's COCO results) beside its four ceilings.

    Returns ``{"model": {...}, "ideal_masks": {...}, "ideal_masks_gt_frame": {...},
    "basis": {...}, "crop": {...}}`` (see the module's docstring), each a COCOeval mask summary
    (AP, AP50, AP75, APs, APm, APl; 0..1), plus ``"model_box"``, the box summary of the same
    results. ``image_ids``: the images the results cover (default: all of ``gt``'s).
    """
    ids = sorted(image_ids) if image_ids is not None else sorted(gt.getImgIds())
    truths = load_truths(gt, ids)
    size = basis.mask_size
    rows = {
        "ideal_masks": with_ideal_masks(gt, results, basis, "pred", truths),
        "ideal_masks_gt_frame": with_ideal_masks(gt, results, basis, "gt", truths),
        "basis": ground_truth_through_masks(gt, size, basis, ids, truths),
        "crop": ground_truth_through_masks(gt, size, None, ids, truths),
    }
    return {"model_box": coco_eval(gt, results, "bbox", ids)[0],
            "model": coco_eval(gt, results, "segm", ids)[0],
            **{key: coco_eval(gt, rows[key], "segm", ids)[0] for key in rows}}


CEILING_ROWS = (
    ("model", "the model"),
    ("ideal_masks", "its boxes, perfect codes (crop of its box)"),
    ("ideal_masks_gt_frame", "its boxes, perfect codes (crop of the GT box)"),
    ("basis", "GT boxes, perfect codes"),
    ("crop", "GT boxes, S x S crops, no basis"),
)


def format_ceilings(ceilings: dict, mask_size: int, dim: int) -> str:
    """The ceilings as a text table (AP in percent)."""
    lines = [f"mask AP ceilings (S = {mask_size}, M = {dim})",
             f"{'':<48} {'AP':>5} {'AP50':>5} {'AP75':>5}"]
    for key, label in CEILING_ROWS:
        s = ceilings[key]
        lines.append(f"{label:<48} {100 * s['AP']:5.1f} {100 * s['AP50']:5.1f} "
                     f"{100 * s['AP75']:5.1f}")
    return "\n".join(lines)
