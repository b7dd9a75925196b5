"""One checkpoint file: weights, configuration, mask basis, classes, metrics, training state.

Saved atomically (temporary file in the same folder, then ``os.replace``), so a run killed at any
moment leaves either the previous file or the new one, never a torn one. Loaded only with
``torch.load(weights_only=True)``: everything inside is tensors, numbers, strings, lists and dicts.
"""

from __future__ import annotations

import math
import numbers
import os
import pickle
import re
import secrets
from pathlib import Path
from typing import Any

import torch

from istr_viz.errors import CheckpointError

FORMAT_VERSION = 1
REQUIRED_KEYS = ("format_version", "model", "config", "basis", "class_names", "category_ids")


def save_atomic(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to a temporary file beside ``path`` and rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkstemp: its files are 0600, and the checkpoint should get the permissions
    # any new file gets (0666 less the umask), so that others can read it where that is usual.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_checkpoint(path: str | Path, **payload: Any) -> Path:
    """Write a checkpoint holding ``payload`` (at least the keys in ``REQUIRED_KEYS`` but the version)."""
    missing = [k for k in REQUIRED_KEYS if k != "format_version" and k not in payload]
    if missing:
        raise ValueError(f"checkpoint payload lacks {missing}")
    return save_atomic({"format_version": FORMAT_VERSION, **payload}, path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Read and validate a checkpoint written by :func:`save_checkpoint`.

    Raises :class:`CheckpointError` (one line naming the file) for a missing file, a file that is
    not a checkpoint, one that needs unsafe unpickling, or one of another format version.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError("checkpoint file not found", file=path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - garbage also raises IndexError, KeyError, ...
        raise CheckpointError(f"not a readable istr_viz checkpoint ({_load_problem(err)})",
                              file=path) from None
    if not isinstance(ckpt, dict) or "format_version" not in ckpt:
        raise CheckpointError("not an istr_viz checkpoint (no format_version)", file=path)
    if ckpt["format_version"] != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint format version {ckpt['format_version']} is not supported "
            f"(this istr_viz reads version {FORMAT_VERSION})", file=path)
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint lacks {', '.join(missing)}", file=path)
    return ckpt


def _load_problem(err: Exception) -> str:
    """A short one-line account of why ``torch.load`` failed, without torch's advice or colours."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    if isinstance(err, pickle.UnpicklingError) and "WeightsUnpickler error:" in text:
        detail = text.split("WeightsUnpickler error:", 1)[1].strip().splitlines()[0]
        detail = detail.split(". ")[0].rstrip(".")
        return f"refused by safe loading (weights_only=True): {detail[:200]}"
    first = text.strip().splitlines()[0] if text.strip() else type(err).__name__
    return first[:160]


_FLOAT32_STATS = (".running_mean", ".running_var")  # BatchNorm buffers kept in float32 on export


def export_for_inference(ckpt: dict, half: bool = True, card: dict | None = None) -> dict:
    """An inference-only copy of a training checkpoint, for shipping: the training state (optimiser,
    raw weights, RNG) is dropped, floating-point weights become float16 when ``half`` (the basis
    buffers and BatchNorm's running statistics stay float32: a running variance can exceed
    float16's range; :func:`istr_viz.predictor.load_model` brings the rest back to float32),
    and ``card`` (data, command, time, hardware: anything JSON-like) is stored beside the metrics.
    Where the run started from another checkpoint (``train_state["init_from"]``: path and
    SHA-256), the card records that as ``init_from`` unless it says so itself, and likewise the
    machines the run trained on (``train_state["machines"]``, each a
    :func:`istr_viz.runtime.machine_summary`) as ``machines``, and the median training instance
    (:func:`trained_median_px`) as ``trained_median_px``.
    """
    weights = {}
    for name, value in ckpt["model"].items():
        if half and torch.is_tensor(value) and value.is_floating_point() \
                and not name.startswith("basis.") and not name.endswith(_FLOAT32_STATS):
            value = value.half()
        weights[name] = value
    keep = {k: v for k, v in ckpt.items() if k not in ("train_state", "model", "format_version")}
    card = dict(card or ckpt.get("card") or {})
    state = ckpt.get("train_state") or {}
    if state.get("init_from") and "init_from" not in card:
        card["init_from"] = dict(state["init_from"])
    if state.get("machines") and "machines" not in card:
        card["machines"] = [dict(m) for m in state["machines"]]
    median = trained_median_px(ckpt)
    if median and "trained_median_px" not in card:
        card["trained_median_px"] = median
    return {**keep, "model": weights, "card": card}


def trained_median_px(ckpt: dict) -> float:
    """The median training instance that checkpoint ``ckpt`` trained on (the square root of its
    area, in px at the middle training size: :func:`istr_viz.data.check.median_object_px`), as
    its run recorded it (``train_state["trained_median_px"]``, or the card of an export); 0 where
    there is no such record (a checkpoint from before it, as the shipped model, whose data's is
    ``data.median_object_px``'s 28; or data without instances)."""
    for holder in (ckpt.get("train_state"), ckpt.get("card")):
        value = holder.get("trained_median_px") if isinstance(holder, dict) else None
        if isinstance(value, numbers.Real) and not isinstance(value, bool) \
                and math.isfinite(value) and value > 0:
            return float(value)
    return 0.0
