"""istr_viz.model: shapes of every stage, queries, pooler, backbone, and a tiny overfit run."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys

import pytest
import torch
from scipy.optimize import linear_sum_assignment
from torchvision.models import resnet18
from torchvision.ops import box_iou, masks_to_boxes, roi_align

from istr_viz.basis import MaskBasis
from istr_viz.config import LossConfig, ModelConfig
from istr_viz.data.instance_masks import synthetic_instance_masks
from istr_viz.errors import CheckpointError, ConfigError, NonFiniteError
from istr_viz.losses import SetCriterion
from istr_viz.model import (ISTR, ISTROutput, RoIPooler, StageOutput, assign_fpn_levels,
                            build_backbone, build_model)
from istr_viz.model.backbone import group_norm
from istr_viz.model.istr import global_image_feature, grid_proposals, valid_mask
from istr_viz.postprocess import paste_masks

Q, K, D, C, M, S = 10, 2, 32, 3, 16, 28


@pytest.fixture(scope="module")
def basis() -> MaskBasis:
    return MaskBasis.fit(synthetic_instance_masks(300, S, seed=0), dim=M, seed=0)


def tiny_model(basis: MaskBasis, seed: int = 0, **kwargs) -> ISTR:
    torch.manual_seed(seed)
    backbone = build_backbone("resnet18", out_channels=D, norm="gn", base_channels=8)
    args = dict(num_queries=Q, num_stages=K, hidden_dim=D, dim_dynamic=8, dim_feedforward=2 * D,
                num_heads=4, canonical_box_size=56.0)
    return ISTR(C, basis, backbone, **{**args, **kwargs})


# the mask heads: v1's, the roi head reading the next stage's P x P RoI, and the roi head reading
# its own finer R x R RoI (model.mask_roi_resolution)
MASK_HEADS = {"query": {"mask_head": "query"}, "roi": {"mask_head": "roi"},
              "roi-fine": {"mask_head": "roi", "mask_roi_resolution": 6}}


@pytest.fixture(scope="module")
def model(basis) -> ISTR:
    return tiny_model(basis)


def _images(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.zeros(2, 3, 64, 96)
    images[0] = torch.rand(3, 64, 96, generator=g)
    images[1, :, :50, :70] = torch.rand(3, 50, 70, generator=g)
    return images, torch.tensor([[64, 96], [50, 70]])


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("return_attention", [True, False])
def test_every_stage_has_the_documented_shapes(model, train, return_attention):
    images, sizes = _images()
    model.train(train)
    with torch.set_grad_enabled(train):
        out = model(images, sizes, return_attention=return_attention)
    model.eval()
    assert isinstance(out, ISTROutput) and out.num_stages == K and out.final is out.stages[-1]
    assert out.proposal_boxes_xyxy.shape == (2, Q, 4)
    assert out.query_features_init.shape == (2, Q, D)
    assert torch.equal(out.image_sizes, sizes)
    for stage in out.stages:
        assert isinstance(stage, StageOutput)
        assert stage.logits.shape == (2, Q, C)
        assert stage.boxes_xyxy.shape == stage.boxes_cxcywh.shape == (2, Q, 4)
        assert stage.mask_embed.shape == (2, Q, M)
        assert stage.masks.shape == (2, Q, S, S)
        assert ((stage.masks >= 0) & (stage.masks <= 1)).all()
        assert (stage.boxes_xyxy[..., 2:] > stage.boxes_xyxy[..., :2]).all()
        scale = torch.tensor([[96, 64, 96, 64], [70, 50, 70, 50]])[:, None]
        xyxy = torch.cat([stage.boxes_cxcywh[..., :2] - stage.boxes_cxcywh[..., 2:] / 2,
                          stage.boxes_cxcywh[..., :2] + stage.boxes_cxcywh[..., 2:] / 2], -1)
        assert torch.allclose(xyxy * scale, stage.boxes_xyxy, atol=1e-3)
        if return_attention:
            assert stage.attn.shape == (2, Q, Q)
            assert torch.allclose(stage.attn.sum(-1), torch.ones(2, Q), atol=1e-5)
        else:
            assert stage.attn is None


def test_initial_boxes_cover_each_valid_image(model):
    out = model(*_images())
    assert torch.allclose(out.proposal_boxes_xyxy[0], torch.tensor([0.0, 0, 96, 64]).expand(Q, 4))
    assert torch.allclose(out.proposal_boxes_xyxy[1], torch.tensor([0.0, 0, 70, 50]).expand(Q, 4))


def test_grid_proposals_tile_each_valid_image(basis):
    grid = tiny_model(basis, proposal_init="grid")
    out = grid(*_images())
    boxes = out.proposal_boxes_xyxy[1]  # (Q, 4) pixels of the 50 x 70 valid region
    centres = torch.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], 1)
    n = math.ceil(math.sqrt(Q))  # 4 x 4 cells, the first 10 used: rows 0-2
    expected_x = (torch.arange(Q) % n + 0.5) / n * 70
    expected_y = (torch.arange(Q) // n + 0.5) / n * 50
    assert torch.allclose(centres, torch.stack([expected_x, expected_y], 1), atol=1e-4)
    assert torch.allclose(boxes[:, 2] - boxes[:, 0], torch.full((Q,), 70 * 2 / n), atol=1e-4)
    assert len({tuple(b) for b in boxes.tolist()}) == Q  # every query pools its own place
    with pytest.raises(ConfigError, match="proposal_init"):
        ModelConfig(proposal_init="random")


def test_grid_proposals_alternate_two_box_sizes_as_a_checkerboard():
    boxes = grid_proposals(9, box_cells=(2.0, 1.0))  # 3 x 3 cells
    sides = boxes[:, 2].view(3, 3)
    assert torch.allclose(sides, torch.tensor([[2, 1, 2], [1, 2, 1], [2, 1, 2]]) / 3)
    assert torch.equal(boxes[:, 2], boxes[:, 3])  # square
    n = 3  # one size: every box twice its cell, as grid proposals always were
    index = torch.arange(9.0)
    old = torch.stack([(index % n + 0.5) / n, (index // n + 0.5) / n,
                       torch.full((9,), 2 / n), torch.full((9,), 2 / n)], 1)
    assert torch.allclose(grid_proposals(9), old)
    assert grid_proposals(1, box_cells=(3.0,))[0, 2] == 1.0  # never beyond the image
    for bad in ((2.0, 0.0), (), (2.0, 1.0, 0.5)):
        with pytest.raises(ConfigError, match="proposal_box_cells"):
            ModelConfig(proposal_box_cells=bad)


def test_different_images_give_different_stage1_queries(model):
    images, sizes = _images()
    images[1] = images[0]
    sizes[1] = sizes[0]
    same = model(images, sizes).query_features_init
    assert torch.allclose(same[0], same[1], atol=1e-5)
    images[1] = 1 - images[0]
    differ = model(images, sizes).query_features_init
    assert (differ[0] - differ[1]).abs().max() > 1e-2


@pytest.mark.parametrize("training", [False, True])
def test_global_feature_averages_only_the_valid_region(training):
    """Inference slices each image's valid cells, training masks the map (a cheaper backward):
    the same means either way."""
    feat = torch.full((3, 4, 8, 8), 1000.0)  # padding holds garbage
    feat[0, :, :5, :3] = 1.0  # image 0: valid region 17 x 9 px at stride 4 -> 5 x 3 cells
    feat[0, :, 4, :3] = 4.0  # its last row, which only ceil(17 / 4) = 5 rows reaches: mean 1.6
    feat[1] = 2.0
    # image 2: no valid cell; image 3: larger than the map (all of it)
    feat = torch.cat([feat, torch.full((1, 4, 8, 8), 3.0)])
    sizes = torch.tensor([[17, 9], [32, 32], [0, 9], [40, 36]])
    feat.requires_grad_(training)
    out = global_image_feature([feat, feat], (4, 4), sizes)
    assert out.requires_grad == training
    assert torch.allclose(out, torch.tensor([[3.2] * 4, [4.0] * 4, [0.0] * 4, [6.0] * 4]))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the maps' dtype, as before
        assert global_image_feature([feat.bfloat16()], (4,), sizes).dtype == torch.bfloat16
    if training:  # the gradient: 2 / cells on the valid cells (2 levels), 0 elsewhere
        out.sum().backward()
        assert torch.allclose(feat.grad[0, :, :5, :3], torch.tensor(2 / 15))
        assert feat.grad[0].sum().item() == pytest.approx(2 * 4)
        assert feat.grad[2].abs().sum() == 0 and torch.allclose(feat.grad[3], torch.tensor(2 / 64))


def test_boxes_are_detached_between_stages(basis):
    model = tiny_model(basis)
    out = model(*_images())
    out.stages[1].boxes_xyxy.sum().backward()
    assert model.proposal_boxes.weight.grad is None or model.proposal_boxes.weight.grad.eq(0).all()
    assert model.stages[0].bbox_deltas.weight.grad is None  # stage-1 deltas only feed boxes
    assert model.stages[0].ffn[0].weight.grad.abs().sum() > 0  # features are not detached
    model.zero_grad(set_to_none=True)
    model(*_images()).stages[0].boxes_xyxy.sum().backward()
    assert model.proposal_boxes.weight.grad.abs().sum() > 0  # learned proposals get gradients


def test_roi_mask_head_reads_the_output_box_and_only_the_mask_branch_does(basis):
    model = tiny_model(basis, mask_head="roi").eval()
    images, sizes = _images()
    stage = model.stages[0]
    with torch.no_grad():
        features = model.backbone(images, valid_mask(sizes, *images.shape[-2:]))
        boxes, queries, _ = model.initial_queries(features, sizes)
        roi = model.pooler(features, boxes).flatten(2).transpose(1, 2)  # input-box RoI, fixed
        before = stage(features, boxes, queries, model.pooler, roi=roi)
        # other features everywhere: only what is pooled from them now (the output box) changes
        after = stage([f + torch.randn_like(f) for f in features], boxes, queries, model.pooler,
                      roi=roi)
    assert torch.equal(before.logits, after.logits)
    assert torch.equal(before.boxes_xyxy, after.boxes_xyxy)
    assert not torch.allclose(before.mask_embed, after.mask_embed, atol=1e-4)
    expected = model.pooler(features, before.boxes_xyxy).flatten(2).transpose(1, 2)
    assert torch.allclose(before.output_roi, expected)


@pytest.mark.parametrize("kwargs, poolings", [
    ({"mask_head": "query"}, K), ({"mask_head": "roi"}, K + 1),
    # the last stage's mask branch reads its own finer RoI: nobody reads its output RoI
    ({"mask_head": "roi", "mask_roi_resolution": 6}, K),
    ({"mask_head": "roi", "mask_roi_resolution": 6, "mask_roi_first_stage": -1}, K)])
def test_roi_mask_head_hands_its_roi_to_the_next_stage(basis, kwargs, poolings):
    """Each stage takes the previous one's output RoI instead of pooling the same boxes again
    (K + 1 poolings for K stages, not 2K; K when the last stage's is read by no one), and gives
    what pooling them again would."""
    mask_head = kwargs["mask_head"]
    model = tiny_model(basis, **kwargs).eval()
    images, sizes = _images()
    calls = []
    model.pooler.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        for final_only in (True, False):
            calls.clear()
            out = model(images, sizes, final_only=final_only)
            assert len(calls) == poolings
        calls.clear()
        model.train()(images, sizes)  # training pools the same boxes
        model.eval()
        assert len(calls) == poolings
        features = model.backbone(images, valid_mask(sizes, *images.shape[-2:]))
        boxes, queries, _ = model.initial_queries(features, sizes)
        for stage, expected in zip(model.stages, out.stages):
            result = stage(features, boxes, queries, model.pooler,  # pools its boxes itself
                           mask_pooler=model.mask_pooler)
            assert (result.output_roi is None) == (mask_head == "query")
            assert torch.allclose(result.mask_embed, expected.mask_embed, atol=1e-5)
            assert torch.allclose(result.logits, expected.logits, atol=1e-5)
            boxes, queries = result.boxes_xyxy, result.query_features


def test_fine_mask_roi_is_pooled_one_level_finer_at_the_output_box(basis):
    """With mask_roi_resolution R the mask branch reads an R x R RoI of its own, pooled at the
    stage's output box with half the canonical box size (one FPN level finer); only the mask
    embedding depends on it, and the next stage still gets the P x P output RoI."""
    R = 6
    model = tiny_model(basis, mask_head="roi", mask_roi_resolution=R).eval()
    assert model.mask_pooler.output_size == R
    # one FPN level finer than the box's own, down to P2
    boxes = torch.tensor([[0.0, 0.0, 20.0, 20.0], [0.0, 0.0, 56.0, 56.0], [0, 0, 120.0, 120.0],
                          [0.0, 0.0, 400.0, 400.0]])
    box_levels = assign_fpn_levels(boxes, canonical_size=model.pooler.canonical_size)
    mask_levels = assign_fpn_levels(boxes, canonical_size=model.mask_pooler.canonical_size)
    assert box_levels.tolist() == [2, 4, 5, 5]
    assert mask_levels.tolist() == [2, 3, 4, 5]
    images, sizes = _images()
    shapes = []
    model.mask_pooler.register_forward_hook(lambda mod, args, out: shapes.append(out.shape))
    with torch.no_grad():
        features = model.backbone(images, valid_mask(sizes, *images.shape[-2:]))
        boxes, queries, _ = model.initial_queries(features, sizes)
        stage = model.stages[0]
        before = stage(features, boxes, queries, model.pooler, mask_pooler=model.mask_pooler)
        assert shapes == [(2 * Q, D, R, R)]
        # the mask RoI alone read at other features: only the mask embedding changes
        other = [f + torch.randn_like(f) for f in features]
        after = stage(features, boxes, queries, model.pooler,
                      mask_pooler=lambda maps, b: model.mask_pooler(other, b))
        expected_roi = model.pooler(features, before.boxes_xyxy).flatten(2).transpose(1, 2)
        with pytest.raises(ValueError, match="mask_pooler"):
            stage(features, boxes, queries, model.pooler)
        shapes.clear()
        model(images, sizes)
        assert len(shapes) == K  # every stage's mask branch, in training's outputs too
        shapes.clear()
        model(images, sizes, final_only=True)
        assert len(shapes) == 1  # only the last stage's heads run
    assert torch.equal(before.logits, after.logits)
    assert torch.equal(before.boxes_xyxy, after.boxes_xyxy)
    assert torch.equal(before.output_roi, after.output_roi)
    assert torch.allclose(before.output_roi, expected_roi)
    assert not torch.allclose(before.mask_embed, after.mask_embed, atol=1e-4)
    assert sum(p.numel() for p in stage.mask_roi_encoder.conv.parameters()) == D * 8 * 9 + 8


def test_fine_mask_roi_passes_gradients_to_the_features(basis):
    model = tiny_model(basis, mask_head="roi", mask_roi_resolution=6)
    pooled = []
    model.mask_pooler.register_forward_hook(lambda mod, args, out: pooled.append(out))
    out = model(*_images())
    for roi in pooled:
        roi.retain_grad()
    out.final.mask_embed.sum().backward()
    assert model.stages[-1].mask_roi_encoder.conv.weight.grad.abs().sum() > 0
    assert len(pooled) == K and pooled[-1].requires_grad  # the features are not detached
    assert pooled[-1].grad.abs().sum() > 0


def test_fine_mask_roi_can_start_at_a_later_stage(basis):
    """model.mask_roi_first_stage=k, through build_model: stages before k keep the P x P mask RoI
    encoder and never call the mask pooler; stages k.. pool and encode their own R x R RoI (in
    training with denoising queries, and in final_only inference, the last stage alone)."""
    cfg = ModelConfig(backbone="resnet18", backbone_base_channels=8, norm="gn", num_queries=Q,
                      num_stages=3, hidden_dim=D, dim_dynamic=8, dim_feedforward=2 * D,
                      num_heads=4, canonical_box_size=56.0, mask_head="roi",
                      mask_roi_resolution=6, mask_roi_first_stage=2, dn_groups=1)
    torch.manual_seed(0)
    model = build_model(cfg, C, basis)
    kinds = [type(stage.mask_roi_encoder).__name__ for stage in model.stages]
    assert kinds == ["RoIMaskEncoder", "RoIMaskConvEncoder", "RoIMaskConvEncoder"]
    calls = []
    model.mask_pooler.register_forward_hook(lambda mod, args, out: calls.append(out.shape))
    images, sizes = _images()
    targets = [{"labels": torch.tensor([1]), "boxes_xyxy": torch.tensor([[10.0, 8.0, 40.0, 30.0]]),
                "size": sizes[0]},
               {"labels": torch.tensor([0, 2]), "size": sizes[1],
                "boxes_xyxy": torch.tensor([[5.0, 5.0, 30.0, 25.0], [20.0, 10.0, 60.0, 45.0]])}]
    out = model(images, sizes, targets=targets)
    assert out.dn_stages  # the denoising queries ran
    assert len(calls) == 2  # stages 2 and 3
    out.final.mask_embed.sum().backward()
    assert model.stages[-1].mask_roi_encoder.conv.weight.grad.abs().sum() > 0
    calls.clear()
    with torch.no_grad():
        model.eval()(images, sizes, final_only=True)
    assert len(calls) == 1
    with pytest.raises(ValueError, match="mask_roi_first_stage"):
        tiny_model(basis, mask_head="roi", mask_roi_resolution=6, mask_roi_first_stage=K + 1)
    for bad in (0, 4, -4, 1.5, True):
        with pytest.raises(ConfigError, match="model.mask_roi_first_stage must be in 1..3"):
            ModelConfig(num_stages=3, mask_head="roi", mask_roi_resolution=14,
                        mask_roi_first_stage=bad)
    with pytest.raises(ValueError, match="mask_roi_first_stage"):
        tiny_model(basis, mask_head="roi", mask_roi_resolution=6, mask_roi_first_stage=-K - 1)


@pytest.mark.parametrize("num_stages, first, fine", [(3, -1, [3]), (2, -1, [2]), (4, -2, [3, 4]),
                                                     (3, -3, [1, 2, 3]), (3, 2, [2, 3])])
def test_negative_mask_roi_first_stage_counts_from_the_last_stage(basis, num_stages, first, fine):
    """-1 is the last stage whatever num_stages is, so a preset that reads the fine mask RoI in
    its last stage stays valid when a user changes the number of stages."""
    cfg = ModelConfig(backbone="resnet18", backbone_base_channels=8, norm="gn", num_queries=Q,
                      num_stages=num_stages, hidden_dim=D, dim_dynamic=8, dim_feedforward=2 * D,
                      num_heads=4, canonical_box_size=56.0, mask_head="roi",
                      mask_roi_resolution=6, mask_roi_first_stage=first)
    model = build_model(cfg, C, basis)
    got = [k for k, stage in enumerate(model.stages, start=1)
           if type(stage.mask_roi_encoder).__name__ == "RoIMaskConvEncoder"]
    assert got == fine


def test_mask_roi_resolution_is_checked(basis):
    for bad in (-1, 1):
        with pytest.raises(ConfigError, match="model.mask_roi_resolution must be 0"):
            ModelConfig(mask_head="roi", mask_roi_resolution=bad)
    with pytest.raises(ConfigError, match="needs model.mask_head='roi'"):
        ModelConfig(mask_head="query", mask_roi_resolution=14)
    with pytest.raises(ValueError, match="needs mask_head='roi'"):
        tiny_model(basis, mask_head="query", mask_roi_resolution=6)
    assert ModelConfig(mask_head="roi", mask_roi_resolution=14).mask_roi_resolution == 14


def test_mask_head_names_are_checked(basis):
    with pytest.raises(ConfigError, match="model.mask_head must be query or roi"):
        ModelConfig(mask_head="box")
    with pytest.raises(ValueError, match="mask_head"):
        tiny_model(basis, mask_head="box")


@pytest.mark.parametrize("mask_head", ["query", "roi"])
def test_non_finite_boxes_name_the_stage(basis, mask_head):
    model = tiny_model(basis, mask_head=mask_head)
    with torch.no_grad():
        model.stages[1].bbox_deltas.bias.fill_(float("nan"))
    with pytest.raises(NonFiniteError, match="^stage2 predicted non-finite boxes$"):
        model(*_images())


def test_output_containers(model):
    out = model(*_images())
    one = out[1]
    assert one.proposal_boxes_xyxy.shape == (1, Q, 4) and one.final.masks.shape == (1, Q, S, S)
    assert torch.equal(one.final.logits[0], out.final.logits[1])
    assert torch.equal(out.image(-1).final.logits[0], out.final.logits[-1])
    assert out.stacked("boxes_xyxy").shape == (K, 2, Q, 4)
    detached = out.detach().cpu().to("cpu")
    assert not detached.final.logits.requires_grad and out.final.logits.requires_grad
    assert out.final[0].logits.shape == (1, Q, C)
    half = dataclasses.replace(out, stages=[dataclasses.replace(s, logits=s.logits.bfloat16())
                                            for s in out.stages])
    back = half.float()
    assert back.final.logits.dtype == torch.float32 and back.image_sizes.dtype == torch.int64
    assert back.final.logits.requires_grad


def test_init_matches_the_reference(model):
    prior = -math.log((1 - 0.01) / 0.01)
    for stage in model.stages:
        assert torch.allclose(stage.class_logits.bias, torch.full((C,), prior))
    assert torch.allclose(model.proposal_boxes.weight, torch.tensor([0.5, 0.5, 1, 1]).expand(Q, 4))


def test_fpn_levels_by_hand():
    sides = torch.tensor([10.0, 56, 111, 112, 224, 447, 448, 2000])
    boxes = torch.stack([torch.zeros(8), torch.zeros(8), sides, sides], 1)
    assert assign_fpn_levels(boxes).tolist() == [2, 2, 2, 3, 4, 4, 5, 5]
    assert assign_fpn_levels(boxes, canonical_size=56.0).tolist() == [2, 4, 4, 5, 5, 5, 5, 5]


@pytest.mark.parametrize("kernel", ["separable", "sparse"])
def test_pooler_equals_roi_align_at_each_boxs_level(kernel):
    """Every CPU kernel (inference: separable, training: sparse) pools what torchvision's
    roi_align pools at each box's level, raw maps and prepared maps alike."""
    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(2, 4, 64 // s, 64 // s, generator=g).requires_grad_(kernel == "sparse")
             for s in (4, 8, 16, 32)]
    boxes = torch.tensor([[[0.0, 0, 10, 10], [0, 0, 64, 64]], [[5, 5, 40, 30], [1, 2, 3, 4]]])
    pooler = RoIPooler(canonical_size=32.0)
    pooled = pooler(feats, boxes)  # (4, 4, 7, 7)
    assert torch.equal(pooler(pooler.prepare(feats), boxes), pooled)
    levels = assign_fpn_levels(boxes.view(-1, 4), canonical_size=32.0)
    for row, (b, q) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        lvl = int(levels[row])
        roi = torch.cat([torch.tensor([[float(b)]]), boxes[b, q][None]], 1)
        expected = roi_align(feats[lvl - 2], roi, 7, 1 / 2**lvl, sampling_ratio=2, aligned=True)
        assert torch.allclose(pooled[row], expected[0], atol=1e-6)
    assert levels.tolist() == [2, 5, 3, 2]  # the boxes really span several levels
    same_level = torch.stack([boxes[0, :1], boxes[1, 1:]])  # both on P2: one call, no reorder
    rois = torch.tensor([[0.0, 0, 0, 10, 10], [1, 1, 2, 3, 4]])
    assert torch.allclose(pooler(feats, same_level)[1], roi_align(
        feats[0], rois, 7, 1 / 4, sampling_ratio=2, aligned=True)[1], atol=1e-6)


def test_backbone_levels_and_strides():
    backbone = build_backbone("resnet18", out_channels=16, norm="gn", base_channels=8)
    feats = backbone(torch.rand(1, 3, 64, 96))
    assert [tuple(f.shape) for f in feats] == [(1, 16, 16, 24), (1, 16, 8, 12), (1, 16, 4, 6),
                                               (1, 16, 2, 3)]
    assert backbone.strides == (4, 8, 16, 32)


@pytest.mark.parametrize("norm", ["bn", "gn"])
def test_separable_fpn_keeps_the_levels_and_cuts_the_output_convs(norm):
    torch.manual_seed(0)
    plain = build_backbone("resnet18", out_channels=16, norm=norm, base_channels=8)
    torch.manual_seed(0)
    light = build_backbone("resnet18", out_channels=16, norm=norm, base_channels=8,
                           fpn_output_conv="separable")
    x = torch.rand(2, 3, 64, 96)
    plain_feats, light_feats = plain(x), light(x)
    assert [f.shape for f in light_feats] == [f.shape for f in plain_feats]
    for block in light.fpn.layer_blocks:
        depthwise, pointwise = block[0]
        assert (depthwise.kernel_size, depthwise.groups) == ((3, 3), 16)
        assert pointwise.kernel_size == (1, 1)
        assert (len(block) == 2) == (norm == "gn")  # the FPN's norm, if any, stays after it
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(light.fpn.layer_blocks) < count(plain.fpn.layer_blocks) / 4
    sum(f.square().mean() for f in light_feats).backward()  # every new weight learns
    assert all(p.grad is not None and p.grad.abs().sum() > 0
               for p in light.fpn.layer_blocks.parameters())
    with pytest.raises(ConfigError, match="separable"):
        build_backbone("resnet18", out_channels=16, base_channels=8, fpn_output_conv="5x5")


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_zero_init_residual_starts_every_block_as_the_identity(name):
    backbone = build_backbone(name, out_channels=16, norm="bn", base_channels=8,
                              zero_init_residual=True)
    body = backbone.body.eval()
    blocks = [b for layer in (body.layer1, body.layer2, body.layer3, body.layer4) for b in layer]
    x = torch.rand(2, blocks[1].conv1.in_channels, 12, 12)
    assert torch.equal(blocks[1](x), torch.relu(x))  # no downsample: relu(x + 0)
    first = blocks[0]
    y = torch.rand(2, first.conv1.in_channels, 12, 12)
    shortcut = first.downsample(y) if first.downsample is not None else y
    assert torch.allclose(first(y), torch.relu(shortcut))
    default = build_backbone(name, out_channels=16, norm="bn", base_channels=8)
    assert all(b.bn2.weight.abs().sum() > 0 for layer in (default.body.layer1,) for b in layer)


def test_group_norm_fits_narrow_widths():
    assert [group_norm(c).num_groups for c in (256, 64, 16, 24, 8, 6)] == [32, 16, 4, 4, 2, 1]


def test_pretrained_weights_load_from_a_local_file_and_freeze_early_layers(tmp_path):
    reference = resnet18()
    path = tmp_path / "r18.pth"
    torch.save(reference.state_dict(), path)
    backbone = build_backbone("resnet18", out_channels=16, norm="frozen_bn",
                              pretrained_path=str(path))
    assert torch.equal(backbone.body.layer3[1].conv2.weight, reference.layer3[1].conv2.weight)
    assert torch.equal(backbone.body.layer2[0].bn1.running_var, reference.layer2[0].bn1.running_var)
    assert not any(p.requires_grad for p in backbone.body.layer1.parameters())
    assert not backbone.body.conv1.weight.requires_grad
    assert all(p.requires_grad for p in backbone.body.layer2.parameters())
    (tmp_path / "broken.pth").write_bytes(b"not a checkpoint")
    for bad in ("missing.pth", "broken.pth"):
        with pytest.raises(CheckpointError, match=bad):
            build_backbone("resnet18", pretrained_path=str(tmp_path / bad))


@pytest.mark.parametrize("at", range(6))
def test_freeze_backbone_at_stops_the_gradients_of_the_first_parts_only(at):
    from istr_viz.model.backbone import freeze_backbone_at

    backbone = build_backbone("resnet18", out_channels=16, norm="bn", base_channels=8)
    freeze_backbone_at(backbone.body, at)
    body = backbone.body
    parts = [[body.conv1, body.bn1], [body.layer1], [body.layer2], [body.layer3], [body.layer4]]
    for i, part in enumerate(parts):
        grads = {p.requires_grad for m in part for p in m.parameters()}
        assert grads == {i >= at}, (at, i)
    assert all(p.requires_grad for p in backbone.fpn.parameters())
    images = torch.randn(1, 3, 64, 64)
    sum(f.sum() for f in backbone(images)).backward()
    assert (body.conv1.weight.grad is None) == (at >= 1)
    assert (body.layer4[1].conv2.weight.grad is None) == (at == 5)


def test_freeze_backbone_at_refuses_points_outside_0_to_5():
    from istr_viz.model.backbone import freeze_backbone_at

    for bad in (-1, 6):
        with pytest.raises(ConfigError, match="0-5"):
            freeze_backbone_at(build_backbone("resnet18", base_channels=8).body, bad)


def test_bad_names_and_sizes_raise_config_errors(basis):
    with pytest.raises(ConfigError, match="resnet18, resnet34, resnet50, resnet101"):
        build_backbone("resnet7")
    with pytest.raises(ConfigError, match="gn"):
        build_backbone("resnet18", norm="layer")
    with pytest.raises(ConfigError, match="base_channels = 64"):
        build_backbone("resnet18", norm="gn", pretrained_path="unused.pth")
    with pytest.raises(ConfigError, match="hidden_dim"):
        ISTR(C, basis, build_backbone("resnet18", out_channels=16, base_channels=8), hidden_dim=32)


def test_build_model_reads_the_config(basis):
    cfg = dataclasses.replace(ModelConfig(), backbone="resnet18", backbone_base_channels=8,
                              norm="gn", num_queries=7, num_stages=3, hidden_dim=32,
                              dim_dynamic=4, dim_feedforward=64, num_heads=2)
    model = build_model(cfg, num_classes=5, basis=basis)
    out = model(torch.rand(1, 3, 64, 64), torch.tensor([[64, 64]]))
    assert out.num_stages == 3 and out.final.logits.shape == (1, 7, 5)
    assert ModelConfig().num_queries == 300 and ModelConfig().backbone == "resnet50"


def test_model_matcher_and_losses_import_no_ui():
    code = ("import sys, istr_viz.model, istr_viz.matcher, istr_viz.losses; "
            "print([m for m in ('matplotlib', 'gradio', 'ipywidgets') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------------------ overfit


COLORS = ((1.0, 0.1, 0.1), (0.1, 0.9, 0.1), (0.1, 0.2, 1.0))


def _scene(shapes, size: int = 64) -> tuple[torch.Tensor, dict]:
    """Grey image with coloured rectangles / ellipses; class = colour index."""
    image = torch.full((3, size, size), 0.5)
    yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    masks, labels = [], []
    for kind, label, (x0, y0, x1, y1) in shapes:
        if kind == "rect":
            mask = (xx >= x0) & (xx < x1) & (yy >= y0) & (yy < y1)
        else:
            cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
            mask = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1
        image[:, mask] = torch.tensor(COLORS[label])[:, None]
        masks.append(mask)
        labels.append(label)
    masks = torch.stack(masks)
    boxes = masks_to_boxes(masks) + torch.tensor([0.0, 0.0, 1.0, 1.0])  # pixel edges
    return image, {"boxes_xyxy": boxes, "labels": torch.tensor(labels), "masks": masks,
                   "size": torch.tensor([size, size])}


def _ap50_is_one(stage: StageOutput, b: int, target: dict) -> bool:
    """Ranked by score over all (query, class) pairs, the first G detections are true positives
    of distinct GT instances (right class, box IoU >= 0.5): precision 1 at recall 1."""
    G = len(target["labels"])
    scores, flat = stage.scores[b].flatten().topk(G)
    queries, labels = flat // C, flat % C
    iou = box_iou(stage.boxes_xyxy[b][queries], target["boxes_xyxy"])  # (G, G)
    hits = (iou >= 0.5) & (labels[:, None] == target["labels"][None])
    rows, cols = linear_sum_assignment(-hits.double().numpy())  # one-to-one, as COCOeval matches
    return bool(hits[rows, cols].all())


@pytest.mark.parametrize("mask_head", list(MASK_HEADS))
def test_overfits_two_images(basis, mask_head):
    image1, target1 = _scene([("rect", 0, (4, 6, 28, 30)), ("ellipse", 1, (34, 10, 60, 40)),
                              ("ellipse", 2, (10, 38, 40, 60))])
    image2, target2 = _scene([("ellipse", 1, (6, 4, 30, 26)), ("rect", 2, (30, 30, 58, 58))])
    images, sizes = torch.stack([image1, image2]), torch.tensor([[64, 64], [64, 64]])
    targets = [target1, target2]
    model = tiny_model(basis, seed=0, **MASK_HEADS[mask_head])
    # the roi head pools the output box, so it learns the masks in that frame
    criterion = SetCriterion(LossConfig(mask_target_boxes="gt" if mask_head == "query" else "pred"),
                             basis)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, [225], 0.1)
    first = None
    for _ in range(300):
        result = criterion(model(images, sizes), targets)
        optimizer.zero_grad()
        result.total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        first = first if first is not None else result.total.item()
    assert result.total.item() < first / 20

    model.eval()
    with torch.no_grad():
        out = model(images, sizes)
    matches = criterion(out, targets).matches[-1]
    for b, (target, match) in enumerate(zip(targets, matches)):
        assert _ap50_is_one(out.final, b, target)
        boxes = out.final.boxes_xyxy[b][match.query_idx]
        pasted = paste_masks(out.final.masks[b][match.query_idx], boxes, 64, 64)  # (G, 64, 64)
        gt = target["masks"][match.gt_idx]
        mask_iou = (pasted & gt).flatten(1).sum(1) / (pasted | gt).flatten(1).sum(1)
        assert mask_iou.min() >= 0.8, mask_iou


@pytest.mark.parametrize("mask_head", list(MASK_HEADS))
def test_weights_cast_for_autocast_give_the_same_outputs(basis, mask_head):
    from istr_viz.runtime import cast_weights_for_autocast

    reference = tiny_model(basis, **MASK_HEADS[mask_head]).eval()
    cast = cast_weights_for_autocast(tiny_model(basis, **MASK_HEADS[mask_head]).eval(),
                                     torch.bfloat16)
    linear = cast.stages[0].dynamic_conv.dynamic_layer
    assert linear.weight.dtype == torch.bfloat16
    assert cast.stages[0].norm1.weight.dtype == torch.float32  # norms stay fp32
    images, sizes = _images()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = reference(images, sizes), cast(images, sizes)
    for sa, sb in zip(a.stages, b.stages):
        assert torch.equal(sa.boxes_xyxy, sb.boxes_xyxy)
        assert torch.equal(sa.logits, sb.logits) and torch.equal(sa.masks, sb.masks)
    with pytest.raises(RuntimeError):  # without autocast the cast layers refuse fp32 inputs
        with torch.no_grad():
            cast(images, sizes)


@pytest.mark.parametrize("mask_head", list(MASK_HEADS))
def test_final_only_gives_the_last_stage_without_the_earlier_heads(basis, mask_head):
    """``final_only`` skips the class and mask heads of stages 1..K-1 (they never run) and
    returns the last stage alone, equal to the last of all stages."""
    model = tiny_model(basis, **MASK_HEADS[mask_head]).eval()
    images, sizes = _images()
    head_calls = []
    for stage in model.stages:
        stage.cls_branch.register_forward_hook(lambda *args: head_calls.append(1))
        stage.mask_branch.register_forward_hook(lambda *args: head_calls.append(1))
    with torch.no_grad():
        full = model(images, sizes)
        assert len(head_calls) == 2 * K
        head_calls.clear()
        fast = model(images, sizes, final_only=True)
    assert len(head_calls) == 2  # the last stage's two heads only
    assert fast.num_stages == 1
    for name in ("logits", "boxes_xyxy", "boxes_cxcywh", "mask_embed", "masks"):
        assert torch.equal(getattr(fast.final, name), getattr(full.final, name)), name
    with pytest.raises(ValueError, match="inference"):
        model.train()(images, sizes, final_only=True)


def test_inference_is_the_same_with_either_roialign_kernel(basis):
    """At the shipped canonical size (112; its mask pooler 224) CPU inference pools with
    torchvision's kernel per level; forcing the separable kernel on both poolers gives the same
    boxes, classes and masks up to float rounding."""
    model = tiny_model(basis, canonical_box_size=112.0, mask_head="roi",
                       mask_roi_resolution=6).eval()
    assert not model.pooler.separable_inference and not model.mask_pooler.separable_inference
    images, sizes = _images()
    with torch.no_grad():
        by_level = model(images, sizes, final_only=True).final
        for pooler in (model.pooler, model.mask_pooler):
            pooler.separable_inference = True
        separable = model(images, sizes, final_only=True).final
    assert torch.allclose(by_level.boxes_xyxy, separable.boxes_xyxy, atol=1e-3)
    assert torch.allclose(by_level.logits, separable.logits, atol=1e-4)
    assert torch.allclose(by_level.masks, separable.masks, atol=1e-4)


@pytest.mark.parametrize("value", [-1.0, float("nan"), float("inf"), 17.0, True, "3"])
def test_queries_per_instance_rejects_what_is_not_a_number_in_0_to_16(value):
    with pytest.raises(ConfigError, match="model.queries_per_instance must be a number in 0..16"):
        ModelConfig(queries_per_instance=value)
