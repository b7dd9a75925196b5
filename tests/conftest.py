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


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """``(data root, checkpoint)``: a tiny shapes data set (16 train, 4 val images of 64 px) and
    the ``last.pt`` of a 2-iteration run of a tiny model on it, written by ``engine.train`` (so
    the checkpoint has the real format: configuration, basis, metrics per stage, train state)."""
    from istr_viz.config import apply_overrides, get_preset
    from istr_viz.data.layout import split_paths
    from istr_viz.data.shapes import make_shapes
    from istr_viz.engine import train
    from test_engine import TINY

    base = tmp_path_factory.mktemp("tiny_run")
    root = base / "shapes"
    make_shapes(root, num_train=16, num_val=4, size=64, seed=5, progress=False)
    cfg = apply_overrides(get_preset("shapes-cpu"), [*TINY, "basis.dim=12"])
    result = train(cfg, split_paths(root, "train"), base / "run", val_data=split_paths(root, "val"),
                   max_iters=2, device="cpu", progress=False)
    return root, result.last_checkpoint


class DevToolsPage:
    """One headless Chromium page driven over the DevTools protocol on a pipe (fds 3 and 4: no
    network port, no extra package). ``open(url)``, ``wait_for(js)``, ``text()``,
    ``click_button(text)``, ``click_tab(label)``,
    ``screenshot(path)``; ``close()`` ends the browser."""

    def __init__(self, exe: str, profile: Path, width: int = 1280, height: int = 900):
        import json

        self._json = json
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()

        def wire_pipes():  # in the child: the protocol wants its ends at fds 3 and 4
            read, write = os.dup(to_chrome_r), os.dup(from_chrome_w)  # out of the way of 3, 4
            os.dup2(read, 3)  # dup2 makes them inheritable
            os.dup2(write, 4)

        self.proc = subprocess.Popen(
            [exe, *CHROMIUM_FLAGS, "--remote-debugging-pipe", f"--user-data-dir={profile}",
             f"--window-size={width},{height}", "about:blank"],
            preexec_fn=wire_pipes, close_fds=False, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buffer, self._next_id = b"", 0
        self.width, self.height = width, height
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self._session = self.send("Target.attachToTarget", targetId=target,
                                  flatten=True)["sessionId"]
        self.send("Emulation.setDeviceMetricsOverride", session=True, width=width,
                  height=height, deviceScaleFactor=1, mobile=False)

    def send(self, method: str, session: bool = False, **params) -> dict:
        """Send one command and return its result (events in between are skipped)."""
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = self._session
        os.write(self._to_chrome, self._json.dumps(message).encode() + b"\0")
        while True:
            while b"\0" not in self._buffer:
                chunk = os.read(self._from_chrome, 1 << 16)
                if not chunk:
                    raise RuntimeError("chromium closed the DevTools pipe")
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            reply = self._json.loads(raw)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def evaluate(self, expression: str):
        result = self.send("Runtime.evaluate", session=True, expression=expression,
                           returnByValue=True)
        return result.get("result", {}).get("value")

    def open(self, url: str) -> None:
        self.send("Page.navigate", session=True, url=url)

    def text(self) -> str:
        """The rendered page's visible text."""
        return self.evaluate("document.body ? document.body.innerText : ''") or ""

    def wait_for(self, expression: str, timeout: float = 60.0) -> bool:
        """Poll the JavaScript ``expression`` (real time) until it is truthy; False on timeout."""
        import time

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.evaluate(expression):
                return True
            time.sleep(0.25)
        return False

    def screenshot(self, path: Path, full_page: bool = True) -> Path:
        """Save a PNG of the page (all of it with ``full_page``, else the window)."""
        import base64

        if full_page:
            height = int(self.evaluate("Math.max(document.documentElement.scrollHeight,"
                                       " document.body.scrollHeight)") or self.height)
            self.send("Emulation.setDeviceMetricsOverride", session=True, width=self.width,
                      height=min(height, 8000), deviceScaleFactor=1, mobile=False)
        data = self.send("Page.captureScreenshot", session=True, format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        if full_page:
            self.send("Emulation.setDeviceMetricsOverride", session=True, width=self.width,
                      height=self.height, deviceScaleFactor=1, mobile=False)
        return path

    def click_button(self, text: str) -> bool:
        """Click the first visible button reading ``text``; False when there is none."""
        return bool(self.evaluate(
            "(() => { const b = [...document.querySelectorAll('button')].find(e =>"
            f" e.offsetParent !== null && e.innerText.trim() === {self._json.dumps(text)});"
            " if (b) { b.click(); return true; } return false; })()"))

    def click_tab(self, label: str) -> bool:
        """Click the tab (``role="tab"``) labelled ``label``; False when there is none."""
        return bool(self.evaluate(
            "(() => { const t = [...document.querySelectorAll('[role=tab]')]"
            f".find(e => e.innerText.trim() === {self._json.dumps(label)});"
            " if (t) { t.click(); return true; } return false; })()"))

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except (RuntimeError, OSError):
            pass
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        os.close(self._to_chrome)
        os.close(self._from_chrome)


@pytest.fixture
def browser_page(tmp_path):
    """A :class:`DevToolsPage` in headless Chromium (skipped as ``chromium`` is when absent)."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        msg = "Debian's chromium is not installed: skipping browser test"
        if os.environ.get("ISTR_VIZ_REQUIRE_BROWSER") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    page = DevToolsPage(exe, tmp_path / "chromium-profile", 1280, 1000)
    yield page
    page.close()
