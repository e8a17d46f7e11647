"""A server that talks while it starts (server/startup.py): the port answers at once with 503 "loading" and the
progress, the web page is a loading screen, a taken port fails at once with one line (exit 2), a failed load
stops the server, and the log shows the conversion's progress when stderr is not a terminal."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from server_util import free_port

from infinichat.server.startup import LoadingShell, bind

SRC = Path(__file__).resolve().parents[1] / "src"
ENV = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1"}


def _serve_cmd(port: int, model: Path, tmp: Path, *extra: str) -> list[str]:
    cmd = [sys.executable, "-m", "infinichat", "serve", "--port", str(port), "--model", str(model)]
    return [*cmd, "--data-dir", str(tmp / "d"), "--cache-dir", str(tmp / "c"), *extra]


def _serve(shell) -> tuple[uvicorn.Server, threading.Thread, str]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(shell, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    return server, t, f"http://127.0.0.1:{port}"


def test_loading_then_ready():
    gate, entered = threading.Event(), []

    def build(progress):
        progress("converting tiny.gguf (first start only)", 3, 12)
        gate.wait(30)

        @contextlib.asynccontextmanager
        async def lifespan(app):
            entered.append(True)
            yield

        app = FastAPI(lifespan=lifespan)

        @app.get("/health")
        async def health():
            return {"status": "ok"}

        return app

    shell = LoadingShell(build, lambda e: None)
    server, t, url = _serve(shell)
    try:
        deadline = time.monotonic() + 10
        while shell.progress.state()["done"] != 3:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        h = httpx.get(url + "/health")
        assert h.status_code == 503 and h.headers["retry-after"]
        assert h.json()["status"] == "loading" and h.json()["progress"] == 0.25 and "converting" in h.json()["stage"]
        other = httpx.post(url + "/v1/chat/completions", json={})
        assert other.status_code == 503 and other.json()["error"]["code"] == "loading"
        assert "25%" in other.json()["error"]["message"]
        page = httpx.get(url + "/")
        assert page.status_code == 200 and "/health" in page.text and "starting" in page.text
        gate.set()
        deadline = time.monotonic() + 10
        while httpx.get(url + "/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert entered == [True]  # the app's lifespan ran
    finally:
        gate.set()
        server.should_exit = True
        t.join(10)


def test_a_failed_load_stops_the_server():
    stopped = threading.Event()

    def build(progress):
        raise RuntimeError("weights damaged")

    shell = LoadingShell(build, lambda e: stopped.set())
    server, t, _ = _serve(shell)
    try:
        assert stopped.wait(10) and "damaged" in str(shell.failed)
    finally:
        server.should_exit = True
        t.join(10)


def test_a_taken_port_fails_at_once_with_one_line(tmp_path, tiny_gguf_1k):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        with pytest.raises(Exception, match=f"cannot listen on 127.0.0.1:{port}"):
            bind("127.0.0.1", port)
        t0 = time.monotonic()
        out = subprocess.run(
            _serve_cmd(port, tiny_gguf_1k, tmp_path),
            capture_output=True,
            text=True,
            env=ENV,
            timeout=120,
        )
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and f"127.0.0.1:{port}" in lines[0] and "--port" in lines[0], out.stderr
    assert "serving" not in out.stdout and not (tmp_path / "c" / "models").exists()  # nothing was loaded
    assert time.monotonic() - t0 < 60


def test_serve_answers_while_loading_and_logs_progress(tmp_path, tiny_gguf_1k):
    port = free_port()
    proc = subprocess.Popen(
        _serve_cmd(port, tiny_gguf_1k, tmp_path, "--dtype", "float32", "--budget", "512"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    try:
        seen: list[int] = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
            except httpx.TransportError:
                time.sleep(0.02)
                continue
            seen.append(r.status_code)
            if r.status_code == 200:
                break
            assert r.json()["status"] == "loading"
            time.sleep(0.02)
        assert seen and seen[-1] == 200, seen
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=60)
        assert r.status_code == 200, r.text
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=60)
    assert out.index("listening on") < out.index("serving")
    assert "converting tiny.gguf (first start only)" in err and "100%" in err, err  # stderr is a pipe here
