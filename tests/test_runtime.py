"""Where and how code runs: the machine record that every pace and timing carries."""

from __future__ import annotations

import json

import torch

from istr_viz.runtime import machine_summary

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Example Xeon 9999
flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_tile amx_bf16
power management:

processor\t: 1
model name\t: Example Xeon 9999
flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_tile amx_bf16
"""


def test_machine_summary_reads_the_cpu_name_and_the_flags_that_pick_kernels(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(CPUINFO)
    got = machine_summary(path)
    assert got["cpu"] == "Example Xeon 9999"
    assert got["cpu_flags"] == ["avx2", "avx512f", "avx512_bf16", "amx_bf16"]
    # a plain str: torch.__version__'s own class is refused by safe loading (weights_only=True)
    assert type(got["torch"]) is str and got["torch"] == torch.__version__
    assert got["torch_threads"] == torch.get_num_threads()
    json.dumps(got)  # recorded in checkpoints and benchmark JSON as it is

    path.write_text(CPUINFO.replace(" avx512_bf16 amx_tile amx_bf16", ""))
    assert machine_summary(path)["cpu_flags"] == ["avx2", "avx512f"]  # absent, not unknown


def test_machine_summary_without_cpuinfo_says_the_flags_are_unknown(tmp_path):
    got = machine_summary(tmp_path / "missing")
    assert got["cpu_flags"] is None and isinstance(got["cpu"], str)
