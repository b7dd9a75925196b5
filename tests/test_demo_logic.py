"""The demo's logic without gradio: safe uploads, served checkpoint, predict / matching / basis
views and the model card (tests/test_app.py drives the same through the running page)."""

from __future__ import annotations

import struct
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from istr_viz.demo_logic.card import AP_COLUMNS, ap_rows, machine_line, model_card
from istr_viz.demo_logic.images import ImageLimits, from_array, load_upload
from istr_viz.demo_logic.mask_basis import prepare_basis, render_basis
from istr_viz.demo_logic.matching import (
    match_sample,
    matching_problem,
    render_matching,
    sample_choices,
)
from istr_viz.demo_logic.predict import (
    DETECTION_COLUMNS,
    GRID_MAX_LABELS,
    examples,
    grid_figure,
    load_example,
    next_stage,
    predict_loaded,
    render_prediction,
    stage_figure,
    start_stage,
)
from istr_viz.demo_logic.served import ServedModel, open_checkpoint, open_data
from istr_viz.errors import DataError
from tiny_viz import patches_with, rect_xyxy


def png_header(path, width: int, height: int):
    """A PNG whose header claims ``width`` x ``height`` RGB pixels, with almost no pixel data."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + body))
        return struct.pack(">I", len(body)) + kind + body + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                     + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    return path


# ----------------------------------------------------------------------------- uploads


@pytest.mark.parametrize("mode, note", [("L", "grayscale"), ("RGBA", "transparency dropped"),
                                        ("P", "palette"), ("I;16", "16-bit")])
def test_uploads_of_any_mode_become_rgb_with_a_note(tmp_path, mode, note):
    rng = np.random.default_rng(0)
    if mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65535, (40, 50), dtype=np.uint16))
    else:
        img = Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).convert(mode)
    img.save(tmp_path / "x.png")
    loaded = load_upload(tmp_path / "x.png")
    assert loaded.array.shape == (40, 50, 3) and loaded.array.dtype == np.uint8
    assert any(note in n for n in loaded.notes)


def test_a_large_picture_is_downscaled_to_the_bound_and_says_so(tmp_path):
    Image.new("RGB", (1500, 1000), "red").save(tmp_path / "big.jpg")
    loaded = load_upload(tmp_path / "big.jpg", ImageLimits(max_side=600))
    assert max(loaded.array.shape[:2]) <= 600 and loaded.original_size == (1000, 1500)
    assert any("downscaled from 1500 x 1000" in n for n in loaded.notes)


@pytest.mark.parametrize("width, height", [(8000, 8000), (30000, 30000)])
def test_a_huge_header_is_refused_before_decoding(tmp_path, width, height):
    path = png_header(tmp_path / "bomb.png", width, height)
    start = time.perf_counter()
    with pytest.raises(DataError, match="megapixels.*not decoded"):
        load_upload(path)
    assert time.perf_counter() - start < 1.0  # nothing was decoded


def test_non_images_small_and_corrupt_files_give_one_line_reasons(tmp_path):
    (tmp_path / "notes.png").write_text("not a picture")
    with pytest.raises(DataError, match="notes.png: not an image file"):
        load_upload(tmp_path / "notes.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "tiny.png")
    with pytest.raises(DataError, match="smaller than 16"):
        load_upload(tmp_path / "tiny.png")
    Image.new("RGB", (2000, 20)).save(tmp_path / "strip.png")
    with pytest.raises(DataError, match="longer than"):
        load_upload(tmp_path / "strip.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
        tmp_path / "whole.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "whole.png").read_bytes()[:300])
    with pytest.raises(DataError, match="cannot be decoded"):
        load_upload(tmp_path / "cut.png")


def test_in_memory_grayscale_and_rgba_arrays_get_notes():
    assert "grayscale" in from_array(np.zeros((32, 32), np.uint8), "g").notes[0]
    assert "RGBA" in from_array(np.zeros((32, 32, 4), np.uint8), "a").notes[0]
    assert from_array(np.zeros((32, 32, 3), np.uint8), "c").notes == []


# ----------------------------------------------------------------------------- served


@pytest.fixture(scope="module")
def served(tiny_run):
    return open_checkpoint(tiny_run[1], device="cpu")


@pytest.fixture(scope="module")
def data(tiny_run):
    return open_data(tiny_run[0])


def test_a_missing_checkpoint_says_how_to_train_one(tmp_path):
    served = open_checkpoint(tmp_path / "none.pt")
    assert not served.ok and served.num_stages == 1
    assert "No checkpoint is present yet" in served.message
    assert "python -m istr_viz train" in served.message


def test_a_checkpoint_that_does_not_load_gives_a_message(tmp_path):
    (tmp_path / "garbage.pt").write_bytes(b"\0garbage" * 100)
    bad = open_checkpoint(tmp_path / "garbage.pt")
    assert not bad.ok and "could not be loaded" in bad.message and "garbage.pt" in bad.message

    class Evil:  # a pickle that would run code: refused by weights_only=True
        def __reduce__(self):
            return (print, ("unsafe",))

    torch.save({"format_version": 1, "x": Evil()}, tmp_path / "evil.pt")
    evil = open_checkpoint(tmp_path / "evil.pt")
    assert not evil.ok and "weights_only=True" in evil.message


def test_a_folder_that_is_not_a_data_set_gives_a_message(tmp_path):
    data = open_data(tmp_path)
    assert not data.ok and "No data set" in data.message and "val" in data.message


def test_the_served_checkpoint_reports_itself(served, data):
    assert served.ok and served.iteration == 2 and served.num_stages == 2
    assert "Serving checkpoint" in served.status() and "2 stages" in served.status()
    assert data.categories_match(served.predictor)


# ----------------------------------------------------------------------------- predict


def data_example(data):
    return next(ex for ex in examples(data).values()
                if ex.index is not None and data.num_instances(ex.index))


def test_examples_are_the_val_images_then_scikit_image_photos(data):
    found = list(examples(data).values())
    assert [ex.index for ex in found if ex.index is not None] == [0, 1, 2, 3]
    assert {ex.photo for ex in found if ex.photo} >= {"coins"}


def test_the_table_rows_are_the_boxes_drawn(served, data):
    loaded, gt_boxes, gt_labels = load_example(data_example(data), data)
    result = predict_loaded(served, loaded, gt_boxes, gt_labels)
    for stage, threshold in [(1, 0.0), (2, 0.0), (2, 0.05)]:
        view = render_prediction(result, stage, threshold)
        ax = stage_figure(result, stage, threshold).axes[0]
        drawn = [rect_xyxy(p) for p in patches_with(ax, "-")]  # in drawing order: best first
        listed = [row[3:7] for row in view.rows]
        assert len(drawn) == len(listed) == len(result.prediction.detections(stage, threshold))
        np.testing.assert_allclose(drawn, listed, atol=0.051)
        assert len(patches_with(ax, "--")) == len(gt_boxes)  # the ground truth, dashed
        assert all(len(row) == len(DETECTION_COLUMNS) for row in view.rows)
        assert f"{len(view.rows)} detections" in view.summary
        assert view.overlay.ndim == 3 and view.grid.ndim == 3


def test_redrawing_never_runs_the_model_and_keeps_no_masks(served, data):
    loaded, _, _ = load_example(examples(data)["photo coins"], data)
    calls = []
    handle = served.predictor.model.register_forward_hook(lambda *args: calls.append(1))
    try:
        result = predict_loaded(served, loaded)
        for stage in (1, 2, 1):
            for threshold in (0.0, 0.02, 0.5):
                render_prediction(result, stage, threshold)
    finally:
        handle.remove()
    assert len(calls) == 1
    assert result.prediction._mask_cache == {}  # redraws filled a throw-away copy
    assert render_prediction(result, 1, 0.0, with_grid=False).grid is None
    assert "grayscale" in render_prediction(result, 2, 0.3).summary


def test_crowded_grid_panels_go_unlabelled(served, data):
    loaded, _, _ = load_example(examples(data)["photo coins"], data)
    result = predict_loaded(served, loaded)
    crowded = grid_figure(result, 0.0).axes  # 48 (query, class) pairs per stage
    assert all(len(ax.patches) > GRID_MAX_LABELS and not ax.texts for ax in crowded)
    top = float(result.prediction.detections(1).scores[GRID_MAX_LABELS - 1])
    sparse = grid_figure(result, top).axes[0]
    assert 0 < len(sparse.texts) == len(sparse.patches) <= GRID_MAX_LABELS


def test_ground_truth_follows_a_downscaled_data_set_image(data):
    example = data_example(data)
    full, boxes, _ = load_example(example, data)
    half, half_boxes, _ = load_example(example, data, ImageLimits(min_side=8, max_side=32))
    assert half.array.shape[:2] == (32, 32) and full.array.shape[:2] == (64, 64)
    np.testing.assert_allclose(half_boxes, boxes / 2, atol=1e-4)


def test_play_steps_through_the_stages_once():
    assert start_stage(6, 6) == 1 and start_stage(3, 6) == 3
    assert next_stage(1, 6) == (2, True)
    assert next_stage(5, 6) == (6, False)
    assert next_stage(6.0, 6) == (6, False)


# ----------------------------------------------------------------------------- matching


def test_the_assignment_has_a_row_per_ground_truth_instance(served, data):
    assert matching_problem(served, data) == ""
    dataset = data.val_dataset(served.config)
    choices = sample_choices(data)
    assert choices and all(data.num_instances(i) > 0 for _, i in choices)
    for _, index in choices:
        im = match_sample(served, dataset, index)
        for stage in (1, 2):
            view = render_matching(im, stage)
            assert [row[0] for row in view.rows] == list(range(data.num_instances(index)))
            assert f"of {data.num_instances(index)} ground-truth" in view.summary


def test_matching_says_why_it_cannot_run(tmp_path, data):
    assert "No checkpoint" in matching_problem(open_checkpoint(tmp_path / "x.pt"), data)


# ----------------------------------------------------------------------------- basis and card


def test_without_a_checkpoint_a_basis_is_fitted_on_the_train_masks(tmp_path, data):
    view = prepare_basis(ServedModel(tmp_path / "none.pt"), data)
    assert "fitted just now" in view.source and view.basis.mask_size == 28
    assert len(view.masks) == sum(data.num_instances(i) for i in range(4))
    recon, curves, summary = render_basis(view, 3, 1)
    assert recon.ndim == curves.ndim == 3 and summary.startswith("k = 3 of")
    pca = next(iter(view.curves.values()))
    assert pca["miou"][-1] >= pca["miou"][0]


def test_with_a_checkpoint_its_own_basis_is_shown(served, data):
    view = prepare_basis(served, data)
    assert "checkpoint's own basis" in view.source
    assert view.basis.dim == served.predictor.model.basis.dim == 12


def test_the_card_has_an_ap_row_per_stage(served, data):
    rows = ap_rows(served.predictor.metrics)
    assert [row[0] for row in rows] == [1, 2] and len(rows[0]) == len(AP_COLUMNS)
    card = model_card(served, data)
    for text in ("2 iterations", "circle (id 1)", "2 stages", "train/annotations.json"):
        assert text in card
    assert ap_rows({}) == []


def test_an_exported_checkpoint_is_served_with_its_card(tmp_path, tiny_run, data):
    from istr_viz.checkpoint import export_for_inference, load_checkpoint, save_checkpoint

    card = {"command": "python -m istr_viz train --out runs/shapes", "hardware": "2 CPU cores"}
    shipped = save_checkpoint(tmp_path / "shipped.pt", **export_for_inference(
        load_checkpoint(tiny_run[1]), card=card))
    served = open_checkpoint(shipped, device="cpu")
    assert served.ok and served.iteration is None
    assert {k: v for k, v in served.card.items()
            if k not in ("machines", "trained_median_px")} == card
    text = model_card(served, data)
    assert "2 CPU cores" in text and "python -m istr_viz train --out runs/shapes" in text
    assert len(ap_rows(served.predictor.metrics)) == 2  # the metrics travel with the export


def test_where_a_run_started_reaches_its_export_and_the_model_card(tmp_path, tiny_run, data):
    from istr_viz.checkpoint import (export_for_inference, load_checkpoint, save_checkpoint,
                                     trained_median_px)

    ckpt = load_checkpoint(tiny_run[1])
    assert ckpt["train_state"].get("init_from") is None  # a run from scratch says nothing
    assert "started from" not in model_card(open_checkpoint(tiny_run[1], device="cpu"), data)
    start = {"path": "/data/ship.pt", "sha256": "ab" * 32}
    ckpt["train_state"]["init_from"] = start
    trained = save_checkpoint(tmp_path / "last.pt", **ckpt)
    served = open_checkpoint(trained, device="cpu")
    assert served.started_from == start
    assert "started from**: `/data/ship.pt` (SHA-256 abababababab...)" in model_card(served, data)
    exported = export_for_inference(load_checkpoint(trained))
    assert exported["card"]["init_from"] == start  # the training state is dropped, the start kept
    # and so is the median training instance, which a start from the export matches
    median = ckpt["train_state"]["trained_median_px"]
    assert median > 0 and exported["card"]["trained_median_px"] == median
    assert trained_median_px(exported) == median
    assert f"median training instance**: {median:.1f} px" in model_card(served, data)
    text = model_card(open_checkpoint(save_checkpoint(tmp_path / "ship.pt", **exported),
                                      device="cpu"), data)
    assert text.count("/data/ship.pt") == 1  # one line, not the card's copy as well
    assert text.count("median training instance") == 1 and "trained_median_px** (card)" not in text
    own = export_for_inference(load_checkpoint(trained), card={"init_from": "said by the card"})
    assert own["card"]["init_from"] == "said by the card"


def test_the_machines_a_run_trained_on_reach_its_export_and_the_model_card(tmp_path, tiny_run,
                                                                           data):
    from istr_viz.checkpoint import export_for_inference, load_checkpoint, save_checkpoint
    from istr_viz.runtime import machine_summary

    ckpt = load_checkpoint(tiny_run[1])
    [here] = ckpt["train_state"]["machines"]  # the run recorded where it trained
    assert here["cpu"] == machine_summary()["cpu"] and here["torch"] == torch.__version__
    first = {"cpu": "Example A", "logical_cpus": 2, "cpu_flags": ["avx2"], "torch": "2.14.1",
             "torch_threads": 1, "gpu": None}
    second = {"cpu": "Example B", "cpu_flags": None, "gpu": "Example GPU"}
    ckpt["train_state"]["machines"] = [first, second]  # as if resumed on another machine
    trained = save_checkpoint(tmp_path / "last.pt", **ckpt)
    served = open_checkpoint(trained, device="cpu")
    assert served.machines == [first, second]
    line = ("- **trained on**: Example A, 2 logical CPUs, flags avx2, torch 2.14.1; then "
            "Example B, CPU flags unknown, GPU Example GPU")
    assert line in model_card(served, data)
    exported = export_for_inference(load_checkpoint(trained))
    assert exported["card"]["machines"] == [first, second]  # the training state is dropped
    text = model_card(open_checkpoint(save_checkpoint(tmp_path / "ship.pt", **exported),
                                      device="cpu"), data)
    assert line in text and text.count("Example A") == 1  # not the card's copy as well
    own = export_for_inference(load_checkpoint(trained), card={"machines": [second]})
    assert own["card"]["machines"] == [second]
    unknown = {"cpu": None, "cpu_flags": None}  # engine.UNKNOWN_MACHINE
    assert machine_line(unknown) == "unknown CPU, CPU flags unknown"
    assert machine_line({"cpu": "Example C", "cpu_flags": []}) == \
        "Example C, flags none of avx2 / avx512 / amx"
