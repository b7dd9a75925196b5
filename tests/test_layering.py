"""Dependencies point one way: the core library never pulls in the UI layers."""

import subprocess
import sys

import pytest

UI_MODULES = ("gradio", "ipywidgets", "matplotlib.pyplot")


def _loaded_after(statement: str) -> set[str]:
    code = (
        f"import sys; {statement}; "
        f"print(' '.join(m for m in {UI_MODULES!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return set(out.stdout.split())


def test_plain_import_pulls_in_no_ui():
    assert _loaded_after("import istr_viz") == set()


@pytest.mark.parametrize("module", ["istr_viz.data", "istr_viz.cli", "istr_viz.basis"])
def test_core_modules_pull_in_no_ui(module):
    assert _loaded_after(f"import {module}") == set()


def test_data_layer_does_not_import_model_layer():
    code = "import sys, istr_viz.data; print('istr_viz.model' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert out.stdout.strip() == "False"
