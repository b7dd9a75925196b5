"""The training engine: kill-safe resume, DDP equivalence, warm starts, schedule, budgets."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import coco_factory as cf
from istr_viz.basis import MaskBasis
from istr_viz.checkpoint import (export_for_inference, load_checkpoint, save_checkpoint,
                                 trained_median_px)
from istr_viz.config import apply_overrides, get_preset
from istr_viz.data.coco import load_annotations
from istr_viz.data.instance_masks import instance_masks
from istr_viz.data.layout import split_paths
from istr_viz.data.shapes import make_shapes
from istr_viz.engine import IterationBatchSampler, lr_factor, read_metrics
from istr_viz.errors import ConfigError
from istr_viz.model.istr import grid_proposals

ROOT = Path(__file__).resolve().parent.parent

TINY = [
    "model.backbone_base_channels=8", "model.num_queries=8", "model.num_stages=2",
    "model.hidden_dim=32", "model.dim_dynamic=8", "model.dim_feedforward=64", "model.num_heads=2",
    "model.canonical_box_size=32", "data.train_min_sizes=64", "data.train_max_size=64",
    "data.test_min_size=64", "data.test_max_size=64", "data.num_workers=0",
    "train.batch_size=4", "train.threads=1", "train.amp=false", "train.checkpoint_every=2",
    "train.warmup_iters=3", "train.lr=1e-3", "train.seed=3",
    "model.elu=library",  # one CPU kernel in every run, so that runs compare to the last bit
    "model.queries_per_instance=0",  # 8 queries, whatever the tiny set's crowding
    "data.median_object_px=0",  # 64 px, whatever the tiny set's object sizes
]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """A tiny shapes root and a basis fitted on its training masks (so no run refits it)."""
    root = tmp_path_factory.mktemp("engine") / "shapes"
    make_shapes(root, num_train=16, num_val=4, size=64, seed=5, progress=False)
    masks = instance_masks(load_annotations(root / "train" / "annotations.json"), 28, progress=False)
    basis_path = root / "basis.npz"
    MaskBasis.fit(masks, dim=12).save(basis_path)
    return root, basis_path


def _train_cmd(root: Path, basis: Path, out: Path, *extra: str, max_iters: int = 8) -> list[str]:
    paths = split_paths(root, "train")
    cmd = [sys.executable, "-m", "istr_viz", "train", "--train-ann", str(paths.ann_file),
           "--train-images", str(paths.images_dir), "--basis", str(basis), "--out", str(out),
           "--max-iters", str(max_iters), "--device", "cpu"]
    for item in TINY:
        cmd += ["--set", item]
    return cmd + list(extra)


def _env() -> dict:
    """The environment of a child training: tests/ importable, and whatever PYTHONPATH already
    held (packages installed with ``pip --target`` on a GPU image, say) still importable."""
    path = os.pathsep.join(p for p in (str(ROOT / "tests"), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}


def _losses(out: Path) -> dict[int, float]:
    return {r["iter"]: r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r}


def test_sigkill_mid_run_resumes_to_the_same_losses(shapes, tmp_path):
    root, basis = shapes
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(_train_cmd(root, basis, full, max_iters=10), check=True, env=_env(),
                   capture_output=True)
    proc = subprocess.Popen(_train_cmd(root, basis, killed, max_iters=10), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = killed / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline:  # kill once a checkpoint exists and the run has gone past it
        if metrics.exists() and (killed / "last.pt").exists() and len(_losses(killed)) >= 3:
            break
        assert proc.poll() is None, "the run finished before it could be killed"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = max(_losses(killed))
    assert before < 10, "killed too late to test a resume"
    # the run's data, configuration and basis come from its checkpoint
    resumed = subprocess.run([sys.executable, "-m", "istr_viz", "train", "--out", str(killed),
                              "--resume"], env=_env(), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    expected, got = _losses(full), _losses(killed)
    assert sorted(got) == list(range(1, 11))
    assert got == expected  # bit-for-bit the same run
    assert load_checkpoint(killed / "last.pt")["train_state"]["iteration"] == 10


def test_two_process_gloo_equals_one_process_with_double_batch(shapes, tmp_path):
    root, basis = shapes
    # no random target noise, and no denoising queries (their noise and padding depend on how
    # the batch is split over processes); GroupNorm, since BatchNorm (the preset's) normalises
    # over each process's share of the batch, which is by design not the whole batch's
    no_noise = ["--set", "loss.embed_target_noise=false", "--set", "model.dn_groups=0",
                "--set", "model.norm=gn"]
    single = tmp_path / "single"
    subprocess.run(_train_cmd(root, basis, single, *no_noise, max_iters=4), check=True,
                   env=_env(), capture_output=True)
    ddp = tmp_path / "ddp"
    # `train --processes 2` starts the two gloo processes itself, as torchrun --standalone does
    cmd = _train_cmd(root, basis, ddp, *no_noise, "--processes", "2", max_iters=4)
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("trained 4 iterations") == 1, proc.stdout  # rank 0 reports
    a = load_checkpoint(single / "last.pt")["model"]
    b = load_checkpoint(ddp / "last.pt")["model"]
    assert load_checkpoint(ddp / "last.pt")["train_state"]["world_size"] == 2
    for name, value in a.items():
        if torch.is_tensor(value) and value.is_floating_point():
            assert torch.allclose(value, b[name], atol=1e-4, rtol=0), name
    # the parameters did move: not a comparison of two untouched initialisations
    boxes = next(k for k in a if "proposal_boxes" in k)
    init = grid_proposals(a[boxes].shape[0])  # the shapes-cpu preset's start
    assert (a[boxes] - init).abs().max() > 1e-4


def test_local_sgd_averages_the_processes_weights_every_k_iterations(shapes, tmp_path):
    """train.average_every=k: no gradient all-reduce, the weights averaged after every k-th step
    and before the final checkpoint when the last step was not an average. 6-iteration runs:
    k=7 (averaged before saving only) ends where k=6 (averaged after its 6th step) does (without
    that last average it would hold process 0's own weights); k=2 (also averaged at 2 and 4)
    ends elsewhere, so the averages inside the run take effect; losses are logged once per
    process group, as under DDP."""
    root, basis = shapes
    models = {}
    for k in (2, 6, 7):
        out = tmp_path / f"k{k}"
        cmd = _train_cmd(root, basis, out, "--set", f"train.average_every={k}",
                         "--set", "train.log_every=3", "--set", "train.checkpoint_every=0",
                         "--processes", "2", max_iters=6)
        proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        ckpt = load_checkpoint(out / "last.pt")
        assert ckpt["train_state"]["world_size"] == 2 and ckpt["train_state"]["iteration"] == 6
        models[k] = ckpt["model"]
        assert [r["iter"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r] == [3, 6]
    floats = [n for n, v in models[2].items() if torch.is_tensor(v) and v.is_floating_point()]
    # (k=6 averages the EMA before its last update, k=7 after: equal up to rounding)
    assert all(torch.allclose(models[6][n], models[7][n], atol=1e-6, rtol=1e-5) for n in floats)
    moved = [n for n in floats if not torch.allclose(models[2][n], models[6][n], atol=1e-6)]
    assert len(moved) > len(floats) // 2


def test_two_processes_train_when_a_share_of_the_batch_has_no_instances(shapes, tmp_path):
    """Each process gets one image an iteration, and every image process 1 gets is a negative: a
    process without instances leaves the denoising label embedding unused and has no denoising
    loss terms, which must not throw the two processes' reductions out of step."""
    root, basis = shapes
    paths = split_paths(root, "train")
    negatives = tmp_path / "negatives.json"
    data = json.loads(paths.ann_file.read_text())
    ids = load_annotations(paths.ann_file).image_ids  # the data set's index order
    seed = int(next(t for t in TINY if t.startswith("train.seed=")).split("=")[1])
    ranks = [IterationBatchSampler(len(ids), 1, seed, 0, 6, rank, 2) for rank in (0, 1)]
    empty = {ids[i] for it in range(6) for i, _ in ranks[1].batch_for(it)}
    assert not empty & {ids[i] for it in range(6) for i, _ in ranks[0].batch_for(it)}
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] not in empty]
    negatives.write_text(json.dumps(data))
    out = tmp_path / "ddp"
    cmd = _train_cmd(root, basis, out, "--set", "train.batch_size=2", "--processes", "2",
                     max_iters=6)
    cmd[cmd.index("--train-ann") + 1] = str(negatives)
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert load_checkpoint(out / "last.pt")["train_state"]["iteration"] == 6
    logged = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert len(logged) == 6 and all("stage1/dn_loss_class" in r for r in logged)


def test_processes_passes_a_child_failure_on_as_one_error_line(shapes, tmp_path):
    """An error only the children meet (nothing to resume in --out) exits 2 with the children's
    one-line message, not a launcher traceback."""
    root, basis = shapes
    paths = split_paths(root, "train")
    cmd = [sys.executable, "-m", "istr_viz", "train", "--train-ann", str(paths.ann_file),
           "--train-images", str(paths.images_dir), "--out", str(tmp_path / "empty"),
           "--device", "cpu", "--resume", "--processes", "2"]  # (--resume takes no --set)
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "nothing to resume" in proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


@pytest.mark.parametrize("argv, message", [
    (["--processes", "0"], "--processes must be at least 1"),
    (["--processes", "3"], "does not split evenly over --processes 3"),
])
def test_processes_refuses_bad_counts_before_starting_anything(shapes, tmp_path, capsys, argv,
                                                              message):
    from istr_viz.cli import main

    root, basis = shapes
    cmd = _train_cmd(root, basis, tmp_path / "out", *argv)[3:]
    assert main(cmd) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_a_batch_larger_than_the_training_set_is_refused_at_once_naming_a_size_that_fits(
        shapes, tmp_path, capsys):
    """16 training images and a batch of 32: one line that names the annotation file and a batch
    that would run, exit 2, before the basis, the model or any run file."""
    from istr_viz.cli import main

    root, _ = shapes
    paths = split_paths(root, "train")
    cmd = ["train", "--train-ann", str(paths.ann_file), "--train-images", str(paths.images_dir),
           "--out", str(tmp_path / "out"), "--max-iters", "2", "--device", "cpu"]
    for item in [*TINY, "train.batch_size=32"]:
        cmd += ["--set", item]
    assert main(cmd) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(paths.ann_file) in err, err
    assert "16 images, fewer than one batch of train.batch_size=32" in err
    assert "--set train.batch_size=16" in err
    assert not (tmp_path / "out" / "metrics.jsonl").exists()
    assert not (tmp_path / "out" / "basis.npz").exists()


def test_launch_helpers_strip_the_flag_split_the_cores_and_pick_the_exit_status():
    from istr_viz.launch import _exit_status, strip_processes_flag, threads_per_process

    # one child's bad input (2) wins over the SIGTERM the launcher then kills the other with
    assert _exit_status([-15, 2]) == 2 and _exit_status([2, -15]) == 2
    assert _exit_status([-2, -15]) == 130 and _exit_status([None]) == 1

    argv = ["train", "--processes", "2", "--out", "r", "--processes=4", "--set", "a=1",
            "--proc", "3", "--pro=2", "--preset", "shapes-cpu"]  # argparse takes abbreviations
    assert strip_processes_flag(argv) == ["train", "--out", "r", "--set", "a=1", "--preset",
                                          "shapes-cpu"]
    assert threads_per_process(2, cores=2) == 1
    assert threads_per_process(2, cores=16) == 8
    assert threads_per_process(4, cores=2) == 1


