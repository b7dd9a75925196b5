"""The command line: bad input gets one clear line naming the file and entry, exit status 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import coco_factory as cf
from istr_viz.cli import main

BAD_CASES = [
    cf.write_missing_annotation_file,
    cf.write_invalid_json,
    cf.write_non_coco_json,
    cf.write_duplicate_image_ids,
    cf.write_unknown_image_annotation,
    cf.write_unknown_category_annotation,
    cf.write_degenerate_polygon,
    cf.write_zero_area_box,
    cf.write_rle_size_mismatch,
    cf.write_truncated_image,
    cf.write_text_as_jpg,
    cf.write_missing_image,
]


def _run(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("make_case", BAD_CASES, ids=lambda f: f.__name__.removeprefix("write_"))
def test_check_data_bad_input_exits_2_naming_file_and_entry(make_case, tmp_path, capsys):
    case = make_case(tmp_path / "ds")
    code, _, err = _run(["check-data", "--ann", str(case.paths.ann_file),
                         "--images", str(case.paths.images_dir)], capsys)
    assert code == 2
    errors = [ln for ln in err.splitlines() if ln.startswith("error: ")]  # besides progress bars
    assert errors, err
    assert str(case.file) in errors[0]
    if case.entry:
        assert case.entry in err
    assert "Traceback" not in err


def test_bad_input_through_the_real_entry_point(tmp_path):
    case = cf.write_degenerate_polygon(tmp_path / "ds")
    proc = subprocess.run([sys.executable, "-m", "istr_viz", "check-data", "--ann",
                           str(case.paths.ann_file), "--images", str(case.paths.images_dir)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert f"{case.file}: {case.entry}:" in proc.stderr


def test_missing_folder_and_wrong_root_layout(tmp_path, capsys):
    code, _, err = _run(["check-data", "--data", str(tmp_path / "nowhere")], capsys)
    assert code == 2 and str(tmp_path / "nowhere") in err
    (tmp_path / "root" / "val").mkdir(parents=True)
    code, _, err = _run(["check-data", "--data", str(tmp_path / "root")], capsys)
    assert code == 2
    assert "expected a data set root holding train/ and val/" in err


def test_check_data_json_out_on_quirky_set(tmp_path, capsys):
    paths = cf.write_quirky_coco(tmp_path / "ds")
    out = tmp_path / "summary.json"
    code, text, _ = _run(["check-data", "--ann", str(paths.ann_file), "--images",
                          str(paths.images_dir), "--json-out", str(out)], capsys)
    assert code == 0
    summary = json.loads(out.read_text())
    assert summary["images"] == len(cf.QUIRKY_IMAGE_IDS)
    assert summary["instances"] == cf.QUIRKY_NUM_INSTANCES
    assert summary["crowd"] == cf.QUIRKY_NUM_CROWD
    assert {c["id"]: c["instances"] for c in summary["categories"]} == cf.QUIRKY_INSTANCES_PER_CATEGORY
    assert summary["skipped"] == []
    assert "unused" in text  # a category without instances is still listed


def test_make_shapes_cli_writes_a_checkable_root(tmp_path, capsys):
    code, _, _ = _run(["make-shapes", "--out", str(tmp_path / "s"), "--train", "3", "--val", "2",
                       "--size", "64", "--seed", "1"], capsys)
    assert code == 0
    code, text, _ = _run(["check-data", "--data", str(tmp_path / "s"), "--split", "train"], capsys)
    assert code == 0 and "3 images" in text


def test_help_lists_the_subcommands():
    proc = subprocess.run([sys.executable, "-m", "istr_viz", "--help"], capture_output=True,
                          text=True, check=True)
    for cmd in ("make-shapes", "check-data", "fit-basis"):
        assert cmd in proc.stdout


# ----------------------------------------------------------------------------- train / evaluate / predict

TINY_SET = ["model.backbone_base_channels=8", "model.num_queries=6", "model.num_stages=2",
            "model.hidden_dim=16", "model.dim_dynamic=4", "model.dim_feedforward=32",
            "model.num_heads=2", "data.train_min_sizes=48", "data.train_max_size=48",
            "data.test_min_size=48", "data.test_max_size=48", "train.batch_size=2",
            "train.threads=1", "basis.dim=8", "model.queries_per_instance=0",
            "data.median_object_px=0"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A shapes root and a checkpoint trained on it for one iteration."""
    from istr_viz.data.shapes import make_shapes

    root = tmp_path_factory.mktemp("cli") / "shapes"
    make_shapes(root, num_train=4, num_val=2, size=48, seed=2, progress=False)
    out = root.parent / "run"
    argv = ["train", "--data", str(root), "--out", str(out), "--max-iters", "1", "--device", "cpu"]
    for item in TINY_SET:
        argv += ["--set", item]
    assert main(argv) == 0
    return root, out / "last.pt"


