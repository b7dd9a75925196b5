"""The training-step breakdown benchmark on a tiny data set: every part timed, the JSON written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from istr_viz.data.shapes import make_shapes
from test_engine import TINY

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_step.py"


def test_bench_step_times_every_part_of_an_iteration(tmp_path):
    root = tmp_path / "shapes"
    make_shapes(root, num_train=6, num_val=2, size=64, seed=1, progress=False)
    sets = [a for s in [*TINY, "basis.dim=12", "train.ema_decay=0.998"] for a in ("--set", s)]
    out = tmp_path / "step.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--data", str(root), "--iters", "4",
                           "--warmup", "1", "--json-out", str(out), "--freeze-at", "2", *sets],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["freeze_at"] == 2
    parts = report["ms_per_iteration"]
    assert list(parts) == ["data", "forward", "matching+loss", "backward", "gradient clipping",
                           "optimizer step", "EMA update"]
    assert all(ms >= 0 for ms in parts.values())  # rounded to 0.1 ms: a tiny part may show 0.0
    assert parts["forward"] > 0 and parts["backward"] > 0
    assert abs(report["ms_per_iteration_total"] - sum(parts.values())) < 0.5
    assert report["processes"] == 1 and report["warmup_iterations"] == 1
    assert "an iteration" in proc.stdout


def test_bench_step_refuses_fewer_iterations_than_warmup(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--iters", "3", "--warmup", "3"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--iters must exceed --warmup" in proc.stderr


def test_bench_step_under_torchrun_times_the_waiting_and_the_collectives(tmp_path):
    root = tmp_path / "shapes"
    make_shapes(root, num_train=8, num_val=2, size=64, seed=1, progress=False)
    sets = [a for s in [*TINY, "basis.dim=12", "train.ema_decay=0.998"] for a in ("--set", s)]
    out = tmp_path / "step_ddp.json"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2", str(SCRIPT), "--data", str(root),
                           "--iters", "4", "--warmup", "1", "--json-out", str(out), *sets],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["processes"] == 2
    assert list(report["ms_per_iteration"]) == [
        "data", "collectives: instance count", "forward", "matching+loss",
        "waiting for the other processes", "backward (+ all-reduce)", "gradient clipping",
        "optimizer step", "EMA update", "collectives: logged loss terms"]
