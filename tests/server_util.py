"""A real uvicorn server in a thread on 127.0.0.1 and a free port, for the server tests."""

from __future__ import annotations

import json
import socket
import threading
import time

import uvicorn

from infinichat.engine.torch_engine import TorchEngine
from infinichat.server.app import create_app
from infinichat.server.http_limits import MAX_HEAD_KB, protocol_options
from infinichat.session.manager import SessionManager


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    def __init__(self, loaded, data_dir, max_header_kb: int = MAX_HEAD_KB, engine=None, **app_kw):
        """`loaded`: a loaded model (its tokenizer, file_hash, name, path), run on a TorchEngine unless `engine`."""
        engine = engine or TorchEngine(loaded.model, loaded.tokenizer.eos_ids)
        self.manager = SessionManager(engine, loaded.tokenizer, loaded.file_hash, data_dir)
        app_kw.setdefault("model_path", loaded.path)
        self.app = create_app(self.manager, engine, loaded.tokenizer, loaded.name, **app_kw)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        heads = protocol_options(max_header_kb)  # as `infinichat serve` runs uvicorn (server/startup.py)
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning", **heads)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def events(resp) -> list[tuple[str, dict]]:
    """The (event, data) pairs of a streamed Server-Sent Events response."""
    out, name = [], None
    for line in resp.iter_lines():
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            out.append((name, json.loads(line[6:])))
    return out
