"""A tiny ISTR trained for a few iterations on a tiny shapes data set, in seconds on a CPU.

What the notebooks run with ``SMALL = True`` (the test suite's setting) and what tests use when
they need a real checkpoint file: the pipeline end to end (data, basis, training, checkpoint,
evaluation), not a useful model. Its scores stay near the class prior (0.01)::

    run = make_tiny_run(tmp_dir)            # TinyRun: data root, train / val paths, last.pt
    model, predictor = load_model(run.checkpoint)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from istr_viz.config import Config, DataConfig, ModelConfig, TrainConfig, get_preset
from istr_viz.data.layout import DatasetPaths, split_paths

# About half a million weights: 8 queries, 3 stages, a 32-wide head on an 8-channel ResNet-18.
# GroupNorm, unlike the preset's BatchNorm: a run of a few iterations at batch 2 would evaluate
# with barely started running statistics, so outputs would say little about the weights.
TINY_MODEL = ModelConfig(backbone="resnet18", backbone_base_channels=8, norm="gn", num_queries=8,
                         num_stages=3, hidden_dim=32, dim_dynamic=8, dim_feedforward=64,
                         num_heads=2, canonical_box_size=32.0, zero_box_deltas=True,
                         mask_head="roi")
TINY_IMAGE_SIZE = 96  # side of the generated images
TINY_INPUT = (64, 96)  # (min_size, max_size) the network sees


def tiny_config(iters: int = 10) -> Config:
    """The ``shapes-cpu`` preset shrunk: :data:`TINY_MODEL`, a 12-dimensional basis, 64 px inputs,
    batch 2, ``iters`` iterations, no checkpoint before the end."""
    base = get_preset("shapes-cpu")
    min_size, max_size = TINY_INPUT
    return replace(
        base,
        model=TINY_MODEL,
        basis=replace(base.basis, dim=12),
        data=DataConfig(train_min_sizes=(min_size,), train_max_size=max_size,
                        test_min_size=min_size, test_max_size=max_size, num_workers=0),
        train=TrainConfig(batch_size=2, lr=1e-3, max_iters=iters, warmup_iters=0,
                          lr_steps=(), checkpoint_every=0, seed=0, threads=1, amp=False),
    )


def make_tiny_shapes(root: str | Path, num_train: int = 8, num_val: int = 4,
                     size: int = TINY_IMAGE_SIZE, seed: int = 0) -> tuple[DatasetPaths, DatasetPaths]:
    """Write a tiny shapes data set root (``train/`` and ``val/``); return its (train, val)."""
    from istr_viz.data.shapes import make_shapes

    root = Path(root)
    make_shapes(root, num_train=num_train, num_val=num_val, size=size, seed=seed, progress=False)
    return split_paths(root, "train"), split_paths(root, "val")


@dataclass(frozen=True)
class TinyRun:
    """Where :func:`make_tiny_run` put everything."""

    data_root: Path  # a data set root: train/ and val/
    train: DatasetPaths
    val: DatasetPaths
    out_dir: Path  # the run folder: last.pt, metrics.jsonl, basis.npz
    checkpoint: Path  # out_dir / "last.pt"
    iterations: int


def make_tiny_run(root: str | Path, iters: int = 10, device: str | None = "cpu",
                  evaluate: bool = False,
                  on_log: Callable[[dict], None] | None = None) -> TinyRun:
    """Generate a tiny data set under ``root/data`` and train :func:`tiny_config` on it for
    ``iters`` iterations into ``root/run`` (a few seconds on one CPU core).

    ``evaluate``: also evaluate on the tiny val set at the end (stored in the checkpoint's
    metrics). ``on_log`` is passed to :func:`istr_viz.engine.train`.
    """
    from istr_viz.engine import train

    root = Path(root)
    train_paths, val_paths = make_tiny_shapes(root / "data")
    result = train(tiny_config(iters), train_paths, root / "run",
                   val_data=val_paths if evaluate else None, device=device, progress=False,
                   on_log=on_log)
    return TinyRun(root / "data", train_paths, val_paths, result.out_dir, result.last_checkpoint,
                   result.iterations)


__all__ = ["TINY_INPUT", "TINY_MODEL", "TinyRun", "make_tiny_run", "make_tiny_shapes",
           "tiny_config"]
