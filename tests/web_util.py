"""End-to-end helpers for the web page tests: a real `infinichat serve` subprocess on loopback (default
model), a tiny JSON client for set-up, and headless Debian Chromium driven by Playwright."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def web_prerequisites() -> str | None:
    """Why the web tests cannot run here (None: they can). `scripts/setup.sh --test` installs both."""
    try:
        import playwright.sync_api  # noqa: F401  (only whether it imports)
    except ImportError:
        return "playwright is not installed (bash scripts/setup.sh --test installs it)"
    if not (os.access(CHROMIUM, os.X_OK) or shutil.which("chromium")):
        return f"{CHROMIUM} is missing (bash scripts/setup.sh --test installs Debian's chromium)"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    """`python3 -m infinichat serve --port P --data-dir D` with the default model, until closed."""

    def __init__(self, data_dir: Path, *extra: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = data_dir / "serve.log"
        env = dict(
            os.environ,
            OMP_WAIT_POLICY="PASSIVE",
            PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
        )
        cmd = [
            sys.executable,
            "-m",
            "infinichat",
            "serve",
            "--port",
            str(self.port),
            "--data-dir",
            str(data_dir),
            *extra,
        ]
        self._log = open(self.log, "w")  # noqa: SIM115  (the server's log for its lifetime; closed in __exit__)
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)

    def __enter__(self) -> ServeProcess:
        deadline = time.monotonic() + 180  # the first load converts the GGUF (~10 s on a quiet machine)
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"infinichat serve exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.3)
        self.close()
        raise RuntimeError(f"infinichat serve did not answer /health in time:\n{self.log.read_text()}")

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()

    def api(self, method: str, path: str, body: dict | None = None) -> dict | None:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.url + path, data=data, method=method, headers={"Content-Type": "application/json"} if data else {}
        )
        with urllib.request.urlopen(req, timeout=120) as r:
            raw = r.read()
        return json.loads(raw) if raw else None


def launch_browser(playwright):
    return playwright.chromium.launch(
        executable_path=CHROMIUM if os.access(CHROMIUM, os.X_OK) else shutil.which("chromium"), args=CHROMIUM_ARGS
    )


def shot(page, name: str) -> Path:
    """Save a screenshot of the page's current state as a test artifact."""
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path))
    return path
