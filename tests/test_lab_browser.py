"""JupyterLab for real: 03_refinement_stages.ipynb run in JupyterLab in headless Chromium.

A JupyterLab server starts on a free localhost port (no token, no browser of its own, root
allowed, its config, settings, workspaces and runtime files in the test's temporary folder) on a
copy of the notebook with ``SMALL = True`` injected after its parameters cell, as
``tests/test_notebooks.py`` does. Headless Chromium (the conftest's ``browser_page``, driven over
the DevTools protocol) opens the notebook; JupyterLab's own "run all cells" command runs it in the
page's kernel, the test waits for every cell, fails on any error output, checks that the
StageExplorer is rendered by the widget manager (ipywidgets' DOM: the ``widget-slider`` controls
and the ``widget-image`` view, not the ``VBox(...)`` text fallback), then presses the left arrow
on its stage slider and waits for the kernel to redraw: the summary goes from the last stage to
the one before and the view image changes. The screenshot is kept in the test artefacts folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest
from conftest import free_port
from test_notebooks import NOTEBOOK_DIR, inject_small

NOTEBOOK = "03_refinement_stages.ipynb"
SCREENSHOT = "lab_03_refinement_stages.png"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
START_TIMEOUT_S = 90  # the server, then the JupyterLab page
RUN_TIMEOUT_S = 240  # every cell of the notebook, in the browser's kernel


# ----------------------------------------------------------------------------- page scripts

PANEL = (f"(window.jupyterapp && [...window.jupyterapp.shell.widgets('main')]"
         f".find(w => w.context && w.context.path === {json.dumps(NOTEBOOK)}))")
KERNEL_READY = f"""(() => {{
  const panel = {PANEL};
  const kernel = panel && panel.sessionContext && panel.sessionContext.session
                 && panel.sessionContext.session.kernel;
  return !!(panel && panel.content && panel.content.model && kernel
            && kernel.connectionStatus === 'connected' && kernel.status === 'idle');
}})()"""
CELLS = f"""(() => {{
  const panel = {PANEL};
  const cells = panel.content.model.cells;
  const out = [];
  for (let i = 0; i < cells.length; i++) {{
    const cell = cells.get(i);
    if (cell.type !== 'code') continue;
    const outputs = [];
    for (let j = 0; j < cell.outputs.length; j++) outputs.push(cell.outputs.get(j).toJSON());
    out.push({{index: i, count: cell.executionCount, outputs: outputs}});
  }}
  return {{cells: out, kernel: panel.sessionContext.session.kernel.status}};
}})()"""
# the output area holding the StageExplorer: the last one with sliders and an image view
EXPLORER = """(() => {
  const areas = [...document.querySelectorAll('.jp-OutputArea-output')]
    .filter(a => a.querySelector('.widget-slider') && a.querySelector('.widget-image'));
  return areas.length ? areas[areas.length - 1] : null;
})()"""
WIDGET_STATE = f"""(() => {{
  const area = {EXPLORER};
  if (!area) return null;
  const img = area.querySelector('.widget-image');
  const html = [...area.querySelectorAll('.widget-html')].map(e => e.innerText).join(' | ');
  return {{classes: area.className,
           textFallback: area.querySelectorAll('.jp-RenderedText, pre').length,
           sliders: area.querySelectorAll('.widget-slider').length,
           jupyterWidgets: area.querySelectorAll('.jupyter-widgets').length,
           play: area.querySelectorAll('.widget-play, .jupyter-widgets.widget-play').length,
           dropdowns: area.querySelectorAll('.widget-dropdown').length,
           checkboxes: area.querySelectorAll('.widget-checkbox').length,
           imageSrc: img ? img.getAttribute('src') : null,
           imageWidth: img ? img.naturalWidth : 0,
           summary: html,
           text: area.innerText.slice(0, 500)}};
}})()"""


DIAGNOSIS = f"""(() => {{
  const app = window.jupyterapp, panel = {PANEL};
  const session = panel && panel.sessionContext;
  const kernel = session && session.session && session.session.kernel;
  return {{title: document.title, url: location.href, app: !!app,
           widget: panel ? panel.title.label : null,
           session: session ? {{ready: session.isReady, kernelName: session.kernelDisplayName,
                                status: session.kernelDisplayStatus}} : null,
           kernel: kernel ? {{status: kernel.status, connection: kernel.connectionStatus}} : null,
           dialogs: [...document.querySelectorAll('.jp-Dialog')].map(d => d.innerText.slice(0, 300)),
           body: document.body ? document.body.innerText.slice(0, 300) : null}};
}})()"""


def _wait(page, expression: str, timeout_s: float, what: str):
    """Poll ``expression`` until it is truthy and return its value; fail saying what the page
    looked like otherwise."""
    if not page.wait_for(expression, timeout_s):
        pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}; page: "
                    f"{json.dumps(page.evaluate(DIAGNOSIS))}")
    return page.evaluate(expression)


def _run_in_lab(page, lab_url: str, screenshot: Path) -> dict:
    """Open the notebook, run all its cells, move the explorer's stage slider, screenshot."""
    # a headless window never has the focus, and JupyterLab's "current notebook" follows it
    page.send("Emulation.setFocusEmulationEnabled", session=True, enabled=True)
    page.open(lab_url)
    _wait(page, KERNEL_READY, START_TIMEOUT_S, "JupyterLab, the notebook and its kernel")
    page.evaluate(f"window.jupyterapp.shell.activateById({PANEL}.id), "
                  "window.jupyterapp.commands.execute('notebook:run-all-cells'), true")
    _wait(page, f"""(() => {{
        const s = {CELLS};
        return s.kernel === 'idle' && s.cells.every(c => c.count !== null);
    }})()""", RUN_TIMEOUT_S, "every cell of the notebook to run")
    state = page.evaluate(CELLS)
    errors = [f"cell {c['index']}: {o.get('ename')}: {o.get('evalue')}"
              for c in state["cells"] for o in c["outputs"] if o["output_type"] == "error"]
    assert not errors, errors
    before = _wait(page, f"""(() => {{
        const s = {WIDGET_STATE};
        return s && s.imageWidth > 0 && s.summary.includes('stage') ? s : null;
    }})()""", 60, "the StageExplorer to render its view")
    # live: the left arrow on the stage slider's handle asks the kernel for the stage before
    page.evaluate(f"{EXPLORER}.scrollIntoView(), {EXPLORER}.querySelector('.widget-slider "
                  ".noUi-handle').focus(), true")
    for kind in ("keyDown", "keyUp"):
        page.send("Input.dispatchKeyEvent", session=True, type=kind, key="ArrowLeft",
                  code="ArrowLeft", windowsVirtualKeyCode=37, nativeVirtualKeyCode=37)
    after = _wait(page, f"""(() => {{
        const s = {WIDGET_STATE};
        return s && s.imageSrc !== {json.dumps(before["imageSrc"])} && s.imageWidth > 0
               && !s.summary.includes({json.dumps(before["summary"])}) ? s : null;
    }})()""", 60, "the kernel to redraw the StageExplorer after the stage slider moved")
    time.sleep(0.5)  # let the new image paint
    page.screenshot(screenshot, full_page=False)
    dom = page.evaluate("document.documentElement.outerHTML")
    return {"before": before, "after": after, "cells": state["cells"], "dom": dom}


