"""A server that talks while it starts: the port is bound before the model loads and answers at once.

`serve` is `infinichat serve`: it checks and binds the port, then runs uvicorn on the loading shell right away,
and imports and builds the real app (server/app.py: `build_served`) in the shell's loading thread, so nothing
heavy (torch) is imported before the port answers.

`bind(host, port)` takes the port first (a taken port is one clear error, before any loading). `LoadingShell` is
the ASGI app uvicorn serves from the first moment: while the model loads (in a thread) `/health` answers 503
`{"status": "loading", "stage", "done", "total", "progress"}`, the web page is a loading screen that polls it and
shows the conversion's progress, and every other path is a 503 in the API's error shape (code "loading",
Retry-After). Once the app is built its lifespan is entered and the shell hands every request to it; a load
that fails stops the server with the error. `Progress` records the stages (and logs them, so a log that is
not a terminal shows the conversion going: every 10%).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from infinichat.errors import InfinichatError  # nothing heavier: the CLI binds the port before importing torch

log = logging.getLogger(__name__)
RETRY_AFTER = "2"


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or an InfinichatError naming the port when it is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as e:
        sock.close()
        hint = "; another program holds it: choose another with --port" if e.errno == errno.EADDRINUSE else ""
        raise InfinichatError(f"cannot listen on {host}:{port}: {e.strerror or e}{hint}") from None
    sock.set_inheritable(True)
    return sock


class Progress:
    """Where the start is: a stage name and, for a long stage, `done` of `total` steps."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.stage, self.done, self.total = "starting", 0, 0
        self.started = time.time()
        self._logged = -1

    def __call__(self, stage: str, done: int = 0, total: int = 0) -> None:
        with self._lock:
            new_stage = stage != self.stage
            self.stage, self.done, self.total = stage, done, total
            tenth = done * 10 // total if total else -1
            if new_stage:
                self._logged = -1
            if new_stage or (tenth > self._logged and tenth >= 0):
                self._logged = tenth
                if total:
                    log.info("%s: %d/%d (%d%%)", stage, done, total, done * 100 // total)
                else:
                    log.info("%s", stage)

    def state(self) -> dict[str, Any]:
        with self._lock:
            frac = self.done / self.total if self.total else None
            return {
                "status": "loading",
                "stage": self.stage,
                "done": self.done,
                "total": self.total,
                "progress": frac,
                "seconds": round(time.time() - self.started, 1),
            }


class LoadingShell:
    """The ASGI app served from the start: `build(progress)` runs in a thread and returns the real app."""

    def __init__(self, build: Callable[[Progress], Any], on_failure: Callable[[BaseException], None]) -> None:
        self.build, self.on_failure = build, on_failure
        self.progress = Progress()
        self.app: Any = None
        self._stack = contextlib.AsyncExitStack()
        self.failed: BaseException | None = None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif self.app is not None:
            await self.app(scope, receive, send)
        elif scope["type"] == "http":
            await self._loading(scope, send)

    async def _lifespan(self, receive, send) -> None:
        loop = asyncio.get_running_loop()
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                threading.Thread(target=self._load, args=(loop,), name="model-load", daemon=True).start()
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                await self._stack.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    def _load(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            app = self.build(self.progress)
            asyncio.run_coroutine_threadsafe(self._attach(app), loop).result()
        except BaseException as e:
            self.failed = e
            self.on_failure(e)

    async def _attach(self, app) -> None:
        await self._stack.enter_async_context(app.router.lifespan_context(app))
        self.app = app

    async def _loading(self, scope, send) -> None:
        path, method = scope.get("path", "/"), scope.get("method", "GET")
        state = self.progress.state()
        if method == "GET" and path in ("/", "/index.html"):
            await _send(send, 200, "text/html; charset=utf-8", LOADING_PAGE.encode())
            return
        if path == "/health":
            body = json.dumps(state).encode()
        else:
            pct = f" ({state['progress'] * 100:.0f}%)" if state["progress"] is not None else ""
            msg = f"the model is loading ({state['stage']}{pct}); retry in a few seconds (GET /health says when)"
            err = {"message": msg, "type": "unavailable", "param": None, "code": "loading"}  # errors.py's shape
            body = json.dumps({"error": err}).encode()
        await _send(send, 503, "application/json", body, [(b"retry-after", RETRY_AFTER.encode())])


async def _send(send, status: int, ctype: str, body: bytes, extra: list | None = None) -> None:
    headers = [(b"content-type", ctype.encode()), (b"content-length", str(len(body)).encode()), *(extra or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


LOADING_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>infinichat: loading</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>body{background:#0f1117;color:#e6e8ef;font:16px system-ui,sans-serif;display:grid;place-items:center;
height:100vh;margin:0}main{width:min(420px,90vw)}.bar{height:8px;background:#262a36;border-radius:4px;overflow:hidden}
#fill{height:100%;width:0;background:#7c9cff;transition:width .3s}#stage{color:#9aa3b8;margin:.6em 0}</style></head>
<body><main id="loading"><h2>infinichat is starting</h2><p id="stage">loading the model</p>
<div class="bar"><div id="fill"></div></div></main>
<script>
async function poll() {
  try {
    const r = await fetch("/health", { cache: "no-store" });
    const s = await r.json();
    if (s.status !== "loading") { location.reload(); return; }
    const pct = s.progress == null ? null : Math.round(100 * s.progress);
    document.getElementById("stage").textContent = s.stage + (pct == null ? "" : ` (${pct}%)`) + ` · ${s.seconds} s`;
    document.getElementById("fill").style.width = (pct == null ? 5 : pct) + "%";
  } catch (e) { document.getElementById("stage").textContent = "waiting for the server"; }
  setTimeout(poll, 500);
}
poll();
</script></body></html>
"""


def serve(args: Any) -> int:
    """`infinichat serve` (see the module's docstring); raises InfinichatError when the start fails."""
    import uvicorn

    from infinichat.server.http_limits import MAX_HEAD_KB, protocol_options

    if not 0 <= args.port <= 65535:
        raise InfinichatError(f"--port must be in [0, 65535], got {args.port}")
    sock = bind(args.host, args.port)
    log.setLevel(logging.INFO)  # the loading stages reach the log
    url = f"http://{args.host}:{args.port}"
    # the lines a person starting the server reads, on stdout even when it is not a terminal (logging may be off)
    print(f"infinichat: listening on {url}; loading the model (GET /health answers 503 until it is ready)", flush=True)  # noqa: T201
    holder: list[uvicorn.Server] = []

    with contextlib.ExitStack() as hold:

        def build(progress: Progress):
            from infinichat.server.app import build_served

            app, name = build_served(args, progress, hold)
            print(f"infinichat: serving {name} on {url} (web page /, API /api and /v1)", flush=True)  # noqa: T201
            return app

        def failed(e: BaseException) -> None:
            holder[0].should_exit = True

        shell = LoadingShell(build, failed)
        heads = protocol_options(getattr(args, "max_header_kb", MAX_HEAD_KB))  # 431 past it (http_limits.py)
        holder.append(uvicorn.Server(uvicorn.Config(shell, log_level="warning", lifespan="on", **heads)))
        try:
            holder[0].run(sockets=[sock])
        finally:
            sock.close()
    if shell.failed is not None:
        if isinstance(shell.failed, InfinichatError):
            raise shell.failed
        raise InfinichatError(f"the model failed to load: {type(shell.failed).__name__}: {shell.failed}")
    return 0
