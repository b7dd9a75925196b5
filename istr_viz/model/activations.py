"""ELU with the same values and gradients as ``torch.nn.ELU`` (alpha 1), on the CPU by the faster of
torch's own kernel and a formula, chosen once per process by timing both. On other devices it is
torch's own ELU.

ISTR's refinement stages use ELU after every layer. How fast torch's CPU ELU is depends on the CPU:
on a 2-core AMD EPYC (2026-12-01) it took 7.7 ms forward + backward for a (128, 49, 128) float32
tensor against 2.0 ms for the formula below, on a 2-core Intel Xeon with AMX (2026-12-06) 1.7
against 1.9-2.2 ms. The formula: ``elu(x) = relu(x) + exp(min(x, 0)) - 1`` in float32 (within 3e-7 of
``expm1``), its gradient the saved ``exp(min(x, 0))``: 1 where x > 0.
``python benchmarks/bench_kernels.py`` times the two.

``ModelConfig.elu`` pins the kernel ("library" or "formula") where runs must repeat to the last bit:
the two differ by rounding, so two "auto" runs on a machine where they are about as fast can take
different kernels and drift apart. A multi-process training takes process 0's choice in every
process (``istr_viz.engine``).
"""

from __future__ import annotations

import functools
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from istr_viz.config import ELU_KERNELS


class _ELUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        x32 = x.float()
        slope = torch.exp(torch.clamp(x32, max=0.0))  # d elu / dx
        ctx.save_for_backward(slope.to(x.dtype))  # saved at the input's precision
        return (torch.relu(x32) + (slope - 1.0)).to(x.dtype)  # exact where x > 0

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (slope,) = ctx.saved_tensors
        return (grad.float() * slope).to(grad.dtype)


def elu(x: Tensor, library: bool | None = None) -> Tensor:
    """ELU (alpha 1) of any shape and floating dtype; see the module docstring. ``library``: use
    torch's kernel on the CPU too (default: ``library_elu_is_faster()``). Without a gradient to
    keep (inference) the formula runs outside the autograd function, whose own overhead is most
    of the cost on inference's small tensors (24 x 128: 15 against 10 us)."""
    if x.device.type != "cpu":
        return F.elu(x)
    if library is None:
        library = library_elu_is_faster()
    if library:
        return F.elu(x)
    if x.requires_grad and torch.is_grad_enabled():
        return _ELUFunction.apply(x)
    x32 = x.float()
    return (torch.relu(x32) + (torch.exp(torch.clamp(x32, max=0.0)) - 1.0)).to(x.dtype)


def library_elu_for(kernel: str) -> bool | None:
    """What ``kernel`` (one of ``ELU_KERNELS``) sets ``ELU.library`` to: True for "library",
    False for "formula", None for "auto" (the module times the two at its first CPU forward)."""
    if kernel not in ELU_KERNELS:
        raise ValueError(f"ELU kernel must be one of {ELU_KERNELS}, got {kernel!r}")
    return None if kernel == "auto" else kernel == "library"


def set_elu_kernel(model: nn.Module, library: bool | None) -> None:
    """Make every ``ELU`` module inside ``model`` use torch's CPU kernel (True), the formula
    (False) or the faster of the two (None)."""
    for m in model.modules():
        if isinstance(m, ELU):
            m.library = library


@functools.cache
def library_elu_is_faster() -> bool:
    """Whether torch's CPU ELU beats the formula on this machine: forward + backward of each on a
    (64, 49, 128) float32 tensor (a dynamic conv's activation), alternating, best of 5 after a
    warm-up; timed once per process (about 20 ms). The two agree to 3e-7, so where they are
    about as fast either choice will do."""
    kernels = {"library": F.elu, "formula": _ELUFunction.apply}
    times: dict[str, list[float]] = {name: [] for name in kernels}
    # normal CPU tensors whatever the caller's mode or default device
    with torch.inference_mode(False), torch.enable_grad():
        x = torch.randn(64, 49, 128, generator=torch.Generator().manual_seed(0), device="cpu")
        grad = torch.ones_like(x)
        for _ in range(6):  # the first round is the warm-up
            for name, fn in kernels.items():
                leaf = x.detach().requires_grad_()
                start = time.perf_counter()
                fn(leaf).backward(grad)
                times[name].append(time.perf_counter() - start)
    return min(times["library"][1:]) < min(times["formula"][1:])


class ELU(nn.Module):
    """Drop-in for ``nn.ELU()`` (no parameters, so checkpoints do not change). ``library``: the
    CPU kernel (``set_elu_kernel`` changes it); None: the faster on this machine
    (``library_elu_is_faster()``), timed at the first CPU forward of the process and then kept
    by the module."""

    def __init__(self, library: bool | None = None):
        super().__init__()
        self.library = library

    def forward(self, x: Tensor) -> Tensor:
        if self.library is None and x.device.type == "cpu":
            self.library = library_elu_is_faster()
        return elu(x, self.library)
