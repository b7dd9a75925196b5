"""The mask basis of ISTR: a PCA fitted once on ground-truth masks, then used to encode and decode.

ISTR never predicts a full mask. Each query predicts a short embedding z (M numbers) and this basis
decodes it into (S, S) probabilities for the mask inside the query's box. The basis is fitted on
every ground-truth instance mask cropped to its box and resized to S x S
(:mod:`istr_viz.data.instance_masks`).

Two recipes:

- ``"istr"`` (the paper's, code v1): every pixel gets its own noise ``r = max(0.05 U(0, 1), 0.01)``;
  foreground becomes ``1 - r`` and background ``r``; PCA runs on the logits of those values. Codes
  are whitened (``z = (x - mean) @ components.T / sqrt(var)``) and the decoder is
  ``sigmoid(z @ (components * sqrt(var)[:, None]) + mean)``: exactly scikit-learn's ``transform``
  and ``inverse_transform`` with ``whiten=True``, then a sigmoid.
- ``"binary"``: plain PCA on the {0, 1} masks; codes are not whitened; decode clamps to [0, 1].

Fit once at ``dim`` components; every smaller M is the first M rows of the same decomposition.
Shape letters: N masks, S mask side, P = S * S pixels, M (or k) embedding length.
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import sklearn
import torch
from sklearn.decomposition import PCA, IncrementalPCA
from torch import Tensor, nn

from istr_viz.data.coco import load_annotations
from istr_viz.data.instance_masks import instance_masks, iter_instance_masks
from istr_viz.dct import DctBasis
from istr_viz.errors import CheckpointError, DataError

FORMAT_VERSION = 1
RECIPES = ("istr", "binary")
SOLVERS = ("auto", "covariance_eigh", "full", "randomized", "incremental")
DEFAULT_CHUNK = 4096  # masks per IncrementalPCA.partial_fit call
_NOISE_LEVELS = 128  # levels of the fit-time noise table (7 random bits per pixel)
_BLOCK_PIXELS = 1 << 20  # pixels per block of the noisy-logit matrix (cache-sized)
_MIN_RELATIVE_STD = 1e-3  # whitening scales are floored at this share of the first one
_CURVE_ELEMENTS = 1 << 24  # (masks x k x pixels) elements per block in reconstruction_curves
_ARRAY_KEYS = ("mean", "components", "explained_variance", "explained_variance_ratio")
_META_KEYS = ("format_version", "mask_size", "dim", "recipe", "whiten", "logit_space",
              "noise_scale", "noise_floor", "fingerprint", "n_masks", "solver")


# ----------------------------------------------------------------------------- noise and inputs


@dataclass(frozen=True)
class NoiseSettings:
    """Per-pixel noise of the ``"istr"`` recipe: ``r = max(scale * U(0, 1), floor)``.

    A foreground pixel becomes ``1 - r`` and a background pixel ``r`` before the logit, so the
    logit magnitude ``log((1 - r) / r)`` lies in [2.94, 4.60] for the defaults.
    """

    scale: float = 0.05
    floor: float = 0.01

    def radius(self, uniform: Tensor) -> Tensor:
        """r for uniform draws ``uniform`` in [0, 1) (any shape)."""
        return (uniform * self.scale).clamp_(min=self.floor)

    def expected_logit(self) -> float:
        """E[log((1 - r) / r)]: the noise-free encoder uses this magnitude, so that its code is
        the average of the noisy codes (the encoder is linear in the logits).

        Closed form: a share ``u0 = floor / scale`` of the draws sits at the floor; over the rest
        ``r`` is uniform on [floor, scale] and the integral of ``log((1-r)/r)`` is the binary
        entropy ``h(r) = -r log r - (1-r) log(1-r)``.
        """
        a, f = self.scale, self.floor
        at_floor = math.log((1 - f) / f)
        if f >= a:
            return at_floor
        return f / a * at_floor + (_binary_entropy(a) - _binary_entropy(f)) / a

    def logit_table(self) -> np.ndarray:
        """(256,) float32 noisy logits indexed by ``2 * level + foreground`` for the fit: level
        ``l`` is r at u = (l + 0.5) / 128, i.e. 128 equiprobable levels of the noise."""
        u = (np.arange(_NOISE_LEVELS) + 0.5) / _NOISE_LEVELS
        r = np.maximum(self.scale * u, self.floor)
        magnitude = np.log((1 - r) / r)
        return np.stack([-magnitude, magnitude], axis=1).reshape(-1).astype(np.float32)


def _binary_entropy(r: float) -> float:
    return -r * math.log(r) - (1 - r) * math.log(1 - r)


def binarise_masks(masks: np.ndarray | Tensor) -> np.ndarray:
    """(N, S, S) masks of any dtype -> (N, S, S) bool C-contiguous numpy array.

    bool is kept, integers are foreground where non-zero, floats where ``>= 0.5``.
    """
    array = masks.detach().cpu().numpy() if isinstance(masks, Tensor) else np.asarray(masks)
    if array.ndim != 3 or array.shape[1] != array.shape[2]:
        raise ValueError(f"masks must have shape (N, S, S), got {tuple(array.shape)}")
    if array.dtype == np.bool_:
        return np.ascontiguousarray(array)
    if array.dtype.kind in "iu":
        return array != 0
    if array.dtype.kind == "f":
        return array >= 0.5
    raise ValueError(f"masks must be bool, integer or float, got dtype {array.dtype}")


def noisy_logit_matrix(flat: np.ndarray, rng: np.random.Generator,
                       noise: NoiseSettings = NoiseSettings()) -> np.ndarray:
    """(n, P) bool masks -> (n, P) float32 noisy logits, the matrix the ``"istr"`` PCA is fit on.

    Each pixel draws its r from 128 equiprobable levels of ``max(scale * U(0, 1), floor)``
    (:meth:`NoiseSettings.logit_table`) and becomes ``+log((1-r)/r)`` (foreground) or its negative.
    Seven random bits and a table look-up per pixel cost a quarter of a float draw plus a log, and
    the levels are at most 0.015 logit apart, far below the noise range of 1.66. The random bits
    are drawn in order from ``rng`` block by block; the look-ups of the blocks run on a few
    threads (numpy releases the GIL), so the result depends only on ``rng``.
    """
    n, p = flat.shape
    out = np.empty((n, p), np.float32)
    table = _pair_table(noise)
    out_pixels, mask_pixels = out.reshape(-1), flat.reshape(-1).view(np.uint8)
    rows = max(2, (_BLOCK_PIXELS // max(p, 1)) & ~1)  # even: pairs of pixels stay in a block

    def fill(begin: int, end: int, index: np.ndarray) -> None:
        index &= 0xFE  # bits 1..7: noise level; bit 0: foreground
        index[:end - begin] |= mask_pixels[begin:end]
        pairs = index.view(np.uint16)
        if len(index) == end - begin:
            np.take(table, pairs, out=out_pixels[begin:end].view(np.uint64), mode="clip")
        else:  # an odd number of pixels (odd P): the last look-up holds one padding pixel
            values = np.take(table, pairs, mode="clip").view(np.float32)
            out_pixels[begin:end] = values[:end - begin]

    with ThreadPoolExecutor(min(4, os.cpu_count() or 1)) as pool:
        jobs = []
        for first in range(0, n, rows):
            begin, end = first * p, min(first + rows, n) * p
            length = end - begin + ((end - begin) & 1)  # two pixels per 16-bit look-up
            index = rng.bit_generator.random_raw((length + 7) // 8).view(np.uint8)[:length]
            jobs.append(pool.submit(fill, begin, end, index))
        for job in jobs:
            job.result()
    return out


def _pair_table(noise: NoiseSettings) -> np.ndarray:
    """(65536,) uint64: the two float32 logits of a pair of pixels, indexed by their 16 bits."""
    single = noise.logit_table()
    codes = np.arange(1 << 16)
    low, high = codes & 0xFF, codes >> 8
    first, second = (low, high) if sys.byteorder == "little" else (high, low)
    pairs = np.stack([single[first], single[second]], axis=1)  # (65536, 2) float32
    return pairs.view(np.uint64).reshape(-1)


def design_matrix(flat: np.ndarray, recipe: str, rng: np.random.Generator,
                  noise: NoiseSettings = NoiseSettings()) -> np.ndarray:
    """(n, P) bool masks -> (n, P) float32 matrix in the recipe's space (noisy logits or {0, 1})."""
    if recipe == "istr":
        return noisy_logit_matrix(flat, rng, noise)
    return flat.astype(np.float32)


