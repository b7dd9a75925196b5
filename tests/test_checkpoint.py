"""istr_viz.checkpoint and load_model: exact round trips, one-line errors, atomic saves, fp16."""

from __future__ import annotations

import dataclasses
import os
import pickle
import random
import stat
import warnings

import numpy as np
import pytest
import torch

from istr_viz.basis import MaskBasis
from istr_viz.checkpoint import FORMAT_VERSION, load_checkpoint, save_checkpoint
from istr_viz.config import Config, ModelConfig, get_preset
from istr_viz.data.instance_masks import synthetic_instance_masks
from istr_viz.errors import CheckpointError
from istr_viz.model import build_model
from istr_viz.predictor import load_model

TINY = ModelConfig(backbone="resnet18", backbone_base_channels=8, norm="gn", num_queries=10,
                   num_stages=2, hidden_dim=32, dim_dynamic=8, dim_feedforward=64, num_heads=2)
CLASS_NAMES = ["triangle", "circle", "square"]
CATEGORY_IDS = [42, 7, 3]
METRICS = {"bbox": {"AP": 0.25}, "segm": {"AP": 0.125}, "per_stage": [{"stage": 1}]}


def tiny_config() -> Config:
    preset = get_preset("shapes-cpu")
    return dataclasses.replace(preset, model=TINY, data=dataclasses.replace(
        preset.data, test_min_size=64, test_max_size=96))


@pytest.fixture(scope="module")
def basis() -> MaskBasis:
    return MaskBasis.fit(synthetic_instance_masks(200, 28, seed=0), dim=16, seed=0)


@pytest.fixture(scope="module")
def model(basis):
    torch.manual_seed(0)
    m = build_model(TINY, len(CLASS_NAMES), basis)
    with torch.no_grad():  # move every weight off its initial value (e.g. GroupNorm's ones/zeros)
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return m.eval()


def payload(net, mask_basis, **changes) -> dict:
    return {"model": net.state_dict(), "config": tiny_config().to_dict(),
            "basis": mask_basis.to_dict(), "class_names": CLASS_NAMES, "category_ids": CATEGORY_IDS,
            "metrics": METRICS, **changes}


