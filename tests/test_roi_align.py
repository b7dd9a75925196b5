"""istr_viz.model.roi_align: the sparse-matrix RoIAlign (training) equals torchvision's, values and
gradients; the separable one (inference) its values."""

import pytest
import torch
from torchvision.ops import roi_align

from istr_viz.model import RoIPooler
from istr_viz.model.roi_align import (_csr_pair, flatten_maps, roi_align_matrix,
                                      separable_roi_align, sparse_roi_align)


# (B, C, H, W) maps, stride, sampling ratio, aligned: non-square maps, several batch images
CASES = [((3, 8, 20, 28), 4, 2, True), ((2, 5, 7, 5), 16, 1, True), ((1, 4, 9, 9), 8, 3, True),
         ((3, 8, 20, 28), 4, 2, False), ((2, 5, 7, 5), 16, 1, False)]


def _rois(batch: int, height: int, width: int, stride: int, count: int, seed: int) -> torch.Tensor:
    """(count, 5) random RoIs in image pixels, including ones partly or wholly outside the map,
    an empty one and one far larger than the image."""
    g = torch.Generator().manual_seed(seed)
    size = torch.tensor([width, height]) * stride
    xy = torch.rand(count, 2, generator=g) * size * 1.4 - 0.2 * size
    wh = torch.rand(count, 2, generator=g) * size * 0.7
    rois = torch.cat([torch.randint(0, batch, (count, 1), generator=g).float(), xy, xy + wh], 1)
    rois[0, 1:] = torch.tensor([-30.0, -30.0, size[0] + 40.0, size[1] + 40.0])
    rois[1, 3:] = rois[1, 1:3]  # zero width and height
    rois[2, 1:] = torch.tensor([size[0] + 50.0, 5.0, size[0] + 90.0, 30.0])  # right of the map
    return rois


@pytest.mark.parametrize("shape,stride,sampling,aligned", CASES)
def test_values_and_feature_gradients_equal_torchvision(shape, stride, sampling, aligned):
    g = torch.Generator().manual_seed(1)
    features = torch.randn(*shape, generator=g)
    rois = _rois(shape[0], shape[2], shape[3], stride, 40, seed=2)
    ours_in = features.clone().requires_grad_()
    ref_in = features.clone().requires_grad_()
    ours = sparse_roi_align(ours_in, rois, 7, 1.0 / stride, sampling, aligned)
    ref = roi_align(ref_in, rois, 7, 1.0 / stride, sampling_ratio=sampling, aligned=aligned)
    assert ours.shape == ref.shape == (40, shape[1], 7, 7)
    assert torch.allclose(ours, ref, atol=1e-5)
    upstream = torch.randn(ref.shape, generator=g)
    ours.backward(upstream)
    ref.backward(upstream)
    assert torch.allclose(ours_in.grad, ref_in.grad, atol=1e-5)
    assert ref_in.grad.abs().sum() > 0  # the comparison is not between two zero maps
    assert ours[2].abs().max() == 0  # the RoI beyond the map pools nothing, as torchvision's


def test_matrix_rows_sum_to_the_valid_share_and_transpose_matches():
    rois = torch.tensor([[0.0, 4, 4, 12, 12], [1.0, -100, -100, -50, -50]])
    matrix, transposed = roi_align_matrix(rois, 2, 8, 8, 2, 0.5, 2)
    dense = matrix.to_dense()
    assert dense.shape == (2 * 4, 2 * 64)
    assert torch.allclose(dense[:4].sum(1), torch.ones(4))  # inside: weights sum to 1
    assert torch.equal(dense[4:], torch.zeros(4, 128))  # wholly outside: nothing
    assert dense[:4, 64:].abs().sum() == 0  # image 0's RoI reads only image 0
    assert torch.allclose(transposed.to_dense(), dense.T)
    for m in (matrix, transposed):  # valid CSR: sorted, unique columns in every row
        torch.sparse_csr_tensor(m.crow_indices(), m.col_indices(), m.values(), m.shape,
                                check_invariants=True)
        cols = [m.col_indices()[a:b] for a, b in zip(m.crow_indices()[:-1], m.crow_indices()[1:])]
        assert all(torch.equal(c, torch.unique(c)) for c in cols)


def test_non_finite_and_huge_boxes_pool_nothing():
    rois = torch.tensor([[0.0, float("nan"), 0, 8, 8], [0.0, 0, 0, float("inf"), 8],
                         [0.0, 1e30, 1e30, 2e30, 2e30], [0.0, 2, 2, 10, 10]])
    pooled = sparse_roi_align(torch.randn(1, 3, 8, 8), rois, 2, 0.5, 2)
    assert torch.isfinite(pooled).all()
    assert pooled[:3].abs().max() == 0 and pooled[3].abs().max() > 0  # non-finite: zeros


