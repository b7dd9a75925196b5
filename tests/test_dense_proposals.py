"""istr_viz.model.dense_proposals: stage-1 boxes picked from the dense heads' maps."""

import math

import numpy as np
import pytest
import torch

from istr_viz.basis import MaskBasis
from istr_viz.config import ModelConfig
from istr_viz.errors import ConfigError
from istr_viz.model import build_model
from istr_viz.model.dense_proposals import cell_boxes, select_dense_proposals


def test_cell_boxes_are_the_predicted_distances_around_each_cell_centre():
    logits = torch.zeros(1, 4, 2, 3)
    logits[0, :, 1, 2] = torch.tensor([math.log(2.0), 0.0, math.log(3.0), math.log(0.5)])
    boxes = cell_boxes(logits, stride=8)  # (1, 2, 3, 4)
    assert boxes.shape == (1, 2, 3, 4)
    # cell (0, 0): centre (4, 4), one stride to each side
    assert torch.allclose(boxes[0, 0, 0], torch.tensor([-4.0, -4.0, 12.0, 12.0]))
    # cell (1, 2): centre x = 2 * 8 + 4 = 20, y = 12
    assert torch.allclose(boxes[0, 1, 2], torch.tensor([20 - 16.0, 12 - 8.0, 20 + 24.0, 12 + 4.0]))


def _maps(h, w, classes=2, stride=8):
    """Background everywhere, boxes one stride to each side: (1, C + 1, h, w), (1, 4, h, w)."""
    sem = torch.zeros(1, classes + 1, h, w)
    sem[:, -1] = 5.0
    return sem, torch.zeros(1, 4, h, w)


def test_peaks_propose_their_boxes_best_first_and_nms_drops_a_duplicate():
    stride, h, w = 8, 6, 8
    sem, box = _maps(h, w)
    feat = torch.arange(h * w, dtype=torch.float32).view(1, 1, h, w).repeat(1, 3, 1, 1)
    for (r, c), logit in {(1, 1): 4.0, (4, 6): 6.0, (4, 4): 2.0}.items():
        sem[0, 0, r, c] = logit
    # (4, 4) predicts a box that covers (4, 6)'s almost entirely: NMS keeps the better one
    box[0, :, 4, 4] = torch.tensor([math.log(1.0), 0.0, math.log(3.0), 0.0])
    box[0, :, 4, 6] = torch.tensor([math.log(1.0), 0.0, math.log(1.0), 0.0])
    box[0, 2, 4, 6] = math.log(1.2)
    box[0, 0, 4, 6] = math.log(3.0)
    out = select_dense_proposals([feat], [sem], [box], (stride,), torch.tensor([[48, 64]]), num=4,
                                 nms_iou=0.5)
    assert out.filled[0].tolist() == [True, True, False, False]
    # (4, 6): centre (52, 36), 3 strides left, 1.2 right, 1 up and down
    assert torch.allclose(out.boxes_xyxy[0, 0], torch.tensor([28.0, 28.0, 61.6, 44.0]))
    assert torch.allclose(out.boxes_xyxy[0, 1], torch.tensor([4.0, 4.0, 20.0, 20.0]))
    assert out.scores[0, 0] > out.scores[0, 1] > 0 and out.scores[0, 2:].eq(0).all()
    # each proposal carries its cell's feature; empty slots carry zeros
    assert out.features[0, :, 0].tolist() == [4 * w + 6, 1 * w + 1, 0.0, 0.0]


def test_cells_outside_the_valid_image_non_peaks_and_background_propose_nothing():
    stride, h, w = 8, 4, 8
    sem, box = _maps(h, w)
    sem[0, 1, 1, 6] = 9.0  # in the padding: the image is 32 x 40 px, 5 columns of cells
    sem[0, 1, 2, 2] = 3.0
    sem[0, 1, 2, 3] = 2.0  # next to a better cell: not a local maximum
    out = select_dense_proposals([torch.zeros(1, 2, h, w)], [sem], [box], (stride,),
                                 torch.tensor([[32, 40]]), num=3)
    assert out.filled[0].tolist() == [True, False, False]
    assert torch.allclose(out.boxes_xyxy[0, 0], torch.tensor([12.0, 12.0, 28.0, 28.0]))


def _small_cfg(**kw):
    return ModelConfig(backbone="resnet18", backbone_base_channels=8, num_queries=5,
                       num_stages=2, hidden_dim=16, dim_dynamic=4, dim_feedforward=32,
                       num_heads=2, norm="gn", **kw)


def test_dense_init_needs_both_dense_heads():
    with pytest.raises(ConfigError, match="aux_dense_box"):
        _small_cfg(proposal_init="dense", aux_semantic=True)


def test_a_dense_model_starts_each_image_from_its_own_boxes_in_training_and_inference():
    rng = np.random.default_rng(0)
    basis = MaskBasis.fit((rng.random((40, 28, 28)) > 0.5).astype(np.float32), dim=4)
    torch.manual_seed(0)
    model = build_model(_small_cfg(proposal_init="dense", aux_semantic=True, aux_dense_box=True),
                        3, basis)
    images = torch.rand(2, 3, 96, 128)
    sizes = torch.tensor([[96, 128], [64, 96]])
    model.train()
    out = model(images, sizes)
    assert out.semantic_logits is not None and out.dense_box_logits is not None
    out.stages[-1].boxes_xyxy.sum().backward()
    assert model.semantic_head.weight.grad is None  # the picked boxes are detached
    model.eval()
    with torch.no_grad():
        out = model(images, sizes)
    boxes = out.proposal_boxes_xyxy
    assert out.semantic_logits is None  # the dense maps are not returned at inference
    assert not torch.allclose(boxes[0], boxes[1])
    assert (boxes[1, :, 2] <= 96).all() and (boxes[1, :, 3] <= 64).all()
