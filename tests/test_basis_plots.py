"""Basis figures render, and what they draw is what the basis computes."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from istr_viz.basis import MaskBasis, dct_reconstruction_curves, reconstruction_curves
from istr_viz.data.instance_masks import synthetic_instance_masks
from istr_viz.viz import (
    figure_to_array,
    figure_to_png,
    image_panel,
    mean_mask,
    new_figure,
    plot_basis_components,
    plot_coefficient_histograms,
    plot_component_walk,
    plot_explained_variance,
    plot_iou_vs_k,
    plot_recipe_comparison,
    plot_reconstructions,
    show,
    walk_component,
)

SIZE, DIM = 16, 12


@pytest.fixture(scope="module")
def masks() -> np.ndarray:
    return synthetic_instance_masks(150, SIZE, seed=0)


@pytest.fixture(scope="module")
def val_masks() -> np.ndarray:
    return synthetic_instance_masks(20, SIZE, seed=1)


@pytest.fixture(scope="module")
def istr(masks) -> MaskBasis:
    return MaskBasis.fit(masks, dim=DIM, recipe="istr")


@pytest.fixture(scope="module")
def binary(masks) -> MaskBasis:
    return MaskBasis.fit(masks, dim=DIM, recipe="binary")


def decode_encode(basis: MaskBasis, masks: np.ndarray, k: int) -> np.ndarray:
    """The reference: the basis's own torch encode/decode."""
    codes = basis.encode(torch.from_numpy(masks), k=k, noise=False)
    return basis.decode(codes).numpy()


def images(ax) -> np.ndarray:
    return np.asarray(ax.images[0].get_array())


def assert_renders(fig: Figure) -> np.ndarray:
    assert isinstance(fig, Figure)
    pixels = figure_to_array(fig)
    assert pixels.ndim == 3 and pixels.shape[2] == 3 and pixels.dtype == np.uint8
    assert pixels.std() > 0  # something was drawn
    return pixels


def visible_axes(fig: Figure) -> list:
    return [ax for ax in fig.axes if ax.get_visible() and ax.get_label() != "<colorbar>"]


# ----------------------------------------------------------------------------- figures.py


def test_new_figure_gives_a_2d_grid_sized_per_panel():
    fig, axes = new_figure(2, 3, size_per_panel=(2.0, 1.5))
    assert axes.shape == (2, 3)
    assert tuple(fig.get_size_inches()) == pytest.approx((6.0, 3.0))
    fig, axes = new_figure()
    assert axes.shape == (1, 1)
    with pytest.raises(ValueError, match="at least 1"):
        new_figure(0, 2)


def test_figure_to_array_has_the_figure_size_and_drawn_colour():
    fig, axes = new_figure(1, 1, size_per_panel=(2.0, 1.0))
    fig.set_dpi(50)
    red = np.zeros((4, 4, 3))
    red[..., 0] = 1.0
    image_panel(axes[0, 0], red)
    pixels = figure_to_array(fig)
    assert pixels.shape == (50, 100, 3) and pixels.dtype == np.uint8
    assert tuple(pixels[25, 50]) == (255, 0, 0)  # the centre of the panel is the image
    assert figure_to_array(fig, dpi=100).shape == (100, 200, 3)
    assert figure_to_array(fig).shape == (50, 100, 3)  # the dpi override did not stick


def test_png_and_show_give_the_same_png():
    fig, _ = new_figure()
    png = figure_to_png(fig)
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    shown = show(fig)
    assert shown.data == png and shown.format == "png"


