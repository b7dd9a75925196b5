"""Shared fixtures: headless Chromium, free ports, test artefacts."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


@pytest.fixture
def artifacts_dir() -> Path:
    """Folder for files a test keeps for people to look at (screenshots)."""
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--hide-scrollbars",
]


@pytest.fixture
def chromium(tmp_path):
    """A function ``run(url, screenshot=None, budget_ms=15000) -> str`` returning the rendered DOM.

    Skips with the reason when Debian's chromium is not installed, unless
    ``ISTR_VIZ_REQUIRE_BROWSER=1`` (CI), where a missing browser is a failure.
    """
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        msg = ("Debian's chromium is not installed (make test installs it with apt-get when run as "
               "root): skipping browser test")
        if os.environ.get("ISTR_VIZ_REQUIRE_BROWSER") == "1":
            pytest.fail(msg)
        pytest.skip(msg)

    def run(url: str, screenshot: Path | None = None, budget_ms: int = 15000,
            window: str = "1280,900") -> str:
        base = [exe, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}",
                f"--window-size={window}", f"--virtual-time-budget={budget_ms}"]
        if screenshot is not None:
            subprocess.run([*base, f"--screenshot={screenshot}", url], check=True,
                           capture_output=True, timeout=120)
        dom = subprocess.run([*base, "--dump-dom", url], check=True, capture_output=True,
                             text=True, timeout=120)
        return dom.stdout

    return run
