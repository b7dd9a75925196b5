"""benchmarks/time_istr.py: ISTR checkpoints timed back to back on the same val images."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "time_istr.py"


def test_times_each_checkpoint_at_each_size_and_writes_json(tiny_run, tmp_path):
    root, checkpoint = tiny_run
    out = tmp_path / "timing.json"
    run = subprocess.run([sys.executable, str(SCRIPT), "--checkpoints", str(checkpoint), str(checkpoint),
                          "--sizes", "48,64", "--data", str(root), "--images", "2",
                          "--json-out", str(out)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert [line.split(" px")[0] for line in run.stdout.splitlines()] == ["48", "64"]
    timing = json.loads(out.read_text())
    assert timing["images"] == 2 and set(timing["ms_per_image"]) == {"48", "64"}
    for row in timing["ms_per_image"].values():
        assert list(row) == [str(checkpoint)] and row[str(checkpoint)] > 0  # one key per path


def test_a_missing_checkpoint_is_one_line_and_status_2(tmp_path):
    run = subprocess.run([sys.executable, str(SCRIPT), "--checkpoints", str(tmp_path / "none.pt")],
                         capture_output=True, text=True)
    assert run.returncode == 2 and "none.pt" in run.stderr and len(run.stderr.splitlines()) == 1


def test_times_a_checkpoint_with_each_roialign_kernel(tiny_run, tmp_path):
    root, checkpoint = tiny_run
    out = tmp_path / "kernels.json"
    run = subprocess.run([sys.executable, str(SCRIPT), "--checkpoints", str(checkpoint),
                          "--sizes", "48", "--data", str(root), "--images", "2",
                          "--kernels", "separable,torchvision", "--json-out", str(out)],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    row = json.loads(out.read_text())["ms_per_image"]["48"]
    assert list(row) == [f"{checkpoint} [separable]", f"{checkpoint} [torchvision]"]
    bad = subprocess.run([sys.executable, str(SCRIPT), "--checkpoints", str(checkpoint),
                          "--data", str(root), "--kernels", "fast"], capture_output=True, text=True)
    assert bad.returncode == 2 and "fast" in bad.stderr and len(bad.stderr.splitlines()) == 1


def test_each_kernel_is_the_one_that_pools(tiny_run, monkeypatch):
    """``--kernels`` sets the poolers' kernel: the separable one pools only in its own timing."""
    sys.path.insert(0, str(SCRIPT.parent))
    import istr_viz.model.pooler as pooler_module
    from time_istr import time_checkpoints
    from istr_viz.model.roi_align import separable_roi_align

    calls = []
    monkeypatch.setattr(pooler_module, "separable_roi_align",
                        lambda *args: calls.append(1) or separable_roi_align(*args))
    root, checkpoint = tiny_run
    for kernel, pooled in (("torchvision", False), ("separable", True)):
        calls.clear()
        time_checkpoints([str(checkpoint)], [48], str(root), images=2, kernels=[kernel])
        assert bool(calls) == pooled, kernel
