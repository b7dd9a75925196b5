"""Start a training in several local processes (DDP), as ``torchrun --standalone`` does.

``python -m istr_viz train --processes N ...`` calls :func:`launch_local`, which starts N copies
of the same command (without ``--processes``) under torch's elastic launcher: on the CPU they
train with gloo, one process per core, each with its share of the batch; on GPUs, one process
per GPU with nccl. On a small model one process per core does more work per minute than one
process with several threads, whose small operators stall at OpenMP barriers
(benchmarks/results_log.md, session 11).
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import uuid
from contextlib import contextmanager

from istr_viz.errors import DataError

_FLAG = "--processes"
_SIGNALS = [getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT")
            if hasattr(signal, name)]


def strip_processes_flag(argv: list[str]) -> list[str]:
    """``argv`` without ``--processes N`` / ``--processes=N`` or an abbreviation argparse takes
    for it (``--proc 2``), so that the children do not launch again."""
    def is_flag(item: str) -> bool:
        name = item.split("=", 1)[0]
        return len(name) >= len("--pro") and _FLAG.startswith(name)  # "--pr" is also --preset

    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif is_flag(item):
            skip = "=" not in item
        else:
            out.append(item)
    return out


def threads_per_process(processes: int, cores: int | None = None) -> int:
    """OpenMP threads each of ``processes`` local processes gets: the cores split evenly, >= 1."""
    cores = cores or os.cpu_count() or 1
    return max(1, cores // processes)


@contextmanager
def _launcher_state():
    """Give back the environment, signal handlers and log levels the launcher changes, so that a
    caller in the same process (a notebook) keeps its Ctrl-C and its settings."""
    env = dict(os.environ)
    handlers = {s: signal.getsignal(s) for s in _SIGNALS}
    log = logging.getLogger("torch.distributed.elastic")
    level = log.level
    log.setLevel(logging.CRITICAL)  # its "failed (exitcode: 2)" lines repeat the children's errors
    try:
        yield
    finally:
        log.setLevel(level)
        for s, handler in handlers.items():
            signal.signal(s, handler)
        os.environ.clear()
        os.environ.update(env)


def _exit_status(codes: list[int | None]) -> int:
    """The status of a failed launch: a child's own error status (2 = bad input) before the
    signals the launcher then kills the others with; -N (killed by signal N) is 128 + N."""
    own = [c for c in codes if c is not None and c > 0]
    if own:
        return own[0]
    killed = [c for c in codes if c is not None and c < 0]
    return 128 - killed[0] if killed else 1


def launch_local(argv: list[str], processes: int) -> int:
    """Run ``python -m istr_viz *argv`` in ``processes`` local DDP processes; their exit status.

    ``argv`` is the child command line (see :func:`strip_processes_flag`). The children print
    their own progress and errors (rank 0 the progress bar and the results); the status is 0 when
    all succeed, otherwise a failed child's (2 for bad input, 130 when interrupted).
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if processes < 1:
        raise DataError(f"--processes must be at least 1, got {processes}")
    if os.environ.get("WORLD_SIZE", "1") != "1":
        raise DataError("--processes starts its own process group: do not combine it with torchrun")
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=processes,
                          run_id=uuid.uuid4().hex, rdzv_backend="c10d",
                          rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=1.0)
    with _launcher_state():
        # the children inherit this environment; an explicit OMP_NUM_THREADS is kept
        os.environ.setdefault("OMP_NUM_THREADS", str(threads_per_process(processes)))
        try:
            elastic_launch(config, sys.executable)("-m", "istr_viz", *argv)
        except ChildFailedError as err:
            return _exit_status([f.exitcode for _, f in sorted(err.failures.items())])
        except SignalException as err:  # Ctrl-C or a scheduler's SIGTERM to this process
            return 128 + int(err.sigval)
    return 0
