"""A fixed DCT mask basis, the DCT-Mask baseline to compare the fitted PCA basis with.

The code of an (S, S) binary mask is its orthonormal 2-D DCT-II (``scipy.fft.dctn(m,
norm="ortho")``) read in zig-zag order and cut after k coefficients; decoding is the inverse DCT
of the zero-filled vector, and ``>= 0.5`` gives the mask (no sigmoid). With k = S * S the
reconstruction is exact. Nothing is fitted, so the basis is fixed by (S, dim).

Zig-zag order is the JPEG one, as (row, col) frequency pairs: (0,0), (0,1), (1,0), (2,0), (1,1),
(0,2), (0,3), (1,2), ... (odd anti-diagonals run down-left, even ones up-right), which is also
DCT-Mask's ``get_dct_vector_coords``. Reconstruction curves: ``istr_viz.basis
.dct_reconstruction_curves``. Shape letters: N masks, S side, P = S * S, k kept coefficients.
"""

from __future__ import annotations

import numpy as np
import scipy.fft
import torch
from torch import Tensor, nn


def dct_matrix(size: int) -> np.ndarray:
    """(S, S) orthonormal DCT-II matrix D: ``D @ x == scipy.fft.dct(x, norm="ortho")``; row u is
    the u-th cosine basis vector."""
    return scipy.fft.dct(np.eye(size), norm="ortho", axis=0)


def zigzag_order(size: int) -> np.ndarray:
    """(S * S, 2) int (row, col) frequencies in JPEG zig-zag order (see the module docstring)."""
    rows, cols = np.divmod(np.arange(size * size), size)
    diagonal = rows + cols
    along = np.where(diagonal % 2 == 1, rows, -rows)  # odd: row ascending; even: descending
    order = np.lexsort((along, diagonal))
    return np.stack([rows[order], cols[order]], axis=1)


def dct_basis_rows(size: int, dim: int) -> np.ndarray:
    """(dim, P) float64 orthonormal rows: row r is the 2-D cosine image of the r-th zig-zag
    frequency (i, j), flattened, so ``mask.ravel() @ rows.T`` are the first dim DCT coefficients."""
    d = dct_matrix(size)
    freqs = zigzag_order(size)[:dim]
    images = d[freqs[:, 0], :, None] * d[freqs[:, 1], None, :]  # (dim, S, S)
    return images.reshape(dim, size * size)


class DctBasis(nn.Module):
    """The first ``dim`` zig-zag DCT coefficients of an S x S mask, with the same encode/decode
    interface as :class:`istr_viz.basis.MaskBasis` (recipe "binary": no whitening, no noise,
    decode clamps to [0, 1]). Moves with ``.to(device)``; its state_dict is empty."""

    def __init__(self, mask_size: int = 28, dim: int = 60):
        super().__init__()
        if not 1 <= dim <= mask_size * mask_size:
            raise ValueError(f"dim={dim} must be between 1 and S * S = {mask_size * mask_size}")
        self.mask_size = mask_size
        rows = torch.from_numpy(dct_basis_rows(mask_size, dim).astype(np.float32))
        self.register_buffer("rows", rows, persistent=False)  # (dim, P)

    @property
    def dim(self) -> int:
        return self.rows.shape[0]

    def extra_repr(self) -> str:
        return f"mask_size={self.mask_size}, dim={self.dim}"

    def to_linear(self, masks: Tensor, noise: bool = False) -> Tensor:
        """(..., S, S) masks -> (..., P) float32 in [0, 1] (``noise`` is ignored)."""
        if tuple(masks.shape[-2:]) != (self.mask_size, self.mask_size):
            raise ValueError(f"masks must end in ({self.mask_size}, {self.mask_size}), "
                             f"got shape {tuple(masks.shape)}")
        flat = masks.reshape(*masks.shape[:-2], self.mask_size * self.mask_size)
        return flat.float().clamp(0, 1) if masks.is_floating_point() else (flat != 0).float()

    def from_linear(self, x: Tensor) -> Tensor:
        """Reconstructed values -> [0, 1] (clamp; thresholding at 0.5 is unchanged by it)."""
        return x.clamp(0, 1)

    def encode(self, masks: Tensor, k: int | None = None, noise: bool = False) -> Tensor:
        """(..., S, S) masks -> (..., k) DCT coefficients in zig-zag order (k defaults to dim)."""
        x = self.to_linear(masks)
        return x @ self.decode_weights(k).to(x.device).T

    def decode_linear(self, codes: Tensor) -> Tensor:
        """(..., k) coefficients, any k <= dim -> (..., P) inverse DCT (raw values)."""
        weights = self.decode_weights(codes.shape[-1]).to(codes.device)
        return codes.float() @ weights

    def decode(self, codes: Tensor) -> Tensor:
        """(..., k) coefficients -> (..., S, S) values clamped to [0, 1]; ``>= 0.5`` is the mask."""
        x = self.from_linear(self.decode_linear(codes))
        return x.reshape(*codes.shape[:-1], self.mask_size, self.mask_size)

    def decode_weights(self, k: int | None = None) -> Tensor:
        """(k, P) the first k basis rows (orthonormal)."""
        k = self.dim if k is None else k
        if not 1 <= k <= self.dim:
            raise ValueError(f"k={k} must be between 1 and dim={self.dim}")
        return self.rows[:k]

    def linear_offset(self) -> Tensor:
        """(P,) zeros: the DCT has no mean term besides coefficient (0, 0)."""
        return self.rows.new_zeros(self.rows.shape[1])
