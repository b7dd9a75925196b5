"""A tiny random ISTR, tiny shapes data and drawing helpers shared by the viz and explorer tests."""

from __future__ import annotations

import pytest
import torch
from matplotlib.patches import Rectangle

from istr_viz.basis import MaskBasis
from istr_viz.config import ModelConfig
from istr_viz.data.coco import CocoDataset
from istr_viz.data.instance_masks import synthetic_instance_masks
from istr_viz.data.shapes import make_shapes
from istr_viz.data.transforms import TransformConfig, build_transform
from istr_viz.model import build_model
from istr_viz.predictor import Predictor

TINY = ModelConfig(backbone="resnet18", backbone_base_channels=8, norm="gn", num_queries=8,
                   num_stages=3, hidden_dim=32, dim_dynamic=8, dim_feedforward=64, num_heads=2,
                   canonical_box_size=32)
Q, K = TINY.num_queries, TINY.num_stages
MIN_SIZE, MAX_SIZE = 64, 96


# ----------------------------------------------------------------------------- shared builders


def tiny_dataset(root) -> CocoDataset:
    """4 shapes images of 64 px (train split) with the evaluation transform."""
    make_shapes(root, 4, 2, 64, progress=False)
    transform = build_transform(TransformConfig((MIN_SIZE,), MAX_SIZE), train=False)
    return CocoDataset(root / "train" / "annotations.json", root / "train" / "images", transform)


def tiny_model(num_classes: int) -> torch.nn.Module:
    """A random tiny ISTR whose learned proposals are spread over the image (seeded)."""
    basis = MaskBasis.fit(synthetic_instance_masks(500, 28), dim=12, seed=0)
    torch.manual_seed(0)
    model = build_model(TINY, num_classes, basis)
    with torch.no_grad():  # the default proposals all cover the whole image
        model.proposal_boxes.weight[:, :2] = torch.rand(Q, 2) * 0.6 + 0.2
        model.proposal_boxes.weight[:, 2:] = torch.rand(Q, 2) * 0.3 + 0.15
    return model.eval()


def tiny_predictor(model, dataset) -> Predictor:
    names = dataset.class_names
    return Predictor(model, names, list(range(1, len(names) + 1)), MIN_SIZE, MAX_SIZE,
                     device="cpu")


def patches_with(ax, linestyle: str) -> list[Rectangle]:
    """The Rectangle patches of ``ax`` drawn with ``linestyle`` ("-", "--" or ":")."""
    aliases = {"-": {"-", "solid"}, "--": {"--", "dashed"}, ":": {":", "dotted"}}[linestyle]
    return [p for p in ax.patches if isinstance(p, Rectangle) and p.get_linestyle() in aliases]


def rect_xyxy(patch: Rectangle) -> list[float]:
    x, y = patch.get_xy()
    return [x, y, x + patch.get_width(), y + patch.get_height()]


def panels(fig) -> list:
    """Visible axes of ``fig`` that are not colour bars."""
    return [ax for ax in fig.axes if ax.get_visible() and ax.get_label() != "<colorbar>"]


# ----------------------------------------------------------------------------- fixtures
# (import them into a test module: ``from tiny_viz import dataset, model, forward_calls``)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return tiny_dataset(tmp_path_factory.mktemp("shapes"))


@pytest.fixture(scope="module")
def model(dataset):
    return tiny_model(dataset.num_classes)


@pytest.fixture
def forward_calls(model):
    """A list that grows by one each time the model runs."""
    calls = []
    handle = model.register_forward_hook(lambda *args: calls.append(1))
    yield calls
    handle.remove()
