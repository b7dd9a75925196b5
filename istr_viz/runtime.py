"""Where and how to run: the device, CPU threads, bf16 support. One place for these choices."""

from __future__ import annotations

import functools
import os
import platform
from pathlib import Path

import torch

from istr_viz.errors import ConfigError


def default_device(requested: str | torch.device | None = None) -> torch.device:
    """``requested`` if given (``"auto"`` counts as not given), else CUDA when present, else CPU."""
    if requested is not None and str(requested) != "auto":
        try:
            device = torch.device(requested)
        except RuntimeError:
            raise ConfigError(f"unknown device {requested!r}; use auto, cpu or cuda") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("CUDA was requested but no CUDA device is available")
        return device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def read_cpuinfo(cpuinfo: str | Path = "/proc/cpuinfo") -> tuple[str | None, set[str] | None]:
    """The first CPU's ``model name`` and ``flags`` in a Linux cpuinfo file: (None, None) where
    it cannot be read (not Linux), flags None where it lists none (ARM names them ``Features``):
    unknown, not absent."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return None, None
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() not in fields:  # the first processor's block
            fields[key.strip()] = value.strip()
    flags = set(fields["flags"].split()) if "flags" in fields else None
    return fields.get("model name") or None, flags


@functools.lru_cache(maxsize=4)
def cpu_has_bf16(cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """True when the CPU has native bf16 arithmetic (AVX512-BF16 or AMX), where bf16 autocast
    pays off; False where the flags are unknown."""
    _, flags = read_cpuinfo(cpuinfo)
    return bool(flags and flags & {"avx512_bf16", "amx_bf16"})


_CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")  # what CPU kernels pick paths by


def machine_summary(cpuinfo: str | Path = "/proc/cpuinfo",
                    device: str | torch.device | None = None) -> dict:
    """What a timing or a training pace depends on, JSON-ready: the CPU's model name, its
    logical CPUs (``os.cpu_count``), the ``_CPU_FLAGS`` it has, torch's version and intra-op
    threads, and ``gpu``: the name of the CUDA device the work runs on (``device``; None: as
    :func:`default_device` picks), None when it runs on the CPU. Where ``cpuinfo`` cannot be
    read (not Linux) or lists no ``flags`` (ARM names them ``Features``), ``cpu_flags`` is None:
    unknown, not absent; without a ``model name`` line ``cpu`` is ``platform.processor()``. The
    same code trains at another pace on another CPU (benchmarks/results_log.md, session 43), so
    every recorded pace carries this."""
    cpu, present = read_cpuinfo(cpuinfo)
    cpu = cpu or platform.processor() or platform.machine()
    flags = None if present is None else [f for f in _CPU_FLAGS if f in present]
    used = default_device(device)
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "cpu_flags": flags,
            "torch": str(torch.__version__), "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(used) if used.type == "cuda" else None}


def same_machine(a: dict, b: dict) -> bool:
    """Whether two :func:`machine_summary` records name the same machine: CPU, logical CPUs,
    flags and GPU; torch's version and threads may differ (a resume with another process count)."""
    return all(a.get(k) == b.get(k) for k in ("cpu", "logical_cpus", "cpu_flags", "gpu"))


def autocast_dtype(device: torch.device, enabled: bool = True) -> torch.dtype | None:
    """The autocast dtype worth using on ``device``, or None for plain fp32."""
    if not enabled:
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_has_bf16():
        return torch.bfloat16
    return None


LOW_PRECISION_LAYERS = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.ConvTranspose2d)


def cast_weights_for_autocast(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Store the weights of ``model``'s linear and convolution layers in ``dtype``, in place.

    For inference under ``torch.autocast(dtype=dtype)`` only: autocast casts those weights to
    ``dtype`` at every call anyway, so the outputs are the same, without the casts. They are not
    free: ISTR's dynamic convolutions generate their kernels with a (2 D E, D) linear layer, and
    at ``shapes-cpu``'s test size the casts take a fifth of a bf16 forward pass on the CPU
    (benchmarks/results_log.md, session 17). Norm layers keep fp32 parameters (autocast runs them
    in fp32). Called outside autocast, the cast layers fail on fp32 inputs with a dtype error.
    Returns ``model``.
    """
    for module in model.modules():
        if isinstance(module, LOW_PRECISION_LAYERS):
            module.to(dtype)
    return model
