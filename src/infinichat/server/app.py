"""The FastAPI application and `infinichat serve`: engine construction, auth, metrics, health, static page."""

from __future__ import annotations

import argparse
import contextlib
import logging
import secrets
import time
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.staticfiles import StaticFiles

from infinichat.engine.backends import load_engine
from infinichat.errors import InfinichatError
from infinichat.kv.registry import POLICIES
from infinichat.server import errors, routes_actions, routes_openai, routes_sessions
from infinichat.server.errors import ApiError
from infinichat.server.metrics import Metrics
from infinichat.server.openai_compat import PrefixLRU
from infinichat.server.worker import EngineWorker
from infinichat.session.manager import SessionManager
from infinichat.session.settings import SessionSettings

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
MAX_BODY = 16 << 20  # bytes; a character card PNG in base64 fits


def make_engine(args: argparse.Namespace):
    """(engine, tokenizer, model id, model name) for `--backend`."""
    return load_engine(
        args.backend,
        args.model,
        args.dtype,
        args.threads,
        args.cache_dir,
        quant=getattr(args, "quant", "none"),
        device=getattr(args, "device", "auto"),
    )


def _auth(request: Request) -> None:
    key = request.app.state.api_key
    if not key:
        return
    got = request.headers.get("authorization", "")
    if not got.startswith("Bearer "):
        raise ApiError(401, "missing API key: send the header 'Authorization: Bearer <key>'", type="auth")
    if not secrets.compare_digest(got[7:].encode(), key.encode()):
        raise ApiError(401, "wrong API key", type="auth")


def _cache_snapshot(metrics: Metrics, lru: PrefixLRU):
    def snap(m) -> None:
        seqs = [s.seq for s in m.sessions.values() if s.seq is not None] + list(lru.free)
        metrics.snapshot_cache(
            {
                "cache_tokens": sum(q.length for q in seqs),
                "resident_sessions": sum(s.seq is not None for s in m.sessions.values()),
                "evictions": sum(q.n_evictions for q in seqs),
                "evicted_tokens": sum(q.n_evicted for q in seqs),
                "kv_offloads": m.n_offloads,
            }
        )

    return snap


def create_app(
    manager: SessionManager,
    engine,
    tokenizer,
    model_name: str,
    backend: str = "torch",
    api_key: str | None = None,
    max_jobs: int = 64,
    anon_budget: int | None = None,
) -> FastAPI:
    metrics = Metrics()
    lru = PrefixLRU(engine, anon_budget or manager.defaults.budget)
    worker = EngineWorker(manager, max_jobs, on_idle=_cache_snapshot(metrics, lru))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        worker.start()
        yield
        worker.close()  # finishes the running generations as cancelled and writes resident caches to disk

    app = FastAPI(title="infinichat", docs_url="/docs", redoc_url=None, lifespan=lifespan)
    for k, v in {
        "worker": worker,
        "metrics": metrics,
        "prefix_lru": lru,
        "engine": engine,
        "tokenizer": tokenizer,
        "manager": manager,
        "api_key": api_key,
        "info": {"model": model_name, "backend": backend, "started": time.time()},
    }.items():
        setattr(app.state, k, v)
    errors.install(app)

    @app.middleware("http")
    async def count(request: Request, call_next):
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > MAX_BODY:
            response = JSONResponse(
                errors.error_body(413, f"request body of {size} bytes is over the limit of {MAX_BODY} bytes"),
                status_code=413,
            )
        else:
            if request.url.path.startswith(("/api/", "/v1/")):  # every body is JSON, whatever the client says
                request.scope["headers"] = [(k, v) for k, v in request.scope["headers"] if k != b"content-type"] + [
                    (b"content-type", b"application/json")
                ]
            response = await call_next(request)
        route = request.scope.get("route")
        metrics.request(request.method, getattr(route, "path", "other"), response.status_code)
        return response

    auth = [Depends(_auth)]
    for r in (routes_sessions.router, routes_actions.router, routes_openai.router):
        app.include_router(r, dependencies=auth)

    @app.get("/api/info", dependencies=auth)
    async def info():
        return {
            "model": model_name,
            "backend": backend,
            "policies": list(POLICIES),
            "defaults": manager.defaults.to_json(),
        }

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "queue_depth": worker.depth}

    @app.get("/metrics")
    async def metrics_text():
        return PlainTextResponse(metrics.render(worker.depth), media_type="text/plain; version=0.0.4")

    if (STATIC / "index.html").exists():  # the web page (last: every API route takes precedence)
        app.mount("/", StaticFiles(directory=STATIC, html=True), name="static")
    return app


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    defaults = SessionSettings().updated(
        {k: v for k, v in (("budget", args.budget), ("policy", args.policy)) if v is not None}
    )
    if args.port < 0 or args.port > 65535:
        raise InfinichatError(f"--port must be in [0, 65535], got {args.port}")
    engine, tok, model_id, name = make_engine(args)
    manager = SessionManager(engine, tok, model_id, args.data_dir, defaults, kv_cap_bytes=args.kv_cap_mb << 20)
    app = create_app(manager, engine, tok, name, args.backend, args.api_key, args.max_queue)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        log.warning("serving on %s without --api-key: anyone who can reach it can use it", args.host)
    # the line a person starting the server reads, on stdout even when it is not a terminal (logging may be off)
    print(f"infinichat: serving {name} on http://{args.host}:{args.port} (web page /, API /api and /v1)", flush=True)  # noqa: T201
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
