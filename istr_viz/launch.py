"""Start a training in several local processes (DDP), as ``torchrun --standalone`` does.

``python -m istr_viz train --processes N ...`` calls :func:`launch_local`, which starts N copies
of the same command (without ``--processes``) under torch's elastic launcher: on the CPU they
train with gloo, one process per core, each with its share of the batch; on GPUs, one process
per GPU with nccl. On a small model one process per core does more work per minute than one
process with several threads, whose small operators stall at OpenMP barriers
(benchmarks/results_log.md, session 11).
"""
from __future__ import annotations

import os
import sys
import uuid

from istr_viz.errors import DataError


def strip_processes_flag(argv: list[str]) -> list[str]:
    """``argv`` without ``--processes N`` / ``--processes=N`` (the children must not relaunch)."""
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item == "--processes":
            skip = True
        elif not item.startswith("--processes="):
            out.append(item)
    return out


def threads_per_process(processes: int, cores: int | None = None) -> int:
    """OpenMP threads each of ``processes`` local processes gets: the cores split evenly, >= 1."""
    cores = cores or os.cpu_count() or 1
    return max(1, cores // processes)


def launch_local(argv: list[str], processes: int) -> int:
    """Run ``python -m istr_viz *argv`` in ``processes`` local DDP processes; their exit status.

    ``argv`` is the child command line (see :func:`strip_processes_flag`). The children print
    their own progress and errors (rank 0 the progress bar and the results); the status is 0 when
    all succeed, otherwise the first failed child's (2 for bad input, 130 when interrupted).
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if processes < 1:
        raise DataError(f"--processes must be at least 1, got {processes}")
    if os.environ.get("WORLD_SIZE", "1") != "1":
        raise DataError("--processes starts its own process group: do not combine it with torchrun")
    # the launcher passes its environment on; an explicit OMP_NUM_THREADS is kept
    os.environ.setdefault("OMP_NUM_THREADS", str(threads_per_process(processes)))
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=processes,
                          run_id=uuid.uuid4().hex, rdzv_backend="c10d",
                          rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=1.0)
    try:
        elastic_launch(config, sys.executable)("-m", "istr_viz", *argv)
    except ChildFailedError as err:
        codes = [f.exitcode for _, f in sorted(err.failures.items())]
        code = next((c for c in codes if c not in (0, None)), 1)
        return 128 - code if code < 0 else code  # -N: killed by signal N (Ctrl-C: 130)
    return 0