def test_pooler_gives_the_same_features_with_and_without_gradients(monkeypatch):
    import istr_viz.model.pooler as pooler_module
    calls = []
    monkeypatch.setattr(pooler_module, "sparse_roi_align",
                        lambda *args: calls.append(1) or sparse_roi_align(*args))
    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(2, 4, 64 // s, 64 // s, generator=g) for s in (4, 8, 16, 32)]
    boxes = torch.tensor([[[0.0, 0, 10, 10], [0, 0, 64, 64]], [[5, 5, 40, 30], [1, 2, 3, 4]]])
    pooler = RoIPooler(canonical_size=32.0)
    separable_calls = []
    monkeypatch.setattr(pooler_module, "separable_roi_align",
                        lambda *args: separable_calls.append(1) or separable_roi_align(*args))
    with torch.no_grad():
        reference = pooler(feats, boxes)  # the separable kernel (inference)
    assert not calls and len(separable_calls) == 1  # every level in one call
    trainable = [f.clone().requires_grad_() for f in feats]
    pooled = pooler(trainable, boxes)  # the sparse path
    assert torch.allclose(pooled, reference, atol=1e-5)
    assert len(calls) == 3  # one call per level that holds boxes: 2, 3 and 5
    pooled.sum().backward()
    assert [f.grad is not None for f in trainable] == [True, True, False, True]


def test_rejects_an_adaptive_sampling_ratio():
    with pytest.raises(ValueError, match="sampling_ratio"):
        sparse_roi_align(torch.zeros(1, 1, 4, 4), torch.zeros(1, 5), 2, 1.0, 0)
    with pytest.raises(ValueError, match="sampling_ratio"):
        separable_roi_align(flatten_maps([torch.zeros(1, 1, 4, 4)]), torch.zeros(1, 5),
                            torch.zeros(1, dtype=torch.long), torch.ones(1), 2, 0)


def _separable(features: list[torch.Tensor], rois: torch.Tensor, maps: list[int],
               strides: list[int], sampling: int = 2, aligned: bool = True) -> torch.Tensor:
    maps_t = torch.tensor(maps, dtype=torch.long)
    scales = 1.0 / torch.tensor(strides, dtype=torch.float32)[maps_t]
    return separable_roi_align(flatten_maps(features), rois, maps_t, scales, 7, sampling, aligned)


@pytest.mark.parametrize("shape,stride,sampling,aligned", CASES)
def test_separable_values_equal_torchvision(shape, stride, sampling, aligned):
    """Boxes inside, across and outside the map, empty and huge ones, non-square maps."""
    g = torch.Generator().manual_seed(1)
    features = torch.randn(*shape, generator=g)
    rois = _rois(shape[0], shape[2], shape[3], stride, 40, seed=2)
    ours = _separable([features], rois, [0] * 40, [stride], sampling, aligned)
    ref = roi_align(features, rois, 7, 1.0 / stride, sampling_ratio=sampling, aligned=aligned)
    assert ours.shape == ref.shape == (40, shape[1], 7, 7)
    assert torch.allclose(ours, ref, atol=1e-5)
    # the (R, P * P, C) rows the stages read are a view of its memory
    assert ours.flatten(2).transpose(1, 2).is_contiguous()


def test_separable_pools_each_box_from_its_own_map_in_one_call():
    g = torch.Generator().manual_seed(5)
    features = [torch.randn(2, 6, 40 // s, 24 // s, generator=g) for s in (4, 8, 16)]
    rois = _rois(2, 10, 6, 4, 30, seed=6)
    maps = torch.randint(0, 3, (30,), generator=g).tolist()
    ours = _separable(features, rois, maps, [4, 8, 16])
    for row, m in enumerate(maps):
        ref = roi_align(features[m], rois[row:row + 1], 7, 1.0 / (4 * 2**m), sampling_ratio=2,
                        aligned=True)
        assert torch.allclose(ours[row], ref[0], atol=1e-5)
    assert _separable(features, rois[:0], [], [4, 8, 16]).shape == (0, 6, 7, 7)


def test_separable_ignores_autocast_and_non_finite_boxes():
    g = torch.Generator().manual_seed(3)
    features = torch.randn(2, 6, 16, 16, generator=g)
    rois = _rois(2, 16, 16, 4, 12, seed=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = _separable([features.bfloat16()], rois, [0] * 12, [4])
    ref = roi_align(features.bfloat16().float(), rois, 7, 0.25, sampling_ratio=2, aligned=True)
    assert ours.dtype == torch.float32 and torch.allclose(ours, ref, atol=1e-5)
    bad = torch.tensor([[0.0, float("nan"), 0, 8, 8], [0.0, 0, 0, float("inf"), 8],
                        [0.0, 1e30, 1e30, 2e30, 2e30], [0.0, 2, 2, 10, 10]])
    pooled = _separable([torch.randn(1, 3, 8, 8)], bad, [0] * 4, [2])
    assert torch.isfinite(pooled).all()
    assert pooled[:3].abs().max() == 0 and pooled[3].abs().max() > 0  # non-finite: zeros


def test_separable_gathers_tall_and_wide_windows_apart():
    """A group's common window is its largest height x its largest width: tall and wide RoIs in
    one group would gather most of the map each. They are grouped apart, values unchanged."""
    from istr_viz.model.roi_align import _window_groups

    h = torch.tensor([1, 40, 2, 37, 1, 3, 40, 5])
    w = torch.tensor([40, 1, 38, 2, 1, 3, 40, 8])
    groups = _window_groups(h, w)
    for group in groups:  # no side gathered at more than 8 cells or 2x its own
        for side in (h, w):
            longest = int(side[group].max())
            assert all(longest <= max(8, 2 * int(side[i])) for i in group.tolist())
    assert sorted(torch.cat(groups).tolist()) == list(range(8))
    assert any(sorted(g.tolist()) == [4, 5, 7] for g in groups)  # small windows: one group
    g = torch.Generator().manual_seed(8)
    features = torch.randn(1, 3, 48, 48, generator=g)
    rois = torch.tensor([[0.0, 1, 1, 190, 5], [0, 1, 1, 5, 190], [0, 3, 7, 180, 12],
                         [0, 7, 3, 12, 180], [0, 20, 20, 40, 44]])
    ref = roi_align(features, rois, 7, 0.25, sampling_ratio=2, aligned=True)
    assert torch.allclose(_separable([features], rois, [0] * 5, [4]), ref, atol=1e-5)


def test_every_box_gets_a_level_nan_ones_the_finest():
    from istr_viz.model.pooler import assign_fpn_levels

    boxes = torch.tensor([[0.0, 0, 8, 8], [float("nan"), 0, 8, 8], [0, 0, 500, 500]])
    assert assign_fpn_levels(boxes, 2, 5, 56.0).tolist() == [2, 2, 5]


def test_pools_in_float32_under_bf16_autocast():
    g = torch.Generator().manual_seed(3)
    features = torch.randn(2, 6, 16, 16, generator=g)
    rois = _rois(2, 16, 16, 4, 12, seed=4)
    leaf = features.clone().bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pooled = sparse_roi_align(leaf, rois, 7, 0.25, 2)
        (pooled * 2).sum().backward()
    ref_in = features.bfloat16().float().requires_grad_()
    ref = roi_align(ref_in, rois, 7, 0.25, sampling_ratio=2, aligned=True)
    (ref * 2).sum().backward()
    assert pooled.dtype == torch.float32 and torch.allclose(pooled, ref, atol=1e-5)
    assert leaf.grad.dtype == torch.bfloat16
    assert torch.allclose(leaf.grad.float(), ref_in.grad, atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize("num_rows", [0, 1, 37])
def test_csr_pair_equals_the_dense_sum_of_its_entries(num_rows):
    """Random entries with many repeats (4 per row drawn from 6 columns): A and its transpose
    are valid CSR and equal the dense matrix that accumulates every entry."""
    g = torch.Generator().manual_seed(num_rows)
    per_row, num_cols = 4, 6
    cols = torch.randint(0, num_cols, (num_rows * per_row,), generator=g)
    values = torch.rand(num_rows * per_row, generator=g)
    dense = torch.zeros(num_rows, num_cols)
    rows = torch.arange(num_rows).repeat_interleave(per_row)
    dense.index_put_((rows, cols), values, accumulate=True)
    matrix, transposed = _csr_pair(cols, values, per_row, num_cols)
    assert torch.allclose(matrix.to_dense(), dense) and torch.allclose(transposed.to_dense(), dense.T)
    for m in (matrix, transposed):
        torch.sparse_csr_tensor(m.crow_indices(), m.col_indices(), m.values(), m.shape,
                                check_invariants=True)


def test_pooler_picks_the_inference_kernel_by_canonical_size(monkeypatch):
    """Small windows (canonical size <= 64) pool with the separable kernel, larger ones with
    torchvision's per level; both give the same features."""
    import istr_viz.model.pooler as pooler_module
    separable_calls = []
    monkeypatch.setattr(pooler_module, "separable_roi_align",
                        lambda *args: separable_calls.append(1) or separable_roi_align(*args))
    g = torch.Generator().manual_seed(1)
    feats = [torch.randn(1, 4, 128 // s, 128 // s, generator=g) for s in (4, 8, 16, 32)]
    boxes = torch.tensor([[[0.0, 0, 30, 20], [10, 5, 120, 90], [40, 40, 70, 100]]])
    fine = RoIPooler(canonical_size=112.0)
    assert not fine.separable_inference and RoIPooler(canonical_size=56.0).separable_inference
    assert isinstance(fine.prepare(feats), list)
    with torch.no_grad():
        by_level = fine(fine.prepare(feats), boxes)
        assert not separable_calls
        forced = RoIPooler(canonical_size=112.0, separable_inference=True)
        separable = forced(forced.prepare(feats), boxes)
    assert len(separable_calls) == 1
    assert torch.allclose(by_level, separable, atol=1e-5)
