"""The PCA mask basis, the DCT baseline and the masks they are fitted on."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import scipy.fft
import torch
from sklearn.decomposition import PCA

from istr_viz.basis import (
    FORMAT_VERSION,
    MaskBasis,
    NoiseSettings,
    binarise_masks,
    choose_solver,
    dct_reconstruction_curves,
    design_matrix,
    fit_basis_from_coco,
    mask_fingerprint,
    reconstruction_curves,
)
from istr_viz.data.coco import load_annotations
from istr_viz.data.instance_masks import (
    crop_masks_to_boxes,
    instance_masks,
    iter_instance_masks,
    synthetic_instance_masks,
)
from istr_viz.dct import DctBasis, dct_matrix, zigzag_order
from istr_viz.errors import CheckpointError, DataError

S = 28
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                  reason="CUDA not available")),
]


@pytest.fixture(scope="module")
def masks() -> np.ndarray:
    """2000 box-tight shapes: the first 1500 to fit, the last 500 held out."""
    return synthetic_instance_masks(2000, S, seed=3)


@pytest.fixture(scope="module")
def basis(masks) -> MaskBasis:
    return MaskBasis.fit(masks[:1500], dim=60, recipe="istr", seed=0)


def _flat(masks: np.ndarray) -> np.ndarray:
    return masks.reshape(len(masks), -1)


def _iou(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """Per-mask IoU of (N, P) bool arrays; both empty counts 1."""
    inter, union = (pred & gt).sum(1), (pred | gt).sum(1)
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


# ----------------------------------------------------------------------------- fit = scikit-learn


def test_fit_equals_sklearn_on_the_same_noisy_logit_matrix(masks, basis):
    X = design_matrix(_flat(masks[:1500]), "istr", np.random.default_rng(0))
    assert X.dtype == np.float32 and np.all(np.abs(np.abs(X) - 3.7) < 0.9)  # |logit| in [2.9, 4.6]
    pca = PCA(60, svd_solver="covariance_eigh", whiten=True).fit(X)
    np.testing.assert_allclose(basis.components.numpy(), pca.components_, atol=2e-4)
    np.testing.assert_allclose(basis.mean.numpy(), pca.mean_, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(basis.explained_variance.numpy(), pca.explained_variance_,
                               rtol=1e-4)
    np.testing.assert_allclose(basis.explained_variance_ratio.numpy(),
                               pca.explained_variance_ratio_, rtol=1e-4)
    assert basis.solver == "covariance_eigh" and basis.n_masks == 1500
    norms = basis.components.norm(dim=1)
    torch.testing.assert_close(norms, torch.ones(60), atol=1e-5, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("recipe", ["istr", "binary"])
def test_linear_space_equals_sklearn_transform_float32(masks, device, recipe):
    X = design_matrix(_flat(masks[:1500]), recipe, np.random.default_rng(1))
    pca = PCA(40, svd_solver="full", whiten=recipe == "istr").fit(X)
    ours = MaskBasis.from_sklearn(pca, S, recipe).to(device)
    X_test = design_matrix(_flat(masks[1500:1600]), recipe, np.random.default_rng(2))
    codes = ours.encode_linear(torch.from_numpy(X_test).to(device))
    expected = pca.transform(X_test)
    scale = np.abs(expected).max()
    np.testing.assert_allclose(codes.cpu().numpy(), expected, rtol=1e-4, atol=1e-5 * scale)
    back = ours.decode_linear(codes)
    np.testing.assert_allclose(back.cpu().numpy(), pca.inverse_transform(expected), rtol=1e-4,
                               atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_linear_space_equals_sklearn_transform_float64(masks, device):
    X = design_matrix(_flat(masks[:800]), "istr", np.random.default_rng(1)).astype(np.float64)
    pca = PCA(30, svd_solver="full", whiten=True).fit(X)
    ours = MaskBasis.from_sklearn(pca, S, "istr").to(device)
    X_test = X[:50] + 0.1
    codes = ours.encode_linear(torch.from_numpy(X_test).to(device))
    assert codes.dtype == torch.float64
    np.testing.assert_allclose(codes.cpu().numpy(), pca.transform(X_test), rtol=1e-5, atol=1e-5)
    z = torch.from_numpy(pca.transform(X_test)).to(device)
    np.testing.assert_allclose(ours.decode_linear(z).cpu().numpy(),
                               pca.inverse_transform(z.cpu().numpy()), rtol=1e-5, atol=1e-5)


def test_encode_is_noisy_logit_then_transform(basis, masks):
    """encode(noise=False) == encode_linear(+-E[logit]); a seeded generator repeats its noise."""
    m = torch.from_numpy(masks[1500:1510])
    magnitude = NoiseSettings().expected_logit()
    x = torch.where(m.reshape(10, -1), magnitude, -magnitude)
    torch.testing.assert_close(basis.encode(m, noise=False), basis.encode_linear(x))
    first = basis.encode(m, 20, noise=torch.Generator().manual_seed(5))
    again = basis.encode(m, 20, noise=torch.Generator().manual_seed(5))
    other = basis.encode(m, 20, noise=torch.Generator().manual_seed(6))
    torch.testing.assert_close(first, again)
    assert not torch.allclose(first, other)


def test_noise_free_code_is_the_mean_of_noisy_codes(basis, masks):
    m = torch.from_numpy(masks[1500:1501]).expand(4000, S, S)
    noisy = basis.encode(m, 10, noise=torch.Generator().manual_seed(0))  # (4000, 10)
    clean = basis.encode(m[:1], 10, noise=False)
    standard_error = noisy.std(0) / math.sqrt(len(noisy))
    assert torch.all((noisy.mean(0) - clean[0]).abs() < 5 * standard_error)


def test_expected_logit_closed_form():
    noise = NoiseSettings()
    u = (np.arange(1_000_000) + 0.5) / 1_000_000
    r = np.maximum(0.05 * u, 0.01)
    assert noise.expected_logit() == pytest.approx(np.mean(np.log((1 - r) / r)), rel=1e-6)
    table = noise.logit_table()  # (256,): -L, +L per level
    assert table.shape == (256,)
    assert np.all(table[1::2] == -table[0::2])
    assert table[1::2].min() == pytest.approx(math.log(0.95 / 0.05), abs=0.02)
    assert table[1::2].max() == pytest.approx(math.log(0.99 / 0.01), abs=1e-5)
    assert table[1::2].mean() == pytest.approx(noise.expected_logit(), abs=2e-3)


def test_noisy_logit_matrix_signs_follow_the_masks(masks):
    flat = _flat(masks[:7])  # odd count: 7 * 784 pixels (pairs stay aligned either way)
    X = design_matrix(flat, "istr", np.random.default_rng(0))
    assert X.shape == flat.shape
    assert np.array_equal(X > 0, flat)
    assert len(np.unique(X[flat])) > 50  # many noise levels drawn
    odd = design_matrix(flat[:, :783].copy(), "istr", np.random.default_rng(0))  # odd total
    assert np.array_equal(odd > 0, flat[:, :783])


# ----------------------------------------------------------------------------- torch side


@pytest.mark.parametrize("device", DEVICES)
def test_decode_of_zeros_is_sigmoid_of_mean(basis, device):
    b = basis.to(device)
    for k in (1, 17, 60):
        out = b.decode(torch.zeros(3, k, device=device))
        assert out.shape == (3, S, S)
        expected = torch.sigmoid(b.mean).reshape(S, S).expand(3, S, S)
        torch.testing.assert_close(out, expected)
    basis.to("cpu")


@pytest.mark.parametrize("device", DEVICES)
def test_decode_is_differentiable(basis, device):
    b = basis.to(device)
    z = torch.randn(4, 60, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(b.decode, (z,), eps=1e-6, atol=1e-5)
    z32 = torch.randn(2, 5, 60, device=device, requires_grad=True)  # (B, Q, M)
    probs = b.decode(z32)
    assert probs.shape == (2, 5, S, S)
    probs.sum().backward()
    assert torch.isfinite(z32.grad).all() and z32.grad.abs().sum() > 0
    basis.to("cpu")


def test_dtype_follows_input_and_math_stays_float32(basis, masks):
    m = torch.from_numpy(masks[1500:1504])
    assert basis.encode(m, noise=False).dtype == torch.float32  # bool in
    half_codes = basis.encode(m.half(), noise=False)
    assert half_codes.dtype == torch.float16
    torch.testing.assert_close(half_codes.float(), basis.encode(m, noise=False), atol=2e-2,
                               rtol=2e-3)
    z = basis.encode(m, noise=False)
    assert basis.decode(z.bfloat16()).dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = basis.decode(z)
    torch.testing.assert_close(inside, basis.decode(z))  # autocast does not lower the math


def test_module_moves_but_keeps_float32(masks):
    b = MaskBasis.fit(masks[:300], dim=12, seed=0)
    holder = torch.nn.Module()
    holder.basis = b
    holder.half()
    assert b.components.dtype == torch.float32 and b.mean.dtype == torch.float32
    holder.to("cpu")
    assert b.mean.device.type == "cpu"


def test_as_many_components_as_masks_gives_bounded_codes(masks):
    """n masks span only n - 1 directions once centred: the last whitening scale is floored."""
    b = MaskBasis.fit(masks[:40], dim=40, seed=0)
    assert b.explained_variance[-1] < 1e-4 * b.explained_variance[0]
    codes = b.encode(torch.from_numpy(masks[1500:1600]), noise=False)
    assert torch.isfinite(codes).all() and codes.abs().max() < 1e3
    x = torch.from_numpy(design_matrix(_flat(masks[:40]), "istr", np.random.default_rng(0)))
    torch.testing.assert_close(b.decode_linear(b.encode_linear(x)), x, atol=2e-3, rtol=1e-3)


def test_k_must_fit_the_basis(basis, masks):
    with pytest.raises(ValueError, match="k=61"):
        basis.decode(torch.zeros(1, 61))
    with pytest.raises(ValueError, match="k=0"):
        basis.encode(torch.from_numpy(masks[:1]), k=0)
    with pytest.raises(ValueError, match="must end in"):
        basis.encode(torch.zeros(2, 14, 14))


# ----------------------------------------------------------------------------- quality


def test_reconstruction_iou_at_60_on_box_tight_shapes(basis, masks):
    held = masks[1500:]
    codes = basis.encode(torch.from_numpy(held), noise=False)
    pred = basis.decode(codes).numpy() >= 0.5
    miou = _iou(_flat(pred), _flat(held)).mean()
    assert miou >= 0.97


def test_curves_from_one_decomposition_equal_direct_decodes(basis, masks):
    held = masks[1500:1700]
    curves = reconstruction_curves(basis, held)
    assert list(curves["k"]) == list(range(1, 61))
    assert curves["miou"][59] > curves["miou"][9] > curves["miou"][0]
    assert curves["pixel_error"][59] < curves["pixel_error"][0]
    m = torch.from_numpy(held)
    for k in (1, 7, 30, 60):
        probs = basis.decode(basis.encode(m, k, noise=False)).numpy()
        miou = _iou(_flat(probs >= 0.5), _flat(held)).mean()
        error = np.abs(probs - held).mean()
        assert curves["miou"][k - 1] == pytest.approx(miou, abs=1e-3)
        assert curves["pixel_error"][k - 1] == pytest.approx(error, rel=1e-4)


def test_curves_count_empty_masks_predicted_empty_as_one():
    dct = DctBasis(8, 64)
    empty = np.zeros((2, 8, 8), dtype=bool)
    curves = reconstruction_curves(dct, empty)
    np.testing.assert_allclose(curves["miou"], 1.0)
    np.testing.assert_allclose(curves["pixel_error"], 0.0)


def test_binary_recipe(masks):
    b = MaskBasis.fit(masks[:1500], dim=60, recipe="binary")
    assert b.recipe == "binary" and not b.whiten and not b.logit_space
    assert 0 <= b.mean.min() and b.mean.max() <= 1
    probs = b.decode(torch.randn(50, 60) * 3)
    assert probs.min() >= 0 and probs.max() <= 1  # clamped, no sigmoid
    torch.testing.assert_close(b.decode(torch.zeros(1, 60))[0], b.mean.reshape(S, S))
    codes = b.encode(torch.from_numpy(masks[:1500]))  # not whitened: variance = eigenvalues
    torch.testing.assert_close(codes.var(0), b.explained_variance, rtol=1e-3, atol=1e-4)
    assert reconstruction_curves(b, masks[1500:])["miou"][-1] >= 0.95


def test_istr_codes_are_whitened(basis, masks):
    codes = basis.encode(torch.from_numpy(masks[:1500]), noise=torch.Generator().manual_seed(0))
    variance = codes.var(0)
    assert torch.all((variance[:20] - 1).abs() < 0.1)


# ----------------------------------------------------------------------------- streaming fit


def test_incremental_pca_matches_full_pca(masks, basis):
    chunked = MaskBasis.fit(masks[:1500], dim=60, chunk_size=500, seed=0)
    assert chunked.solver == "incremental" and chunked.n_masks == 1500
    assert chunked.fingerprint == basis.fingerprint == mask_fingerprint(masks[:1500])
    # same seed and chunks of whole bytes of noise: the very same matrix, so the leading
    # components agree up to sign
    dots = (chunked.components[:10] * basis.components[:10]).sum(1).abs()
    assert torch.all(dots > 0.999), dots
    torch.testing.assert_close(chunked.explained_variance[:10], basis.explained_variance[:10],
                               rtol=1e-2, atol=0)
    torch.testing.assert_close(chunked.mean, basis.mean, rtol=1e-5, atol=1e-5)


def test_fit_accepts_an_iterable_of_chunks(masks):
    chunks = (masks[i:min(i + 130, 1000)] for i in range(0, 1000, 130))  # last one short
    b = MaskBasis.fit(chunks, dim=20, chunk_size=200)
    assert b.n_masks == 1000 and b.dim == 20
    assert b.fingerprint == mask_fingerprint(masks[:1000])
    assert reconstruction_curves(b, masks[1500:1600])["miou"][-1] > 0.9


def test_fit_rejects_bad_input(masks):
    with pytest.raises(DataError, match="need at least 60"):
        MaskBasis.fit(masks[:10], dim=60)
    with pytest.raises(DataError, match="no masks"):
        MaskBasis.fit(iter([]), dim=5)
    with pytest.raises(ValueError, match="recipe"):
        MaskBasis.fit(masks[:100], dim=5, recipe="pca")
    with pytest.raises(ValueError, match=r"\(N, S, S\)"):
        MaskBasis.fit(np.zeros((10, 28, 14), bool), dim=5)
    with pytest.raises(ValueError, match="chunk_size"):
        MaskBasis.fit(masks[:100], dim=50, chunk_size=20)


def test_binarise_masks_by_dtype():
    values = np.array([[[0, 1], [2, 255]]])
    assert binarise_masks(values.astype(np.uint8)).tolist() == [[[False, True], [True, True]]]
    floats = np.array([[[0.2, 0.5], [0.49, 1.0]]], dtype=np.float32)
    assert binarise_masks(floats).tolist() == [[[False, True], [False, True]]]


def test_choose_solver_by_shape():
    assert choose_solver(100_000, 784, 60) == "covariance_eigh"
    assert choose_solver(500, 784, 60) == "randomized"
    assert choose_solver(50, 784, 45) == "full"
    assert choose_solver(100_000, 12544, 256) == "randomized"


# ----------------------------------------------------------------------------- persistence


def _same_basis(a: MaskBasis, b: MaskBasis) -> None:
    for name in ("mean", "components", "explained_variance", "explained_variance_ratio"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=0)
    for name in ("mask_size", "dim", "recipe", "whiten", "noise", "fingerprint", "n_masks",
                 "solver"):
        assert getattr(a, name) == getattr(b, name), name


def test_save_load_round_trip(basis, masks, tmp_path):
    path = basis.save(tmp_path / "sub" / "basis.npz")
    loaded = MaskBasis.load(path)
    _same_basis(basis, loaded)
    m = torch.from_numpy(masks[1500:1510])
    torch.testing.assert_close(loaded.decode(loaded.encode(m, noise=False)),
                               basis.decode(basis.encode(m, noise=False)))
    assert [p.name for p in path.parent.iterdir()] == ["basis.npz"]  # no temporary left over


def test_dict_and_state_dict_round_trips_with_weights_only(basis, tmp_path):
    holder = torch.nn.Module()
    holder.basis = basis
    buffer = io.BytesIO()
    torch.save({"basis": basis.to_dict(), "model": holder.state_dict()}, buffer)
    buffer.seek(0)
    ckpt = torch.load(buffer, weights_only=True)
    _same_basis(basis, MaskBasis.from_dict(ckpt["basis"]))
    _same_basis(basis, MaskBasis.from_state_dict(ckpt["model"], prefix="basis."))
    other = MaskBasis.fit(synthetic_instance_masks(200, S, seed=9), dim=60, recipe="binary")
    other.load_state_dict(basis.state_dict())  # same shapes: buffers and metadata replaced
    _same_basis(basis, other)


def _write_npz(path, **entries) -> None:
    with open(path, "wb") as f:
        np.savez(f, **entries)


def _npz_entries(basis: MaskBasis) -> dict:
    return {k: np.asarray(v) for k, v in basis.to_dict().items()}


def test_load_refuses_a_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found") as err:
        MaskBasis.load(tmp_path / "nope.npz")
    assert "nope.npz" in str(err.value)


def test_load_refuses_random_bytes(tmp_path):
    path = tmp_path / "corrupt.npz"
    path.write_bytes(np.random.default_rng(0).bytes(5000))
    with pytest.raises(CheckpointError, match="not a readable .npz") as err:
        MaskBasis.load(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_load_refuses_another_format_version(basis, tmp_path):
    path = tmp_path / "v2.npz"
    _write_npz(path, **{**_npz_entries(basis), "format_version": np.asarray(FORMAT_VERSION + 1)})
    with pytest.raises(CheckpointError, match="format_version 2") as err:
        MaskBasis.load(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("key", ["components", "recipe", "format_version", "mask_size"])
def test_load_refuses_missing_keys(basis, tmp_path, key):
    path = tmp_path / "missing.npz"
    entries = _npz_entries(basis)
    del entries[key]
    _write_npz(path, **entries)
    with pytest.raises(CheckpointError, match=f"lacks {key}") as err:
        MaskBasis.load(path)
    assert str(path) in str(err.value)


def test_load_refuses_wrong_shapes(basis, tmp_path):
    path = tmp_path / "shapes.npz"
    entries = _npz_entries(basis)
    entries["explained_variance"] = entries["explained_variance"][:-1]
    _write_npz(path, **entries)
    with pytest.raises(CheckpointError, match="'explained_variance' has shape"):
        MaskBasis.load(path)
    entries = _npz_entries(basis)
    entries["mask_size"] = np.asarray(27)
    _write_npz(path, **entries)
    with pytest.raises(CheckpointError, match="'mean' has shape"):
        MaskBasis.load(path)


def test_load_refuses_pickled_objects(basis, tmp_path):
    path = tmp_path / "pickled.npz"
    entries = _npz_entries(basis)
    entries["recipe"] = np.array([{"evil": "payload"}], dtype=object)
    _write_npz(path, **entries)
    with pytest.raises(CheckpointError, match="pickled objects") as err:
        MaskBasis.load(path)
    assert str(path) in str(err.value)


# ----------------------------------------------------------------------------- DCT baseline


def test_dct_zigzag_is_the_jpeg_order():
    jpeg = [0, 1, 8, 16, 9, 2, 3, 10, 17, 24, 32, 25, 18, 11, 4, 5, 12, 19, 26, 33, 40, 48, 41,
            34, 27, 20, 13, 6, 7, 14, 21, 28, 35, 42, 49, 56, 57, 50, 43, 36, 29, 22, 15, 23, 30,
            37, 44, 51, 58, 59, 52, 45, 38, 31, 39, 46, 53, 60, 61, 54, 47, 55, 62, 63]
    order = zigzag_order(8)
    assert (order[:, 0] * 8 + order[:, 1]).tolist() == jpeg
    assert zigzag_order(S)[:4].tolist() == [[0, 0], [0, 1], [1, 0], [2, 0]]
    assert sorted(map(tuple, zigzag_order(S).tolist())) == [(i, j) for i in range(S)
                                                             for j in range(S)]


def test_dct_codes_are_scipy_dctn_in_zigzag_order(masks):
    m = masks[:5]
    codes = DctBasis(S, 100).encode(torch.from_numpy(m)).numpy()
    order = zigzag_order(S)[:100]
    expected = scipy.fft.dctn(m.astype(np.float64), axes=(1, 2), norm="ortho")
    np.testing.assert_allclose(codes, expected[:, order[:, 0], order[:, 1]], atol=1e-4)
    d = dct_matrix(S)
    np.testing.assert_allclose(d @ d.T, np.eye(S), atol=1e-12)


def test_dct_full_length_reconstruction_is_exact(masks):
    dct = DctBasis(S, S * S)
    m = torch.from_numpy(masks[:20])
    out = dct.decode(dct.encode(m))
    torch.testing.assert_close(out, m.float(), atol=1e-4, rtol=0)
    curves = dct_reconstruction_curves(masks[:20], S * S)
    assert curves["miou"][-1] == 1.0 and curves["pixel_error"][-1] < 1e-5


def test_dct_truncation_and_curves(masks):
    dct = DctBasis(S, 60)
    m = torch.from_numpy(masks[1500:1600])
    probs = dct.decode(dct.encode(m, 30)).numpy()
    assert probs.min() >= 0 and probs.max() <= 1
    miou = _iou(_flat(probs >= 0.5), _flat(masks[1500:1600])).mean()
    curves = dct_reconstruction_curves(masks[1500:1600], 60)
    assert curves["miou"][29] == pytest.approx(miou, abs=1e-3)
    assert 0.8 < curves["miou"][-1] < 1.0


# ----------------------------------------------------------------------------- masks from COCO


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def _write_small_coco(path, num_images: int = 3, per_image: int = 4, seed: int = 0) -> dict:
    """Images 40x60 with ``per_image`` random rectangles (RLE) each, the first instance of every
    image the left half of its box (bbox twice as wide as the mask), plus one crowd per image."""
    rng = np.random.default_rng(seed)
    images, anns = [], []
    for image_id in range(1, num_images + 1):
        images.append({"id": image_id, "file_name": f"{image_id}.png", "height": 40, "width": 60})
        for index in range(per_image + 1):
            x, y = int(rng.integers(0, 30)), int(rng.integers(0, 20))
            w, h = int(rng.integers(6, 29)), int(rng.integers(6, 19))
            mask = np.zeros((40, 60), bool)
            mask[y:y + h, x:x + w] = True
            bbox = [x, y, w, h]
            if index == 0:  # box twice as wide as the mask: the crop's right half is empty
                mask[:, x + w // 2:] = False
                w = 2 * (w // 2)
                bbox = [x, y, w, h]
            crowd = index == per_image
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": 1,
                         "segmentation": _rle(mask), "area": float(mask.sum()), "bbox": bbox,
                         "iscrowd": int(crowd)})
    data = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "box"}]}
    path.write_text(json.dumps(data))
    return data


def test_instance_masks_from_a_small_coco(tmp_path):
    ann_file = tmp_path / "annotations.json"
    _write_small_coco(ann_file, num_images=3, per_image=4)
    ann = load_annotations(ann_file)
    out = instance_masks(ann, mask_size=8, progress=False)
    assert out.shape == (12, 8, 8) and out.dtype == bool  # 3 x 4, the 3 crowds left out
    halves = out[::4]  # the first instance of every image: left half of its box
    assert halves[:, :, :4].all() and not halves[:, :, 4:].any()
    rest = np.delete(out, np.s_[::4], axis=0)
    assert rest.all()  # rectangles filling their boxes
    chunks = list(iter_instance_masks(ann, mask_size=8, chunk=5))
    assert [len(c) for c in chunks] == [5, 5, 2]
    assert np.array_equal(np.concatenate(chunks), out)


def test_crop_masks_to_boxes_matches_hand_crop():
    full = torch.zeros(1, 20, 30, dtype=torch.bool)
    full[0, 4:12, 10:18] = True  # 8 x 8 square
    box = torch.tensor([[10.0, 4.0, 26.0, 12.0]])  # twice as wide: the square is the left half
    crop = crop_masks_to_boxes(full, box, 4)
    assert crop.tolist() == [[[True, True, False, False]] * 4]
    assert crop_masks_to_boxes(full[:0], box[:0], 4).shape == (0, 4, 4)


def test_fit_basis_from_coco_report(tmp_path):
    ann_file = tmp_path / "annotations.json"
    _write_small_coco(ann_file, num_images=10, per_image=6, seed=1)
    basis, report = fit_basis_from_coco(ann_file, dim=8, mask_size=16, holdout=0.25, seed=0,
                                        progress=False)
    json.dumps(report)  # JSON-ready
    assert report["n_masks"] == 60 and report["n_eval"] == 15 and report["n_fit"] == 45
    assert report["eval_on"] == "holdout" and basis.n_masks == 45 and basis.dim == 8
    assert len(report["explained_variance_ratio"]) == 8
    assert report["explained_variance_cumulative"] == pytest.approx(
        sum(report["explained_variance_ratio"]))
    assert len(report["recon_miou_curve"]) == len(report["dct_miou_curve"]) == 8
    assert report["recon_miou"] == report["recon_miou_curve"][-1]
    assert 0.5 < report["recon_miou"] <= 1.0
    with pytest.raises(DataError, match="cannot give a 100-component"):
        fit_basis_from_coco(ann_file, dim=100, mask_size=16, progress=False)


def test_synthetic_masks_are_box_tight():
    m = synthetic_instance_masks(300, S, seed=0)
    assert m.shape == (300, S, S) and m.dtype == bool
    rows, cols = m.any(2), m.any(1)  # (N, S): which rows / columns hold foreground
    for edge in (rows[:, 0], rows[:, -1], cols[:, 0], cols[:, -1]):
        assert edge.mean() > 0.9  # shapes touch (nearly) every side of their box
    assert 0.5 < m.mean() < 0.9


def test_fit_basis_from_coco_streamed_through_incremental_pca(tmp_path):
    ann_file = tmp_path / "annotations.json"
    _write_small_coco(ann_file, num_images=12, per_image=6, seed=2)
    basis, report = fit_basis_from_coco(ann_file, dim=8, mask_size=16, holdout=0.25, seed=0,
                                        progress=False, chunk_size=20)
    assert basis.solver == "incremental" and basis.dim == 8
    assert report["n_masks"] == 72 and report["n_fit"] + report["n_eval"] == 72
    assert report["eval_on"] == "holdout" and 0 < report["n_eval"] < 72
    assert basis.n_masks == report["n_fit"]
    assert 0.5 < report["recon_miou"] <= 1.0
    _, on_fit = fit_basis_from_coco(ann_file, dim=8, mask_size=16, holdout=0.0, progress=False,
                                    chunk_size=20, max_eval=30)
    assert on_fit["eval_on"] == "fit" and on_fit["n_fit"] == 72 and on_fit["n_eval"] == 30


# ----------------------------------------------------------------------------- fit-basis CLI


def _fit_basis_cli(args: list[str], capsys) -> tuple[int, str, str]:
    from istr_viz.cli import main

    code = main(["fit-basis", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_fit_basis_cli_writes_the_basis_and_the_report(tmp_path, capsys):
    ann_file = tmp_path / "annotations.json"
    _write_small_coco(ann_file, num_images=10, per_image=6, seed=1)
    (tmp_path / "images").mkdir()
    code, out, _ = _fit_basis_cli(["--ann", str(ann_file), "--images", str(tmp_path / "images"),
                                   "--dim", "8", "--mask-size", "16",
                                   "--out", str(tmp_path / "b.npz"),
                                   "--json-out", str(tmp_path / "b.json")], capsys)
    assert code == 0 and "explained variance" in out and "mIoU" in out
    report = json.loads((tmp_path / "b.json").read_text())
    assert type(report["dim"]) is int and report["dim"] == 8
    assert type(report["mask_size"]) is int and report["mask_size"] == 16
    assert type(report["n_masks"]) is int and report["n_masks"] == 60
    assert isinstance(report["explained_variance_ratio"], list)
    assert len(report["explained_variance_ratio"]) == 8
    assert isinstance(report["explained_variance_cumulative"], float)
    assert isinstance(report["recon_miou"], float)
    loaded = MaskBasis.load(tmp_path / "b.npz")
    assert loaded.dim == 8 and loaded.mask_size == 16 and loaded.fingerprint
    np.testing.assert_allclose(loaded.explained_variance_ratio.numpy(),
                               report["explained_variance_ratio"], rtol=1e-6)


def test_fit_basis_cli_bad_input_is_one_line_and_status_2(tmp_path, capsys):
    good = tmp_path / "annotations.json"
    data = _write_small_coco(good, num_images=10, per_image=6, seed=1)
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text('{"images": [')
    bad_entry = tmp_path / "bad_entry.json"
    data["annotations"][2]["segmentation"] = {"size": [5, 5], "counts": "zzzz"}
    bad_entry.write_text(json.dumps(data))
    out = ["--out", str(tmp_path / "b.npz")]
    cases = [
        (["--ann", str(tmp_path / "nope.json"), *out], "nope.json"),
        (["--ann", str(corrupt), *out], "corrupt.json"),
        (["--ann", str(bad_entry), "--dim", "8", *out], "annotation id=3"),
        (["--ann", str(good), "--images", str(tmp_path / "no_images"), *out], "no_images"),
        (["--ann", str(good), "--dim", "0", *out], "--dim"),
        (["--ann", str(good), "--mask-size", "0", *out], "--mask-size"),
        (["--ann", str(good), "--dim", "8", "--chunk-size", "4", *out], "--chunk-size"),
        (["--ann", str(good), "--dim", "8", "--out", str(tmp_path)], str(tmp_path)),
    ]
    for args, named in cases:
        code, _, err = _fit_basis_cli(args, capsys)
        lines = err.strip().splitlines()
        assert code == 2, args
        assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], err
    code, _, err = _fit_basis_cli(["--ann", str(bad_entry), "--dim", "8", "--mask-size", "16",
                                   "--skip-invalid", *out], capsys)
    assert code == 0 and "skipped 1 invalid" in err


# ----------------------------------------------------------------------------- encode = transform


@pytest.mark.parametrize("device", DEVICES)
def test_noise_free_encode_and_decode_linear_equal_sklearn_on_masks(masks, device):
    """encode(masks, noise=False) is ``transform`` of the noise-free logits of the masks, and
    decode_linear of those codes is ``inverse_transform`` (float32, rtol 1e-4)."""
    X = design_matrix(_flat(masks[:1500]), "istr", np.random.default_rng(4))
    pca = PCA(60, svd_solver="covariance_eigh", whiten=True).fit(X)
    ours = MaskBasis.from_sklearn(pca, S, "istr").to(device)
    held = torch.from_numpy(masks[1500:1700]).to(device)
    linear = ours.to_linear(held, noise=False)
    magnitude = NoiseSettings().expected_logit()
    np.testing.assert_allclose(np.abs(linear.cpu().numpy()), magnitude, rtol=1e-6)
    expected = pca.transform(linear.cpu().numpy())
    codes = ours.encode(held, noise=False)
    np.testing.assert_allclose(codes.cpu().numpy(), expected, rtol=1e-4,
                               atol=1e-5 * np.abs(expected).max())
    back = ours.decode_linear(codes).cpu().numpy()
    np.testing.assert_allclose(back, pca.inverse_transform(expected), rtol=1e-4, atol=1e-4)
