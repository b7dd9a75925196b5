"""istr_viz.losses: loss functions by hand, the focal prior, empty targets, SetCriterion keys."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torchvision.ops import box_iou

from istr_viz.basis import MaskBasis
from istr_viz.config import LossConfig
from istr_viz.data.instance_masks import synthetic_instance_masks
from istr_viz.errors import ConfigError
from istr_viz.losses import (LOSS_TERMS, SetCriterion, box_losses, dice_loss, embedding_weights,
                             overlap_pairs,
                             focal_class_loss, mask_losses, varifocal_class_loss)
from istr_viz.matcher import hungarian_match, prepare_target
from istr_viz.model import ISTR, build_backbone
from istr_viz.model.outputs import ISTROutput, StageOutput

S, M, C, Q = 28, 12, 3, 8
PRIOR = -math.log((1 - 0.01) / 0.01)


@pytest.fixture(scope="module")
def basis() -> MaskBasis:
    return MaskBasis.fit(synthetic_instance_masks(200, S, seed=2), dim=M, seed=0)


def _target(boxes: list[list[float]], labels: list[int], size=(48, 64)) -> dict:
    H, W = size
    masks = torch.zeros(len(boxes), H, W, dtype=torch.bool)
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        masks[i, int(y0):int(y1), int(x0):int(x1)] = True
    return {"boxes_xyxy": torch.tensor(boxes, dtype=torch.float32).view(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.long), "masks": masks,
            "size": torch.tensor([H, W])}


def _output(basis: MaskBasis, B: int = 2, K: int = 2, seed: int = 0) -> ISTROutput:
    g = torch.Generator().manual_seed(seed)
    stages = []
    for _ in range(K):
        xy = torch.rand(B, Q, 2, generator=g) * 30
        boxes = torch.cat([xy, xy + 5 + torch.rand(B, Q, 2, generator=g) * 20], -1)
        embed = torch.randn(B, Q, M, generator=g)
        stages.append(StageOutput(logits=torch.randn(B, Q, C, generator=g), boxes_xyxy=boxes,
                                  boxes_cxcywh=boxes / 64, mask_embed=embed,
                                  masks=basis.decode(embed)))
    for s in stages:
        for t in (s.logits, s.boxes_xyxy, s.mask_embed):
            t.requires_grad_(True)
    return ISTROutput(stages, torch.zeros(B, Q, 4), torch.tensor([[48, 64]] * B),
                      torch.zeros(B, Q, 16))


def test_focal_loss_at_the_prior_bias():
    logits = torch.full((2, 100, 80), PRIOR)
    unmatched = torch.full((2, 100), 80)
    expected = 2 * 100 * 80 * 0.75 * 0.01**2 * -math.log(0.99)  # about 0.012
    assert math.isclose(focal_class_loss(logits, unmatched, 1.0).item(), expected, rel_tol=1e-3)
    without_prior = focal_class_loss(torch.zeros(2, 100, 80), unmatched, 1.0).item()
    assert without_prior > 1000 * expected  # why the bias is there


def test_fresh_model_starts_near_the_focal_prior(basis):
    torch.manual_seed(0)
    model = ISTR(C, basis, build_backbone("resnet18", 32, "gn", base_channels=8), num_queries=Q,
                 num_stages=2, hidden_dim=32, dim_dynamic=4, dim_feedforward=64, num_heads=2)
    out = model(torch.rand(1, 3, 64, 64), torch.tensor([[64, 64]]))
    unmatched = torch.full((1, Q), C)
    at_prior = focal_class_loss(torch.full((1, Q, C), PRIOR), unmatched, 1.0).item()
    at_zero = focal_class_loss(torch.zeros(1, Q, C), unmatched, 1.0).item()
    for stage in out.stages:
        # xavier weights spread the logits around the bias, which raises the mean loss above
        # the exact prior value (convexity), but it stays orders of magnitude below bias 0
        loss = focal_class_loss(stage.logits, unmatched, 1.0).item()
        assert at_prior < loss < at_zero / 300
        assert stage.scores.mean() < 0.05


def test_focal_loss_one_hot_targets():
    logits = torch.tensor([[[2.0, -1.0]]])
    p = torch.sigmoid(logits[0, 0])
    pos = 0.25 * (1 - p[0]) ** 2 * -torch.log(p[0])
    neg = 0.75 * p[1] ** 2 * -torch.log(1 - p[1])
    loss = focal_class_loss(logits, torch.tensor([[0]]), num_instances=2.0)
    assert torch.isclose(loss, (pos + neg) / 2)


def test_varifocal_negatives_are_the_focal_ones_and_a_positive_is_best_at_its_iou():
    logits = torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(0))
    unmatched = torch.full((2, 5), 3)
    assert torch.isclose(varifocal_class_loss(logits, torch.zeros(2, 5, 3), 2.0),
                         focal_class_loss(logits, unmatched, 2.0))
    # one positive logit with target 0.6: the loss is lowest at p = 0.6 (logit log(0.6/0.4)),
    # where its gradient vanishes; the focal loss would push it on towards p = 1
    target = torch.zeros(1, 1, 1)
    target[0, 0, 0] = 0.6
    at = torch.tensor(math.log(0.6 / 0.4)).reshape(1, 1, 1).requires_grad_(True)
    best = varifocal_class_loss(at, target, 1.0)
    best.backward()
    assert abs(at.grad.item()) < 1e-6
    for delta in (-0.5, 0.5):
        assert varifocal_class_loss(at.detach() + delta, target, 1.0) > best
    assert torch.isclose(best, 0.6 * torch.nn.functional.binary_cross_entropy(
        torch.tensor(0.6), torch.tensor(0.6)))


def test_varifocal_criterion_targets_the_iou_each_matched_query_reached(basis):
    targets = [_target([[5, 5, 20, 30], [30, 10, 60, 40]], [0, 2]), _target([[0, 0, 30, 30]], [1])]
    out = _output(basis, K=1)
    result = SetCriterion(LossConfig(class_loss="varifocal"), basis)(out, targets, 3.0)
    stage = out.stages[0]
    expected = torch.zeros(2, Q, C)
    for b, (target, match) in enumerate(zip(targets, result.matches[0])):
        for q, g in zip(match.query_idx.tolist(), match.gt_idx.tolist()):
            gt_box = target["boxes_xyxy"][g].float()
            iou = box_iou(stage.boxes_xyxy[b, q][None].detach(), gt_box[None])[0, 0]
            expected[b, q, target["labels"][g]] = iou.clamp(min=1e-3)
    want = 2.0 * varifocal_class_loss(stage.logits, expected, 3.0)
    assert torch.isclose(result.losses["stage1/loss_class"], want)
    focal = SetCriterion(LossConfig(), basis)(out, targets, 3.0).losses["stage1/loss_class"]
    assert not torch.isclose(result.losses["stage1/loss_class"], focal)
    result.total.backward()
    assert stage.logits.grad.abs().sum() > 0


def test_class_loss_is_checked():
    with pytest.raises(ConfigError, match="class_loss"):
        LossConfig(class_loss="softmax")


def test_box_losses_by_hand():
    pred = torch.tensor([[0.0, 0, 10, 10], [0, 0, 20, 10]])
    gt = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 10]])
    scale = torch.tensor([[100.0, 50, 100, 50]] * 2)
    out = box_losses(pred, gt, scale, num_instances=2.0)
    assert torch.isclose(out["l1"], torch.tensor(10 / 100 / 2))
    assert torch.isclose(out["giou"], torch.tensor((1 - 0.5) / 2))  # IoU 0.5, hull = union


def test_dice_and_mask_losses_by_hand():
    g = torch.zeros(2, 4, 4)
    g[:, :2] = 1
    assert torch.allclose(dice_loss(g, g), torch.zeros(2), atol=1e-5)
    assert torch.allclose(dice_loss(1 - g, g), torch.ones(2))
    half = torch.full((1, 4, 4), 0.5)  # 1 - 2 * 4 / (4 + 8)
    assert torch.isclose(dice_loss(half, g[:1])[0], torch.tensor(1 / 3), atol=1e-5)
    z = torch.zeros(2, 6)
    out = mask_losses(z + 1, z, g, g, num_instances=4.0)
    assert torch.isclose(out["mask_embed"], torch.tensor(2 * 6 / 6 / 4))
    assert torch.isclose(out["mask_dice"], torch.tensor(0.0), atol=1e-5)


def test_criterion_keys_total_and_matches(basis):
    targets = [_target([[5, 5, 20, 30], [30, 10, 60, 40]], [0, 2]), _target([[0, 0, 30, 30]], [1])]
    out = _output(basis, K=3)
    result = SetCriterion(LossConfig(), basis)(out, targets)
    keys = [f"stage{k}/{name}" for k in (1, 2, 3) for name in LOSS_TERMS]
    assert list(result.losses) == keys
    assert torch.isclose(result.total, sum(result.losses.values()))
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in result.losses.values())
    assert len(result.matches) == 3 and [m.num_matched for m in result.matches[0]] == [2, 1]
    weights = LossConfig().cost_weights()
    for k, stage in enumerate(out.stages):  # the criterion's matches are the matcher's
        for b, target in enumerate(targets):
            single = hungarian_match(stage.logits[b], stage.boxes_xyxy[b], stage.mask_embed[b],
                                     prepare_target(target, basis), weights)
            assert torch.equal(single.query_idx, result.matches[k][b].query_idx)
    result.total.backward()
    assert out.stages[0].mask_embed.grad.abs().sum() > 0


def test_num_instances_normalises_every_term(basis):
    targets = [_target([[5, 5, 20, 30], [30, 10, 60, 40]], [0, 2]), _target([[0, 0, 30, 30]], [1])]
    cfg = dataclasses.replace(LossConfig(), embed_target_noise=False)
    default = SetCriterion(cfg, basis)(_output(basis), targets)
    doubled = SetCriterion(cfg, basis)(_output(basis), targets, num_instances=6.0)
    for key, value in default.losses.items():
        assert torch.isclose(doubled.losses[key], value / 2, rtol=1e-4), key
    tiny = SetCriterion(cfg, basis)(_output(basis), targets, num_instances=0.1)  # clamped to 1
    assert torch.isclose(tiny.total, default.total * 3, rtol=1e-4)


def test_empty_targets_keep_the_graph(basis):
    targets = [_target([], []), _target([], [])]
    out = _output(basis)
    result = SetCriterion(LossConfig(), basis)(out, targets)
    for key, value in result.losses.items():
        assert torch.isfinite(value)
        if not key.endswith("loss_class"):
            assert value.item() == 0.0
    assert result.losses["stage1/loss_class"] > 0
    result.total.backward()
    assert out.stages[0].logits.grad is not None and out.stages[0].boxes_xyxy.grad is not None


def test_crowd_regions_are_not_targets(basis):
    target = _target([[5, 5, 20, 30]], [0])
    with_crowd = {**target, "crowd_boxes_xyxy": torch.tensor([[30.0, 0, 60, 40]]),
                  "crowd_mask": torch.ones(48, 64, dtype=torch.bool)}
    cfg = dataclasses.replace(LossConfig(), embed_target_noise=False)
    a = SetCriterion(cfg, basis)(_output(basis, B=1), [target])
    b = SetCriterion(cfg, basis)(_output(basis, B=1), [with_crowd])
    assert torch.equal(a.total, b.total)


def test_losses_stay_float32_under_bf16_autocast(basis):
    targets = [_target([[5, 5, 20, 30]], [0]), _target([[0, 0, 30, 30]], [1])]
    out = _output(basis)
    for stage in out.stages:
        stage.logits, stage.mask_embed = stage.logits.bfloat16(), stage.mask_embed.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = SetCriterion(LossConfig(), basis)(out, targets)
    assert all(v.dtype == torch.float32 for v in result.losses.values())


def test_predicted_box_frame_for_mask_targets(basis):
    targets = [_target([[5, 5, 20, 30]], [0]), _target([[0, 0, 30, 30]], [1])]
    cfg = LossConfig(mask_target_boxes="pred", embed_target_noise=False)
    v1 = SetCriterion(dataclasses.replace(cfg, mask_target_boxes="gt"), basis)(_output(basis),
                                                                               targets)
    v2 = SetCriterion(cfg, basis)(_output(basis), targets)
    assert torch.equal(v1.losses["stage1/loss_class"], v2.losses["stage1/loss_class"])
    assert not torch.isclose(v1.losses["stage1/loss_mask_dice"], v2.losses["stage1/loss_mask_dice"])
    with pytest.raises(ConfigError, match="mask_target_boxes"):
        SetCriterion(LossConfig(mask_target_boxes="box"), basis)


def test_one_to_many_stages_give_each_instance_k_queries(basis):
    targets = [_target([[5, 5, 20, 30], [30, 10, 60, 40]], [0, 2]), _target([[0, 0, 30, 30]], [1])]
    cfg = dataclasses.replace(LossConfig(), o2m_k=3, o2m_stages=1)
    out = _output(basis, K=2)
    result = SetCriterion(cfg, basis)(out, targets)
    first, last = result.matches
    for match, target in zip(first, targets):  # stage 1: every instance three times
        G = len(target["labels"])
        assert match.num_matched == 3 * G and match.cost.shape == (Q, G)
        assert torch.bincount(match.gt_idx, minlength=G).tolist() == [3] * G
        assert len(set(match.query_idx.tolist())) == 3 * G  # distinct queries
    assert [m.num_matched for m in last] == [2, 1]  # stage 2 stays one-to-one
    plain = SetCriterion(LossConfig(), basis)(out, targets)
    assert torch.equal(plain.matches[1][0].query_idx, last[0].query_idx)
    assert not torch.isclose(result.losses["stage1/loss_l1"], plain.losses["stage1/loss_l1"])


def test_one_to_many_never_asks_for_more_queries_than_there_are(basis):
    boxes = [[i * 6.0, 0, i * 6.0 + 5, 5] for i in range(5)]  # G = 5, Q = 8: one copy fits
    cfg = dataclasses.replace(LossConfig(), o2m_k=3, o2m_stages=2)
    result = SetCriterion(cfg, basis)(_output(basis, B=1), [_target(boxes, [0, 1, 2, 0, 1])])
    assert sorted(result.matches[0][0].gt_idx.tolist()) == [0, 1, 2, 3, 4]


def test_variance_weighted_embedding_loss_is_the_error_in_the_fitted_space(basis):
    """On a whitened basis, "variance" weighting turns the MSE of whitened codes into the mean
    squared error of what they decode to in the fitted (logit) space, over the mean variance."""
    weights = embedding_weights(basis, "variance")
    assert weights.shape == (M,) and torch.isclose(weights.mean(), torch.tensor(1.0))
    assert weights[0] > weights[-1]  # leading components weigh more
    assert embedding_weights(basis, "uniform") is None
    g = torch.Generator().manual_seed(3)
    pred, gt = torch.randn(5, M, generator=g), torch.randn(5, M, generator=g)
    crops = torch.zeros(5, 4, 4)
    out = mask_losses(pred, gt, crops, crops, num_instances=5.0, embed_weights=weights)
    in_fitted_space = ((basis.decode_linear(pred) - basis.decode_linear(gt)) ** 2).sum()
    mean_variance = (basis.code_scale() ** 2).mean()
    assert torch.isclose(out["mask_embed"], in_fitted_space / M / mean_variance / 5, rtol=1e-4)
    # predicting the mean code (all zeros) for encoded masks scores about 1, weighted or not
    codes = basis.encode(torch.from_numpy(synthetic_instance_masks(300, S, seed=5)), noise=False)
    zeros, none = torch.zeros_like(codes), torch.zeros(len(codes), 4, 4)
    for w in (weights, None):
        score = mask_losses(zeros, codes, none, none, len(codes), w)["mask_embed"]
        assert 0.7 < score < 1.3
    # the criterion picks the weights from its config
    cfg = dataclasses.replace(LossConfig(), embed_weighting="variance")
    assert torch.equal(SetCriterion(cfg, basis).embed_weights, weights)
    assert SetCriterion(LossConfig(), basis).embed_weights is None
    with pytest.raises(ConfigError, match="embed_weighting"):
        LossConfig(embed_weighting="whitened")


def test_variance_weights_follow_the_whitening_floor():
    """A basis fitted with as many components as masks has components the data never varied
    along: encode floors their scale, and so must the weights (else they would be ~0 there)."""
    masks = synthetic_instance_masks(8, S, seed=4)
    basis = MaskBasis.fit(masks, dim=8, seed=0)
    weights = embedding_weights(basis, "variance")
    scale = basis.code_scale()
    variance = basis.explained_variance.float()
    assert variance[-1] < 1e-9 * variance[0]  # the floor binds on the last component
    assert torch.isclose(scale[-1], scale[0] * 1e-3)
    assert torch.allclose(weights, scale ** 2 / (scale ** 2).mean())
    assert weights[-1] > 1e-7 * weights[0]  # not the raw (vanishing) variance
    binary = MaskBasis.fit(masks, dim=4, seed=0, recipe="binary")
    assert embedding_weights(binary, "variance") is None  # not whitened: already that space


def test_configs_saved_before_the_new_loss_options_load_with_the_old_behaviour():
    from istr_viz.config import Config, get_preset

    saved = get_preset("shapes-cpu").to_dict()
    for key in ("embed_weighting", "dense_box_weight", "mask_overlap_iou"):
        del saved["loss"][key]
    del saved["model"]["aux_dense_box"]
    cfg = Config.from_dict(saved)
    assert cfg.loss.embed_weighting == "uniform" and not cfg.model.aux_dense_box
    assert cfg.loss.mask_overlap_iou == 0.0


def test_one_to_many_settings_are_checked():
    with pytest.raises(ConfigError):
        LossConfig(o2m_k=0)


def test_overlap_pairs_take_unmatched_queries_over_the_iou_with_their_best_gt():
    gt = torch.tensor([[0.0, 0, 10, 10], [20, 20, 40, 40]])
    boxes = torch.tensor([[0.0, 0, 10, 10],   # 0: GT 0 exactly (matched below)
                          [0.0, 0, 10, 20],   # 1: IoU 0.5 with GT 0
                          [0.0, 0, 10, 21],   # 2: IoU 100 / 210 < 0.5
                          [21.0, 21, 40, 40],  # 3: IoU 361 / 400 with GT 1
                          [5.0, 5, 30, 30],   # 4: overlaps both, neither by 0.5
                          [50.0, 50, 60, 60]])  # 5: nothing
    q, g = overlap_pairs(boxes, gt, torch.tensor([0]), 0.5)
    assert q.tolist() == [1, 3] and g.tolist() == [0, 1]
    q, g = overlap_pairs(boxes, gt, torch.tensor([0, 3]), 0.9)
    assert q.tolist() == [] and g.tolist() == []
    q, g = overlap_pairs(boxes, gt[:0], torch.tensor([], dtype=torch.long), 0.5)
    assert q.shape == (0,) and g.shape == (0,)


def _overlap_case(basis: MaskBasis):
    """One image, one GT; query 0 sits on it, query 1 is the same box a pixel wider, query 2 is
    far away; the rest are empty corners."""
    target = _target([[8, 8, 40, 40]], [1])
    out = _output(basis, B=1, K=1)
    stage = out.stages[0]
    with torch.no_grad():
        stage.boxes_xyxy[0] = torch.tensor([[60.0, 0, 63, 3]] * Q)
        stage.boxes_xyxy[0, :3] = torch.tensor([[8.0, 8, 40, 40], [8, 8, 41, 40],
                                                [44, 0, 64, 20]])
        stage.logits[0, 0, 1] = 8.0  # the match picks query 0
    return out, target


def test_overlap_masks_train_more_queries_and_keep_class_and_box_losses(basis):
    out, target = _overlap_case(basis)
    cfg = LossConfig(embed_target_noise=False, mask_target_boxes="pred")
    plain = SetCriterion(cfg, basis)(out, [target])
    wide = SetCriterion(dataclasses.replace(cfg, mask_overlap_iou=0.5), basis)(out, [target])
    assert plain.matches[0][0].query_idx.tolist() == [0]
    for name in ("loss_class", "loss_l1", "loss_giou"):
        assert torch.equal(plain.losses[f"stage1/{name}"], wide.losses[f"stage1/{name}"])
    assert not torch.isclose(plain.losses["stage1/loss_mask_embed"],
                             wide.losses["stage1/loss_mask_embed"])
    wide.total.backward()
    grad = out.stages[0].mask_embed.grad[0].abs().sum(-1)
    assert grad[0] > 0 and grad[1] > 0 and grad[2:].sum() == 0  # query 1 trained too, 2 not


def test_overlap_masks_average_each_instance_over_its_queries(basis):
    """Query 1 (overlapping, unmatched) gets its GT's exact code and query 0 (matched) a wrong
    one: the instance's mask loss is the mean of the two queries' losses."""
    out, target = _overlap_case(basis)
    cfg = LossConfig(embed_target_noise=False, mask_target_boxes="pred", mask_overlap_iou=0.5)
    criterion = SetCriterion(cfg, basis)
    prepared = [prepare_target(target, basis)]
    stage = out.stages[0]
    crops, codes = criterion.mask_targets(prepared, [torch.tensor([0, 0])],
                                          stage.boxes_xyxy[0, :2].detach(), torch.zeros(2).long())
    with torch.no_grad():
        stage.mask_embed[0, 0] = codes[0] + 1.0
        stage.mask_embed[0, 1] = codes[1]
    wide = criterion(out, [target])
    per_query = [mask_losses(stage.mask_embed[0, i:i + 1], codes[i:i + 1],
                             basis.decode(stage.mask_embed[0, i:i + 1]), crops[i:i + 1], 1.0,
                             criterion.embed_weights) for i in (0, 1)]
    weights = {"mask_embed": cfg.mask_embed_weight, "mask_dice": cfg.mask_dice_weight}
    for key, weight in weights.items():
        mean = (per_query[0][key] + per_query[1][key]) / 2 * weight
        assert torch.isclose(wide.losses[f"stage1/loss_{key}"], mean, rtol=1e-4), key
    assert per_query[1]["mask_embed"] == 0 and per_query[0]["mask_embed"] > 0


def test_overlap_pair_weights_are_per_instance_and_per_image(basis):
    """Two images: in the first, GT 0 has its matched query and two overlapping ones, GT 1 only
    its matched one; in the second, one GT with its matched query and one overlapping query.
    Each instance's weights sum to its matched count; pairs come image by image."""
    from istr_viz.matcher import Match

    targets = [prepare_target(_target([[0, 0, 20, 20], [30, 10, 60, 40]], [0, 2]), basis),
               prepare_target(_target([[10, 10, 40, 40]], [1]), basis)]
    out = _output(basis, B=2, K=1)
    stage = out.stages[0]
    with torch.no_grad():
        stage.boxes_xyxy[:] = torch.tensor([63.0, 47, 64, 48])  # nothing overlaps
        stage.boxes_xyxy[0, :4] = torch.tensor([[0.0, 0, 20, 20], [30, 10, 60, 40],
                                                [0, 0, 21, 20], [1, 0, 20, 20]])
        stage.boxes_xyxy[1, 5:7] = torch.tensor([[10.0, 10, 40, 40], [10, 10, 40, 41]])
    empty = torch.zeros(Q, 0)
    matches = [Match(torch.tensor([0, 1]), torch.tensor([0, 1]), empty, {}, {}),
               Match(torch.tensor([5]), torch.tensor([0]), empty, {}, {})]
    criterion = SetCriterion(LossConfig(mask_overlap_iou=0.5), basis)
    batch, query, gts, weights = criterion.mask_pairs(stage, targets, matches)
    assert batch.tolist() == [0, 0, 0, 0, 1, 1]
    assert query.tolist() == [0, 1, 2, 3, 5, 6]
    assert [g.tolist() for g in gts] == [[0, 1, 0, 0], [0, 0]]
    assert torch.allclose(weights, torch.tensor([1 / 3, 1, 1 / 3, 1 / 3, 1 / 2, 1 / 2]))
    # one-to-many: GT 0 matched twice keeps twice an instance's weight
    matches[0] = Match(torch.tensor([0, 2, 1]), torch.tensor([0, 0, 1]), empty, {}, {})
    _, query, _, weights = criterion.mask_pairs(stage, targets, matches)
    assert query[:4].tolist() == [0, 2, 1, 3]
    assert torch.allclose(weights[:4], torch.tensor([2 / 3, 2 / 3, 1, 2 / 3]))


