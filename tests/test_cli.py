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