def _fails_with(argv, capsys, *needles):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_train_bad_inputs(tiny_run, tmp_path, capsys):
    root, _ = tiny_run
    _fails_with(["train", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "o")], capsys,
                str(tmp_path / "none"))
    _fails_with(["train", "--data", str(root), "--out", str(tmp_path / "o"), "--set",
                 "train.batch_size=0"], capsys, "batch_size")
    _fails_with(["train", "--data", str(root), "--out", str(tmp_path / "o"), "--set",
                 "model.num_heads=3"], capsys, "num_heads")
    _fails_with(["train", "--data", str(root), "--out", str(tmp_path / "o"), "--preset", "coco-r50",
                 "--max-iters", "1"], capsys, "pretrained_path")
    _fails_with(["train", "--data", str(root), "--out", str(tmp_path / "o"), "--preset", "nope"],
                capsys, "unknown preset")
    _fails_with(["train", "--out", str(tmp_path / "never"), "--resume"], capsys, "last.pt")
    _fails_with(["train", "--out", str(tmp_path / "never"), "--resume", "--max-minutes", "5"],
                capsys, "--max-minutes")


def test_train_with_a_val_set_of_other_classes_is_refused(tiny_run, tmp_path, capsys):
    root, _ = tiny_run
    other = cf.write_quirky_coco(tmp_path / "other")
    train = root / "train"
    _fails_with(["train", "--train-ann", str(train / "annotations.json"), "--train-images",
                 str(train / "images"), "--val-ann", str(other.ann_file), "--val-images",
                 str(other.images_dir), "--out", str(tmp_path / "o")], capsys, str(other.ann_file))


def test_evaluate_and_predict_bad_inputs(tiny_run, tmp_path, capsys):
    root, ckpt = tiny_run
    other = cf.write_quirky_coco(tmp_path / "other")
    _fails_with(["evaluate", "--checkpoint", str(ckpt), "--ann", str(other.ann_file), "--images",
                 str(other.images_dir)], capsys, str(ckpt), "do not fit")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint at all")
    _fails_with(["evaluate", "--checkpoint", str(corrupt), "--data", str(root)], capsys, str(corrupt))
    _fails_with(["predict", "--checkpoint", str(corrupt), str(root / "val" / "images" / "000001.png"),
                 "--out", str(tmp_path / "p")], capsys, str(corrupt))
    text = tmp_path / "notes.png"
    text.write_text("hello")
    _fails_with(["predict", "--checkpoint", str(ckpt), str(text), "--out", str(tmp_path / "p")],
                capsys, str(text))


def test_evaluate_and_predict_write_their_files(tiny_run, tmp_path, capsys):
    root, ckpt = tiny_run
    assert main(["evaluate", "--checkpoint", str(ckpt), "--data", str(root), "--json-out",
                 str(tmp_path / "m.json"), "--results-out", str(tmp_path / "r.json")]) == 0
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert [s["stage"] for s in metrics["per_stage"]] == [1, 2]
    assert set(metrics["bbox"]) >= {"AP", "AP50", "AP75"}
    assert isinstance(json.loads((tmp_path / "r.json").read_text()), list)
    assert "ceilings" not in metrics
    best = metrics["score_threshold"]  # None only when the tiny model detects nothing
    out = capsys.readouterr().out
    assert best is None or f"at score >= {best['threshold']:.3f}" in out
    assert main(["evaluate", "--checkpoint", str(ckpt), "--data", str(root), "--ceilings",
                 "--breakdown", "--json-out", str(tmp_path / "c.json")]) == 0
    out = capsys.readouterr().out
    assert "mask AP ceilings (S = " in out and "classes corrected" in out
    with_extras = json.loads((tmp_path / "c.json").read_text())
    for iou_type in ("bbox", "segm"):  # the breakdown's plain AP is the evaluation's own
        assert with_extras["breakdown"][iou_type]["AP"] == pytest.approx(
            with_extras[iou_type]["AP"])
    ceilings = with_extras["ceilings"]
    assert ceilings["crop"]["AP"] >= ceilings["basis"]["AP"] > 0.3  # ground truth through the basis
    image = root / "val" / "images" / "000001.png"
    assert main(["predict", "--checkpoint", str(ckpt), str(image), "--out", str(tmp_path / "p"),
                 "--score-threshold", "0"]) == 0
    record = json.loads((tmp_path / "p" / "000001.json").read_text())
    assert [s["stage"] for s in record["stages"]] == [1, 2]
    first = record["stages"][-1]["detections"][0]
    assert set(first) == {"query", "category_id", "category_name", "score", "bbox", "segmentation"}
    assert (tmp_path / "p" / "000001_stages.png").stat().st_size > 1000


