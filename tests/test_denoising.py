"""Query denoising: noised GT boxes as extra training queries, hidden from the learned ones."""

from __future__ import annotations

import torch

from istr_viz.basis import MaskBasis
from istr_viz.config import LossConfig, ModelConfig
from istr_viz.data.instance_masks import synthetic_instance_masks
from istr_viz.losses import SetCriterion
from istr_viz.model import build_model
from istr_viz.model.denoising import make_denoising_queries, noise_boxes
from test_losses import _target as loss_target


def _target(boxes, labels, size=(64, 64)) -> dict:
    return loss_target(boxes, labels, size)


def test_noised_boxes_stay_near_their_box_and_inside_the_image():
    boxes = torch.tensor([[10.0, 10, 30, 50], [0, 0, 64, 64]])
    g = torch.Generator().manual_seed(0)
    noised = torch.stack([noise_boxes(boxes, 0.4, torch.tensor([64, 64]), g) for _ in range(200)])
    half = torch.tensor([10.0, 20, 10, 20])
    assert ((noised[:, 0] - boxes[0]).abs() <= 0.4 * half + 1e-4).all()
    assert (noised[..., :2] >= 0).all() and (noised[..., 2:] <= 64).all()
    assert (noised[..., 2:] - noised[..., :2] >= 1).all()
    assert noised[:, 0].std(0).min() > 0.5  # it does move


def test_queries_slots_and_attention_mask():
    targets = [_target([[5, 5, 20, 30], [30, 10, 60, 40]], [0, 2]), _target([[0, 0, 30, 30]], [1])]
    Q, groups = 4, 3
    dn = make_denoising_queries(targets, Q, groups, num_classes=3, label_noise=0.0,
                                generator=torch.Generator().manual_seed(1))
    N = groups * 2
    assert dn.boxes_xyxy.shape == (2, N, 4) and dn.attn_mask.shape == (2, Q + N, Q + N)
    assert dn.gt_index.tolist() == [[0, 1, 0, 1, 0, 1], [0, -1, 0, -1, 0, -1]]
    assert dn.labels[0].tolist() == [0, 2] * 3  # no label noise: the true labels
    m = dn.attn_mask[0]
    assert not m[:Q, :Q].any() and m[:Q, Q:].all()  # learned queries see only each other
    assert not m[Q:, :Q].any()  # denoising queries see the learned ones
    assert not m[Q, Q + 1] and m[Q, Q + 2]  # own group yes, the next group no
    assert dn.attn_mask[1][:, Q + 1].all()  # nobody attends to image 1's padding slots
    assert (~dn.attn_mask).any(-1).all()  # every row attends to something
    assert make_denoising_queries([_target([], [])], Q, groups, 3) is None


def test_denoising_trains_only_and_is_supervised_without_matching():
    basis = MaskBasis.fit(synthetic_instance_masks(200, 28, seed=2), dim=12, seed=0)
    cfg = ModelConfig(backbone="resnet18", backbone_base_channels=8, norm="gn", num_queries=4,
                      num_stages=2, hidden_dim=16, dim_dynamic=4, dim_feedforward=32, num_heads=2,
                      dn_groups=2)
    model = build_model(cfg, 3, basis)
    targets = [_target([[5, 5, 20, 30], [30, 10, 60, 40]], [0, 2]), _target([[0, 0, 30, 30]], [1])]
    images, sizes = torch.rand(2, 3, 64, 64), torch.tensor([[64, 64], [64, 64]])
    out = model(images, sizes, targets=targets)
    assert len(out.dn_stages) == 2 and out.dn_stages[0].logits.shape == (2, 4, 3)
    assert out.stages[0].logits.shape == (2, 4, 3)  # the learned queries are still Q = 4
    result = SetCriterion(LossConfig(), basis)(out, targets)
    assert {"stage1/dn_loss_class", "stage2/dn_loss_giou"} <= set(result.losses)
    result.total.backward()
    assert model.label_embed.weight.grad.abs().sum() > 0
    model.eval()  # inference: no denoising queries, and the same outputs with or without targets
    with torch.no_grad():
        a, b = model(images, sizes), model(images, sizes, targets=targets)
    assert a.dn_stages is None and torch.equal(a.final.logits, b.final.logits)


def test_learned_queries_do_not_depend_on_the_denoising_ones():
    """The attention mask works: adding denoising queries leaves the learned queries' outputs."""
    basis = MaskBasis.fit(synthetic_instance_masks(200, 28, seed=2), dim=12, seed=0)
    cfg = ModelConfig(backbone="resnet18", backbone_base_channels=8, norm="gn", num_queries=4,
                      num_stages=2, hidden_dim=16, dim_dynamic=4, dim_feedforward=32, num_heads=2,
                      dn_groups=2)
    torch.manual_seed(0)
    model = build_model(cfg, 3, basis)  # training mode; no dropout in this configuration
    images, sizes = torch.rand(1, 3, 64, 64), torch.tensor([[64, 64]])
    with torch.no_grad():
        plain = model(images, sizes)
        with_dn = model(images, sizes, targets=[_target([[5, 5, 20, 30]], [0])])
    assert with_dn.dn_stages is not None
    for s0, s1 in zip(plain.stages, with_dn.stages):
        assert torch.allclose(s0.logits, s1.logits, atol=1e-5)
        assert torch.allclose(s0.boxes_xyxy, s1.boxes_xyxy, atol=1e-4)


def test_padding_slots_are_left_out_of_the_class_loss():
    from istr_viz.losses import focal_class_loss

    logits = torch.randn(1, 3, 2)
    target = torch.tensor([[0, 2, 2]])  # query 0: class 0, queries 1-2: negatives
    full = focal_class_loss(logits, target, 1.0)
    masked = focal_class_loss(logits, target, 1.0, query_mask=torch.tensor([[True, True, False]]))
    only_two = focal_class_loss(logits[:, :2], target[:, :2], 1.0)
    assert torch.isclose(masked, only_two) and masked < full