def test_init_from_trains_on_a_data_set_with_other_classes(shapes, tmp_path, capsys):
    from istr_viz.cli import main

    root, basis = shapes
    source = tmp_path / "source"
    subprocess.run(_train_cmd(root, basis, source, max_iters=2), check=True, env=_env(),
                   capture_output=True)
    other = cf.write_quirky_coco(tmp_path / "other")  # categories 3, 7, 19, 42: other classes
    argv = ["train", "--train-ann", str(other.ann_file), "--train-images", str(other.images_dir),
            "--init-from", str(source / "last.pt"), "--out", str(tmp_path / "tuned"),
            "--max-iters", "2", "--device", "cpu"]
    for item in TINY:
        argv += ["--set", item]
    assert main(argv) == 0, capsys.readouterr().err
    src = load_checkpoint(source / "last.pt")
    tuned = load_checkpoint(tmp_path / "tuned" / "last.pt")
    assert tuned["category_ids"] == [3, 7, 19, 42]
    head = next(k for k in tuned["model"] if k.endswith("class_logits.weight"))
    assert tuned["model"][head].shape[0] == 4 != src["model"][head].shape[0]
    # everything but the class head started from the source: the first stage's dynamic layer is
    # far closer to the source's than a fresh initialisation would be after 2 small steps
    key = next(k for k in src["model"] if "stages.0" in k and k.endswith("weight")
               and "class_logits" not in k and src["model"][k].dim() == 2)
    moved = (tuned["model"][key] - src["model"][key]).abs().max()
    assert moved < 0.05 * src["model"][key].abs().max()


def test_init_from_keeps_the_source_mask_head_and_its_target_frame():
    """Fine-tuning an ISTR v1 checkpoint (query head, trained on GT-box crops; ship3 was one) with
    today's preset must not train that head toward predicted-box crops."""
    from istr_viz.config import Config, with_architecture_of

    preset, source = get_preset("shapes-cpu"), Config()  # Config(): ISTR v1
    assert (preset.model.mask_head, preset.loss.mask_target_boxes) == ("roi", "pred")
    cfg = with_architecture_of(preset, source)
    assert cfg.model == source.model and cfg.basis == source.basis
    assert (cfg.model.mask_head, cfg.loss.mask_target_boxes) == ("query", "gt")
    assert cfg.loss.embed_weighting == preset.loss.embed_weighting == "variance"
    assert cfg.train == preset.train and cfg.data == preset.data


def test_init_from_with_the_same_classes_keeps_the_class_head(shapes, tmp_path):
    from istr_viz.engine import train

    root, basis_path = shapes
    cfg = apply_overrides(get_preset("shapes-cpu"), [*TINY, "train.lr=1e-9", "train.warmup_iters=0"])
    train(cfg, split_paths(root, "train"), tmp_path / "a", basis=MaskBasis.load(basis_path),
          max_iters=1, device="cpu", progress=False)
    train(cfg, split_paths(root, "train"), tmp_path / "b", init_from=tmp_path / "a" / "last.pt",
          max_iters=1, device="cpu", progress=False)
    a, b = (load_checkpoint(tmp_path / n / "last.pt")["model"] for n in "ab")
    head = next(k for k in a if k.endswith("class_logits.weight"))
    torch.testing.assert_close(a[head], b[head], atol=1e-6, rtol=0)


def test_init_from_a_checkpoint_with_another_norm_says_so(shapes, tmp_path, capsys):
    """A GroupNorm checkpoint (ship3, shipped until session 15) and the BatchNorm preset:
    fine-tuning one with the other warns."""
    from istr_viz.engine import train

    root, basis_path = shapes
    basis = MaskBasis.load(basis_path)
    gn = apply_overrides(get_preset("shapes-cpu"), [*TINY, "model.norm=gn"])
    train(gn, split_paths(root, "train"), tmp_path / "gn", basis=basis, max_iters=1,
          device="cpu", progress=False)
    capsys.readouterr()
    for norm, noted in (("bn", True), ("gn", False)):
        cfg = apply_overrides(gn, [f"model.norm={norm}"])
        train(cfg, split_paths(root, "train"), tmp_path / norm, init_from=tmp_path / "gn" / "last.pt",
              max_iters=1, device="cpu", progress=False)
        err = capsys.readouterr().err
        assert ("was trained with model.norm=gn, this run uses bn" in err) is noted, err
        assert ("--set model.norm=gn" in err) is noted


def test_batchnorm_becomes_syncbatchnorm_under_cuda_ddp_only(shapes):
    """Several CUDA processes sync BatchNorm over the whole batch; one process, the CPU (gloo),
    GroupNorm and ``train.sync_bn=false`` keep the model as it is. The conversion keeps the
    parameter objects (the optimiser built before it stays valid) and the state-dict keys (a
    checkpoint loads into a plain model)."""
    from istr_viz.engine import sync_batchnorm_for_ddp
    from istr_viz.model.istr import build_model

    _, basis_path = shapes
    basis = MaskBasis.load(basis_path)
    cfg = apply_overrides(get_preset("shapes-cpu"), TINY)
    assert cfg.model.norm == "bn" and cfg.train.sync_bn

    def kinds(model):
        return {type(m).__name__ for m in model.modules()} & {"BatchNorm2d", "SyncBatchNorm"}

    cuda = torch.device("cuda")  # only the device's type is read: no GPU is needed
    for device, world, enabled in ((torch.device("cpu"), 2, True), (cuda, 1, True),
                                   (cuda, 2, False)):
        model = build_model(cfg.model, 6, basis)
        assert kinds(sync_batchnorm_for_ddp(model, device, world, enabled)) == {"BatchNorm2d"}

    torch.manual_seed(0)
    model = build_model(cfg.model, 6, basis)
    params = {name: id(p) for name, p in model.named_parameters()}
    keys = list(model.state_dict())
    synced = sync_batchnorm_for_ddp(model, cuda, 2)
    assert kinds(synced) == {"SyncBatchNorm"}
    assert {name: id(p) for name, p in synced.named_parameters()} == params
    assert list(synced.state_dict()) == keys
    plain = build_model(cfg.model, 6, basis)
    plain.load_state_dict(synced.state_dict(), strict=True)
    for (name, a), b in zip(plain.state_dict().items(), synced.state_dict().values()):
        assert not torch.is_tensor(a) or torch.equal(a, b), name

    gn = build_model(apply_overrides(cfg, ["model.norm=gn"]).model, 6, basis)
    assert kinds(sync_batchnorm_for_ddp(gn, cuda, 2)) == set()


def test_train_hands_the_model_and_the_sync_bn_flag_to_the_conversion(shapes, tmp_path, monkeypatch):
    """``train`` routes its model through ``sync_batchnorm_for_ddp`` with the run's world size and
    ``train.sync_bn`` (default on, ``false`` off)."""
    from istr_viz import engine

    root, basis_path = shapes
    basis = MaskBasis.load(basis_path)
    calls = []

    def spy(model, device, world_size, enabled=True):
        calls.append((device.type, world_size, enabled))
        return model

    monkeypatch.setattr(engine, "sync_batchnorm_for_ddp", spy)
    for flag in ("true", "false"):
        cfg = apply_overrides(get_preset("shapes-cpu"), [*TINY, f"train.sync_bn={flag}"])
        engine.train(cfg, split_paths(root, "train"), tmp_path / flag, basis=basis, max_iters=1,
                     device="cpu", progress=False)
    assert calls == [("cpu", 1, True), ("cpu", 1, False)]


def test_init_from_other_classes_of_the_same_count_starts_every_per_class_layer_afresh(shapes):
    """Classes are matched by name and id, not count: with other classes, the class logits, the
    semantic head and the denoising label embedding are not copied even when their shapes fit."""
    from istr_viz.engine import _init_from
    from istr_viz.model.istr import build_model

    _, basis_path = shapes
    cfg = apply_overrides(get_preset("shapes-cpu"), TINY)
    assert cfg.model.aux_semantic and cfg.model.dn_groups > 0
    basis = MaskBasis.load(basis_path)
    torch.manual_seed(0)
    source = build_model(cfg.model, 6, basis)
    torch.manual_seed(1)
    target = build_model(cfg.model, 6, basis)
    fresh = _init_from(target, {"model": source.state_dict()}, keep_class_head=False)
    assert any("class_logits" in k for k in fresh)
    assert {"semantic_head.weight", "label_embed.weight"} <= set(fresh)
    assert not torch.equal(target.semantic_head.weight, source.semantic_head.weight)
    assert torch.equal(target.backbone.state_dict()[next(iter(target.backbone.state_dict()))],
                       source.backbone.state_dict()[next(iter(source.backbone.state_dict()))])
    assert _init_from(target, {"model": source.state_dict()}, keep_class_head=True) == []


def test_diverged_boxes_stop_with_one_line_naming_the_stage(shapes, tmp_path, monkeypatch):
    import istr_viz.engine as engine

    root, basis_path = shapes
    real_build = engine.build_model

    def poisoned(*args, **kwargs):
        model = real_build(*args, **kwargs)
        with torch.no_grad():
            model.stages[0].bbox_deltas.bias.fill_(float("nan"))
        return model

    monkeypatch.setattr(engine, "build_model", poisoned)
    cfg = apply_overrides(get_preset("shapes-cpu"), TINY)
    with pytest.raises(engine.TrainingDiverged) as err:
        engine.train(cfg, split_paths(root, "train"), tmp_path / "run",
                     basis=MaskBasis.load(basis_path), max_iters=3, device="cpu", progress=False)
    assert "stage1 predicted non-finite boxes at iteration 1" in str(err.value)


def test_batches_are_a_function_of_seed_and_iteration():
    full = IterationBatchSampler(20, 4, seed=1, start_iter=0, max_iters=12)
    resumed = IterationBatchSampler(20, 4, seed=1, start_iter=7, max_iters=12)
    assert list(full)[7:] == list(resumed)
    ranks = [IterationBatchSampler(20, 2, 1, 0, 12, rank=r, world_size=2) for r in (0, 1)]
    for it in range(12):
        assert ranks[0].batch_for(it) + ranks[1].batch_for(it) == full.batch_for(it)
    epoch0 = [i for it in range(5) for i, _ in full.batch_for(it)]
    assert sorted(epoch0) == list(range(20))  # each epoch visits every image once


def test_linear_decay_falls_to_zero_over_the_budget_by_iterations_or_minutes():
    f = [lr_factor(i, 100, 10, 0.01, (0.5,), 0.1, decay="linear") for i in range(101)]
    assert f[0] == pytest.approx(0.01)  # the warm-up still applies
    assert f[20] == pytest.approx(0.8) and f[50] == pytest.approx(0.5) and f[100] == 0.0
    assert all(a >= b for a, b in zip(f[10:], f[11:]))  # no step: it only falls
    # a minutes budget: the clock alone
    assert lr_factor(10**6, None, 0, 1.0, (), 0.1, time_done=0.25, decay="linear") == 0.75
    # whichever is further along
    assert lr_factor(60, 100, 0, 1.0, (), 0.1, time_done=0.3, decay="linear") == pytest.approx(0.4)
    with pytest.raises(ConfigError, match="train.lr_decay"):
        apply_overrides(get_preset("shapes-cpu"), ["train.lr_decay=cosine"])


def test_lr_schedule_warmup_and_steps():
    f = [lr_factor(i, 100, 10, 0.01, (0.5, 0.9), 0.1) for i in range(100)]
    assert f[0] == pytest.approx(0.01)
    assert f[5] == pytest.approx(0.01 + 0.5 * 0.99)
    assert f[10] == f[49] == 1.0
    assert f[50] == pytest.approx(0.1) and f[90] == pytest.approx(0.01)