def test_overlap_masks_leave_denoising_losses_and_the_off_state_exact(basis):
    targets = [_target([[5, 5, 20, 30], [30, 10, 60, 40]], [0, 2]), _target([[0, 0, 30, 30]], [1])]
    out = _output(basis, K=2)
    dn = _output(basis, K=2, seed=5)
    out.dn_stages = dn.stages
    out.dn_gt_index = torch.tensor([[0, 1] + [-1] * (Q - 2), [0] + [-1] * (Q - 1)])
    for stage in out.stages:  # every query overlaps an instance somewhat
        with torch.no_grad():
            stage.boxes_xyxy[0] = torch.tensor([5.0, 5, 20, 30]) + torch.rand(Q, 4)
    cfg = LossConfig(embed_target_noise=False, mask_target_boxes="pred")
    off = SetCriterion(cfg, basis)(out, targets)
    on = SetCriterion(dataclasses.replace(cfg, mask_overlap_iou=0.5), basis)(out, targets)
    dn_keys = [k for k in off.losses if "/dn_" in k]
    assert dn_keys and all(torch.equal(off.losses[k], on.losses[k]) for k in dn_keys)
    assert not torch.equal(off.losses["stage1/loss_mask_dice"], on.losses["stage1/loss_mask_dice"])
    # 0 is the code path of before: the sums of mask_losses without pair weights
    again = SetCriterion(dataclasses.replace(cfg, mask_overlap_iou=0.0), basis)(out, targets)
    assert all(torch.equal(off.losses[k], again.losses[k]) for k in off.losses)
    z, g = torch.randn(5, M), torch.rand(5, S, S).round()
    plain = mask_losses(z, z * 0, basis.decode(z), g, 2.0)
    ones = mask_losses(z, z * 0, basis.decode(z), g, 2.0, pair_weights=torch.ones(5))
    for key in plain:
        assert torch.isclose(plain[key], ones[key])


