"""Dependencies point one way: the core library never pulls in the UI layers."""

import ast
import subprocess
import sys
from pathlib import Path

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


def test_the_demo_logic_runs_without_gradio():
    modules = ", ".join(f"istr_viz.demo_logic.{m}" for m in
                        ("served", "images", "predict", "matching", "mask_basis", "card"))
    assert _loaded_after(f"import {modules}") == set()


# Layers, lowest first: a module may import istr_viz modules of its own layer or below only.
LAYERS = [
    ("errors", "runtime", "config", "data", "boxes", "basis", "dct", "checkpoint"),
    ("model", "matcher", "losses", "postprocess"),
    ("engine", "evaluate", "ceilings", "breakdown", "predictor", "inspect", "tiny", "baseline",
     "launch"),
    ("viz",),
    ("widgets", "demo_logic", "demo"),
]


def _layer_of(module: str) -> int:
    top = module.split(".")[1] if module.count(".") else ""
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"{module} is in no layer: add it to LAYERS")


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("istr_viz."):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("istr_viz."))
    return found


def test_dependencies_point_one_way():
    package = Path(__file__).resolve().parent.parent / "istr_viz"
    problems = []
    for path in package.rglob("*.py"):
        rel = path.relative_to(package.parent).with_suffix("")
        module = ".".join(rel.parts)
        if rel.parts[-1] in ("__init__", "__main__", "cli") and len(rel.parts) == 2:
            continue  # the package front door and the CLI sit on top of everything
        own = _layer_of(module if len(rel.parts) > 1 else module)
        for imported in _imports(path):
            if _layer_of(imported) > own:
                problems.append(f"{module} imports {imported}")
    assert not problems, problems
