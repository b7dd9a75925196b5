"""istr_viz.boxes: delta decoding and box normalisation, checked by hand and by round trips."""

from __future__ import annotations

import math

import pytest
import torch

from istr_viz.boxes import (DEFAULT_SCALE_CLAMP, apply_deltas, denormalize_boxes,
                            image_scale_xyxy, normalize_boxes)


def _random_boxes(n: int, width: float, height: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * torch.tensor([width, height]) * 0.7
    wh = (torch.rand(n, 2, generator=g) * 0.3 + 0.01) * torch.tensor([width, height])
    return torch.cat([xy, xy + wh], dim=1)


def test_zero_deltas_return_the_boxes():
    boxes = _random_boxes(20, 200, 100)
    assert torch.allclose(apply_deltas(torch.zeros(20, 4), boxes), boxes, atol=1e-5)


def test_deltas_by_hand():
    box = torch.tensor([[0.0, 0.0, 10.0, 20.0]])  # centre (5, 10), w 10, h 20
    # dx = 2 / wx(2) = 1 width to the right; dh = log 2 doubles the height about the centre
    deltas = torch.tensor([[2.0, 0.0, 0.0, math.log(2.0)]])
    assert torch.allclose(apply_deltas(deltas, box), torch.tensor([[10.0, -10.0, 20.0, 30.0]]))
    # custom weights: dy = 1 / wy(0.5) = 2 heights down
    out = apply_deltas(torch.tensor([[0.0, 1.0, 0.0, 0.0]]), box, weights=(1.0, 0.5, 1.0, 1.0))
    assert torch.allclose(out, torch.tensor([[0.0, 40.0, 10.0, 60.0]]))


def test_huge_deltas_are_clamped_and_finite():
    box = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    out = apply_deltas(torch.tensor([[0.0, 0.0, 1e4, 1e4]]), box)
    assert torch.isfinite(out).all()
    assert torch.allclose(out[0, 2] - out[0, 0], torch.tensor(math.exp(DEFAULT_SCALE_CLAMP)))


def test_normalise_by_hand():
    sizes = torch.tensor([[50, 100], [20, 40]])  # [H, W]
    boxes = torch.tensor([[[0.0, 0.0, 100.0, 50.0]], [[10.0, 5.0, 30.0, 15.0]]])  # (B=2, N=1, 4)
    expected = torch.tensor([[[0.5, 0.5, 1.0, 1.0]], [[0.5, 0.5, 0.5, 0.5]]])
    assert torch.allclose(normalize_boxes(boxes, sizes), expected)
    assert torch.equal(image_scale_xyxy(sizes[0]), torch.tensor([100.0, 50.0, 100.0, 50.0]))


@pytest.mark.parametrize("batched", [True, False])
def test_normalise_denormalise_round_trip(batched):
    if batched:
        sizes = torch.tensor([[120, 200], [64, 48], [300, 300]])
        boxes = torch.stack([_random_boxes(7, w, h, seed=i) for i, (h, w) in
                             enumerate(sizes.tolist())])  # (3, 7, 4)
    else:
        sizes = torch.tensor([90, 160])
        boxes = _random_boxes(7, 160, 90)
    cxcywh = normalize_boxes(boxes, sizes)
    assert cxcywh.shape == boxes.shape
    assert (cxcywh >= 0).all() and (cxcywh <= 1).all()
    assert torch.allclose(denormalize_boxes(cxcywh, sizes), boxes, atol=1e-4)
    assert torch.allclose(normalize_boxes(denormalize_boxes(cxcywh, sizes), sizes), cxcywh,
                          atol=1e-6)
