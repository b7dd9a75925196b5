"""Notebooks 03-05 with their defaults (SMALL = False) and no checkpoint stop at once, saying
how to get one: ``default_checkpoint``'s ``CheckpointError``, not a traceback from deep inside."""

from __future__ import annotations

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError
from test_notebooks import KERNEL_NAME, NOTEBOOK_DIR, kernel_dir  # noqa: F401 (fixture)

NEED_A_CHECKPOINT = ["03_refinement_stages.ipynb", "04_hungarian_matching.ipynb",
                     "05_evaluate.ipynb"]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", NEED_A_CHECKPOINT)
def test_a_missing_checkpoint_says_how_to_get_one(name, tmp_path, kernel_dir, monkeypatch):
    missing = tmp_path / "no-such-checkpoint.pt"
    monkeypatch.setenv("JUPYTER_PATH", str(kernel_dir))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("ISTR_VIZ_CHECKPOINT", str(missing))
    monkeypatch.setenv("ISTR_VIZ_CACHE", str(tmp_path / "cache"))  # nothing is generated
    nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    client = NotebookClient(nb, kernel_name=KERNEL_NAME, timeout=240,
                            resources={"metadata": {"path": str(tmp_path)}})
    with pytest.raises(CellExecutionError) as err:
        client.execute()
    text = str(err.value)
    assert "CheckpointError" in text and str(missing) in text
    assert "02_train.ipynb" in text and "python -m istr_viz train" in text
    failed = [i for i, c in enumerate(nb.cells) if c.cell_type == "code"
              and any(o.output_type == "error" for o in c.get("outputs", []))]
    assert len(failed) == 1 and "default_checkpoint(CHECKPOINT)" in nb.cells[failed[0]].source
    assert not (tmp_path / "cache").exists()  # stopped before touching any data