@pytest.fixture(scope="module")
def saved(model, basis, tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pt", **payload(model, basis))


def _inputs():
    g = torch.Generator().manual_seed(1)
    images = torch.zeros(2, 3, 64, 96)
    images[0] = torch.rand(3, 64, 96, generator=g)
    images[1, :, :64, :70] = torch.rand(3, 64, 70, generator=g)
    return images, torch.tensor([[64, 96], [64, 70]])


def _run(model):
    with torch.no_grad():
        return model(*_inputs())


# ----------------------------------------------------------------------------- round trip


def test_a_saved_model_loads_back_to_identical_outputs(model, saved):
    loaded, predictor = load_model(saved, device="cpu")
    assert not loaded.training
    a, b = _run(model), _run(loaded)
    assert a.num_stages == b.num_stages == TINY.num_stages
    for sa, sb in zip(a.stages, b.stages):
        assert torch.equal(sa.logits, sb.logits)
        assert torch.equal(sa.boxes_xyxy, sb.boxes_xyxy)
        assert torch.equal(sa.masks, sb.masks)
    assert torch.equal(a.proposal_boxes_xyxy, b.proposal_boxes_xyxy)
    assert predictor.class_names == CLASS_NAMES and predictor.category_ids == CATEGORY_IDS
    assert predictor.config == tiny_config()
    assert (predictor.min_size, predictor.max_size) == (64, 96)
    assert predictor.metrics == METRICS
    assert predictor.checkpoint_path == saved


def test_a_checkpoint_from_before_the_fpn_option_loads_with_the_3x3_fpn(basis, tmp_path):
    """Checkpoints written before model.fpn_output_conv, model.zero_init_residual and
    model.mask_head existed (ship3, shipped until session 15, among them) have none of the keys:
    they must build the FPN (3x3) and mask head (query) they were trained with and load
    strictly, while the shapes-cpu preset now builds the separable FPN and the roi mask head."""
    assert get_preset("shapes-cpu").model.fpn_output_conv == "separable"
    assert get_preset("shapes-cpu").model.mask_head == "roi"
    assert get_preset("coco-r50").model.fpn_output_conv == "3x3"  # the paper's recipe
    assert get_preset("coco-r50").model.mask_head == "query"
    torch.manual_seed(0)
    old_model_cfg = dataclasses.replace(TINY, mask_head="query")
    old = build_model(old_model_cfg, len(CLASS_NAMES), basis).eval()
    config = dataclasses.replace(tiny_config(), model=old_model_cfg).to_dict()
    for key in ("fpn_output_conv", "zero_init_residual", "mask_head"):
        del config["model"][key]
    path = save_checkpoint(tmp_path / "old.pt", **{**payload(old, basis), "config": config})
    loaded, _ = load_model(path, device="cpu")  # strict: a roi head's extra weights would be missing
    assert all(stage.mask_roi_encoder is None for stage in loaded.stages)
    assert isinstance(loaded.backbone.fpn.layer_blocks[0][0], torch.nn.Conv2d)
    assert loaded.backbone.fpn.layer_blocks[0][0].kernel_size == (3, 3)
    images = torch.rand(1, 3, 64, 64)
    sizes = torch.tensor([[64, 64]])
    with torch.no_grad():
        assert torch.equal(loaded(images, sizes).stages[-1].logits,
                           old(images, sizes).stages[-1].logits)
    separable = dataclasses.replace(TINY, fpn_output_conv="separable")
    config["model"]["fpn_output_conv"] = "separable"  # the 3x3 weights do not fit that FPN
    wrong = save_checkpoint(tmp_path / "wrong.pt", **{**payload(old, basis), "config": config})
    with pytest.raises(CheckpointError, match="wrong.pt"):
        load_model(wrong)
    assert build_model(separable, len(CLASS_NAMES), basis).backbone.fpn.layer_blocks[0][0][0].groups == 32


def test_load_checkpoint_returns_the_payload(saved, basis):
    ckpt = load_checkpoint(saved)
    assert ckpt["format_version"] == FORMAT_VERSION
    assert ckpt["class_names"] == CLASS_NAMES and ckpt["category_ids"] == CATEGORY_IDS
    assert Config.from_dict(ckpt["config"]) == tiny_config()
    assert torch.equal(MaskBasis.from_dict(ckpt["basis"]).components, basis.components)


def test_half_precision_weights_load_as_float32_and_stay_close(model, basis, tmp_path, saved):
    half = {k: v.half() if torch.is_tensor(v) and v.is_floating_point() else v
            for k, v in model.state_dict().items()}
    path = save_checkpoint(tmp_path / "half.pt", **payload(model, basis, model=half))
    assert path.stat().st_size < 0.7 * saved.stat().st_size
    loaded, _ = load_model(path, device="cpu")
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    assert all(b.dtype == torch.float32 for b in loaded.buffers() if b.is_floating_point())
    a, b = _run(model), _run(loaded)
    for sa, sb in zip(a.stages, b.stages):
        assert not torch.equal(sa.logits, sb.logits)  # the weights did lose precision
        torch.testing.assert_close(sb.logits, sa.logits, atol=3e-2, rtol=0)
    # Stage 1 only: a random model's later stages pool features at boxes that moved a little
    # and turn that into box changes of several pixels.
    s1a, s1b = a.stages[0], b.stages[0]
    torch.testing.assert_close(s1b.boxes_xyxy, s1a.boxes_xyxy, atol=2.0, rtol=0)  # of 96 px
    torch.testing.assert_close(s1b.masks, s1a.masks, atol=3e-2, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_load_model_on_cuda(model, saved):
    loaded, predictor = load_model(saved, device="cuda")
    assert predictor.device.type == "cuda"
    assert all(p.is_cuda for p in loaded.parameters())
    images, sizes = _inputs()
    with torch.no_grad():
        out = loaded(images.cuda(), sizes.cuda())
    expected = _run(model).final.logits
    torch.testing.assert_close(out.final.logits.cpu(), expected, atol=1e-3, rtol=1e-3)
    pred = predictor.predict(np.zeros((40, 60, 3), np.uint8))
    assert pred.size == (40, 60) and pred.detection_masks().shape[1:] == (40, 60)


# ----------------------------------------------------------------------------- corrupt files


class Arbitrary:
    """An object that safe loading must refuse; unpickling it would create ``marker``."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _random_bytes(seed: int) -> bytes:
    r = random.Random(seed)
    data = bytes(r.getrandbits(8) for _ in range(r.randint(0, 3000)))
    return [b"PK\x03\x04", b"\x80\x02", b""][seed % 3] + data  # zip, pickle, anything


def _assert_one_line_error(path) -> CheckpointError:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns about the pickle protocol of odd files
        with pytest.raises(CheckpointError) as info:
            load_model(path, device="cpu")
    text = str(info.value)
    assert str(path) in text and "\n" not in text and "\x1b" not in text, text
    assert len(text) < 400, text
    return info.value


def test_random_bytes_raise_checkpoint_error(tmp_path):
    # garbage makes torch.load raise UnpicklingError, RuntimeError, but also IndexError,
    # KeyError or UnicodeDecodeError (seeds 4, 17, 35 here): every one is a CheckpointError
    for seed in range(50):
        path = tmp_path / f"random{seed}.pt"
        path.write_bytes(_random_bytes(seed))
        _assert_one_line_error(path)


@pytest.mark.parametrize("case", ["empty", "truncated", "head", "list", "version", "lacks_basis",
                                  "object", "plain_pickle", "folder", "missing"])
def test_corrupt_checkpoints_raise_one_line_errors(case, saved, tmp_path):
    path = tmp_path / f"{case}.pt"
    marker = tmp_path / "unpickled"
    blob = saved.read_bytes()
    if case == "empty":
        path.write_bytes(b"")
    elif case == "truncated":
        path.write_bytes(blob[: len(blob) // 2])
    elif case == "head":
        path.write_bytes(blob[:10])
    elif case == "list":
        torch.save([1, 2, 3], path)
    elif case == "version":
        ckpt = load_checkpoint(saved)
        torch.save({**ckpt, "format_version": FORMAT_VERSION + 1}, path)
    elif case == "lacks_basis":
        ckpt = load_checkpoint(saved)
        torch.save({k: v for k, v in ckpt.items() if k != "basis"}, path)
    elif case == "object":
        torch.save({"format_version": FORMAT_VERSION, "model": Arbitrary(str(marker))}, path)
    elif case == "plain_pickle":
        obj = {"format_version": FORMAT_VERSION, "x": Arbitrary(str(marker))}
        path.write_bytes(pickle.dumps(obj))
    elif case == "folder":
        path.mkdir()
    error = _assert_one_line_error(path)
    assert not marker.exists()  # nothing was unpickled
    expected = {"version": "version", "lacks_basis": "basis", "object": "safe loading",
                "missing": "not found", "folder": "not found"}
    if case in expected:
        assert expected[case] in error.reason


def test_checkpoints_that_do_not_fit_their_configuration(model, basis, tmp_path):
    other = dataclasses.replace(tiny_config(), model=dataclasses.replace(TINY, num_queries=7))
    cases = {
        "shape": payload(model, basis, config=other.to_dict()),
        "not_a_dict": payload(model, basis, model=[1, 2, 3]),
        "unknown_key": payload(model, basis, config={**tiny_config().to_dict(), "model": {
            **tiny_config().to_dict()["model"], "colour": "red"}}),
        "bad_basis": payload(model, basis, basis={**basis.to_dict(), "format_version": 9}),
        "class_count": payload(model, basis, class_names=["one"], category_ids=[1]),
    }
    for name, content in cases.items():
        path = save_checkpoint(tmp_path / f"{name}.pt", **content)
        error = _assert_one_line_error(path)
        assert error.file == str(path), name
    assert "colour" in _assert_one_line_error(tmp_path / "unknown_key.pt").reason


# ----------------------------------------------------------------------------- atomic save


def test_save_replaces_the_file_whole_and_leaves_no_temporary_files(model, basis, tmp_path):
    path = tmp_path / "run" / "last.pt"  # the folder is created
    save_checkpoint(path, **payload(model, basis, metrics={"round": 1}))
    save_checkpoint(path, **payload(model, basis, metrics={"round": 2}))
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]
    assert load_checkpoint(path)["metrics"] == {"round": 2}
    with pytest.raises(ValueError, match="basis"):
        save_checkpoint(path, **{k: v for k, v in payload(model, basis).items() if k != "basis"})


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_a_save_that_fails_midway_keeps_the_old_file(model, basis, tmp_path, monkeypatch, error):
    path = save_checkpoint(tmp_path / "last.pt", **payload(model, basis, metrics={"round": 1}))
    before = path.read_bytes()
    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)  # most of the bytes are written...
        f.truncate(len(before) // 3)
        raise error  # ...then the disk fills up, or the user presses Ctrl-C

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(type(error)):
        save_checkpoint(path, **payload(model, basis, metrics={"round": 2}))
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
    assert load_checkpoint(path)["metrics"] == {"round": 1}


def test_a_saved_checkpoint_gets_the_permissions_of_any_new_file(model, basis, tmp_path):
    path = save_checkpoint(tmp_path / "model.pt", **payload(model, basis))
    (tmp_path / "plain.txt").write_text("x")  # created with 0666 less the umask
    mode = stat.S_IMODE(os.stat(path).st_mode)
    assert mode == stat.S_IMODE(os.stat(tmp_path / "plain.txt").st_mode)


def test_export_keeps_batchnorm_statistics_in_float32(basis, tmp_path):
    """A from-scratch BatchNorm's running variance can pass float16's 65504: it must survive."""
    from istr_viz.checkpoint import export_for_inference

    torch.manual_seed(0)
    bn_tiny = dataclasses.replace(TINY, norm="bn")
    bn_model = build_model(bn_tiny, len(CLASS_NAMES), basis).eval()
    with torch.no_grad():
        bn_model.backbone.body.bn1.running_var.fill_(1e5)  # inf in float16
        bn_model.backbone.body.bn1.running_mean.fill_(0.3)
    cfg = dataclasses.replace(tiny_config(), model=bn_tiny).to_dict()
    exported = export_for_inference(payload(bn_model, basis, config=cfg))
    loaded, _ = load_model(save_checkpoint(tmp_path / "bn.pt", **exported), device="cpu")
    a, b = _run(bn_model), _run(loaded)
    torch.testing.assert_close(b.stages[0].logits, a.stages[0].logits, atol=3e-2, rtol=0)
    shipped = exported["model"]
    assert shipped["backbone.body.bn1.running_var"].dtype == torch.float32
    assert torch.isfinite(shipped["backbone.body.bn1.running_var"]).all()
    assert shipped["backbone.body.bn1.weight"].dtype == torch.float16  # weights are still halved
    stats = [k for k in shipped if k.endswith((".running_mean", ".running_var"))]
    assert stats and all(shipped[k].dtype == torch.float32 for k in stats)


def test_export_ships_half_weights_a_card_and_no_training_state(model, basis, tmp_path):
    import subprocess
    import sys

    train_state = {"iteration": 5, "optimizer": {"state": {}, "param_groups": []},
                   "raw_model": model.state_dict()}
    source = save_checkpoint(tmp_path / "last.pt", **payload(model, basis, train_state=train_state))
    card_file = tmp_path / "card.json"
    card_file.write_text('{"data": "built-in shapes", "minutes": 1.5}')
    out = tmp_path / "ship.pt"
    done = subprocess.run([sys.executable, "-m", "istr_viz", "export", str(source), "--out",
                           str(out), "--card", str(card_file)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    shipped = load_checkpoint(out)
    assert "train_state" not in shipped and shipped["card"]["minutes"] == 1.5
    assert shipped["metrics"] == METRICS and shipped["class_names"] == CLASS_NAMES
    dtypes = {k: v.dtype for k, v in shipped["model"].items()
              if torch.is_tensor(v) and v.is_floating_point()}
    assert {d for k, d in dtypes.items() if not k.startswith("basis.")} == {torch.float16}
    assert {d for k, d in dtypes.items() if k.startswith("basis.")} == {torch.float32}
    assert out.stat().st_size < 0.6 * source.stat().st_size
    loaded, _ = load_model(out, device="cpu")
    a, b = _run(model), _run(loaded)
    torch.testing.assert_close(b.stages[0].logits, a.stages[0].logits, atol=3e-2, rtol=0)
    bad = subprocess.run([sys.executable, "-m", "istr_viz", "export", str(source), "--out",
                          str(out), "--card", str(tmp_path / "missing.json")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "missing.json" in bad.stderr and len(bad.stderr.splitlines()) == 1


def test_the_card_file_and_the_model_card_give_the_same_commands():
    """checkpoints/card.json (what `export --card` embeds) and checkpoints/README.md must document
    one recipe: each step of the card's command appears verbatim in the model card."""
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    card = json.loads((root / "checkpoints" / "card.json").read_text())
    readme = (root / "checkpoints" / "README.md").read_text()
    steps = [step.strip() for step in card["command"].split("&&")]
    assert len(steps) == 3 and "train" in steps[1]
    for step in steps:
        assert step in readme, step


def test_trained_median_px_reads_a_sound_record_and_ignores_anything_else():
    from istr_viz.checkpoint import trained_median_px

    assert trained_median_px({"train_state": {"trained_median_px": 20.5}}) == 20.5
    assert trained_median_px({"card": {"trained_median_px": 24}}) == 24.0  # an export's card
    assert trained_median_px({"train_state": {}, "card": {"trained_median_px": 3.0}}) == 3.0
    for bad in ({}, {"card": "a card that is not a dict"}, {"train_state": None},
                {"card": {"trained_median_px": float("inf")}},
                {"card": {"trained_median_px": float("nan")}},
                {"train_state": {"trained_median_px": True}},
                {"train_state": {"trained_median_px": "20"}},
                {"train_state": {"trained_median_px": 0.0}},  # data without instances
                {"train_state": {"trained_median_px": -4.0}}):
        assert trained_median_px(bad) == 0.0, bad