def test_mask_overlap_iou_is_checked():
    for bad in (-0.1, 1.5, True, "0.5"):
        with pytest.raises(ConfigError, match="mask_overlap_iou"):
            LossConfig(mask_overlap_iou=bad)
    assert LossConfig().mask_overlap_iou == 0.0


def test_semantic_target_map_classes_background_crowd_and_padding():
    from istr_viz.losses import semantic_target_map

    target = _target([[0, 0, 16, 16], [8, 8, 24, 24]], [2, 1], size=(32, 24))
    crowd = torch.zeros(32, 24, dtype=torch.bool)
    crowd[24:, :8] = True
    target["crowd_mask"] = crowd
    cells = semantic_target_map(target, height=10, width=8, stride=4, num_classes=3)
    assert cells.shape == (10, 8)
    assert cells[0, 0] == 2  # the first instance only
    assert cells[3, 3] == 1  # both: the later annotation is on top
    assert cells[0, 5] == 3  # background
    assert cells[7, 0] == -100  # crowd
    assert (cells[8:] == -100).all()  # rows beyond the 32 px image: padding


def _tiny_model_batch(basis: MaskBasis, **aux: bool):
    """A one-stage GroupNorm ISTR with the given training-only heads, two images and targets."""
    from istr_viz.config import ModelConfig
    from istr_viz.model import build_model

    cfg = ModelConfig(backbone="resnet18", backbone_base_channels=8, norm="gn", num_queries=4,
                      num_stages=1, hidden_dim=16, dim_dynamic=4, dim_feedforward=32, num_heads=2,
                      **aux)
    images, sizes = torch.rand(2, 3, 64, 64), torch.tensor([[64, 64], [48, 64]])
    targets = [_target([[5, 5, 20, 30]], [0], size=(64, 64)), _target([[0, 0, 30, 30]], [1])]
    return build_model(cfg, C, basis), images, sizes, targets