# ----------------------------------------------------------------------------- fixtures


def _write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload))


@pytest.fixture
def lab_server(tmp_path):
    """JupyterLab on a free port serving a copy of the notebook with SMALL = True; its URL."""
    root = tmp_path / "notebooks"
    root.mkdir()
    nb = nbformat.read(NOTEBOOK_DIR / NOTEBOOK, as_version=4)
    inject_small(nb)
    nbformat.write(nb, root / NOTEBOOK)
    config = tmp_path / "jupyter-config"
    _write_json(config / "jupyter_server_config.json", {
        "ServerApp": {"token": "", "password": "", "open_browser": False, "allow_root": True,
                      "disable_check_xsrf": True, "root_dir": str(root)},
        "LabApp": {"news_url": None, "expose_app_in_browser": True,
                   "check_for_updates_class": "jupyterlab.NeverCheckForUpdate",
                   "user_settings_dir": str(tmp_path / "lab-settings"),
                   "workspaces_dir": str(tmp_path / "lab-workspaces")},
    })
    settings = tmp_path / "lab-settings" / "@jupyterlab"
    # every cell in the DOM (no windowing), no news or update checks
    _write_json(settings / "notebook-extension" / "tracker.jupyterlab-settings",
                {"windowingMode": "none"})
    _write_json(settings / "apputils-extension" / "notification.jupyterlab-settings",
                {"fetchNews": "false", "checkForUpdates": False})
    port = free_port()
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(config),
               JUPYTER_RUNTIME_DIR=str(tmp_path / "jupyter-runtime"), MPLBACKEND="Agg",
               ISTR_VIZ_CACHE=str(tmp_path / "cache"), TMPDIR=str(tmp_path),
               OMP_NUM_THREADS="1")
    log = (tmp_path / "lab.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "jupyterlab", "--no-browser",
                             "--ip=127.0.0.1", f"--port={port}", "--port-retries=0"],
                            cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"JupyterLab exited with {proc.returncode}: "
                            f"{(tmp_path / 'lab.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{base}/api/status", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"JupyterLab did not answer on {base} within {START_TIMEOUT_S} s")
            time.sleep(0.5)
        yield f"{base}/lab/tree/{NOTEBOOK}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


# ----------------------------------------------------------------------------- the test


@pytest.mark.timeout(600)
def test_stage_explorer_runs_live_in_jupyterlab(browser_page, lab_server, artifacts_dir):
    shot = artifacts_dir / SCREENSHOT
    shot.unlink(missing_ok=True)
    page = _run_in_lab(browser_page, lab_server, shot)
    before, after = page["before"], page["after"]
    # the explorer cell's output is a widget view, rendered by the widget manager, not as text
    views = [o for c in page["cells"] for o in c["outputs"] if WIDGET_VIEW in o.get("data", {})]
    assert len(views) == 1, page["cells"][-1]
    assert before["textFallback"] == 0, before
    assert before["sliders"] >= 2 and before["dropdowns"] >= 2 and before["checkboxes"] == 4
    assert before["jupyterWidgets"] > 5
    assert "VBox(children" not in page["dom"]
    assert before["imageSrc"] and before["imageWidth"] > 100
    # live: the kernel redrew the stage view for the stage before the last
    assert "stage 3 of 3" in before["summary"] and "stage 2 of 3" in after["summary"]
    assert after["imageSrc"] != before["imageSrc"]
    assert all(cell["count"] is not None for cell in page["cells"])
    assert shot.is_file() and shot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert shot.stat().st_size > 20_000  # a real page, not a blank one