def test_predict_defaults_to_the_threshold_the_checkpoint_records(tiny_run, tmp_path, capsys):
    from istr_viz.checkpoint import load_checkpoint, save_checkpoint

    root, ckpt = tiny_run
    image = root / "val" / "images" / "000001.png"
    state = load_checkpoint(ckpt)
    for name, chosen, shown in [("chosen", {"threshold": 0.0371, "f1": 0.5}, "0.03"),
                                ("none", None, "0.4"), ("bad", {"threshold": 7.0}, "0.4")]:
        path = save_checkpoint(tmp_path / f"{name}.pt",
                               **{**state, "metrics": {**state["metrics"], "score_threshold": chosen}})
        capsys.readouterr()
        assert main(["predict", "--checkpoint", str(path), str(image), "--out",
                     str(tmp_path / name)]) == 0
        assert f"(score >= {shown})" in capsys.readouterr().out, name
        record = json.loads((tmp_path / name / "000001.json").read_text())
        assert all(d["score"] >= float(shown) for s in record["stages"] for d in s["detections"])


def test_with_test_size_keeps_or_raises_the_cap_and_rejects_bad_sizes():
    from istr_viz.config import ConfigError, get_preset, with_test_size

    import dataclasses

    shapes = get_preset("shapes-cpu")
    preset = dataclasses.replace(shapes, data=dataclasses.replace(shapes.data, test_min_size=224,
                                                                  test_max_size=373))
    smaller = with_test_size(preset, 160)
    assert (smaller.data.test_min_size, smaller.data.test_max_size) == (160, 373)  # cap kept
    larger = with_test_size(preset, 256)
    assert (larger.data.test_min_size, larger.data.test_max_size) == (256, 427)  # 256 x 1333 / 800
    assert larger.data.train_min_sizes == preset.data.train_min_sizes and larger.model == preset.model
    for bad in (0, -32, 1.5, True, 10**6):
        with pytest.raises(ConfigError, match="test size"):
            with_test_size(preset, bad)
    import numpy as np

    assert with_test_size(preset, np.int64(240)).data.test_min_size == 240


def test_test_size_resizes_the_input_of_evaluate_and_predict(tiny_run, tmp_path, capsys):
    from istr_viz.predictor import load_model

    root, ckpt = tiny_run
    image = root / "val" / "images" / "000001.png"  # 48 x 48
    _, default = load_model(ckpt)
    _, larger = load_model(ckpt, test_size=96)
    own = default.min_size  # the checkpoint's own test size
    assert own < 96 and default.config.data.test_min_size == own
    assert (larger.min_size, larger.max_size, larger.config.data.test_min_size) == (96, 160, 96)
    assert default.predict(image).input_size == (own, own)
    assert larger.predict(image).input_size == (96, 96)
    results = {}
    for size in (None, 96):
        extra = ["--test-size", str(size)] if size else []
        out = tmp_path / f"r{size}.json"
        assert main(["evaluate", "--checkpoint", str(ckpt), "--data", str(root),
                     "--results-out", str(out), *extra]) == 0
        results[size] = json.loads(out.read_text())
    # boxes come back at the images' own size either way, but the network saw other pixels
    assert len(results[None]) == len(results[96]) > 0
    assert [r["bbox"] for r in results[None]] != [r["bbox"] for r in results[96]]
    assert max(max(r["bbox"][0] + r["bbox"][2], r["bbox"][1] + r["bbox"][3])
               for r in results[96]) <= 48 + 1e-3
    assert main(["predict", "--checkpoint", str(ckpt), str(image), "--out", str(tmp_path / "p"),
                 "--test-size", "96"]) == 0
    capsys.readouterr()
    _fails_with(["evaluate", "--checkpoint", str(ckpt), "--data", str(root), "--test-size", "0"],
                capsys, "data.test_min_size", "test size")
    _fails_with(["predict", "--checkpoint", str(ckpt), str(image), "--out", str(tmp_path / "q"),
                 "--test-size", "-8"], capsys, "test size")


