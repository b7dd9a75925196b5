"""Every notebook in notebooks/ runs headless, top to bottom, with SMALL = True.

The convention for all notebooks: a code cell tagged ``parameters`` that defines ``SMALL``; the
test inserts ``SMALL = True`` right after it (as papermill does), runs the notebook with nbclient
in a kernel of this interpreter (a kernelspec written to a temporary ``JUPYTER_PATH``), with
``MPLBACKEND=Agg`` and ``ISTR_VIZ_CACHE`` and ``TMPDIR`` in the test's temporary folder, and fails
on the first cell error.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
INJECTED = "SMALL = True  # injected by tests/test_notebooks.py"
KERNEL_NAME = "istr-viz-test"
CELL_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def kernel_dir(tmp_path_factory) -> Path:
    """A JUPYTER_PATH folder with a kernelspec that runs ipykernel on this very interpreter."""
    root = tmp_path_factory.mktemp("jupyter")
    spec_dir = root / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "istr_viz test kernel", "language": "python"}
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    return root


def parameters_index(nb: nbformat.NotebookNode) -> int:
    """Index of the code cell tagged ``parameters``."""
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code" and "parameters" in cell.metadata.get("tags", []):
            return i
    raise AssertionError("no code cell tagged 'parameters'")


def inject_small(nb: nbformat.NotebookNode) -> None:
    """Insert ``SMALL = True`` right after the parameters cell."""
    index = parameters_index(nb)
    cell = nbformat.v4.new_code_cell(INJECTED, metadata={"tags": ["injected-parameters"]})
    nb.cells.insert(index + 1, cell)


def test_there_are_notebooks():
    assert NOTEBOOKS, f"no notebooks in {NOTEBOOK_DIR}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_follows_conventions(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    first = nb.cells[0]
    assert first.cell_type == "markdown" and first.source.startswith("# "), "needs an H1 title"
    params = nb.cells[parameters_index(nb)]
    assert "SMALL" in params.source, "the parameters cell must define SMALL"
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, "outputs are not stripped"
            assert "matplotlib.pyplot" not in cell.source and "plt." not in cell.source


@pytest.mark.timeout(600)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_headless(path, tmp_path, kernel_dir, monkeypatch):
    monkeypatch.setenv("JUPYTER_PATH", str(kernel_dir))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("ISTR_VIZ_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # temporary folders a notebook makes land here
    nb = nbformat.read(path, as_version=4)
    inject_small(nb)
    nb.cells.insert(0, nbformat.v4.new_code_cell("import sys; print(sys.executable)"))
    client = NotebookClient(nb, kernel_name=KERNEL_NAME, timeout=CELL_TIMEOUT_S,
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError on the first failing cell
    executable = nb.cells[0].outputs[0]["text"].strip()
    assert Path(executable) == Path(sys.executable)
    errors = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs
              if out.output_type == "error"]
    assert not errors
    images = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs
              if "image/png" in out.get("data", {})]
    assert images, "the notebook displayed no figure"
