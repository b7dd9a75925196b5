"""istr_viz.matcher: cost terms, optimality by brute force, empty and non-finite cases."""

from __future__ import annotations

import itertools

import pytest
import torch
from torchvision.ops import generalized_box_iou

from istr_viz.basis import MaskBasis
from istr_viz.config import LossConfig
from istr_viz.data.instance_masks import synthetic_instance_masks
from istr_viz.matcher import (COST_TERMS, NonFiniteCostError, crop_gt_masks, hungarian_match,
                              match_batch, match_costs, prepare_target)
from istr_viz.model.outputs import StageOutput

S, M, C = 28, 12, 4
WEIGHTS = LossConfig().cost_weights()


@pytest.fixture(scope="module")
def basis() -> MaskBasis:
    return MaskBasis.fit(synthetic_instance_masks(200, S, seed=1), dim=M, seed=0)


def _target(G: int, seed: int = 0, size=(60, 80)) -> dict:
    g = torch.Generator().manual_seed(seed)
    H, W = size
    xy = torch.rand(G, 2, generator=g) * torch.tensor([W * 0.6, H * 0.6])
    wh = torch.rand(G, 2, generator=g) * torch.tensor([W * 0.3, H * 0.3]) + 4
    boxes = torch.cat([xy, xy + wh], 1).round()
    masks = torch.zeros(G, H, W, dtype=torch.bool)
    for i, (x0, y0, x1, y1) in enumerate(boxes.long().tolist()):
        masks[i, y0:y1, x0:(x0 + x1) // 2 + 1] = True  # left half of the box
    return {"boxes_xyxy": boxes, "labels": torch.randint(0, C, (G,), generator=g),
            "masks": masks, "size": torch.tensor([H, W])}


def _predictions(Q: int, seed: int = 0, size=(60, 80)) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed + 100)
    H, W = size
    xy = torch.rand(Q, 2, generator=g) * torch.tensor([W * 0.6, H * 0.6])
    wh = torch.rand(Q, 2, generator=g) * torch.tensor([W * 0.3, H * 0.3]) + 2
    return (torch.randn(Q, C, generator=g) * 2, torch.cat([xy, xy + wh], 1),
            torch.randn(Q, M, generator=g))


@pytest.mark.parametrize("seed", range(5))
def test_match_is_optimal_by_brute_force(basis, seed):
    target = prepare_target(_target(3, seed), basis)
    match = hungarian_match(*_predictions(5, seed), target, WEIGHTS)
    assert match.cost.shape == (5, 3) and match.num_matched == 3
    assert torch.allclose(sum(match.terms.values()), match.cost)
    best = min(sum(match.cost[q, g] for g, q in enumerate(perm))
               for perm in itertools.permutations(range(5), 3))
    found = match.cost[match.query_idx, match.gt_idx].sum()
    assert torch.isclose(found, torch.as_tensor(best), atol=1e-5)
    assert sorted(match.gt_idx.tolist()) == [0, 1, 2]
    assert match.gt_of_query(5)[match.query_idx].tolist() == match.gt_idx.tolist()


def test_terms_equal_their_definitions_pair_by_pair(basis):
    raw = _target(3, seed=7)
    target = prepare_target(raw, basis)
    logits, boxes, embed = _predictions(4, seed=7)
    terms = match_costs(logits, boxes, embed, target, WEIGHTS)
    assert set(terms) == set(COST_TERMS)
    scale = torch.tensor([80.0, 60, 80, 60])
    for q, g in itertools.product(range(4), range(3)):
        p = torch.sigmoid(logits[q, raw["labels"][g]])
        focal = 0.25 * (1 - p) ** 2 * -torch.log(p + 1e-8) - 0.75 * p**2 * -torch.log(1 - p + 1e-8)
        l1 = (boxes[q] / scale - raw["boxes_xyxy"][g] / scale).abs().sum()
        giou = generalized_box_iou(boxes[q][None], raw["boxes_xyxy"][g][None])[0, 0]
        z_gt = basis.encode(crop_gt_masks(raw["masks"][g][None], raw["boxes_xyxy"][g][None], S)
                            .float(), noise=False)[0]
        cos = torch.nn.functional.cosine_similarity(embed[q], z_gt, dim=0)
        assert torch.isclose(terms["class"][q, g], 2 * focal, atol=1e-5)
        assert torch.isclose(terms["l1"][q, g], 5 * l1, atol=1e-5)
        assert torch.isclose(terms["giou"][q, g], -2 * giou, atol=1e-5)
        assert torch.isclose(terms["mask"][q, g], -2 * (cos + 1) / 2, atol=1e-5)