def test_unknown_set_key_lists_the_valid_ones(capsys):
    from istr_viz.cli import main

    assert main(["train", "--out", "/tmp/never", "--set", "model.nope=1"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'model.nope'" in err and "model.num_stages" in err
    assert "Traceback" not in err


def test_a_bad_fpn_output_conv_is_refused_by_the_cli_in_one_line(capsys):
    from istr_viz.cli import main

    assert main(["train", "--out", "/tmp/never", "--set", "model.fpn_output_conv=5x5"]) == 2
    err = capsys.readouterr().err
    assert "model.fpn_output_conv must be 3x3 or separable" in err and "Traceback" not in err


def test_zero_init_residual_is_refused_with_frozen_or_pretrained_norms():
    from istr_viz.errors import ConfigError

    for extra in (["model.norm=frozen_bn"], ["model.pretrained_path=r18.pth"]):
        with pytest.raises(ConfigError, match="zero_init_residual is for training from scratch"):
            apply_overrides(get_preset("shapes-cpu"), ["model.zero_init_residual=true"] + extra)
    assert apply_overrides(get_preset("shapes-cpu"),
                           ["model.zero_init_residual=true"]).model.zero_init_residual


def test_overrides_are_checked_together_whatever_their_order():
    """The preset reads a fine mask RoI, which needs the roi mask head: switching to the query
    head works with the RoI turned off in the same command, before or after it."""
    from istr_viz.errors import ConfigError

    for order in (["model.mask_head=query", "model.mask_roi_resolution=0"],
                  ["model.mask_roi_resolution=0", "model.mask_head=query"]):
        cfg = apply_overrides(get_preset("shapes-cpu"), order)
        assert (cfg.model.mask_head, cfg.model.mask_roi_resolution) == ("query", 0)
    with pytest.raises(ConfigError, match="needs model.mask_head='roi'"):
        apply_overrides(get_preset("shapes-cpu"), ["model.mask_head=query"])
    cfg = apply_overrides(get_preset("shapes-cpu"), ["train.lr=1e-4", "train.lr=2e-4"])
    assert cfg.train.lr == 2e-4  # the last one wins


def test_preset_overrides_in_a_notebook_style():
    cfg = apply_overrides(get_preset("shapes-cpu"), ["model.num_stages=4", "train.lr=1e-4"])
    assert cfg.model.num_stages == 4 and cfg.train.lr == 1e-4
    assert get_preset("coco-r50").model.num_queries == 300
    assert json.loads(json.dumps(cfg.to_dict()))["model"]["num_stages"] == 4


def test_non_finite_loss_stops_naming_stage_and_term_and_keeps_last_checkpoint(shapes, tmp_path,
                                                                               monkeypatch):
    import istr_viz.engine as engine

    root, basis_path = shapes
    real = engine.SetCriterion

    class PoisonedAtThirdCall(real):
        calls = 0

        def __call__(self, *args, **kwargs):
            total, terms, matches = super().__call__(*args, **kwargs)
            type(self).calls += 1
            if type(self).calls == 3:
                terms = dict(terms)
                terms["stage2/loss_giou"] = terms["stage2/loss_giou"] * float("nan")
            return total, terms, matches

    monkeypatch.setattr(engine, "SetCriterion", PoisonedAtThirdCall)
    cfg = apply_overrides(get_preset("shapes-cpu"), TINY)
    with pytest.raises(engine.TrainingDiverged) as err:
        engine.train(cfg, split_paths(root, "train"), tmp_path / "run",
                     basis=MaskBasis.load(basis_path), max_iters=6, device="cpu", progress=False)
    assert "loss_giou of stage2" in str(err.value) and "\n" not in str(err.value)
    assert load_checkpoint(tmp_path / "run" / "last.pt")["train_state"]["iteration"] == 2


def test_max_minutes_is_stored_and_ends_the_run_on_the_clock(shapes, tmp_path):
    """A minutes budget is kept in the checkpoint with the iterations it bought; the clock ends
    it, even inside the first iterations that time the forecast."""
    from istr_viz.engine import train

    root, basis_path = shapes
    cfg = apply_overrides(get_preset("shapes-cpu"), TINY)
    result = train(cfg, split_paths(root, "train"), tmp_path / "run", basis=MaskBasis.load(basis_path),
                   max_minutes=0.01, device="cpu", progress=False)
    state = load_checkpoint(tmp_path / "run" / "last.pt")["train_state"]
    assert state["max_minutes"] == 0.01
    assert state["max_iters"] == result.iterations == len(_losses(tmp_path / "run"))
    logged = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert logged[-1]["train_s"] >= 0.6 > logged[-2]["train_s"]  # the first step past 0.6 s


def test_ema_checkpoint_holds_the_average_and_resume_continues_it(shapes, tmp_path):
    """With train.ema_decay the checkpoint's "model" is the running average (what evaluation and
    prediction load), the raw weights travel for resuming, and a resumed run equals a straight one."""
    from istr_viz.engine import train

    root, basis_path = shapes
    cfg = apply_overrides(get_preset("shapes-cpu"),
                          TINY + ["train.ema_decay=0.9", "train.ema_ramp=2",
                                  "train.lr_steps=()"])  # the same schedule for 3 and 6 iterations
    basis = MaskBasis.load(basis_path)
    straight = train(cfg, split_paths(root, "train"), tmp_path / "a", basis=basis, max_iters=6,
                     device="cpu", progress=False)
    ckpt = load_checkpoint(straight.last_checkpoint)
    raw, avg = ckpt["train_state"]["raw_model"], ckpt["model"]
    name = "stages.0.class_logits.weight"
    assert not torch.equal(raw[name], avg[name])  # an average, not a copy
    train(cfg, split_paths(root, "train"), tmp_path / "b", basis=basis, max_iters=3,
          device="cpu", progress=False)
    train(cfg, split_paths(root, "train"), tmp_path / "b", resume=True, max_iters=6,
          device="cpu", progress=False)
    resumed = load_checkpoint(tmp_path / "b" / "last.pt")
    for key in (name, "backbone.body.conv1.weight"):
        assert torch.allclose(resumed["model"][key], avg[key], atol=1e-6)
        assert torch.allclose(resumed["train_state"]["raw_model"][key], raw[key], atol=1e-6)


def test_evaluations_do_not_change_the_training(shapes, tmp_path):
    """Where the evaluations fall does not move the training: a run that evaluates every 2
    iterations has the losses of one that evaluates only at the end (the denoising queries draw
    their noise from the global RNG, which an evaluation leaves as it found it)."""
    from istr_viz.engine import train

    root, basis_path = shapes
    basis = MaskBasis.load(basis_path)
    losses = {}
    for every in (0, 2):
        cfg = apply_overrides(get_preset("shapes-cpu"),
                              TINY + [f"train.eval_every={every}", "train.eval_max_images=2"])
        assert cfg.model.dn_groups > 0  # the training does draw from the global RNG
        train(cfg, split_paths(root, "train"), tmp_path / str(every),
              val_data=split_paths(root, "val"), basis=basis, max_iters=5, device="cpu",
              progress=False)
        losses[every] = _losses(tmp_path / str(every))
    evals = [r["iter"] for r in read_metrics(tmp_path / "2" / "metrics.jsonl") if "eval" in r]
    assert evals[:2] == [2, 4] and len(losses[2]) == 5
    assert losses[2] == losses[0]
    # and an evaluation does draw from the global RNG (its DataLoader's base seed), so the
    # equality above is the engine's doing, not an evaluation that never drew
    from istr_viz.evaluate import evaluate_model
    from istr_viz.predictor import load_model

    model = load_model(tmp_path / "2" / "last.pt", device="cpu")[0]
    before = torch.get_rng_state()
    evaluate_model(model, split_paths(root, "val"), cfg, device="cpu", max_images=2,
                   progress=False)
    assert not torch.equal(before, torch.get_rng_state())


def test_adam_beta2_reaches_the_optimiser_and_is_checked(shapes, tmp_path):
    """train.adam_beta2 is AdamW's second-moment decay in the run (the checkpoint's optimiser
    state carries it, so a resumed run keeps it); values outside (0, 1) are refused."""
    from istr_viz.engine import train

    root, basis_path = shapes
    basis = MaskBasis.load(basis_path)
    for beta2 in (0.95, None):  # None: the preset's, torch's default 0.999
        cfg = apply_overrides(get_preset("shapes-cpu"),
                              TINY + ([f"train.adam_beta2={beta2}"] if beta2 else []))
        out = tmp_path / str(beta2)
        train(cfg, split_paths(root, "train"), out, basis=basis, max_iters=1, device="cpu",
              progress=False)
        groups = load_checkpoint(out / "last.pt")["train_state"]["optimizer"]["param_groups"]
        assert {tuple(g["betas"]) for g in groups} == {(0.9, beta2 or 0.999)}
    for bad in ("0", "1", "1.5"):
        with pytest.raises(ConfigError, match="train.adam_beta2"):
            apply_overrides(get_preset("shapes-cpu"), [f"train.adam_beta2={bad}"])
    # a run written before the field resumes at torch's default, the betas it trained with
    from istr_viz.engine import resumed_config
    stored = cfg.to_dict()
    del stored["train"]["adam_beta2"]
    assert resumed_config(stored).train.adam_beta2 == 0.999


def test_ema_decay_ramps_up_from_a_copy():
    from istr_viz.engine import build_ema

    model = torch.nn.Linear(2, 1, bias=False)
    ema = build_ema(model, decay=0.5, ramp=0)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update_parameters(model)  # the first update copies
    with torch.no_grad():
        model.weight.fill_(3.0)
    ema.update_parameters(model)  # 0.5 * 1 + 0.5 * 3
    assert torch.allclose(ema.module.weight, torch.full((1, 2), 2.0))
    ramped = build_ema(model, decay=0.9, ramp=10)
    ramped.update_parameters(model)
    with torch.no_grad():
        model.weight.fill_(5.0)
    ramped.update_parameters(model)  # decay 0.9 * (1 - exp(-1 / 10)) after one update
    d = 0.9 * (1 - math.exp(-0.1))
    assert torch.allclose(ramped.module.weight, torch.full((1, 2), d * 3.0 + (1 - d) * 5.0))


def test_ema_averages_batchnorm_statistics_and_copies_its_counter():
    """shapes-cpu uses BatchNorm: the averaged model must evaluate with averaged running stats."""
    from istr_viz.engine import build_ema

    model = torch.nn.BatchNorm1d(3)
    ema = build_ema(model, decay=0.9, ramp=0)
    model.train()
    model(torch.full((4, 3), 2.0) + torch.arange(4.0)[:, None])  # batch mean 3.5, var 5/3
    ema.update_parameters(model)  # the first update copies
    first_mean, first_var = model.running_mean.clone(), model.running_var.clone()
    model(torch.full((4, 3), 10.0) + 3 * torch.arange(4.0)[:, None])  # batch mean 14.5, var 15
    ema.update_parameters(model)
    mean = 0.9 * first_mean + 0.1 * model.running_mean
    var = 0.9 * first_var + 0.1 * model.running_var
    assert torch.allclose(ema.module.running_mean, mean)
    assert torch.allclose(ema.module.running_var, var)
    assert int(ema.module.num_batches_tracked) == int(model.num_batches_tracked) == 2
    x = torch.randn(5, 3)
    assert not ema.module.training  # evaluation normalises with the averaged statistics
    torch.testing.assert_close(ema.module(x), (x - mean) / torch.sqrt(var + model.eps))


def test_eval_points_split_the_budget_evenly():
    from istr_viz.engine import eval_points

    assert eval_points(100, 3) == {25, 50, 75}
    assert eval_points(10, 0) == set()


def test_training_warns_when_images_hold_more_objects_than_queries(tmp_path, capsys):
    from istr_viz.data.layout import DatasetPaths
    from istr_viz.engine import train

    quirky = cf.write_quirky_coco(tmp_path / "quirky")  # image 1001 holds 3 instances
    cfg = apply_overrides(get_preset("shapes-cpu"), [*TINY, "model.num_queries=2", "basis.dim=4"])
    train(cfg, DatasetPaths(quirky.ann_file, quirky.images_dir), tmp_path / "run", max_iters=1,
          device="cpu", progress=False)
    err = capsys.readouterr().err
    assert "warning: annotations.json: 1 of 6 images have more instances than the model's 2" in err


def test_a_run_from_scratch_on_other_classes_hints_at_the_shipped_model(tiny_run, tmp_path,
                                                                        capsys, monkeypatch):
    from dataclasses import replace

    import istr_viz.predictor
    from istr_viz.config import Config
    from istr_viz.data.layout import DatasetPaths
    from istr_viz.engine import fine_tune_hint, train

    root, shipped = tiny_run  # stands in for the shipped model: its classes are the shapes'
    cfg = Config.from_dict(load_checkpoint(shipped)["config"])
    quirky = cf.write_quirky_coco(tmp_path / "quirky")
    other = load_annotations(quirky.ann_file)
    same = load_annotations(root / "train" / "annotations.json")
    hint = fine_tune_hint(cfg, other, shipped)
    assert hint.startswith("hint: ") and f"model {shipped} (the train command's default" in hint
    assert fine_tune_hint(cfg, same, shipped) is None  # the shipped model's own classes
    other_model = replace(cfg, model=replace(cfg.model, num_queries=cfg.model.num_queries + 1))
    assert fine_tune_hint(other_model, other, shipped) is None  # --init-from would change it
    # settings that shape no weight do not matter: the weights would all be copied
    weight_free = replace(cfg, model=replace(cfg.model, canonical_box_size=2 * cfg.model.canonical_box_size,
                                             maskness_power=cfg.model.maskness_power + 1))
    assert fine_tune_hint(weight_free, other, shipped) == hint
    state = torch.get_rng_state()  # building the model to compare must not move the run's seed
    fine_tune_hint(cfg, other, shipped)
    assert torch.equal(torch.get_rng_state(), state)
    imagenet = replace(cfg, model=replace(cfg.model, pretrained_path=str(tmp_path / "r18.pth")))
    assert fine_tune_hint(imagenet, other, shipped) is None
    assert fine_tune_hint(cfg, other, tmp_path / "missing.pt") is None
    # train prints it once, after the data checks, and not when it starts from a checkpoint
    monkeypatch.setattr(istr_viz.predictor, "SHIPPED_CHECKPOINT", Path(shipped))
    paths = DatasetPaths(quirky.ann_file, quirky.images_dir)
    train(cfg, paths, tmp_path / "scratch", max_iters=1, device="cpu", progress=False)
    assert capsys.readouterr().err.count("hint: ") == 1
    # also when the data raise the queries (the quirky set: 3 instances at most): --init-from
    # would take the shipped model's count
    raised = replace(cfg, model=replace(cfg.model, queries_per_instance=4.0))
    train(raised, paths, tmp_path / "raised", max_iters=1, device="cpu", progress=False)
    err = capsys.readouterr().err
    assert f"note: model.num_queries=12 rather than {cfg.model.num_queries}" in err
    assert err.count("hint: ") == 1
    train(cfg, paths, tmp_path / "tuned", max_iters=1, device="cpu", progress=False,
          init_from=shipped)
    err = capsys.readouterr().err
    assert "hint: " not in err
    # cfg (not from training_start) still holds a fine-tuning lr it does not train at: a note
    assert (f"note: train.fine_tune_lr={cfg.train.fine_tune_lr:.1e}, train.fine_tune_ema_decay="
            f"0.995, train.fine_tune_lr_gamma=1 are not applied" in err)
    assert "training at train.lr=1.0e-03, train.ema_decay=0, train.lr_gamma=0.1" in err
    train(cfg, paths, tmp_path / "asked", max_iters=1, device="cpu", progress=False,
          suggest_shipped=False)  # a caller that chose scratch on purpose
    assert "hint: " not in capsys.readouterr().err


def test_training_start_takes_the_shipped_model_for_other_classes_only(tiny_run, tmp_path):
    """"auto" starts from the shipped model on data of other classes whose configuration has its
    weights; from scratch on its own classes, on an override that reshapes a weight, with ImageNet
    weights, and when asked (None). A checkpoint's architecture replaces the preset's before the
    overrides apply."""
    from dataclasses import replace

    from istr_viz.config import Config
    from istr_viz.engine import training_start

    root, shipped = tiny_run  # stands in for the shipped model: its classes are the shapes'
    source = Config.from_dict(load_checkpoint(shipped)["config"])
    preset = get_preset("shapes-cpu")
    quirky = cf.write_quirky_coco(tmp_path / "quirky").ann_file
    own = root / "train" / "annotations.json"
    tiny = [*TINY, "basis.dim=12"]

    cfg, start = training_start(preset, tiny, quirky, "auto", shipped=shipped)
    assert start == Path(shipped) and cfg.model == source.model and cfg.basis == source.basis
    assert training_start(preset, tiny, own, "auto", shipped=shipped) == \
        (apply_overrides(preset, tiny), None)
    assert training_start(preset, tiny, quirky, None, shipped=shipped)[1] is None
    assert training_start(preset, [*tiny, "model.dim_feedforward=48"], quirky, "auto",
                          shipped=shipped)[1] is None
    # the preset's query rule, not the shipped model's (the stand-in's tiny override is 0); the
    # data may raise the count (3 instances x 4 = 12 > 8): the per-query weights start afresh
    assert cfg.model.queries_per_instance == 0
    raised, start = training_start(preset, [*tiny, "model.queries_per_instance=4"], quirky, "auto",
                                   shipped=shipped)
    assert start == Path(shipped) and raised.model.queries_per_instance == 4
    wide = replace(preset, model=replace(preset.model, queries_per_instance=4.0))
    cfg, start = training_start(wide, [t for t in tiny if "queries_per_instance" not in t],
                                quirky, "auto", shipped=shipped)
    assert start == Path(shipped) and cfg.model.queries_per_instance == 4
    imagenet = [*tiny, f"model.pretrained_path={tmp_path / 'r18.pth'}"]
    assert training_start(preset, imagenet, quirky, "auto", shipped=shipped)[1] is None
    assert training_start(preset, tiny, quirky, "auto", shipped=tmp_path / "none.pt")[1] is None
    # the real preset (its own sizes) does not fit the tiny stand-in: from scratch, preset kept
    cfg, start = training_start(preset, [], quirky, "auto", shipped=shipped)
    assert start is None and cfg == preset
    # an explicit checkpoint: its architecture, then the overrides (scoring and lr here)
    cfg, start = training_start(preset, ["model.maskness_power=3", "train.lr=1e-3"], quirky,
                                shipped)
    assert start == Path(shipped) and cfg.model == replace(source.model, maskness_power=3.0)
    assert cfg.train.lr == 1e-3 and cfg.loss.mask_target_boxes == source.loss.mask_target_boxes


def test_a_start_from_trained_weights_takes_the_fine_tuning_lr(tiny_run, tmp_path):
    """training_start gives a run that starts from a checkpoint (the automatic start or an
    explicit one) train.fine_tune_lr, where set, unless the overrides set train.lr; a run from
    scratch keeps train.lr."""
    from istr_viz.engine import training_start

    root, shipped = tiny_run
    preset = get_preset("shapes-cpu")
    assert 0 < preset.train.fine_tune_lr < preset.train.lr  # the preset's own pair
    quirky = cf.write_quirky_coco(tmp_path / "quirky").ann_file
    own = root / "train" / "annotations.json"
    tiny = [t for t in TINY if not t.startswith("train.lr=")] + ["basis.dim=12"]

    def lr(overrides, ann=quirky, start="auto"):
        cfg, began = training_start(preset, [*tiny, *overrides], ann, start, shipped=shipped)
        return cfg.train.lr, began is not None

    assert lr([]) == (preset.train.fine_tune_lr, True)
    assert lr([], start=shipped) == (preset.train.fine_tune_lr, True)
    assert lr([], ann=own) == (preset.train.lr, False)  # from scratch: its own classes
    assert lr([], start=None) == (preset.train.lr, False)
    assert lr(["train.lr=1e-3"]) == (1e-3, True)  # an explicit lr wins, after or before
    assert lr(["train.lr=1e-3", "train.fine_tune_lr=5e-5"]) == (1e-3, True)
    assert lr(["train.fine_tune_lr=5e-5"]) == (5e-5, True)
    assert lr(["train.fine_tune_lr=0"]) == (preset.train.lr, True)  # 0: train.lr
    with pytest.raises(ConfigError, match="train.fine_tune_lr"):
        apply_overrides(preset, ["train.fine_tune_lr=-1e-4"])


def test_a_start_from_trained_weights_takes_the_fine_tuning_average_and_lr_drop(tiny_run,
                                                                                 tmp_path):
    """train.fine_tune_ema_decay and train.fine_tune_lr_gamma become a run's train.ema_decay and
    train.lr_gamma when it starts from a checkpoint, unless the overrides set those; none leaves
    the run's own; a run from scratch keeps its own; out-of-range values are refused."""
    from dataclasses import replace

    from istr_viz.config import Config
    from istr_viz.engine import training_start

    root, shipped = tiny_run
    shapes = get_preset("shapes-cpu")
    preset = replace(shapes, train=replace(shapes.train, ema_decay=0.5, lr_gamma=0.2))
    quirky = cf.write_quirky_coco(tmp_path / "quirky").ann_file
    tiny = [*TINY, "basis.dim=12"]
    fine = ["train.fine_tune_ema_decay=0.99", "train.fine_tune_lr_gamma=1"]

    def run(overrides, start="auto"):
        cfg, began = training_start(preset, [*tiny, *overrides], quirky, start, shipped=shipped)
        return cfg.train, began is not None

    tc, began = run(fine)
    assert began and (tc.ema_decay, tc.lr_gamma) == (0.99, 1.0)
    assert (tc.fine_tune_lr, tc.fine_tune_ema_decay, tc.fine_tune_lr_gamma) == (0.0, None, None)
    assert run(fine, start=shipped)[0].ema_decay == 0.99  # an explicit start too
    # an explicit setting wins, before or after; none: the run's own
    tc, _ = run([*fine, "train.ema_decay=0.9"])
    assert (tc.ema_decay, tc.lr_gamma) == (0.9, 1.0)
    tc, _ = run(["train.lr_gamma=0.3", *fine])
    assert (tc.ema_decay, tc.lr_gamma) == (0.99, 0.3)
    tc, began = run([*fine, "train.fine_tune_ema_decay=none", "train.fine_tune_lr_gamma=none"])
    assert began and (tc.ema_decay, tc.lr_gamma) == (0.5, 0.2)
    tc, began = run(fine, start=None)  # from scratch: the run's own, the fine-tuning ones kept
    assert not began and (tc.ema_decay, tc.lr_gamma) == (0.5, 0.2)
    assert (tc.fine_tune_ema_decay, tc.fine_tune_lr_gamma) == (0.99, 1.0)
    for bad in ("train.fine_tune_ema_decay=1", "train.fine_tune_ema_decay=-0.1",
                "train.fine_tune_lr_gamma=0"):
        with pytest.raises(ConfigError, match=f"{bad.split('=')[0]} must be"):
            apply_overrides(preset, [bad])
    # fields unset in a preset parse from text too; text that is no number is refused
    paper = get_preset("coco-r50")
    assert paper.train.fine_tune_ema_decay is None and paper.train.fine_tune_lr_gamma is None
    parsed = apply_overrides(paper, ["train.fine_tune_ema_decay=0.99",
                                     "train.fine_tune_lr_gamma=2"]).train
    assert (parsed.fine_tune_ema_decay, parsed.fine_tune_lr_gamma) == (0.99, 2.0)
    with pytest.raises(ConfigError, match="bad value 'high' for train.fine_tune_ema_decay"):
        apply_overrides(paper, ["train.fine_tune_ema_decay=high"])
    for bad in ("train.lr_gamma=0", "train.lr_gamma=inf", "train.fine_tune_lr_gamma=inf"):
        with pytest.raises(ConfigError, match=f"{bad.split('=')[0]} must be positive and finite"):
            apply_overrides(preset, [bad])
    # a configuration stored before these fields reads them as unset
    stored = preset.to_dict()
    del stored["train"]["fine_tune_ema_decay"], stored["train"]["fine_tune_lr_gamma"]
    old = Config.from_dict(stored).train
    assert (old.fine_tune_ema_decay, old.fine_tune_lr_gamma) == (None, None)


def test_train_command_starts_from_the_shipped_model_unless_told_otherwise(tiny_run, tmp_path,
                                                                            capsys, monkeypatch):
    """The CLI's default start on data of other classes is the shipped model (one line says so,
    the weights it trains from are the shipped ones); --from-scratch and --init-from override it,
    the two together are refused, and --resume takes neither."""
    import istr_viz.predictor
    from istr_viz.cli import main

    root, shipped = tiny_run
    monkeypatch.setattr(istr_viz.predictor, "SHIPPED_CHECKPOINT", Path(shipped))
    quirky = cf.write_quirky_coco(tmp_path / "quirky")
    base = ["train", "--train-ann", str(quirky.ann_file), "--train-images", str(quirky.images_dir),
            "--max-iters", "1", "--device", "cpu"]
    for item in [*TINY, "basis.dim=12"]:
        base += ["--set", item]
    source = load_checkpoint(shipped)["model"]
    stem = next(k for k in source if k.startswith("backbone.") and source[k].ndim == 4)

    assert main([*base, "--out", str(tmp_path / "auto")]) == 0
    out = capsys.readouterr()
    assert f"starting from the shipped model {shipped}" in out.err and "hint: " not in out.err
    # TINY's train.lr wins; the preset's fine-tuning average and lr drop apply
    assert f"initialised from {shipped} (lr 1.0e-03, weight average 0.995, no lr drop)" in out.out
    assert "at lr 1.0e-03 (train.lr)" in out.err and "not applied" not in out.err
    started = load_checkpoint(tmp_path / "auto" / "last.pt")["train_state"]["init_from"]
    assert started["path"] == str(Path(shipped).resolve()) and len(started["sha256"]) == 64
    # without an lr of its own the run takes the preset's fine-tuning lr, and says so
    preset_lr = base[:base.index("--set")]
    for item in [*TINY, "basis.dim=12"]:
        preset_lr += [] if item.startswith("train.lr=") else ["--set", item]
    assert main([*preset_lr, "--out", str(tmp_path / "ftlr")]) == 0
    fine = get_preset("shapes-cpu").train.fine_tune_lr
    err = capsys.readouterr().err
    assert f"at lr {fine:.1e} (train.fine_tune_lr)" in err
    stored = load_checkpoint(tmp_path / "ftlr" / "last.pt")["config"]["train"]
    assert stored["lr"] == fine and stored["fine_tune_lr"] == 0.0
    # the preset's weight average and no lr drop for such runs alone: said, stored, trained with
    assert (f"at lr {fine:.1e} (train.fine_tune_lr), weight average 0.995 "
            f"(train.fine_tune_ema_decay), no lr drop (train.fine_tune_lr_gamma);" in err)
    average = load_checkpoint(tmp_path / "ftlr" / "last.pt")
    assert (stored["ema_decay"], stored["lr_gamma"]) == (0.995, 1.0)
    assert stored["fine_tune_ema_decay"] is None and stored["fine_tune_lr_gamma"] is None
    assert "raw_model" in average["train_state"]  # the average's raw weights travel for resuming
    # fine-tuning values of one's own
    assert main([*preset_lr, "--out", str(tmp_path / "average"), "--set",
                 "train.fine_tune_ema_decay=0.99", "--set", "train.fine_tune_lr_gamma=0.5"]) == 0
    assert ("weight average 0.99 (train.fine_tune_ema_decay), lr x0.5 at the steps "
            "(train.fine_tune_lr_gamma);" in capsys.readouterr().err)
    stored = load_checkpoint(tmp_path / "average" / "last.pt")["config"]["train"]
    assert (stored["ema_decay"], stored["lr_gamma"]) == (0.99, 0.5)
    # the settings that --set gives are named as such
    assert main([*preset_lr, "--out", str(tmp_path / "given"), "--set", "train.ema_decay=0.9",
                 "--set", "train.lr_gamma=0.5", "--set", "train.fine_tune_ema_decay=0.995"]) == 0
    err = capsys.readouterr().err
    assert "weight average 0.9 (train.ema_decay), lr x0.5 at the steps (train.lr_gamma)" in err
    assert main([*base, "--out", str(tmp_path / "scratch"), "--from-scratch"]) == 0
    out = capsys.readouterr()
    assert "starting from the shipped model" not in out.err and "initialised from" not in out.out
    assert "hint: " not in out.err  # scratch was asked for: no suggestion to do otherwise
    scratch = load_checkpoint(tmp_path / "scratch" / "last.pt")
    assert scratch["train_state"]["init_from"] is None
    preset = get_preset("shapes-cpu").train  # the run's own average and drop, not the fine-tuning
    stored = scratch["config"]["train"]
    assert (stored["ema_decay"], stored["lr_gamma"]) == (preset.ema_decay, preset.lr_gamma) == \
        (0.0, 0.1)
    assert "raw_model" not in scratch["train_state"]
    # an explicit checkpoint: no line about the default; a basis of one's own: from scratch
    assert main([*base, "--out", str(tmp_path / "explicit"), "--init-from", str(shipped)]) == 0
    out = capsys.readouterr()
    assert "starting from the shipped model" not in out.err and "initialised from" in out.out
    # the data raise the query count (12 > 8): every weight but the class heads and the
    # per-query ones is the shipped model's
    assert main([*base, "--out", str(tmp_path / "raised"), "--set",
                 "model.queries_per_instance=4"]) == 0
    out = capsys.readouterr()
    assert "starting from the shipped model" in out.err
    fresh = out.out.split("re-initialised: ")[1].splitlines()[0].split(", ")
    assert {"proposal_boxes.weight", "query_embed.weight"} <= set(fresh)
    assert all(k.startswith(("proposal_boxes.", "query_embed.", "label_embed.", "semantic_head."))
               or "class_logits" in k for k in fresh), fresh
    basis = tmp_path / "basis.npz"
    MaskBasis.from_dict(load_checkpoint(shipped)["basis"]).save(basis)
    assert main([*base, "--out", str(tmp_path / "own"), "--basis", str(basis)]) == 0
    out = capsys.readouterr()
    assert "starting from the shipped model" not in out.err and "initialised from" not in out.out
    # one iteration moves the weights a little: the shipped start stays near the shipped ones
    near = load_checkpoint(tmp_path / "auto" / "last.pt")["model"][stem].float()
    far = load_checkpoint(tmp_path / "scratch" / "last.pt")["model"][stem].float()
    assert (near - source[stem].float()).abs().mean() < (far - source[stem].float()).abs().mean()
    with pytest.raises(SystemExit) as both:
        main([*base, "--out", str(tmp_path / "x"), "--from-scratch", "--init-from", str(shipped)])
    assert both.value.code == 2
    capsys.readouterr()
    assert main(["train", "--out", str(tmp_path / "auto"), "--resume", "--from-scratch"]) == 2
    assert "--from-scratch" in capsys.readouterr().err


def test_train_processes_decide_the_start_once_and_tell_the_children(tiny_run, tmp_path, capsys,
                                                                     monkeypatch):
    """Under --processes the parent picks the start (one line, one error for a bad checkpoint)
    and launches children told it explicitly, whatever start flags the command had."""
    import istr_viz.launch
    import istr_viz.predictor
    from istr_viz.cli import main, strip_start_flags

    root, shipped = tiny_run
    monkeypatch.setattr(istr_viz.predictor, "SHIPPED_CHECKPOINT", Path(shipped))
    launched = []
    monkeypatch.setattr(istr_viz.launch, "launch_local",
                        lambda argv, n: launched.append((argv, n)) or 0)
    quirky = cf.write_quirky_coco(tmp_path / "quirky")
    base = ["train", "--train-ann", str(quirky.ann_file), "--train-images", str(quirky.images_dir),
            "--max-iters", "1", "--device", "cpu", "--out", str(tmp_path / "o"), "--processes", "2"]
    for item in [*TINY, "basis.dim=12"]:
        base += ["--set", item]
    assert main(base) == 0
    err = capsys.readouterr().err
    assert err.count("starting from the shipped model") == 1
    argv, n = launched.pop()
    assert n == 2 and "--processes" not in argv and argv[-2:] == ["--init-from", str(shipped)]
    # the automatic start's query rule reaches the children (here TINY's 0; a child given only
    # --init-from would take the checkpoint's own)
    assert argv[-4:-2] == ["--set", "model.queries_per_instance=0.0"]
    assert main([*base, "--set", "model.queries_per_instance=4"]) == 0
    capsys.readouterr()
    argv = launched.pop()[0]
    assert argv[-4:] == ["--set", "model.queries_per_instance=4.0", "--init-from", str(shipped)]
    # a child told the start computes the parent's configuration (the fine-tuning lr included)
    from istr_viz.engine import training_start

    def sets(args):
        return [args[i + 1] for i, a in enumerate(args) if a == "--set"]

    import istr_viz.cli

    preset = get_preset("shapes-cpu")
    decided, real_launch = [], istr_viz.cli._launch_train
    monkeypatch.setattr(istr_viz.cli, "_launch_train",
                        lambda a, cfg, child: decided.append(cfg) or real_launch(a, cfg, child))
    own_lr = [s for s in sets(base) if not s.startswith("train.lr=")]  # the preset's lrs
    assert main([*base[:base.index("--set")], *[x for s in own_lr for x in ("--set", s)]]) == 0
    assert f"at lr {preset.train.fine_tune_lr:.1e} (train.fine_tune_lr)" in capsys.readouterr().err
    argv, parent = launched.pop()[0], decided.pop()
    assert parent.train.lr == preset.train.fine_tune_lr
    assert training_start(preset, sets(argv), quirky.ann_file, argv[-1]) == (parent, Path(argv[-1]))
    assert main([*base, "--from-scratch"]) == 0
    assert launched.pop()[0][-1] == "--from-scratch"
    assert main([*base, "--init-from", str(shipped)]) == 0
    argv = launched.pop()[0]
    assert argv.count("--init-from") == 1 and argv[-1] == str(shipped)
    # a missing checkpoint is one error line from the parent; nothing is launched
    code = main([*base, "--init-from", str(tmp_path / "missing.pt")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("error: ") == 1 and "missing.pt" in err and not launched
    assert strip_start_flags(["train", "--init", "a.pt", "--fr", "--init-from=b", "--out", "x"]) \
        == ["train", "--out", "x"]


def test_train_seconds_leave_evaluation_out_and_add_up_over_a_resume(tmp_path, monkeypatch):
    """``train_s`` in metrics.jsonl (the benchmark's ISTR clock) is wall time minus evaluations,
    and a resumed run continues it instead of starting again from 0."""
    import istr_viz.evaluate as evaluate_module
    from istr_viz.engine import train

    real = evaluate_module.evaluate_model

    def slow_evaluate(*args, **kwargs):
        time.sleep(1.5)
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluate_module, "evaluate_model", slow_evaluate)
    root = tmp_path / "shapes"
    make_shapes(root, num_train=8, num_val=2, size=64, seed=4, progress=False)
    cfg = apply_overrides(get_preset("shapes-cpu"), [*TINY, "basis.dim=12", "train.eval_every=2"])
    run = tmp_path / "run"
    train(cfg, split_paths(root, "train"), run, val_data=split_paths(root, "val"), max_iters=4,
          device="cpu", progress=False)
    records = read_metrics(run / "metrics.jsonl")
    at4 = next(r for r in records if r["iter"] == 4 and "loss" in r)  # after the eval at 2
    assert at4["time"] - at4["train_s"] >= 1.5
    evals = [r for r in records if "eval" in r]
    assert [r["iter"] for r in evals] == [2, 4] and evals[0]["train_s"] < at4["train_s"]
    best = load_checkpoint(run / "best.pt")["train_state"]  # its clock: where its eval began
    assert best["train_s"] == next(r["train_s"] for r in evals if r["iter"] == best["iteration"])
    train(cfg, split_paths(root, "train"), run, val_data=split_paths(root, "val"), max_iters=5,
          resume=True, device="cpu", progress=False)
    at5 = next(r for r in read_metrics(run / "metrics.jsonl") if r["iter"] == 5 and "loss" in r)
    assert at5["train_s"] > at4["train_s"] and at5["time"] < at4["time"]  # the wall clock restarted


def test_a_minutes_budget_stops_training_when_iterations_slow_down(tmp_path, monkeypatch):
    """The iteration budget is forecast from iterations 3-23; when later ones run slower (another
    job on the machine), the run still ends at its minutes, not 10x past them."""
    from istr_viz.data.coco import CocoDataset
    from istr_viz.engine import train

    real_get, loaded = CocoDataset.get, []

    def slow_after_the_forecast(self, index, *args, **kwargs):  # the engine loads with .get
        loaded.append(index)
        if len(loaded) > 4 * 24:  # batch 4: from iteration 25 on, 0.5 s an iteration
            time.sleep(0.125)
        return real_get(self, index, *args, **kwargs)

    monkeypatch.setattr(CocoDataset, "get", slow_after_the_forecast)
    root = tmp_path / "shapes"
    make_shapes(root, num_train=8, num_val=2, size=64, seed=4, progress=False)
    cfg = apply_overrides(get_preset("shapes-cpu"), [*TINY, "basis.dim=12",
                                                     "train.checkpoint_every=0"])
    result = train(cfg, split_paths(root, "train"), tmp_path / "run", max_minutes=0.1,
                   device="cpu", progress=False)
    logged = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    # however slow the forecast's iterations were, the slowed ones (0.5 s) are slower: the run
    # ends at the first step past 6 s, not when the forecast's count is done
    assert 6.0 <= logged[-1]["train_s"] < 6.0 + 2.0
    assert len(logged) < 40  # stopped by the minutes, long before the forecast's count
    # the x0.1 step at 80% of the budget follows the minutes too: the last iterations, past
    # 4.8 s, ran at the low lr although they were far from 80% of the forecast's count
    # (each iteration's lr is set from the clock at the end of the one before)
    pairs = [(a, b) for a, b in zip(logged, logged[1:])
             if b["iter"] > 3 and abs(a["train_s"] - 0.8 * 6.0) > 0.05]  # the clock is read
    # again just after logging: leave out the few ms around the step
    assert any(a["train_s"] >= 0.8 * 6.0 for a, _ in pairs)
    assert any(a["train_s"] < 0.8 * 6.0 for a, _ in pairs)
    for before, r in pairs:
        assert r["lr"] == pytest.approx(1e-4 if before["train_s"] >= 0.8 * 6.0 else 1e-3)
    ckpt = load_checkpoint(result.last_checkpoint)
    assert ckpt["train_state"]["max_iters"] == result.iterations == logged[-1]["iter"]


@pytest.fixture
def virtual_clock(monkeypatch):
    """The engine's clock, plus seconds that ``advance(s)`` adds: slow iterations without
    sleeping, and far slower than any machine load could make the real ones."""
    import types

    import istr_viz.engine as engine

    offset, real = [0.0], time.perf_counter
    clock = types.SimpleNamespace(**{k: getattr(time, k) for k in dir(time) if not k.startswith("_")})
    clock.perf_counter = lambda: real() + offset[0]
    monkeypatch.setattr(engine, "time", clock)

    def advance(seconds: float) -> None:
        offset[0] += seconds
    return advance


def test_a_minutes_budget_outlasts_a_forecast_that_was_too_low(tmp_path, monkeypatch,
                                                               virtual_clock):
    """Iterations timed while the machine was busy forecast too few; when they then speed up the
    run goes on to its minutes (it used to stop at the forecast's count), its lr step and its
    evaluation point fall at their shares of the minutes, not of that forecast."""
    from istr_viz.data.coco import CocoDataset
    from istr_viz.engine import train

    real_get, loaded = CocoDataset.get, []

    def slow_while_timed(self, index, *args, **kwargs):  # the engine loads with .get
        loaded.append(index)  # batch 4: the first 24 iterations 0.5 s each, then 0.1 s (+ real)
        virtual_clock(0.125 if len(loaded) <= 4 * 24 else 0.025)
        return real_get(self, index, *args, **kwargs)

    monkeypatch.setattr(CocoDataset, "get", slow_while_timed)
    root = tmp_path / "shapes"
    make_shapes(root, num_train=8, num_val=2, size=64, seed=4, progress=False)
    cfg = apply_overrides(get_preset("shapes-cpu"), [*TINY, "basis.dim=12", "train.checkpoint_every=0",
                                                     "train.eval_points=1"])
    budget_s = 40.0
    result = train(cfg, split_paths(root, "train"), tmp_path / "run", max_minutes=budget_s / 60,
                   val_data=split_paths(root, "val"), device="cpu", progress=False)
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    logged = [r for r in records if "loss" in r]
    at = {r["iter"]: r["time"] for r in logged}
    forecast = 23 + (budget_s - at[23]) / ((at[23] - at[3]) / 20)  # as the engine made it
    assert at[23] < budget_s / 2  # (the evaluation point falls after the timed iterations)
    assert result.iterations == logged[-1]["iter"] > forecast + 5
    assert budget_s <= logged[-1]["train_s"] < budget_s + 1.0
    pairs = [(a, b) for a, b in zip(logged, logged[1:])
             if b["iter"] > 3 and abs(a["train_s"] - 0.8 * budget_s) > 0.05]
    assert any(a["train_s"] >= 0.8 * budget_s for a, _ in pairs)
    for before, r in pairs:  # the lr step came from the clock alone
        assert r["lr"] == pytest.approx(1e-4 if before["train_s"] >= 0.8 * budget_s else 1e-3)
    evals = [r for r in records if "eval" in r]
    assert len(evals) == 2  # the point at half the minutes, then the final one
    assert 0.5 * budget_s <= evals[0]["train_s"] < 0.5 * budget_s + 1.0
    assert load_checkpoint(result.last_checkpoint)["train_state"]["max_iters"] == result.iterations


def test_resuming_a_minutes_run_keeps_its_mode(shapes, tmp_path):
    """A finished minutes run resumes to nothing; one resumed with an explicit --max-iters keeps
    to iteration counts when it is resumed again (its minutes are long used up by then)."""
    from istr_viz.checkpoint import save_checkpoint
    from istr_viz.engine import train

    root, basis_path = shapes
    cfg = apply_overrides(get_preset("shapes-cpu"), [*TINY, "train.checkpoint_every=0"])
    basis, run = MaskBasis.load(basis_path), tmp_path / "run"
    done = train(cfg, split_paths(root, "train"), run, basis=basis, max_minutes=0.005,
                 device="cpu", progress=False).iterations
    lines = len(_losses(run))
    assert train(cfg, split_paths(root, "train"), run, resume=True, device="cpu",
                 progress=False).iterations == done
    assert len(_losses(run)) == lines  # no step was added
    extended = train(cfg, split_paths(root, "train"), run, resume=True, max_iters=done + 2,
                     device="cpu", progress=False)
    assert extended.iterations == done + 2
    ckpt = load_checkpoint(run / "last.pt")
    assert ckpt["train_state"]["by_minutes"] is False
    frozen = ckpt["train_state"]["time_done"]  # the share of the minutes at the switch
    assert frozen >= 1.0
    ckpt["train_state"]["max_iters"] = done + 4  # as if killed on the way to done + 4
    save_checkpoint(run / "last.pt", **ckpt)
    again = train(cfg, split_paths(root, "train"), run, resume=True, device="cpu", progress=False)
    assert again.iterations == done + 4
    # the lr steps' share of the minutes stayed where the switch froze it, though the clock ran on
    assert load_checkpoint(run / "last.pt")["train_state"]["time_done"] == frozen


def test_a_finished_run_resumes_to_nothing_and_logs_its_last_step(shapes, tmp_path):
    """With log_every > 1 the last step of a minutes run is still logged (past its minutes), and
    resuming the finished run neither trains nor evaluates again."""
    from istr_viz.engine import train

    root, basis_path = shapes
    cfg = apply_overrides(get_preset("shapes-cpu"), [*TINY, "basis.dim=12", "train.log_every=7",
                                                     "train.checkpoint_every=0"])
    run = tmp_path / "run"
    first = train(cfg, split_paths(root, "train"), run, basis=MaskBasis.load(basis_path),
                  val_data=split_paths(root, "val"), max_minutes=0.02, device="cpu", progress=False)
    records = read_metrics(run / "metrics.jsonl")
    logged = [r for r in records if "loss" in r]
    assert logged[-1]["iter"] == first.iterations and logged[-1]["train_s"] >= 0.02 * 60
    again = train(cfg, split_paths(root, "train"), run, resume=True, device="cpu", progress=False)
    assert again.iterations == first.iterations
    assert again.metrics["segm"]["AP"] == first.metrics["segm"]["AP"]
    assert read_metrics(run / "metrics.jsonl") == records  # no step, no second evaluation


def test_lr_steps_of_a_minutes_budget_follow_the_clock_alone():
    # max_iters=None: however many iterations, only the share of the minutes moves the step
    assert lr_factor(10**6, None, 0, 1.0, (0.8,), 0.1, time_done=0.79) == 1.0
    assert lr_factor(5, None, 0, 1.0, (0.8,), 0.1, time_done=0.8) == pytest.approx(0.1)
    assert lr_factor(5, 10, 0, 1.0, (0.8,), 0.1, time_done=0.0) == 1.0
    assert lr_factor(8, 10, 0, 1.0, (0.8,), 0.1, time_done=0.0) == pytest.approx(0.1)


def test_backbone_lr_mult_gives_the_backbone_its_own_lr_through_the_schedule(shapes, tmp_path):
    from istr_viz.engine import train

    root, basis_path = shapes
    cfg = apply_overrides(get_preset("shapes-cpu"), [*TINY, "train.backbone_lr_mult=3",
                                                     "train.warmup_iters=0"])
    run = tmp_path / "run"
    train(cfg, split_paths(root, "train"), run, basis=MaskBasis.load(basis_path), max_iters=5,
          device="cpu", progress=False)
    ckpt = load_checkpoint(run / "last.pt")
    body, head = ckpt["train_state"]["optimizer"]["param_groups"]
    assert body["lr"] == pytest.approx(3e-4) and head["lr"] == pytest.approx(1e-4)  # after the step
    names = [n for n, p in build_model_for(ckpt).named_parameters()]
    assert len(body["params"]) == sum(n.startswith("backbone.") for n in names) > 0
    assert len(head["params"]) == sum(not n.startswith("backbone.") for n in names) > 0
    assert [r["lr"] for r in read_metrics(run / "metrics.jsonl")][-1] == pytest.approx(1e-4)


def build_model_for(ckpt: dict):
    from istr_viz.config import Config
    from istr_viz.model.istr import build_model

    cfg = Config.from_dict(ckpt["config"])
    return build_model(cfg.model, len(ckpt["class_names"]), MaskBasis.from_dict(ckpt["basis"]))


def test_training_steps_with_the_fused_adamw_also_after_resuming_an_unfused_checkpoint(
        shapes, tmp_path, monkeypatch):
    """The optimiser is the fused AdamW; a checkpoint written without it (older code) does not
    switch it off on resume (``load_state_dict`` restores the saved groups' flags)."""
    from istr_viz.checkpoint import load_checkpoint, save_checkpoint
    from istr_viz.engine import train

    root, basis_path = shapes
    seen = []
    real_step = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        seen.append(self.param_groups[0]["fused"])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    cfg = apply_overrides(get_preset("shapes-cpu"), [*TINY, "basis.dim=12"])
    basis = MaskBasis.load(basis_path)
    run = tmp_path / "run"
    train(cfg, split_paths(root, "train"), run, basis=basis, max_iters=2, device="cpu",
          progress=False)
    assert seen == [True, True]
    ckpt = load_checkpoint(run / "last.pt")
    for group in ckpt["train_state"]["optimizer"]["param_groups"]:
        group["fused"] = None  # as torch writes it for the default, unfused AdamW
    save_checkpoint(run / "last.pt", **ckpt)
    train(cfg, split_paths(root, "train"), run, basis=basis, max_iters=3, resume=True,
          device="cpu", progress=False)
    assert seen == [True, True, True]


def test_queries_per_instance_raises_the_queries_for_crowded_data_and_resume_keeps_them(
        shapes, tmp_path, capsys):
    """model.queries_per_instance=k: the run gets ceil(k x the most instances of a training image)
    queries where TINY's 8 are fewer, says so, and records the number in the checkpoint, from
    which the model is rebuilt at that size and a resumed run goes on with it."""
    from istr_viz.data.check import most_instances
    from istr_viz.data.layout import DatasetPaths
    from istr_viz.engine import train
    from istr_viz.predictor import load_model

    root, basis_path = shapes
    most = most_instances(load_annotations(split_paths(root, "train").ann_file))
    assert 3 <= most  # the tiny set: TINY's 8 queries are fewer than 3 x most
    cfg = apply_overrides(get_preset("shapes-cpu"), TINY + ["model.queries_per_instance=3"])
    assert get_preset("shapes-cpu").model.queries_per_instance == 3  # the preset's rule
    train(cfg, split_paths(root, "train"), tmp_path / "run", basis=MaskBasis.load(basis_path),
          max_iters=2, device="cpu", progress=False)
    assert f"note: model.num_queries={3 * most} rather than 8" in capsys.readouterr().err
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ckpt["config"]["model"]["num_queries"] == 3 * most
    assert ckpt["model"]["query_embed.weight"].shape[0] == 3 * most
    model, _ = load_model(tmp_path / "run" / "last.pt", device="cpu")
    assert model.num_queries == 3 * most
    # resumed on data whose most crowded image holds twice as many: the stored number stands
    data = json.loads(split_paths(root, "train").ann_file.read_text())
    counts = {}
    for a in data["annotations"]:
        counts[a["image_id"]] = counts.get(a["image_id"], 0) + (not a.get("iscrowd"))
    busiest = max(counts, key=counts.get)
    next_id = max(a["id"] for a in data["annotations"]) + 1
    copies = [dict(a, id=next_id + i) for i, a in enumerate(
        a for a in data["annotations"] if a["image_id"] == busiest and not a.get("iscrowd"))]
    crowded = tmp_path / "crowded.json"
    crowded.write_text(json.dumps(dict(data, annotations=data["annotations"] + copies)))
    assert most_instances(load_annotations(crowded)) == 2 * most
    resumed_data = DatasetPaths(crowded, split_paths(root, "train").images_dir)
    train(cfg, resumed_data, tmp_path / "run", resume=True, max_iters=3, device="cpu",
          progress=False)
    again = load_checkpoint(tmp_path / "run" / "last.pt")
    assert again["train_state"]["iteration"] == 3
    assert again["config"]["model"]["num_queries"] == 3 * most
    off = apply_overrides(get_preset("shapes-cpu"), TINY + ["model.queries_per_instance=0"])
    train(off, split_paths(root, "train"), tmp_path / "off", basis=MaskBasis.load(basis_path),
          max_iters=1, device="cpu", progress=False)
    assert load_checkpoint(tmp_path / "off" / "last.pt")["config"]["model"]["num_queries"] == 8


def test_a_start_from_trained_weights_freezes_the_stem_and_layer1_and_a_resume_keeps_them(
        shapes, tmp_path, capsys):
    """train.fine_tune_freeze_at=2: a run from trained weights leaves the source's conv1, bn1
    and layer1 parameters as they were, over a resume too, while their BatchNorm statistics
    follow the new batches and layer2 trains; 0 (the preset's) trains them; a run from scratch
    trains everything whatever the field; the configuration of a run written before the field
    reads 0."""
    from istr_viz.engine import resumed_config, train

    root, basis_path = shapes
    paths, basis = split_paths(root, "train"), MaskBasis.load(basis_path)
    assert get_preset("shapes-cpu").train.fine_tune_freeze_at == 0
    cfg = apply_overrides(get_preset("shapes-cpu"), TINY + ["train.fine_tune_freeze_at=2"])
    train(cfg, paths, tmp_path / "scratch", basis=basis, max_iters=2, device="cpu", progress=False)
    src = load_checkpoint(tmp_path / "scratch" / "last.pt")["model"]

    def frozen_keys(state):
        return [k for k in state if k.startswith(("backbone.body.conv1.", "backbone.body.bn1.",
                                                  "backbone.body.layer1."))
                and not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]

    def moved(a, b, keys):
        return [k for k in keys if not torch.equal(a[k], b[k])]

    train(cfg, paths, tmp_path / "tuned", init_from=tmp_path / "scratch" / "last.pt",
          max_iters=2, device="cpu")
    assert "frozen: the ResNet's stem and layer1 (train.fine_tune_freeze_at=2" in \
        capsys.readouterr().out
    tuned = load_checkpoint(tmp_path / "tuned" / "last.pt")["model"]
    keys = frozen_keys(src)
    assert len(keys) >= 6 and moved(src, tuned, keys) == []
    assert moved(src, tuned, ["backbone.body.layer1.0.bn1.running_mean"])  # statistics adapt
    assert moved(src, tuned, [k for k in src if k.startswith("backbone.body.layer2.")
                              and k.endswith("conv1.weight")])
    train(cfg, paths, tmp_path / "tuned", resume=True, max_iters=3, device="cpu", progress=False)
    resumed = load_checkpoint(tmp_path / "tuned" / "last.pt")
    assert resumed["train_state"]["iteration"] == 3 and moved(src, resumed["model"], keys) == []

    off = apply_overrides(cfg, ["train.fine_tune_freeze_at=0"])
    train(off, paths, tmp_path / "all", init_from=tmp_path / "scratch" / "last.pt", max_iters=2,
          device="cpu", progress=False)
    assert len(moved(src, load_checkpoint(tmp_path / "all" / "last.pt")["model"], keys)) == \
        len(keys)
    # from scratch nothing is frozen, even at 2: a resumed scratch run moves the stem and layer1
    train(cfg, paths, tmp_path / "scratch", resume=True, max_iters=3, device="cpu", progress=False)
    assert len(moved(src, load_checkpoint(tmp_path / "scratch" / "last.pt")["model"], keys)) == \
        len(keys)
    stored = cfg.to_dict()
    del stored["train"]["fine_tune_freeze_at"]
    assert resumed_config(stored).train.fine_tune_freeze_at == 0
    for bad in ("-1", "6"):
        with pytest.raises(ConfigError, match="train.fine_tune_freeze_at"):
            apply_overrides(cfg, [f"train.fine_tune_freeze_at={bad}"])


def test_a_run_from_imagenet_weights_resumes_with_its_stem_and_layer1_still_frozen(shapes,
                                                                                   tmp_path):
    """ImageNet weights (a file the test writes) train all but the stem and layer1; a resume,
    which builds the model without the file, freezes the same parts, so the optimiser's groups
    match and those weights stay the file's."""
    from torchvision.models import resnet18

    from istr_viz.engine import train

    root, basis_path = shapes
    weights = tmp_path / "r18.pth"
    torch.save(resnet18().state_dict(), weights)
    imagenet = torch.load(weights, weights_only=True)
    cfg = apply_overrides(get_preset("shapes-cpu"), TINY + [
        "model.backbone_base_channels=64", f"model.pretrained_path={weights}"])
    out, paths = tmp_path / "run", split_paths(root, "train")
    train(cfg, paths, out, basis=MaskBasis.load(basis_path), max_iters=2, device="cpu",
          progress=False)
    train(cfg, paths, out, resume=True, max_iters=3, device="cpu", progress=False)
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["train_state"]["iteration"] == 3
    model = ckpt["model"]
    for key in ("conv1.weight", "bn1.weight", "layer1.0.conv1.weight", "layer1.1.bn2.bias"):
        assert torch.equal(model[f"backbone.body.{key}"], imagenet[key]), key
    assert not torch.equal(model["backbone.body.layer2.0.conv1.weight"],
                           imagenet["layer2.0.conv1.weight"])


def test_median_object_px_trains_a_start_from_trained_weights_larger_on_small_objects(
        shapes, tmp_path, capsys, monkeypatch):
    """data.median_object_px: a run that starts from another checkpoint's weights, on data whose
    median training instance at the middle training size is at most 0.8 of the target, trains
    and tests at sizes x1.25, says so, and stores them with the rule off, so that a resume, or a
    start from that checkpoint with its own configuration, keeps them; a run from scratch, or on
    larger objects, keeps its sizes."""
    from istr_viz import engine
    from istr_viz.config import Config
    from istr_viz.data.check import median_object_px, size_factor

    built = []  # (min sizes, max size) of every transform the runs build
    real_build = engine.build_transform
    monkeypatch.setattr(engine, "build_transform", lambda tc, train: built.append(
        (tuple(tc.min_size), tc.max_size)) or real_build(tc, train=train))
    root, basis_path = shapes
    ann = load_annotations(split_paths(root, "train").ann_file)
    median = median_object_px(ann, (64,), 64)
    target = median * 1.3
    cfg = apply_overrides(get_preset("shapes-cpu"), TINY + [f"data.median_object_px={target}"])
    assert size_factor(target, median) == 1.25
    # from scratch: the sizes as given
    engine.train(cfg, split_paths(root, "train"), tmp_path / "scratch",
                 basis=MaskBasis.load(basis_path), max_iters=1, device="cpu", progress=False)
    assert "note: sizes" not in capsys.readouterr().err and set(built) == {((64,), 64)}
    scratch_ckpt = load_checkpoint(tmp_path / "scratch" / "last.pt")
    scratch = scratch_ckpt["config"]["data"]
    assert (list(scratch["train_min_sizes"]), scratch["test_min_size"]) == ([64], 64)
    # every run records the median it trained at; a checkpoint from before the record (as the
    # shipped model) is matched against data.median_object_px
    assert trained_median_px(scratch_ckpt) == pytest.approx(median)
    del scratch_ckpt["train_state"]["trained_median_px"]
    save_checkpoint(tmp_path / "unrecorded.pt", **scratch_ckpt)
    # from that run's weights: trained at x1.25
    built.clear()
    engine.train(cfg, split_paths(root, "train"), tmp_path / "run",
                 init_from=tmp_path / "unrecorded.pt", max_iters=2, device="cpu",
                 progress=False)
    assert "note: sizes x1.25: training [80] (at most 80), test 80 (at most 80)" in \
        capsys.readouterr().err
    assert ((80,), 80) in built and ((64,), 64) not in built
    stored = load_checkpoint(tmp_path / "run" / "last.pt")["config"]["data"]
    assert (list(stored["train_min_sizes"]), stored["train_max_size"]) == ([80], 80)
    assert (stored["test_min_size"], stored["test_max_size"]) == (80, 80)
    assert stored["median_object_px"] == target  # the rule stays on; the record says the scale
    scaled_px = median_object_px(ann, (80,), 80)
    assert trained_median_px(load_checkpoint(tmp_path / "run" / "last.pt")) == \
        pytest.approx(scaled_px)
    engine.train(cfg, split_paths(root, "train"), tmp_path / "run", resume=True, max_iters=3,
                 device="cpu", progress=False)
    again = load_checkpoint(tmp_path / "run" / "last.pt")
    assert again["train_state"]["iteration"] == 3 and again["config"]["data"] == stored
    assert trained_median_px(again) == pytest.approx(scaled_px)
    # a start from the scaled run with its own stored configuration: its record matches the data
    # at those sizes, so they are not raised twice
    built.clear()
    engine.train(Config.from_dict(again["config"]), split_paths(root, "train"), tmp_path / "twice",
                 init_from=tmp_path / "run" / "last.pt", max_iters=1, device="cpu",
                 progress=False)
    assert "note: sizes" not in capsys.readouterr().err and set(built) == {((80,), 80)}
    # larger objects than the target: nothing changes and nothing is said
    big = apply_overrides(get_preset("shapes-cpu"), TINY + [f"data.median_object_px={median}"])
    engine.train(big, split_paths(root, "train"), tmp_path / "big",
                 init_from=tmp_path / "unrecorded.pt", max_iters=1, device="cpu",
                 progress=False)
    assert "note: sizes" not in capsys.readouterr().err
    kept = load_checkpoint(tmp_path / "big" / "last.pt")["config"]["data"]
    assert (list(kept["train_min_sizes"]), kept["test_min_size"]) == ([64], 64)


def test_median_object_px_matches_the_median_that_the_start_checkpoint_recorded(
        shapes, tmp_path, capsys):
    """A checkpoint records the median instance it trained at; a start from it matches that
    median, not data.median_object_px (which then only turns the rule on): the same data at
    48 px where the source trained at 64 has objects 0.75 as large, so the run trains at x1.25
    (60 px) though the configured target alone would not scale it."""
    from istr_viz import engine
    from istr_viz.data.check import median_object_px

    root, basis_path = shapes
    ann = load_annotations(split_paths(root, "train").ann_file)
    median = median_object_px(ann, (64,), 64)
    engine.train(apply_overrides(get_preset("shapes-cpu"), TINY), split_paths(root, "train"),
                 tmp_path / "source", basis=MaskBasis.load(basis_path), max_iters=1,
                 device="cpu", progress=False)
    source = tmp_path / "source" / "last.pt"
    assert trained_median_px(load_checkpoint(source)) == pytest.approx(median)
    # the same data at the same sizes: the record wins over a target that alone would scale
    high_target = apply_overrides(get_preset("shapes-cpu"),
                                  TINY + [f"data.median_object_px={median * 1.3}"])
    capsys.readouterr()
    engine.train(high_target, split_paths(root, "train"), tmp_path / "same", init_from=source,
                 max_iters=1, device="cpu", progress=False)
    assert "note: sizes" not in capsys.readouterr().err
    assert list(load_checkpoint(tmp_path / "same" / "last.pt")["config"]["data"][
        "train_min_sizes"]) == [64]
    small = ["data.train_min_sizes=48", "data.train_max_size=48", "data.test_min_size=48",
             "data.test_max_size=48"]
    low_target = apply_overrides(get_preset("shapes-cpu"),
                                 TINY + small + [f"data.median_object_px={median * 0.5}"])
    capsys.readouterr()
    engine.train(low_target, split_paths(root, "train"), tmp_path / "run", init_from=source,
                 max_iters=1, device="cpu", progress=False)
    err = capsys.readouterr().err
    assert "note: sizes x1.25: training [60] (at most 60), test 60 (at most 60)" in err
    assert f"under the {median:.1f} px that {source} trained on (its record)" in err
    run = load_checkpoint(tmp_path / "run" / "last.pt")
    assert list(run["config"]["data"]["train_min_sizes"]) == [60]
    # an export (half precision, no training state) carries the record in its card
    exported = save_checkpoint(tmp_path / "export.pt",
                               **export_for_inference(load_checkpoint(source)))
    engine.train(low_target, split_paths(root, "train"), tmp_path / "from_export",
                 init_from=exported, max_iters=1, device="cpu", progress=False)
    assert f"under the {median:.1f} px that {exported} trained on (its record)" in \
        capsys.readouterr().err
    assert trained_median_px(run) == pytest.approx(median_object_px(ann, (60,), 60))
    # the rule off: the record alone changes nothing
    off = apply_overrides(get_preset("shapes-cpu"), TINY + small)
    engine.train(off, split_paths(root, "train"), tmp_path / "off", init_from=source,
                 max_iters=1, device="cpu", progress=False)
    assert "note: sizes" not in capsys.readouterr().err
    assert list(load_checkpoint(tmp_path / "off" / "last.pt")["config"]["data"][
        "train_min_sizes"]) == [48]


def _elu_kernel_worker(rank: int, port: int, out_dir: str) -> None:
    """One gloo process whose own timing says "library" on rank 1 only."""
    import torch.distributed as dist

    from istr_viz import engine

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        engine.library_elu_is_faster = lambda: rank == 1
        chosen = engine._shared_elu_kernel(engine.DistInfo(rank, 2, rank), torch.device("cpu"))
        Path(out_dir, f"rank{rank}").write_text(str(chosen))
    finally:
        dist.destroy_process_group()


def test_processes_that_timed_different_elu_kernels_all_take_process_0s(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_elu_kernel_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    assert [(tmp_path / f"rank{r}").read_text() for r in (0, 1)] == ["False", "False"]


@pytest.mark.parametrize("grouped", [True, False])
def test_training_batches_follow_data_group_by_orientation(tmp_path, monkeypatch, grouped):
    """On images of both orientations the engine hands the sampler each image's group
    (istr_viz.data.batching) when ``data.group_by_orientation`` is on, and nothing when off;
    a resumed run written before the option existed keeps its ungrouped batches."""
    import istr_viz.engine as engine
    from istr_viz.data.batching import orientation_groups
    from istr_viz.data.layout import DatasetPaths

    quirky = cf.write_quirky_coco(tmp_path / "quirky")  # 6 images, one of them portrait
    ann = load_annotations(quirky.ann_file)
    expected = orientation_groups(ann)
    assert sorted(expected) == [0, 0, 0, 0, 0, 1]
    seen = []

    class Recording(engine.IterationBatchSampler):
        def __init__(self, *args, **kwargs):
            seen.append(kwargs.get("groups"))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(engine, "IterationBatchSampler", Recording)
    cfg = apply_overrides(get_preset("shapes-cpu"),
                          [*TINY, "basis.dim=4", "train.batch_size=2",
                           f"data.group_by_orientation={str(grouped).lower()}"])
    engine.train(cfg, DatasetPaths(quirky.ann_file, quirky.images_dir), tmp_path / "run",
                 max_iters=2, device="cpu", progress=False)
    assert seen == [expected if grouped else None]
    stored = load_checkpoint(tmp_path / "run" / "last.pt")["config"]
    assert engine.resumed_config(stored).data.group_by_orientation == grouped
    del stored["data"]["group_by_orientation"]  # a checkpoint from before the option
    assert engine.resumed_config(stored).data.group_by_orientation is False


def test_the_checkpoint_records_each_machine_the_run_trained_on(shapes, tmp_path, monkeypatch):
    """``train_state["machines"]``: the machine of the run; a resume on the same machine adds
    nothing (other threads or another torch included), a resume on another appends it (the run's
    pace mixes both), and one of a checkpoint that kept no machines starts with an unknown one."""
    import istr_viz.engine as engine
    from istr_viz.checkpoint import save_checkpoint

    root, basis_path = shapes
    cfg = apply_overrides(get_preset("shapes-cpu"), [*TINY, "train.checkpoint_every=0"])
    basis, run, data = MaskBasis.load(basis_path), tmp_path / "run", split_paths(root, "train")
    first = {"cpu": "first", "logical_cpus": 2, "cpu_flags": ["avx2"], "torch_threads": 1}
    second = {"cpu": "second", "logical_cpus": 2, "cpu_flags": None, "torch_threads": 1}

    def on(machine, **budget):
        monkeypatch.setattr(engine, "machine_summary", lambda **_: dict(machine))
        engine.train(cfg, data, run, basis=basis, device="cpu", progress=False, **budget)
        return load_checkpoint(run / "last.pt")["train_state"]["machines"]

    assert on(first, max_iters=2) == [first]
    assert on({**first, "torch_threads": 2}, resume=True, max_iters=3) == [first]
    assert on(second, resume=True, max_iters=4) == [first, second]
    assert on(second, resume=True, max_iters=5) == [first, second]
    old = load_checkpoint(run / "last.pt")
    del old["train_state"]["machines"]  # as a checkpoint written before machines were kept
    save_checkpoint(run / "last.pt", **old)
    assert on(first, resume=True, max_iters=6) == [engine.UNKNOWN_MACHINE, first]


def test_schedule_words_say_how_the_lr_and_the_weights_evolve():
    """The words that the train command and train() print for a run's lr, weight average and lr
    drop, and the settings they name, for a step schedule with and without a drop, one without
    steps and a linear decay."""
    from dataclasses import replace

    from istr_viz.engine import schedule_words

    tc = get_preset("shapes-cpu").train
    assert schedule_words(tc) == "lr 4.0e-04, no weight average, lr x0.1 at the steps"
    fine = replace(tc, lr=2.8e-4, ema_decay=0.995, lr_gamma=1.0)
    sources = {"lr": "train.fine_tune_lr", "ema_decay": "train.fine_tune_ema_decay",
               "lr_gamma": "train.lr_gamma"}
    assert schedule_words(fine, sources) == ("lr 2.8e-04 (train.fine_tune_lr), weight average "
                                             "0.995 (train.fine_tune_ema_decay), no lr drop "
                                             "(train.lr_gamma)")
    assert schedule_words(replace(tc, lr_steps=())).endswith(", no lr drop")
    assert schedule_words(replace(tc, lr_steps=()), sources).endswith("no lr drop (train.lr_steps)")
    assert schedule_words(replace(tc, lr_decay="linear"), sources).endswith(
        "linear lr decay to 0 (train.lr_decay)")
