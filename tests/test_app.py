"""The demo starts from app.py and renders in a real browser."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import free_port

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def running_app(tmp_path):
    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    proc = subprocess.Popen(
        [sys.executable, "app.py", "--server-port", str(port)], cwd=ROOT, env=env,
        stdout=open(tmp_path / "app.log", "w"), stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError("app exited early:\n" + (tmp_path / "app.log").read_text())
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        raise AssertionError("app did not answer in 120 s:\n" + (tmp_path / "app.log").read_text())
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def test_app_binds_localhost_and_serves(running_app):
    assert running_app.startswith("http://127.0.0.1:")
    html = urllib.request.urlopen(running_app, timeout=10).read().decode()
    assert "istr_viz" in html


def test_app_renders_in_chromium(running_app, chromium, artifacts_dir):
    shot = artifacts_dir / "app_start.png"
    dom = chromium(running_app, screenshot=shot)
    assert "look inside ISTR" in dom  # rendered by Gradio's JavaScript, not in the raw HTML
    assert shot.stat().st_size > 5000