class MaskHasher:
    """sha256 of a stream of masks; equal for the same masks however they are chunked."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self.count = 0

    def update(self, flat: np.ndarray) -> None:
        """Add (n, P) bool masks."""
        self._hash.update(np.packbits(flat, axis=1))  # each mask padded to whole bytes
        self.count += len(flat)

    def hexdigest(self, mask_size: int) -> str:
        header = f"{self.count}x{mask_size}x{mask_size}:".encode()
        return hashlib.sha256(header + self._hash.digest()).hexdigest()


def mask_fingerprint(masks: np.ndarray | Tensor) -> str:
    """The fingerprint :meth:`MaskBasis.fit` records for (N, S, S) masks (binarised first)."""
    array = binarise_masks(masks)
    hasher = MaskHasher()
    hasher.update(array.reshape(len(array), -1))
    return hasher.hexdigest(array.shape[1])


# ----------------------------------------------------------------------------- decomposition


def choose_solver(n_samples: int, n_features: int, dim: int) -> str:
    """The fastest scikit-learn PCA solver for an (n_samples, n_features) matrix.

    ``covariance_eigh`` (X.T @ X, then a P x P eigh) when masks outnumber pixels and pixels are
    few: 0.5 s for 100k x 784 on 2 cores, several times faster than the others.
    ``randomized`` when only a few leading components of a short or wide matrix are wanted
    (500 x 784: 0.07 s against 0.2 s), ``full`` SVD for the rest (tiny or nearly full-rank).
    """
    if n_features <= 2048 and n_samples >= n_features:
        return "covariance_eigh"
    if dim < 0.8 * min(n_samples, n_features) and max(n_samples, n_features) > 500:
        return "randomized"
    return "full"


def _fit_pca(X: np.ndarray, dim: int, solver: str, seed: int, whiten: bool) -> PCA:
    """scikit-learn PCA of X (n, P), which it may centre in place."""
    pca = PCA(n_components=dim, svd_solver=solver, whiten=whiten, copy=False, random_state=seed)
    with sklearn.config_context(assume_finite=True):  # X is finite by construction
        return pca.fit(X)


def _rebatch(chunks: Iterable[np.ndarray], batch: int) -> Iterator[np.ndarray]:
    """Re-cut a stream of (n_i, ...) arrays into blocks of ``batch`` rows; the last block takes the
    remainder (batch to 2 * batch - 1 rows), so no block is short unless the whole stream is."""
    pending: list[np.ndarray] = []
    count = 0
    for chunk in chunks:
        pending.append(chunk)
        count += len(chunk)
        if count >= 2 * batch:
            block = np.concatenate(pending) if len(pending) > 1 else pending[0]
            start = 0
            while count - start >= 2 * batch:
                yield block[start:start + batch]
                start += batch
            pending, count = [block[start:]], count - start
    if count:
        yield np.concatenate(pending) if len(pending) > 1 else pending[0]


@dataclass
class FitTimings:
    """Where :meth:`MaskBasis.fit` spent its time, in seconds (not saved with the basis)."""

    prepare_s: float  # binarise and build the design matrix (noisy logits)
    decompose_s: float  # scikit-learn PCA / IncrementalPCA
    fingerprint_s: float
    total_s: float


# ----------------------------------------------------------------------------- the basis


class MaskBasis(nn.Module):
    """A fitted mask basis: ``mean (P,)``, ``components (dim, P)`` with unit-norm rows,
    ``explained_variance (dim,)`` and ``explained_variance_ratio (dim,)`` (scikit-learn's meaning:
    a share of the total variance of the fitted matrix), all float32 buffers.

    Build it with :meth:`fit`, :meth:`load`, :meth:`from_dict` or :meth:`from_sklearn`. It is an
    ``nn.Module``: as a submodule of a model it moves with ``model.to(device)`` and sits in the
    model's ``state_dict`` (buffers plus metadata in ``_extra_state``). A dtype cast of the model
    (``.half()``) leaves it float32, and encode/decode always compute in float32 (float64 for
    float64 inputs) with autocast off, returning the input's floating dtype.
    """

    def __init__(self, mean: np.ndarray | Tensor, components: np.ndarray | Tensor,
                 explained_variance: np.ndarray | Tensor,
                 explained_variance_ratio: np.ndarray | Tensor, mask_size: int,
                 recipe: str = "istr", whiten: bool | None = None,
                 noise: NoiseSettings = NoiseSettings(), fingerprint: str = "",
                 n_masks: int = 0, solver: str = ""):
        super().__init__()
        _check_recipe(recipe)
        for name, value in zip(_ARRAY_KEYS, (mean, components, explained_variance,
                                             explained_variance_ratio), strict=True):
            self.register_buffer(name, torch.as_tensor(np.asarray(value, np.float32)).clone())
        self.mask_size = int(mask_size)
        self.recipe = recipe
        self.whiten = (recipe == "istr") if whiten is None else bool(whiten)
        self.noise = noise
        self.fingerprint = fingerprint
        self.n_masks = int(n_masks)
        self.solver = solver
        self.fit_timings: FitTimings | None = None
        problem = _shape_problem(self.mean.shape, self.components.shape,
                                 self.explained_variance.shape,
                                 self.explained_variance_ratio.shape, self.mask_size)
        if problem:
            raise ValueError(problem)

    # -- properties

    @property
    def dim(self) -> int:
        """Number of components fitted (the largest usable M)."""
        return self.components.shape[0]

    @property
    def num_pixels(self) -> int:
        """P = S * S."""
        return self.mask_size * self.mask_size

    @property
    def logit_space(self) -> bool:
        """True for the ``"istr"`` recipe (PCA in noisy logit space, sigmoid decode)."""
        return self.recipe == "istr"

    def extra_repr(self) -> str:
        return (f"recipe={self.recipe!r}, dim={self.dim}, mask_size={self.mask_size}, "
                f"whiten={self.whiten}, fingerprint={self.fingerprint[:12]!r}")

    # -- fitting

    @classmethod
    def fit(cls, masks: np.ndarray | Tensor | Iterable[np.ndarray], dim: int = 60,
            recipe: str = "istr", solver: str = "auto", seed: int = 0,
            chunk_size: int | None = None, noise: NoiseSettings = NoiseSettings()) -> MaskBasis:
        """Fit a basis of ``dim`` components on ground-truth masks cropped to their boxes.

        Args:
            masks: (N, S, S) bool, integer or float array or tensor (binarised: non-zero, or
                ``>= 0.5`` for floats), or an iterable of such chunks (then :meth:`fit_chunks`).
            dim: number of components, at most N and S * S.
            recipe: ``"istr"`` (noisy logits, whitened, sigmoid) or ``"binary"``.
            solver: ``"auto"`` (:func:`choose_solver`), a scikit-learn ``svd_solver``, or
                ``"incremental"`` (IncrementalPCA over chunks of ``chunk_size`` masks).
            seed: seeds the noise and the randomized solver.
            chunk_size: stream the masks through ``IncrementalPCA.partial_fit`` in chunks of this
                many masks (memory ~ chunk_size * P floats instead of N * P).
        """
        if not isinstance(masks, (np.ndarray, Tensor)):
            return cls.fit_chunks(masks, dim, recipe, seed, chunk_size, noise)
        if solver not in SOLVERS:
            raise ValueError(f"unknown solver {solver!r}; choose one of {SOLVERS}")
        start = time.perf_counter()
        binary = binarise_masks(masks)
        if chunk_size is not None or solver == "incremental":
            size = chunk_size or DEFAULT_CHUNK
            chunks = (binary[i:i + size] for i in range(0, len(binary), size))
            return cls.fit_chunks(chunks, dim, recipe, seed, chunk_size, noise)
        n, size = len(binary), binary.shape[1]
        _check_fit_args(n, size, dim, recipe)
        flat = binary.reshape(n, size * size)
        X = design_matrix(flat, recipe, np.random.default_rng(seed), noise)
        prepared = time.perf_counter()
        solver = choose_solver(n, size * size, dim) if solver == "auto" else solver
        pca = _fit_pca(X, dim, solver, seed, whiten=recipe == "istr")
        decomposed = time.perf_counter()
        hasher = MaskHasher()
        hasher.update(flat)
        basis = cls.from_sklearn(pca, size, recipe, noise, hasher.hexdigest(size), n, solver)
        end = time.perf_counter()
        basis.fit_timings = FitTimings(prepared - start, decomposed - prepared, end - decomposed,
                                       end - start)
        return basis

    @classmethod
    def fit_chunks(cls, chunks: Iterable[np.ndarray | Tensor], dim: int = 60,
                   recipe: str = "istr", seed: int = 0, chunk_size: int | None = None,
                   noise: NoiseSettings = NoiseSettings()) -> MaskBasis:
        """Fit with IncrementalPCA on a stream of (n_i, S, S) mask chunks (masks that do not fit
        in memory, e.g. :func:`istr_viz.data.instance_masks.iter_instance_masks`).

        The stream is re-cut into blocks of ``chunk_size`` (default 4096) masks, which must be at
        least ``dim``; memory stays at a few blocks of P floats.
        """
        _check_recipe(recipe)
        batch = chunk_size or DEFAULT_CHUNK
        if batch < dim:
            raise ValueError(f"chunk_size={batch} must be at least dim={dim}")
        start = time.perf_counter()
        rng = np.random.default_rng(seed)
        ipca = IncrementalPCA(n_components=dim, whiten=recipe == "istr", copy=False)
        hasher = MaskHasher()
        size = None
        prepare = decompose = 0.0
        for block in _rebatch((binarise_masks(c) for c in chunks), batch):
            if size is None:
                size = block.shape[1]
            elif block.shape[1] != size:
                raise ValueError(f"mask chunks mix sizes {size} and {block.shape[1]}")
            t0 = time.perf_counter()
            _check_fit_args(len(block), size, dim, recipe)  # only a lone block can be short
            flat = block.reshape(len(block), size * size)
            hasher.update(flat)
            X = design_matrix(flat, recipe, rng, noise)
            t1 = time.perf_counter()
            ipca.partial_fit(X)
            prepare, decompose = prepare + t1 - t0, decompose + time.perf_counter() - t1
        if size is None:
            raise DataError("no masks to fit the basis on")
        basis = cls.from_sklearn(ipca, size, recipe, noise, hasher.hexdigest(size), hasher.count,
                                 "incremental")
        total = time.perf_counter() - start
        basis.fit_timings = FitTimings(prepare, decompose, 0.0, total)
        return basis

    @classmethod
    def from_sklearn(cls, pca: PCA | IncrementalPCA, mask_size: int, recipe: str = "istr",
                     noise: NoiseSettings = NoiseSettings(), fingerprint: str = "",
                     n_masks: int | None = None, solver: str = "") -> MaskBasis:
        """A basis holding a fitted scikit-learn PCA or IncrementalPCA (its ``whiten`` included).

        ``encode_linear`` / ``decode_linear`` then equal ``pca.transform`` /
        ``pca.inverse_transform``.
        """
        return cls(pca.mean_, pca.components_, pca.explained_variance_,
                   pca.explained_variance_ratio_, mask_size, recipe, whiten=bool(pca.whiten),
                   noise=noise, fingerprint=fingerprint,
                   n_masks=pca.n_samples_ if n_masks is None else n_masks, solver=solver)

    # -- torch side: masks <-> linear space <-> codes

    def to_linear(self, masks: Tensor, noise: bool | torch.Generator = True) -> Tensor:
        """(..., S, S) masks -> (..., P) in the basis's space, float32 (float64 for float64).

        ``"istr"``: the noisy logit ``logit(r + (1 - 2r) m)``; ``noise=True`` draws a fresh r per
        pixel (as the official encoder does on every call), a ``torch.Generator`` draws from it,
        ``False`` uses the r whose logit is the noise's mean magnitude (the expected code).
        ``"binary"``: the masks as 0/1 floats. Float masks are used as soft values in [0, 1];
        other dtypes are foreground where non-zero.
        """
        if tuple(masks.shape[-2:]) != (self.mask_size, self.mask_size):
            raise ValueError(f"masks must end in ({self.mask_size}, {self.mask_size}), "
                             f"got shape {tuple(masks.shape)}")
        dtype = _compute_dtype(masks)
        m = masks.reshape(*masks.shape[:-2], self.num_pixels)
        m = m.to(dtype).clamp(0, 1) if masks.is_floating_point() else (m != 0).to(dtype)
        if not self.logit_space:
            return m
        if noise is False:
            r = 1 / (1 + math.exp(self.noise.expected_logit()))  # logit(1 - r) = E[logit]
        else:
            generator = noise if isinstance(noise, torch.Generator) else None
            device = generator.device if generator is not None else m.device
            uniform = torch.rand(m.shape, generator=generator, device=device, dtype=dtype)
            r = self.noise.radius(uniform.to(m.device))
        return torch.logit(r + (1 - 2 * r) * m)

    def from_linear(self, x: Tensor) -> Tensor:
        """Linear space -> probabilities: sigmoid (``"istr"``) or clamp to [0, 1] (``"binary"``)."""
        return torch.sigmoid(x) if self.logit_space else x.clamp(0, 1)

    def encode_linear(self, x: Tensor, k: int | None = None) -> Tensor:
        """(..., P) values already in the basis's space -> (..., k) codes (k defaults to dim).

        ``(x - mean) @ components[:k].T``, divided by ``sqrt(explained_variance[:k])`` when
        whitened: scikit-learn's ``transform`` (see :meth:`_linear_params` for the one guard).
        """
        k = self._check_k(k)
        with torch.autocast(x.device.type, enabled=False):
            mean, components, scale = self._linear_params(k, x.device, _compute_dtype(x))
            codes = (x.to(mean.dtype) - mean) @ components.T
            if self.whiten:
                codes = codes / scale
        return codes.to(_output_dtype(x))

    def decode_linear(self, codes: Tensor) -> Tensor:
        """(..., k) codes, any k <= dim -> (..., P) in the basis's space (pre-sigmoid for
        ``"istr"``): scikit-learn's ``inverse_transform`` on the first k components."""
        with torch.autocast(codes.device.type, enabled=False):
            x = self._decode_linear(codes)
        return x.to(_output_dtype(codes))

    def encode(self, masks: Tensor, k: int | None = None,
               noise: bool | torch.Generator = True) -> Tensor:
        """(..., S, S) masks -> (..., k) codes (see :meth:`to_linear` for ``noise``).

        This is the target the mask head regresses. The default ``noise=True`` matches the
        official encoder; pass ``False`` for a deterministic code.
        """
        codes = self.encode_linear(self.to_linear(masks, noise), k)
        return codes.to(_output_dtype(masks))

    def decode(self, codes: Tensor) -> Tensor:
        """(..., k) codes, any k <= dim -> (..., S, S) mask probabilities (differentiable)."""
        with torch.autocast(codes.device.type, enabled=False):
            probs = self.from_linear(self._decode_linear(codes))
        probs = probs.to(_output_dtype(codes))
        return probs.reshape(*codes.shape[:-1], self.mask_size, self.mask_size)

    def _decode_linear(self, codes: Tensor) -> Tensor:
        """decode_linear in the compute dtype (float32, or float64 for float64 codes)."""
        k = self._check_k(codes.shape[-1])
        weights = self.decode_weights(k, codes.device, _compute_dtype(codes))  # (k, P)
        return codes.to(weights.dtype) @ weights + self.mean.to(weights.device, weights.dtype)

    def decode_weights(self, k: int | None = None, device: torch.device | str | None = None,
                       dtype: torch.dtype = torch.float32) -> Tensor:
        """(k, P) rows that codes multiply in :meth:`decode_linear` (scaled by sqrt(var) when
        whitened)."""
        k = self._check_k(k)
        _, components, scale = self._linear_params(k, device or self.mean.device, dtype)
        return components * scale[:, None] if self.whiten else components

    def code_scale(self) -> Tensor:
        """(dim,) float32: what each code component is multiplied by to give its coefficient in
        the space the basis was fitted in (the floored sqrt of the explained variance for
        whitened codes, 1 otherwise)."""
        if not self.whiten:
            return torch.ones(self.dim, device=self.mean.device)
        return self._linear_params(self.dim, self.mean.device, torch.float32)[2]

    def linear_offset(self) -> Tensor:
        """(P,) what :meth:`decode_linear` adds to the weighted rows: the mean."""
        return self.mean

    def _linear_params(self, k: int, device: torch.device | str,
                       dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        """mean (P,), components[:k] (k, P) and the whitening scale sqrt(var[:k]) (k,) on
        ``device`` in ``dtype``. The scale is floored at 1e-3 of the first one, so a component
        the data never varied along (fitting as many components as masks) cannot blow codes up;
        encode and decode use the same scale, so they stay inverse to each other."""
        mean = self.mean.to(device, dtype)
        components = self.components[:k].to(device, dtype)
        std = self.explained_variance.to(device, dtype).sqrt()
        scale = torch.maximum(std[:k], std[0] * _MIN_RELATIVE_STD)  # no host sync
        return mean, components, scale

    def _check_k(self, k: int | None) -> int:
        if k is None:
            return self.dim
        if not 1 <= k <= self.dim:
            raise ValueError(f"k={k} must be between 1 and the basis dim {self.dim}")
        return int(k)

    def _apply(self, fn, recurse=True):  # noqa: ANN001 (nn.Module's signature)
        """Follow device moves (``.to(device)``, ``.cuda()``) but never dtype casts: the basis
        stays float32 under ``model.half()`` or ``model.to(torch.bfloat16)``."""

        def device_only(t: Tensor) -> Tensor:
            return t.to(fn(t.new_empty(0)).device)

        return super()._apply(device_only, recurse)

    # -- plain-data round trips (checkpoints, npz)

    def get_extra_state(self) -> dict[str, Any]:
        """The metadata that rides in ``state_dict()['_extra_state']``."""
        return self._metadata()

    def set_extra_state(self, state: dict[str, Any]) -> None:
        entries = {**{name: getattr(self, name) for name in _ARRAY_KEYS}, **state}
        other = MaskBasis.from_dict(entries)
        for name in ("mask_size", "recipe", "whiten", "noise", "fingerprint", "n_masks", "solver"):
            setattr(self, name, getattr(other, name))

    def to_dict(self) -> dict[str, Any]:
        """Everything needed to rebuild the basis as CPU tensors, numbers and strings (safe for
        ``torch.load(weights_only=True)``)."""
        arrays = {name: getattr(self, name).detach().cpu().clone() for name in _ARRAY_KEYS}
        return {**arrays, **self._metadata()}

    def _metadata(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION, "mask_size": self.mask_size, "dim": self.dim,
            "recipe": self.recipe, "whiten": self.whiten, "logit_space": self.logit_space,
            "noise_scale": float(self.noise.scale), "noise_floor": float(self.noise.floor),
            "fingerprint": self.fingerprint, "n_masks": self.n_masks, "solver": self.solver,
        }

    @classmethod
    def from_dict(cls, entries: Mapping[str, Any], file: str | Path | None = None) -> MaskBasis:
        """Rebuild from :meth:`to_dict` output (or the arrays of a basis file).

        Raises :class:`CheckpointError` naming ``file`` for a missing key, a wrong type or shape,
        non-finite values or another format version.
        """
        missing = [key for key in (*_ARRAY_KEYS, *_META_KEYS) if key not in entries]
        if missing:
            raise CheckpointError(f"basis lacks {', '.join(missing)}", file=file)
        version = _scalar(entries, "format_version", "iu", file)
        if version != FORMAT_VERSION:
            raise CheckpointError(f"basis format_version {version} is not supported (this "
                                  f"istr_viz reads version {FORMAT_VERSION})", file=file)
        arrays = {key: _float_array(entries, key, file) for key in _ARRAY_KEYS}
        mask_size = _scalar(entries, "mask_size", "iu", file)
        problem = _shape_problem(*(arrays[key].shape for key in _ARRAY_KEYS), mask_size)
        if problem:
            raise CheckpointError(problem, file=file)
        if _scalar(entries, "dim", "iu", file) != len(arrays["components"]):
            raise CheckpointError("'dim' does not match the number of components", file=file)
        recipe = _scalar(entries, "recipe", "U", file)
        if recipe not in RECIPES:
            raise CheckpointError(f"unknown recipe {recipe!r} (known: {RECIPES})", file=file)
        noise = NoiseSettings(_scalar(entries, "noise_scale", "f", file),
                              _scalar(entries, "noise_floor", "f", file))
        return cls(*arrays.values(), mask_size, recipe, _scalar(entries, "whiten", "b", file),
                   noise, _scalar(entries, "fingerprint", "U", file),
                   _scalar(entries, "n_masks", "iu", file), _scalar(entries, "solver", "U", file))

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any], prefix: str = "") -> MaskBasis:
        """Rebuild from a ``state_dict()`` (of the basis, or of a model holding it at ``prefix``,
        e.g. ``"basis."``)."""
        extra = state.get(prefix + "_extra_state")
        if not isinstance(extra, Mapping):
            raise CheckpointError(f"state dict has no {prefix}_extra_state of a mask basis")
        arrays = {name: state[prefix + name] for name in _ARRAY_KEYS if prefix + name in state}
        return cls.from_dict({**arrays, **extra})

    def save(self, path: str | Path) -> Path:
        """Write the basis to ``path`` as an ``.npz`` (plain arrays; atomically: a temporary file
        beside it, then a rename). The path is used as given."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {key: np.asarray(value) for key, value in self.to_dict().items()}
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | Path) -> MaskBasis:
        """Read a basis written by :meth:`save` (``np.load(allow_pickle=False)``).

        Raises :class:`CheckpointError` naming the file if it is missing, not an ``.npz``, holds
        pickled objects, lacks keys, has wrong shapes or another ``format_version``.
        """
        path = Path(path)
        if not path.is_file():
            raise CheckpointError("basis file not found", file=path)
        try:
            data = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
            raise CheckpointError(f"not a readable .npz basis file ({_first_line(err)})",
                                  file=path) from None
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise CheckpointError("not an .npz archive (a single .npy array?)", file=path)
        with data:
            entries = {}
            for key in data.files:
                try:
                    entries[key] = data[key]
                except ValueError:
                    raise CheckpointError(f"entry {key!r} holds pickled objects, which are "
                                          "refused", file=path) from None
                except (OSError, EOFError, zipfile.BadZipFile) as err:
                    raise CheckpointError(f"entry {key!r} is corrupt ({_first_line(err)})",
                                          file=path) from None
        return cls.from_dict(entries, file=path)


# ----------------------------------------------------------------------------- checks and helpers


def _check_recipe(recipe: str) -> None:
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; choose one of {RECIPES}")


def _check_fit_args(n: int, size: int, dim: int, recipe: str) -> None:
    _check_recipe(recipe)
    if n == 0:
        raise DataError("no masks to fit the basis on")
    if not 1 <= dim <= size * size:
        raise ValueError(f"dim={dim} must be between 1 and S * S = {size * size}")
    if n < dim:
        raise DataError(f"{n} masks cannot give a {dim}-component basis; need at least {dim}")


def _shape_problem(mean: tuple, components: tuple, variance: tuple, ratio: tuple,
                   mask_size: int) -> str | None:
    """Why the array shapes do not form a basis of S = mask_size, or None."""
    pixels = mask_size * mask_size
    if mask_size < 1 or mean != (pixels,):
        return f"'mean' has shape {mean}, expected ({pixels},) for mask_size {mask_size}"
    if len(components) != 2 or components[1] != pixels or components[0] < 1:
        return f"'components' has shape {components}, expected (dim, {pixels})"
    for name, shape in (("explained_variance", variance), ("explained_variance_ratio", ratio)):
        if shape != components[:1]:
            return f"'{name}' has shape {shape}, expected ({components[0]},)"
    return None


def _scalar(entries: Mapping[str, Any], key: str, kinds: str, file: str | Path | None) -> Any:
    """A 0-d entry of numpy kind in ``kinds`` ("iu" int, "f" float, "b" bool, "U" str)."""
    value = entries[key]
    array = value.detach().cpu().numpy() if isinstance(value, Tensor) else np.asarray(value)
    ok = array.ndim == 0 and (array.dtype.kind in kinds or (kinds == "f" and
                                                            array.dtype.kind in "iu"))
    if not ok:
        raise CheckpointError(f"entry {key!r} should be a single value of kind {kinds!r}, got "
                              f"shape {array.shape} dtype {array.dtype}", file=file)
    return str(array[()]) if kinds == "U" else array.item()


def _float_array(entries: Mapping[str, Any], key: str, file: str | Path | None) -> np.ndarray:
    value = entries[key]
    array = value.detach().cpu().numpy() if isinstance(value, Tensor) else np.asarray(value)
    if array.dtype.kind not in "fiu":
        raise CheckpointError(f"entry {key!r} should hold numbers, got dtype {array.dtype}",
                              file=file)
    if not np.isfinite(array).all():
        raise CheckpointError(f"entry {key!r} holds non-finite values", file=file)
    return array.astype(np.float32)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:160]


def _compute_dtype(t: Tensor) -> torch.dtype:
    """float64 for float64 inputs, float32 otherwise (never less)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _output_dtype(t: Tensor) -> torch.dtype:
    """The input's floating dtype, float32 for bool and integer inputs."""
    return t.dtype if t.is_floating_point() else torch.float32


