"""Where and how code runs: the machine record that every pace and timing carries."""

from __future__ import annotations

import json

import torch

from istr_viz.runtime import cpu_has_bf16, machine_summary, read_cpuinfo, same_machine

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
    got = machine_summary(path, device="cpu")
    assert got["cpu"] == "Example Xeon 9999" and got["gpu"] is None  # a run on the CPU
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


def test_a_cpuinfo_without_a_flags_line_leaves_the_flags_unknown(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text("processor\t: 0\nFeatures\t: fp asimd\nmodel name\t: Example ARM\n")
    got = machine_summary(path)
    assert got["cpu"] == "Example ARM" and got["cpu_flags"] is None


def test_same_machine_ignores_torch_and_its_threads_but_not_the_cpu(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(CPUINFO)
    a = machine_summary(path, device="cpu")
    assert same_machine(a, {**a, "torch_threads": a["torch_threads"] + 1, "torch": "0.0"})
    assert not same_machine(a, {**a, "cpu": "Example EPYC"})
    assert not same_machine(a, {**a, "cpu_flags": ["avx2"]})
    assert not same_machine(a, {**a, "gpu": "Example GPU"})


def test_machine_summary_names_the_gpu_only_where_the_work_runs_on_it(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Example GPU")
    assert machine_summary(tmp_path / "missing", device="cpu")["gpu"] is None
    assert machine_summary(tmp_path / "missing", device="cuda")["gpu"] == "Example GPU"


def test_bf16_autocast_is_picked_from_the_same_flags_the_record_shows(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(CPUINFO)
    assert read_cpuinfo(path) == ("Example Xeon 9999", {"fpu", "sse2", "avx2", "avx512f",
                                                        "avx512_bf16", "amx_tile", "amx_bf16"})
    assert cpu_has_bf16(path)
    amx_only = tmp_path / "amx_only"
    amx_only.write_text(CPUINFO.replace(" avx512_bf16", ""))
    assert cpu_has_bf16(amx_only)
    none = tmp_path / "none"
    none.write_text(CPUINFO.replace(" avx512_bf16 amx_tile amx_bf16", ""))
    assert not cpu_has_bf16(none)
    # a flag's name inside another line is not the flag
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_text("model name\t: not avx512_bf16\nflags\t\t: fpu avx2\n")
    assert not cpu_has_bf16(elsewhere)
    assert not cpu_has_bf16(tmp_path / "missing")
    assert read_cpuinfo(tmp_path / "missing") == (None, None)