def test_mask_cost_is_minus_one_for_the_gt_embedding(basis):
    target = prepare_target(_target(3, seed=2), basis)
    logits, boxes, _ = _predictions(3, seed=2)
    raw = match_costs(logits, boxes, target.mask_embed * 3.0, target, {**WEIGHTS, "mask": 1.0})
    assert torch.allclose(raw["mask"].diagonal(), torch.full((3,), -1.0), atol=1e-5)
    assert (raw["mask"] >= -1 - 1e-5).all() and (raw["mask"] <= 0).all()


@pytest.mark.parametrize("field, term", [(0, "class"), (1, "l1"), (2, "mask")])
def test_non_finite_cost_names_its_term(basis, field, term):
    target = prepare_target(_target(2), basis)
    predictions = list(_predictions(4))
    predictions[field] = predictions[field].clone()
    predictions[field][1] = float("nan")  # one query diverged
    with pytest.raises(NonFiniteCostError, match=repr(term)) as err:
        hungarian_match(*predictions, target, WEIGHTS)
    assert err.value.term == term and isinstance(err.value, ValueError)


def test_no_ground_truth_gives_an_empty_match(basis):
    raw = _target(0)
    match = hungarian_match(*_predictions(6), prepare_target(raw, basis), WEIGHTS)
    assert match.num_matched == 0 and match.query_idx.dtype == torch.long
    assert match.cost.shape == (6, 0) and all(t.shape == (6, 0) for t in match.terms.values())
    assert match.gt_of_query(6).eq(-1).all()


def test_crop_gt_masks_by_hand():
    masks = torch.zeros(2, 40, 40, dtype=torch.bool)
    masks[0, 10:30, 10:30] = True  # fills its box
    masks[1, 0:20, 0:10] = True  # left half of the box (0, 0, 20, 20)
    crops = crop_gt_masks(masks, torch.tensor([[10.0, 10, 30, 30], [0, 0, 20, 20]]), 8)
    assert crops.dtype == torch.bool and crops.shape == (2, 8, 8)
    assert crops[0].all()
    assert crops[1, :, :4].all() and not crops[1, :, 4:].any()
    assert crop_gt_masks(masks[:0], torch.zeros(0, 4), 8).shape == (0, 8, 8)


def test_match_batch_equals_matching_each_image(basis):
    raws = [_target(3, seed=3), _target(0, seed=4), _target(2, seed=5)]
    preds = [_predictions(5, seed=s) for s in (3, 4, 5)]
    logits, boxes, embed = (torch.stack(p) for p in zip(*preds))
    stage = StageOutput(logits=logits, boxes_xyxy=boxes, boxes_cxcywh=boxes / 80,
                        mask_embed=embed, masks=basis.decode(embed))
    matches = match_batch(stage, raws, basis, WEIGHTS)
    for raw, pred, match in zip(raws, preds, matches):
        single = hungarian_match(*pred, prepare_target(raw, basis), WEIGHTS)
        assert torch.equal(single.query_idx, match.query_idx)
        assert torch.equal(single.gt_idx, match.gt_idx)
        assert torch.allclose(single.cost, match.cost)
    assert [m.num_matched for m in matches] == [3, 0, 2]