def test_semantic_head_trains_only_and_adds_a_loss(basis):
    model, images, sizes, targets = _tiny_model_batch(basis, aux_semantic=True)
    out = model(images, sizes)
    assert [t.shape[1] for t in out.semantic_logits] == [C + 1] * 4
    result = SetCriterion(LossConfig(), basis)(out, targets)
    assert "aux/loss_semantic" in result.losses and result.losses["aux/loss_semantic"] > 0
    result.total.backward()
    assert model.semantic_head.weight.grad.abs().sum() > 0
    model.eval()
    assert model(images, sizes).semantic_logits is None  # inference is ISTR's


def test_instance_index_map_puts_later_instances_on_top_and_pads_with_minus_one():
    from istr_viz.losses import instance_index_map

    target = _target([[0, 0, 16, 16], [8, 8, 24, 24]], [2, 1], size=(32, 24))
    index = instance_index_map(target, height=10, width=8, stride=4)
    assert index[0, 0] == 0 and index[3, 3] == 1 and index[0, 5] == -1
    assert (index[8:] == -1).all()


def test_dense_box_loss_is_zero_for_exact_distances_and_trains_the_head(basis):
    from istr_viz.losses import dense_box_loss, instance_index_map

    stride, h, w = 4, 8, 8
    target = _target([[4, 8, 20, 28]], [0], size=(32, 32))
    index = instance_index_map(target, h, w, stride)
    centres = torch.arange(h, dtype=torch.float32) * stride + stride // 2  # the labelled pixels
    cy, cx = torch.meshgrid(centres, centres, indexing="ij")
    x0, y0, x1, y1 = target["boxes_xyxy"][0]
    exact = torch.stack([cx - x0, cy - y0, x1 - cx, y1 - cy]).clamp(min=1e-3) / stride
    logits = exact.log()[None]  # (1, 4, h, w): right inside the box, anything outside it
    assert (index >= 0).sum() > 0
    assert dense_box_loss([logits], [target], [stride]) < 1e-4
    assert dense_box_loss([logits + 0.5], [target], [stride]) > 0.05  # boxes too large
    empty = _target([], [], size=(32, 32))
    zero = dense_box_loss([logits.requires_grad_(True)], [empty], [stride])
    assert zero == 0 and zero.requires_grad

    model, images, sizes, targets = _tiny_model_batch(basis, aux_dense_box=True)
    out = model(images, sizes)
    assert [t.shape[1] for t in out.dense_box_logits] == [4] * 4 and out.semantic_logits is None
    result = SetCriterion(LossConfig(dense_box_weight=2.0), basis)(out, targets)
    assert result.losses["aux/loss_dense_box"] > 0
    result.total.backward()
    assert model.dense_box_head.weight.grad.abs().sum() > 0
    model.eval()
    assert model(images, sizes).dense_box_logits is None  # inference is ISTR's