def test_maskness_power_in_evaluate_and_export(tiny_run, tmp_path, capsys):
    """``--maskness-power`` rescores the detections in evaluate; export stores it, with the
    metrics measured again with it; a power outside 0..16 exits 2 naming the entry."""
    from istr_viz.checkpoint import load_checkpoint
    from istr_viz.config import Config
    from istr_viz.predictor import load_model

    root, ckpt = tiny_run
    scores = {}
    for power in (0, 3):
        out = tmp_path / f"r{power}.json"
        assert main(["evaluate", "--checkpoint", str(ckpt), "--data", str(root),
                     "--results-out", str(out), "--maskness-power", str(power)]) == 0
        scores[power] = sorted(r["score"] for r in json.loads(out.read_text()))
    assert len(scores[0]) == len(scores[3]) > 0
    assert max(scores[3]) < max(scores[0])  # maskness <= 1 only lowers scores
    capsys.readouterr()
    exported = tmp_path / "m.pt"
    assert main(["export", str(ckpt), "--out", str(exported), "--maskness-power", "3",
                 "--data", str(root)]) == 0
    assert "maskness power 3: mask AP" in capsys.readouterr().out
    stored = load_checkpoint(exported)
    cfg = Config.from_dict(stored["config"])
    assert cfg.model.maskness_power == 3.0
    assert cfg.data.test_min_size == Config.from_dict(load_checkpoint(ckpt)["config"]).data.test_min_size
    model, predictor = load_model(exported)
    assert predictor.maskness_power == 3.0
    own = Config.from_dict(load_checkpoint(ckpt)["config"]).model.maskness_power
    assert load_model(ckpt)[1].maskness_power == own != 3.0
    # the stored metrics are those of scoring with the stored power
    from istr_viz.data.layout import split_paths
    from istr_viz.evaluate import evaluate_model

    again = evaluate_model(model, split_paths(root, "val"), predictor.config, progress=False,
                           category_ids=predictor.category_ids)
    assert stored["metrics"]["segm"]["AP"] == pytest.approx(again["segm"]["AP"], abs=1e-9)
    assert again["score_threshold"] == stored["metrics"]["score_threshold"]
    for bad in ("-1", "17", "nan"):
        _fails_with(["evaluate", "--checkpoint", str(ckpt), "--data", str(root),
                     "--maskness-power", bad], capsys, "model.maskness_power")
    _fails_with(["export", str(ckpt), "--out", str(tmp_path / "n.pt"), "--maskness-power", "2"],
                capsys, "--maskness-power 2", "--data")
    _fails_with(["export", str(ckpt), "--out", str(tmp_path / "n.pt"), "--maskness-power", "-2"],
                capsys, "model.maskness_power")  # refused before asking for the data
    assert not (tmp_path / "n.pt").exists()


def test_export_with_a_test_size_measures_the_metrics_again_at_it(tiny_run, tmp_path, capsys):
    import torch

    from istr_viz.checkpoint import load_checkpoint
    from istr_viz.config import Config
    from istr_viz.evaluate import evaluate_model
    from istr_viz.predictor import load_model

    root, ckpt = tiny_run
    out = tmp_path / "retested.pt"
    assert main(["export", str(ckpt), "--out", str(out), "--test-size", "96",
                 "--data", str(root)]) == 0  # float16 weights, measured as stored
    assert "at 96 px, maskness power 2: mask AP" in capsys.readouterr().out  # the preset's
    shipped = load_checkpoint(out)
    cfg = Config.from_dict(shipped["config"])
    assert (cfg.data.test_min_size, cfg.data.test_max_size) == (96, 160)
    assert "train_state" not in shipped
    assert shipped["model"]["proposal_boxes.weight"].dtype == torch.float16
    # the stored metrics are those of the exported (float16) model at its stored size
    model, predictor = load_model(out)
    assert predictor.min_size == 96
    from istr_viz.data.layout import split_paths

    again = evaluate_model(model, split_paths(root, "val"), predictor.config, progress=False,
                           category_ids=predictor.category_ids)
    for key in ("bbox", "segm"):
        assert shipped["metrics"][key]["AP"] == pytest.approx(again[key]["AP"], abs=1e-9)
    own = load_checkpoint(ckpt)["metrics"]["per_stage"]
    assert [s["stage"] for s in shipped["metrics"]["per_stage"]] == [s["stage"] for s in own]
    # a test size needs the data to measure at; the data needs a test size
    _fails_with(["export", str(ckpt), "--out", str(tmp_path / "x.pt"), "--test-size", "96"],
                capsys, "--test-size 96", "--data")
    _fails_with(["export", str(ckpt), "--out", str(tmp_path / "y.pt"), "--data", str(root)],
                capsys, "go with --test-size")
    _fails_with(["export", str(ckpt), "--out", str(tmp_path / "z.pt"), "--test-size", "0",
                 "--data", str(root)], capsys, "test size")
    other = cf.write_quirky_coco(tmp_path / "other")  # other classes: no metrics to measure
    _fails_with(["export", str(ckpt), "--out", str(tmp_path / "w.pt"), "--test-size", "96",
                 "--ann", str(other.ann_file), "--images", str(other.images_dir)],
                capsys, str(ckpt), "do not fit")
    assert not any((tmp_path / n).exists() for n in ("x.pt", "y.pt", "z.pt", "w.pt"))
    # --ann / --images instead of --data
    assert main(["export", str(ckpt), "--out", str(tmp_path / "v.pt"), "--test-size", "80",
                 "--ann", str(root / "val" / "annotations.json"),
                 "--images", str(root / "val" / "images")]) == 0
    assert Config.from_dict(load_checkpoint(tmp_path / "v.pt")["config"]).data.test_min_size == 80
