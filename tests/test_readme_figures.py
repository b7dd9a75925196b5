"""scripts/make_readme_figures.py writes the three README pictures from a checkpoint."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from istr_viz.tiny import TINY_MODEL, make_tiny_run

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "make_readme_figures.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("make_readme_figures", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_run(tmp_path_factory.mktemp("tiny"), iters=2)


def test_writes_a_stage_a_matching_and_a_basis_figure(script, tiny, tmp_path, capsys):
    out = tmp_path / "images"
    status = script.main(["--checkpoint", str(tiny.checkpoint), "--data", str(tiny.data_root),
                          "--index", "1", "--score-threshold", "0", "--out", str(out),
                          "--dpi", "50"])
    assert status == 0
    printed = capsys.readouterr().out
    for name in script.NAMES:
        path = out / f"{name}.png"
        assert f"wrote {path}" in printed
        image = np.asarray(Image.open(path).convert("RGB"))
        assert image.shape[0] > 100 and image.shape[1] > 100 and image.std() > 10


def test_the_figures_show_every_stage_and_both_matchings(script, tiny):
    figures = script.readme_figures(tiny.checkpoint, tiny.data_root, index=0,
                                    score_threshold=0.0)
    assert set(figures) == set(script.NAMES)
    titles = [ax.get_title() for ax in figures["stages"].axes if ax.get_visible()]
    assert [t.split(":")[0] for t in titles] == [f"stage {k}" for k in
                                                 range(1, TINY_MODEL.num_stages + 1)]
    matching = [ax.get_title() for ax in figures["matching"].axes]
    assert matching[0].startswith("stage 1:")
    assert matching[1].startswith(f"stage {TINY_MODEL.num_stages}:")
    assert matching[2] == "matched query per GT"
    assert figures["basis"].axes[0].get_title().startswith("mean")


def test_a_missing_checkpoint_exits_2_saying_how_to_get_one(script, tmp_path, capsys):
    missing = tmp_path / "nothing.pt"
    assert script.main(["--checkpoint", str(missing), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "02_train.ipynb" in err
    assert not (tmp_path / "out").exists()


def test_an_index_outside_the_val_set_exits_2(script, tiny, tmp_path, capsys):
    status = script.main(["--checkpoint", str(tiny.checkpoint), "--data", str(tiny.data_root),
                          "--index", "99", "--out", str(tmp_path / "out")])
    assert status == 2 and "--index 99" in capsys.readouterr().err