def test_viz_imports_neither_pyplot_nor_ipywidgets():
    code = ("import sys, istr_viz.viz; "
            "print([m for m in ('matplotlib.pyplot', 'ipywidgets') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True)
    assert out.stdout.strip() == "[]"


def test_image_panel_rejects_a_1d_array():
    _, axes = new_figure()
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        image_panel(axes[0, 0], np.zeros(5))


# ----------------------------------------------------------------------------- basis plots


def test_components_panels_are_signed_with_symmetric_shared_limits(istr):
    num = 7
    fig = plot_basis_components(istr, num=num, ncols=4)
    assert_renders(fig)
    signed = [ax for ax in visible_axes(fig) if ax.images and ax.images[0].cmap.name == "RdBu_r"]
    assert len(signed) == num
    limit = float(istr.components[:num].abs().max())
    for j, ax in enumerate(signed):
        assert ax.images[0].get_clim() == pytest.approx((-limit, limit))
        np.testing.assert_allclose(images(ax).ravel(), istr.components[j].numpy())
        assert f"{float(istr.explained_variance_ratio[j]):.1%}" in ax.get_title()
    mean_panel = visible_axes(fig)[0]
    np.testing.assert_allclose(images(mean_panel).ravel(), torch.sigmoid(istr.mean).numpy(),
                               atol=1e-6)
    assert len(visible_axes(plot_basis_components(istr, num=100))) == DIM + 1  # capped at dim


def test_mean_mask_is_sigmoid_of_mean_or_the_clamped_mean(istr, binary, masks):
    np.testing.assert_allclose(mean_mask(istr).ravel(), torch.sigmoid(istr.mean).numpy(),
                               atol=1e-6)
    np.testing.assert_allclose(mean_mask(binary), masks.mean(0), atol=1e-5)


def test_explained_variance_draws_the_cumulative_ratio_per_basis(istr, binary):
    fig = plot_explained_variance({"istr": istr, "binary": binary}, k=5)
    assert_renders(fig)
    lines = {line.get_gid(): line for line in fig.axes[0].lines if line.get_gid()}
    assert set(lines) == {"istr", "binary"}
    for label, basis in (("istr", istr), ("binary", binary)):
        expected = np.cumsum(basis.explained_variance_ratio.double().numpy())
        np.testing.assert_allclose(lines[label].get_ydata(), expected, rtol=1e-6)
        assert f"{expected[4]:.3f} at k=5" in lines[label].get_label()
    assert len(plot_explained_variance(istr).axes[0].get_legend().get_texts()) == 1


def test_iou_vs_k_has_one_line_per_curve_and_marks_k(istr, val_masks):
    curves = {"PCA": reconstruction_curves(istr, val_masks),
              "DCT": dct_reconstruction_curves(val_masks, DIM)}
    fig = plot_iou_vs_k(curves, k=8)
    assert_renders(fig)
    ax = fig.axes[0]
    lines = {line.get_gid(): line for line in ax.lines if line.get_gid()}
    assert set(lines) == {"PCA", "DCT"}
    for label, curve in curves.items():
        np.testing.assert_array_equal(lines[label].get_ydata(), curve["miou"])
        assert f"{curve['miou'][7]:.3f} at k=8" in lines[label].get_label()
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert len(legend) == 2
    marks = [line for line in ax.lines if line.get_label() == "_chosen k"]
    assert len(marks) == 1 and list(marks[0].get_xdata()) == [8, 8]
    errors = plot_iou_vs_k(curves, metric="pixel_error").axes[0]
    assert "|p - mask|" in errors.get_ylabel()
    with pytest.raises(ValueError, match="unknown metric"):
        plot_iou_vs_k(curves, metric="ap")


@pytest.mark.parametrize("recipe", ["istr", "binary"])
def test_reconstruction_panels_equal_decode_of_encode(recipe, istr, binary, val_masks):
    basis = istr if recipe == "istr" else binary
    k, num = 5, 6
    fig = plot_reconstructions(val_masks, basis, k=k, num=num)
    assert_renders(fig)
    grid = np.array(visible_axes(fig)).reshape(3, num)
    expected = decode_encode(basis, val_masks[:num], k)
    for i in range(num):
        np.testing.assert_array_equal(images(grid[0, i]), val_masks[i].astype(np.float32))
        np.testing.assert_allclose(images(grid[1, i]), expected[i], atol=1e-6)
        np.testing.assert_allclose(images(grid[2, i]), expected[i] - val_masks[i], atol=1e-6)
        assert grid[2, i].images[0].get_clim() == (-1.0, 1.0)
        iou = ((expected[i] >= 0.5) & val_masks[i]).sum() / ((expected[i] >= 0.5)
                                                             | val_masks[i]).sum()
        assert grid[1, i].get_title() == f"IoU {iou:.2f}"


def test_reconstructions_improve_with_k(istr, val_masks):
    error = [np.abs(decode_encode(istr, val_masks, k) - val_masks).mean() for k in (1, DIM)]
    assert error[1] < error[0]
    with pytest.raises(ValueError, match="no masks"):
        plot_reconstructions(val_masks[:0], istr, k=3)


def test_recipe_comparison_has_one_row_per_basis(istr, binary, val_masks):
    num, k = 4, 3
    fig = plot_recipe_comparison({"istr": istr, "binary": binary}, val_masks, k=k, num=num)
    assert_renders(fig)
    grid = np.array(visible_axes(fig)).reshape(3, num)
    for row, basis in ((1, istr), (2, binary)):
        expected = decode_encode(basis, val_masks[:num], k)
        for i in range(num):
            np.testing.assert_allclose(images(grid[row, i]), expected[i], atol=1e-6)
    assert grid[1, 0].get_ylabel().startswith("istr") and grid[2, 0].get_ylabel().startswith(
        "binary")


def test_coefficient_histograms_bin_the_codes(istr, masks):
    codes = istr.encode(torch.from_numpy(masks), noise=False).numpy()
    num = 5
    fig = plot_coefficient_histograms(codes, num=num, bins=10, ncols=3)
    assert_renders(fig)
    axes = visible_axes(fig)
    assert len(axes) == num
    for j, ax in enumerate(axes):
        heights = np.array([patch.get_height() for patch in ax.patches])
        expected, _ = np.histogram(codes[:, j], bins=10, density=True)
        np.testing.assert_allclose(heights, expected, rtol=1e-6)
        assert ax.get_title().startswith(f"z{j + 1} ")


def test_coefficient_histograms_overlay_several_code_sets(istr, binary, masks):
    tensor = torch.from_numpy(masks)
    sets = {"istr": istr.encode(tensor, noise=False), "binary": binary.encode(tensor)}
    fig = plot_coefficient_histograms(sets, num=3, bins=8, normal_reference=True)
    assert_renders(fig)
    for ax in visible_axes(fig):
        assert len(ax.patches) == 2 * 8  # one set of bars per code set, on shared bins
        assert [t.get_text().split()[0] for t in ax.get_legend().get_texts()] == ["istr",
                                                                                  "binary"]
    with pytest.raises(ValueError, match=r"\(N, M\)"):
        plot_coefficient_histograms(np.zeros(5))


@pytest.mark.parametrize("recipe", ["istr", "binary"])
def test_component_walk_decodes_multiples_of_one_component(recipe, istr, binary):
    basis = istr if recipe == "istr" else binary
    sigmas = (-2.0, 0.0, 1.0)
    fig = plot_component_walk(basis, num=3, sigmas=sigmas)
    assert_renders(fig)
    grid = np.array(visible_axes(fig)).reshape(3, len(sigmas))
    for j in range(3):
        step = 1.0 if recipe == "istr" else float(basis.explained_variance[j].sqrt())
        for i, s in enumerate(sigmas):
            code = torch.zeros(DIM)
            code[j] = s * step
            expected = basis.decode(code).numpy()
            np.testing.assert_allclose(images(grid[j, i]), expected, atol=1e-6)
            np.testing.assert_allclose(walk_component(basis, j, s), expected, atol=1e-6)
        np.testing.assert_allclose(images(grid[j, 1]), mean_mask(basis), atol=1e-6)
    with pytest.raises(ValueError, match="component index"):
        walk_component(basis, DIM, 1.0)