# ----------------------------------------------------------------------------- quality curves


class LinearBasis(Protocol):
    """What :func:`reconstruction_curves` needs: :class:`MaskBasis` and ``DctBasis`` have it."""

    mask_size: int
    dim: int

    def encode(self, masks: Tensor, k: int | None = None, noise: bool = False) -> Tensor: ...
    def decode_weights(self, k: int | None = None) -> Tensor: ...
    def linear_offset(self) -> Tensor: ...
    def from_linear(self, x: Tensor) -> Tensor: ...


@torch.no_grad()
def reconstruction_curves(basis: LinearBasis, masks: np.ndarray | Tensor,
                          k_max: int | None = None) -> dict[str, np.ndarray]:
    """Reconstruction quality for every k = 1..k_max from one encoding.

    The masks are encoded once at k_max (noise off); the reconstruction with the first k
    components is the cumulative sum of the first k weighted rows, so all k come from one pass.

    Args:
        basis: a :class:`MaskBasis` or ``DctBasis``.
        masks: (N, S, S) masks (binarised as in :func:`binarise_masks`).
        k_max: largest k (default: ``basis.dim``).

    Returns:
        ``{"k": (k_max,) int 1..k_max, "miou": (k_max,) mean IoU of ``decode >= 0.5`` against
        the masks (an empty mask predicted empty counts 1), "pixel_error": (k_max,) mean
        |probability - mask|}``.
    """
    k_max = basis.dim if k_max is None else k_max
    if not 1 <= k_max <= basis.dim:
        raise ValueError(f"k_max={k_max} must be between 1 and the basis dim {basis.dim}")
    device = basis.linear_offset().device
    targets = torch.from_numpy(binarise_masks(masks)).to(device)  # (N, S, S)
    if targets.shape[1] != basis.mask_size:
        raise ValueError(f"masks are {targets.shape[1]}x{targets.shape[1]}, the basis is "
                         f"{basis.mask_size}x{basis.mask_size}")
    n = len(targets)
    if n == 0:
        raise ValueError("reconstruction_curves needs at least one mask")
    codes = basis.encode(targets, k_max, noise=False).float()  # (N, K)
    weights = basis.decode_weights(k_max).float()  # (K, P)
    offset = basis.linear_offset().float()  # (P,)
    flat = targets.reshape(n, -1)  # (N, P)
    iou_sum = torch.zeros(k_max, dtype=torch.float64, device=device)
    error_sum = torch.zeros(k_max, dtype=torch.float64, device=device)
    rows = max(1, _CURVE_ELEMENTS // (k_max * flat.shape[1]))
    for start in range(0, n, rows):
        z, gt = codes[start:start + rows], flat[start:start + rows, None, :]  # (n, K), (n, 1, P)
        linear = torch.cumsum(z[:, :, None] * weights, dim=1).add_(offset)  # (n, K, P)
        probs = basis.from_linear(linear)
        pred = probs >= 0.5
        inter = (pred & gt).sum(-1)
        union = (pred | gt).sum(-1)  # (n, K)
        iou = torch.where(union > 0, inter / union.clamp(min=1), 1.0)
        iou_sum += iou.sum(0)
        error_sum += (probs - gt.float()).abs_().mean(-1).sum(0)
    return {"k": np.arange(1, k_max + 1), "miou": (iou_sum / n).cpu().numpy(),
            "pixel_error": (error_sum / n).cpu().numpy()}


def dct_reconstruction_curves(masks: np.ndarray | Tensor, k_max: int) -> dict[str, np.ndarray]:
    """:func:`reconstruction_curves` of the fixed DCT basis (``DctBasis(S, k_max)``) on the same
    masks: the DCT-Mask baseline to plot beside the PCA curve."""
    size = binarise_masks(masks).shape[1]
    return reconstruction_curves(DctBasis(size, k_max), masks, k_max)


# ----------------------------------------------------------------------------- from a COCO file


def fit_basis_from_coco(ann_file: str | Path, dim: int = 60, mask_size: int = 28,
                        recipe: str = "istr", holdout: float = 0.1, seed: int = 0,
                        progress: bool = True, chunk_size: int | None = None,
                        max_eval: int = 20_000,
                        strict: bool = False) -> tuple[MaskBasis, dict[str, Any]]:
    """Fit a basis on every non-crowd instance of a COCO file and measure it on held-out masks.

    A random ``holdout`` share of the masks (seeded) is kept out of the fit and used, at most
    ``max_eval`` of them, for the reconstruction curves of the PCA and of the DCT baseline; with
    ``holdout=0`` the curves are measured on the fitted masks. Unusable annotation entries are
    skipped and counted (``n_skipped_annotations``); with ``strict=True`` the first one raises
    :class:`DataError` naming the file and the entry.

    With ``chunk_size`` the masks are never all in memory: they are cut out image by image
    (:func:`~istr_viz.data.instance_masks.iter_instance_masks`), each one is sent to the
    held-out set with probability ``holdout`` (seeded; at most ``max_eval`` are kept) or
    streamed into ``IncrementalPCA`` in blocks of ``chunk_size`` masks (:meth:`MaskBasis
    .fit_chunks`). Without it all masks are loaded and the fastest PCA solver is used.

    Returns:
        ``(basis, report)``; the report is JSON-ready: ``dim``, ``mask_size``, ``recipe``,
        ``n_masks`` (all instances), ``n_fit``, ``n_eval``, ``eval_on`` ("holdout" or "fit"),
        ``fingerprint``, ``explained_variance_ratio`` (list), ``explained_variance_cumulative``
        (float at dim), ``recon_miou`` (float at dim), ``recon_miou_curve``,
        ``recon_pixel_error_curve`` and ``dct_miou_curve`` (lists for k = 1..dim),
        ``n_skipped_annotations``.
    """
    if not 0 <= holdout < 1:
        raise ValueError(f"holdout={holdout} must be in [0, 1)")
    ann = load_annotations(ann_file, strict=strict)
    if chunk_size is not None:
        basis, n, n_fit, eval_masks = _fit_streamed(ann, dim, mask_size, recipe, holdout, seed,
                                                    progress, chunk_size, max_eval)
        evaluated_on_holdout = n_fit < n
    else:
        masks = instance_masks(ann, mask_size, progress=progress)
        n = len(masks)
        if n < dim:
            raise DataError(f"{n} instance masks cannot give a {dim}-component basis",
                            file=ann_file)
        order = np.random.default_rng(seed).permutation(n)
        n_hold = min(int(round(holdout * n)), n - dim)
        fit_masks, held = masks[np.sort(order[n_hold:])], masks[np.sort(order[:n_hold])]
        basis = MaskBasis.fit(fit_masks, dim=dim, recipe=recipe, seed=seed)
        n_fit, evaluated_on_holdout = len(fit_masks), n_hold > 0
        eval_masks = (held if n_hold else fit_masks)[:max_eval]
    curves = reconstruction_curves(basis, eval_masks)
    dct = dct_reconstruction_curves(eval_masks, dim)
    ratio = basis.explained_variance_ratio.double()
    report = {
        "dim": dim, "mask_size": mask_size, "recipe": recipe, "n_masks": n,
        "n_fit": n_fit, "n_eval": len(eval_masks),
        "eval_on": "holdout" if evaluated_on_holdout else "fit", "fingerprint": basis.fingerprint,
        "explained_variance_ratio": ratio.tolist(),
        "explained_variance_cumulative": float(ratio.sum()),
        "recon_miou": float(curves["miou"][-1]),
        "recon_miou_curve": curves["miou"].tolist(),
        "recon_pixel_error_curve": curves["pixel_error"].tolist(),
        "dct_miou_curve": dct["miou"].tolist(),
        "n_skipped_annotations": len(ann.skipped),
    }
    return basis, report


def _fit_streamed(ann: Any, dim: int, mask_size: int, recipe: str, holdout: float, seed: int,
                  progress: bool, chunk_size: int, max_eval: int
                  ) -> tuple[MaskBasis, int, int, np.ndarray]:
    """The streamed branch of :func:`fit_basis_from_coco`: (basis, n masks, n fitted, the masks
    to measure on)."""
    if chunk_size < dim:
        raise ValueError(f"chunk_size={chunk_size} must be at least dim={dim}")
    split = np.random.default_rng([seed, 1])  # not the stream the fitting noise is drawn from
    kept: list[np.ndarray] = []  # held-out masks (or, with holdout=0, the first fitted ones)
    counts = {"all": 0, "fit": 0, "kept": 0}

    def keep(masks: np.ndarray) -> None:
        take = masks[:max_eval - counts["kept"]]
        if len(take):
            kept.append(take)
            counts["kept"] += len(take)

    def fit_stream() -> Iterator[np.ndarray]:
        for chunk in iter_instance_masks(ann, mask_size, chunk=chunk_size, progress=progress):
            counts["all"] += len(chunk)
            held = split.random(len(chunk)) < holdout
            keep(chunk[held] if holdout else chunk)
            counts["fit"] += int((~held).sum())
            yield chunk[~held]

    try:
        basis = MaskBasis.fit_chunks(fit_stream(), dim, recipe, seed, chunk_size)
    except DataError as err:
        raise DataError(f"{counts['fit']} instance masks to fit cannot give a {dim}-component "
                        f"basis ({err.reason})", file=ann.ann_file) from None
    if not kept:
        raise DataError("no held-out masks to measure the basis on; raise holdout",
                        file=ann.ann_file)
    return basis, counts["all"], counts["fit"], np.concatenate(kept)
