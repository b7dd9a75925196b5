"""Look inside one training image: run the model once and match EVERY stage to the ground truth.

ISTR re-matches each stage on its own (deep supervision), so the query that owns a ground-truth
instance can change from one stage to the next. :func:`match_image` gives everything needed to draw
that (``istr_viz.viz.matching`` and ``istr_viz.widgets.MatchingExplorer`` use it); the
assignment helpers summarise it without drawing::

    ds = CocoDataset(ann_file, images_dir, build_transform(TransformConfig((224,), 256), False))
    im = match_image(model, ds, index=0)            # ImageMatches, one Match per stage
    assignment_churn(im.matches)                    # [2, 0, 1, ...] GT changing query per step
    assignment_table(im.matches)                    # [{"gt": 0, "stage1": 5, ...}, ...]

Everything is in the network input frame: the image at its evaluation size (no padding), the GT
and the predicted boxes in its pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from istr_viz.config import LossConfig
from istr_viz.data.coco import collate
from istr_viz.matcher import Match, hungarian_match, prepare_target
from istr_viz.postprocess import paste_masks


@dataclass
class ImageMatches:
    """One image's ground truth, every stage's queries and every stage's Hungarian match.

    Attributes:
        image: (H, W, 3) uint8 RGB at the network input size (no padding).
        image_id: the data set's own id of the image; ``index`` its position in the data set.
        gt_boxes_xyxy: (G, 4) pixels; gt_masks: (G, H, W) bool; gt_labels: (G,) contiguous.
        matches: K ``Match`` (stage 1 first), each with ``cost`` and ``terms`` (Q, G).
        proposal_boxes_xyxy: (Q, 4) the learned initial boxes in pixels.
        query_boxes_xyxy: (K, Q, 4) pixels; query_scores: (K, Q) best class probability;
        query_labels: (K, Q) its class; query_mask_probs: (K, Q, S, S) box-relative masks.
        class_names: name of each contiguous class index.
    """

    image: np.ndarray
    image_id: int
    index: int
    gt_boxes_xyxy: Tensor
    gt_masks: Tensor
    gt_labels: Tensor
    matches: list[Match]
    proposal_boxes_xyxy: Tensor
    query_boxes_xyxy: Tensor
    query_scores: Tensor
    query_labels: Tensor
    query_mask_probs: Tensor
    class_names: list[str]

    @property
    def num_stages(self) -> int:
        return len(self.matches)

    @property
    def num_queries(self) -> int:
        return int(self.query_boxes_xyxy.shape[1])

    @property
    def num_gt(self) -> int:
        return int(self.gt_labels.numel())

    @property
    def size(self) -> tuple[int, int]:
        """(H, W) of ``image``."""
        return int(self.image.shape[0]), int(self.image.shape[1])

    def match(self, stage: int) -> Match:
        """The ``Match`` of stage ``stage``, counted from 1 (-1 = the last)."""
        return self.matches[_stage_index(stage, self.num_stages)]

    def query_masks(self, stage: int, queries: Sequence[int] | Tensor) -> Tensor:
        """(N, H, W) bool masks of ``queries`` at ``stage`` (from 1), pasted at their boxes."""
        k = _stage_index(stage, self.num_stages)
        q = torch.as_tensor(queries, dtype=torch.long).reshape(-1)
        return paste_masks(self.query_mask_probs[k, q], self.query_boxes_xyxy[k, q], *self.size)


def _stage_index(stage: int, num_stages: int) -> int:
    if stage == -1:
        return num_stages - 1
    if not 1 <= stage <= num_stages:
        raise IndexError(f"stage {stage} out of range 1..{num_stages}")
    return stage - 1


@torch.no_grad()
def match_image(model: torch.nn.Module, dataset, index: int,
                device: str | torch.device | None = None,
                loss_cfg: LossConfig | None = None) -> ImageMatches:
    """Run ``model`` once on ``dataset[index]`` and match every stage to that image's ground truth.

    ``dataset`` must apply the evaluation transform (a ``CocoDataset`` built with
    ``build_transform(TransformConfig(...), train=False)``): what is drawn is exactly what the
    model saw. The matching uses ``model.basis`` and the cost weights and focal parameters of
    ``loss_cfg`` (default ``LossConfig()``), as training does. ``device`` defaults to the model's
    own; the model's train/eval mode is restored afterwards.

    Raises:
        IndexError: ``index`` outside the data set.
        NonFiniteCostError: a cost term holds NaN/Inf (named in the message).
    """
    if not 0 <= index < len(dataset):
        raise IndexError(f"image index {index} out of range 0..{len(dataset) - 1}")
    loss_cfg = loss_cfg if loss_cfg is not None else LossConfig()
    if device is not None:
        model.to(device)
    device = next(model.parameters()).device
    image, target = dataset[index]
    batch = collate([(image, target)]).to(device)
    was_training = model.training
    model.eval()
    try:
        output = model(batch.images, batch.image_sizes).float()
    finally:
        model.train(was_training)
    prepared = prepare_target(batch.targets[0], model.basis, device)
    weights = loss_cfg.cost_weights()
    matches = [hungarian_match(st.logits[0], st.boxes_xyxy[0], st.mask_embed[0], prepared,
                               weights, loss_cfg.focal_alpha, loss_cfg.focal_gamma)
               for st in output.stages]
    probs = output.stacked("logits")[:, 0].sigmoid().cpu()  # (K, Q, C)
    scores, labels = probs.max(dim=-1)  # (K, Q)
    return ImageMatches(
        image=(image.permute(1, 2, 0) * 255).round().clamp(0, 255).to(torch.uint8).numpy(),
        image_id=int(target["image_id"]), index=int(index),
        gt_boxes_xyxy=target["boxes_xyxy"].float(), gt_masks=target["masks"].bool(),
        gt_labels=target["labels"].long(), matches=matches,
        proposal_boxes_xyxy=output.proposal_boxes_xyxy[0].cpu(),
        query_boxes_xyxy=output.stacked("boxes_xyxy")[:, 0].cpu(),
        query_scores=scores, query_labels=labels,
        query_mask_probs=output.stacked("masks")[:, 0].cpu(),
        class_names=list(dataset.class_names))


def query_of_gt(match: Match) -> np.ndarray:
    """(G,) int: the query matched to each GT instance, -1 where none is (only when Q < G)."""
    out = np.full(match.cost.shape[1], -1, dtype=np.int64)
    out[match.gt_idx.numpy()] = match.query_idx.numpy()
    return out


def assignment_churn(matches: Sequence[Match]) -> list[int]:
    """K - 1 counts: how many GT instances change their matched query from stage k to k + 1."""
    owners = [query_of_gt(m) for m in matches]
    return [int((a != b).sum()) for a, b in zip(owners[:-1], owners[1:])]


def assignment_table(matches: Sequence[Match]) -> list[dict]:
    """One dict per GT instance: ``{"gt": g, "stage1": q1, ..., "stageK": qK, "changes": n}``,
    ``qk`` the query matched at stage k (-1 for none) and ``n`` how often it changes."""
    if not matches:
        return []
    owners = np.stack([query_of_gt(m) for m in matches], axis=1)  # (G, K)
    rows = []
    for g, per_stage in enumerate(owners):
        row = {"gt": g}
        row.update({f"stage{k}": int(q) for k, q in enumerate(per_stage, start=1)})
        row["changes"] = int((per_stage[1:] != per_stage[:-1]).sum())
        rows.append(row)
    return rows


__all__ = ["ImageMatches", "assignment_churn", "assignment_table", "match_image", "query_of_gt"]
