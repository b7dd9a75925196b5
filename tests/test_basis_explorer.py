"""BasisExplorer: driving its controls changes what it shows, and what it shows is right."""

from __future__ import annotations

import ipywidgets
import numpy as np
import pytest
import torch

from istr_viz.basis import MaskBasis
from istr_viz.data.instance_masks import synthetic_instance_masks
from istr_viz.widgets import BasisExplorer

SIZE, DIM = 16, 10
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def masks() -> np.ndarray:
    return synthetic_instance_masks(120, SIZE, seed=0)


@pytest.fixture(scope="module")
def bases(masks) -> dict[str, MaskBasis]:
    return {recipe: MaskBasis.fit(masks, dim=DIM, recipe=recipe) for recipe in ("istr", "binary")}


def expected_reconstruction(basis: MaskBasis, mask: np.ndarray, k: int) -> np.ndarray:
    return basis.decode(basis.encode(torch.from_numpy(mask), k=k, noise=False)).numpy()


@pytest.mark.parametrize("recipe", ["istr", "binary"])
def test_instance_and_k_drive_the_reconstruction(recipe, bases, masks):
    basis = bases[recipe]
    explorer = BasisExplorer(basis, masks[:30])
    assert explorer.k == DIM and explorer.k_slider.max == DIM and explorer.k_slider.min == 1
    assert explorer.instance_slider.max == 29
    before = bytes(explorer.reconstruction_image.value)
    explorer.instance_slider.value = 7
    explorer.k_slider.value = 3
    assert (explorer.instance, explorer.k) == (7, 3)
    expected = expected_reconstruction(basis, masks[7], 3)
    np.testing.assert_allclose(explorer.reconstruction, expected, atol=1e-6)
    np.testing.assert_array_equal(explorer.mask, masks[7])
    np.testing.assert_allclose(explorer.error, expected - masks[7], atol=1e-6)
    full_code = basis.encode(torch.from_numpy(masks[7]), noise=False).numpy()
    np.testing.assert_allclose(explorer.code, full_code, atol=1e-5)
    iou = ((expected >= 0.5) & masks[7]).sum() / ((expected >= 0.5) | masks[7]).sum()
    assert explorer.iou == pytest.approx(iou)
    png = bytes(explorer.reconstruction_image.value)
    assert png.startswith(PNG_MAGIC) and png != before
    assert "IoU" in explorer.summary.value and "k = 3" in explorer.summary.value


def test_more_components_reconstruct_better(bases, masks):
    explorer = BasisExplorer(bases["istr"], masks, k=1, instance=4)
    error_k1 = np.abs(explorer.error).mean()
    explorer.k_slider.value = DIM
    assert np.abs(explorer.error).mean() < error_k1
    np.testing.assert_allclose(explorer.reconstruction,
                               expected_reconstruction(bases["istr"], masks[4], DIM), atol=1e-6)


@pytest.mark.parametrize("recipe", ["istr", "binary"])
def test_component_walk_shows_decode_of_c_times_e_j(recipe, bases, masks):
    basis = bases[recipe]
    explorer = BasisExplorer(basis, masks)
    before = bytes(explorer.walk_image.value)
    explorer.component_picker.value = 2
    explorer.coefficient_slider.value = -1.5
    assert (explorer.component, explorer.coefficient) == (2, -1.5)
    c = -1.5 if recipe == "istr" else -1.5 * float(basis.explained_variance[2].sqrt())
    e_j = torch.zeros(DIM)
    e_j[2] = 1.0
    np.testing.assert_allclose(explorer.walk_coefficients, (c * e_j).numpy(), rtol=1e-6)
    np.testing.assert_allclose(explorer.walk_mask, basis.decode(c * e_j).numpy(), atol=1e-6)
    walk_png = bytes(explorer.walk_image.value)
    assert walk_png.startswith(PNG_MAGIC) and walk_png != before
    explorer.coefficient_slider.value = 0.0
    mean = basis.decode(torch.zeros(DIM)).numpy()
    np.testing.assert_allclose(explorer.walk_mask, mean, atol=1e-6)


def test_walk_does_not_touch_the_reconstruction(bases, masks):
    explorer = BasisExplorer(bases["istr"], masks, k=4, instance=2)
    shown = explorer.reconstruction.copy()
    png = bytes(explorer.reconstruction_image.value)
    explorer.component_picker.value = 5
    np.testing.assert_array_equal(explorer.reconstruction, shown)
    assert bytes(explorer.reconstruction_image.value) == png


def test_widget_is_a_vbox_holding_every_control(bases, masks):
    explorer = BasisExplorer(bases["istr"], masks)
    box = explorer.widget
    assert isinstance(box, ipywidgets.VBox)

    def walk(widget):
        yield widget
        for child in getattr(widget, "children", ()):
            yield from walk(child)

    inside = list(walk(box))
    for control in (explorer.instance_slider, explorer.k_slider, explorer.component_picker,
                    explorer.coefficient_slider, explorer.reconstruction_image,
                    explorer.walk_image):
        assert any(control is w for w in inside)
    assert [value for _, value in explorer.component_picker.options] == list(range(DIM))


def test_masks_of_the_wrong_size_are_refused(bases):
    with pytest.raises(ValueError, match="basis is 16x16"):
        BasisExplorer(bases["istr"], synthetic_instance_masks(3, SIZE + 2))
    with pytest.raises(ValueError, match="at least one mask"):
        BasisExplorer(bases["istr"], np.zeros((0, SIZE, SIZE), bool))
