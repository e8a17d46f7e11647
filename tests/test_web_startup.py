"""The web page while the server starts and with an API key (headless Chromium, a real `infinichat serve` with the
default model and an empty cache directory, so the conversion runs): the loading screen shows the progress and
turns into the app by itself; a wrong key stored in the browser makes the key dialog say "wrong key"."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from web_util import ROOT, free_port, launch_browser, shot, web_prerequisites

pytestmark = [pytest.mark.slow, pytest.mark.skipif(web_prerequisites() is not None, reason=str(web_prerequisites()))]


def _health(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None


def test_loading_screen_then_the_app_and_wrong_key(tmp_path):
    from playwright.sync_api import sync_playwright

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", PYTHONPATH=str(ROOT / "src"))
    cmd = [sys.executable, "-m", "infinichat", "serve", "--port", str(port), "--api-key", "right"]
    cmd += ["--data-dir", str(tmp_path / "d"), "--cache-dir", str(tmp_path / "c")]
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115  (closed below)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    try:
        deadline = time.monotonic() + 120
        while _health(url) is None:
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            time.sleep(0.05)
        assert _health(url) == 503  # converting: the port answers "loading"
        with sync_playwright() as p:
            browser = launch_browser(p)
            page = browser.new_context(viewport={"width": 1280, "height": 800}).new_page()
            page.set_default_timeout(180_000)
            page.goto(url + "/")
            page.wait_for_selector("#loading")
            page.wait_for_function("document.getElementById('stage').textContent.includes('%')")  # the progress
            shot(page, "startup-loading")
            # the loading page reloads into the app once the model is ready; the app asks for the key
            page.evaluate("localStorage.setItem('infinichat.apiKey', 'wrong')")
            page.wait_for_selector("#dlg-key[open]")
            assert "Wrong key" in page.text_content("#key-msg")
            shot(page, "startup-wrong-key")
            page.fill("#key-input", "right")
            page.click("#key-form button[value='ok']")
            page.wait_for_selector("body[data-ready='1']")
            assert not page.is_visible("#dlg-key")
            browser.close()
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
