"""The FastAPI application and `infinichat serve`: engine construction, auth, metrics, health, static page."""

from __future__ import annotations

import argparse
import contextlib
import logging
import secrets
import time
from collections.abc import Sequence
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.staticfiles import StaticFiles

from infinichat.engine.backends import load_engine
from infinichat.errors import InfinichatError
from infinichat.kv.registry import POLICIES
from infinichat.model.label import model_label, served_id, shown
from infinichat.model.loader import default_model_path
from infinichat.server import (
    errors,
    routes_actions,
    routes_chats,
    routes_llama,
    routes_openai,
    routes_sessions,
    routes_tokenize,
    startup,
)
from infinichat.server.errors import ApiError
from infinichat.server.guard import Guard, default_allowed_hosts
from infinichat.server.metrics import Metrics
from infinichat.server.openai_compat import PrefixLRU
from infinichat.server.worker import PREFILL_GROUP, EngineWorker
from infinichat.session.datalock import lock_data_dir
from infinichat.session.manager import SessionManager, default_data_dir, kv_bytes_per_token
from infinichat.session.settings import MAX_BUDGET, SessionSettings

MAX_BATCH = 256  # --max-batch: sequences per batched decode call
MAX_PREFILL_CHUNK = 65536  # --prefill-chunk: prompt tokens per worker round while others stream
MAX_PREFILL_GROUP = 65536  # --prefill-group: prompt tokens of several requests in one forward call

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
MAX_BODY = 16 << 20  # bytes; a character card PNG in base64 fits


def make_engine(args: argparse.Namespace, on_progress=None):
    """(engine, tokenizer, model id, model name) for `--backend`; `on_progress(stage, done, total)` hears the
    loading stages."""
    return load_engine(
        args.backend,
        args.model,
        args.dtype,
        args.threads,
        args.cache_dir,
        quant=getattr(args, "quant", "none"),
        device=getattr(args, "device", "auto"),
        compile=getattr(args, "compile", False),
        kv_dtype=getattr(args, "kv_dtype", "auto"),
        on_progress=on_progress,
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
                "cache_bytes": sum(int(getattr(q.store, "nbytes", 0)) for q in seqs),
                "resident_sessions": sum(s.seq is not None for s in m.sessions.values()),
                "evictions": sum(q.n_evictions for q in seqs),
                "evicted_tokens": sum(q.n_evicted for q in seqs),
                "kv_offloads": m.n_offloads,
                "kv_peak_bytes": m.kv_peak_bytes,
                "kv_limit_bytes": m.kv_limit_bytes,
                # requests without a session of their own, running: their reservations (or stores, when larger)
                "kv_reserved_bytes": sum(sp.busy_bytes for sp in m.spare),
            }
        )
        batcher = getattr(getattr(m, "engine", None), "batcher", None)
        if batcher is not None:
            metrics.snapshot_batches(batcher.sizes)

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
    allowed_hosts: Sequence[str] | None = None,
    cors_origins: Sequence[str] | None = None,
    max_batch: int = 8,
    prefill_chunk: int | None = 256,
    label: str | None = None,
    model_path: str | Path | None = None,
    prefill_group: int = PREFILL_GROUP,
) -> FastAPI:
    """The app. `allowed_hosts`: names the Host header may carry (default: loopback names; "*" = any);
    `cors_origins`: other origins whose pages may call the API (default: none); `max_batch`: generations
    decoded together in one forward call (1: one at a time); `prefill_chunk`: prompt tokens per worker round
    while other generations stream (None: prompts in one go, not batched: server/worker.py); `prefill_group`: prompt
    tokens of several requests at most in one forward call (0 or 1: each request's chunk in its own call).
    `model_name`: the model's own name (GGUF `general.name`); `label`: what people call it (model/label.py); the API
    serves `served_id(label)` as the model id and accepts the other two names for it too. `model_path`: the loaded
    model's file or checkpoint folder (llama-server's /props `model_path`)."""
    label = label or model_name
    served = served_id(label)
    metrics = Metrics()
    lru = PrefixLRU(engine, anon_budget or manager.defaults.budget)
    manager.spare.append(lru)  # anonymous /v1 caches count in the KV memory cap
    worker = EngineWorker(
        manager,
        max_jobs,
        on_idle=_cache_snapshot(metrics, lru),
        max_batch=max_batch,
        prefill_chunk=prefill_chunk,
        prefill_group=prefill_group,
    )

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
        "info": {
            "model": served,
            "aliases": sorted({served, label, model_name}),  # names GET /v1/models/{id} also answers to
            "name": model_name,
            "backend": backend,
            "started": time.time(),
            "model_hash": str(manager.model_id),
            "path": shown(Path(model_path).expanduser().resolve()) if model_path else "",
        },
    }.items():
        setattr(app.state, k, v)
    errors.install(app)
    app.add_middleware(
        Guard, metrics=metrics, max_body=MAX_BODY, allowed_hosts=allowed_hosts, cors_origins=cors_origins or ()
    )
    if cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(cors_origins),
            allow_methods=["*"],
            allow_headers=["*"],
            max_age=600,
        )

    auth = [Depends(_auth)]
    for r in (
        routes_chats.router,
        routes_sessions.router,
        routes_actions.router,
        routes_openai.router,
        routes_llama.router,
        routes_tokenize.router,
    ):
        app.include_router(r, dependencies=auth)
    app.include_router(routes_chats.public)  # the code colours of the page

    @app.get("/api/info", dependencies=auth)
    async def info():
        return {
            "model": served,
            "label": label,  # what the web page and the terminal client show (see model/label.py)
            "backend": backend,
            "policies": list(POLICIES),
            "defaults": manager.defaults.to_json(),
        }

    @app.get("/health")
    async def health():
        fault = manager.db.fault
        body = {"status": "ok" if fault is None else "degraded", "model": served, "queue_depth": worker.depth}
        if fault is not None:  # the process serves, but sessions cannot be stored: 503 for a load balancer
            return JSONResponse({**body, "storage": fault}, status_code=503, headers={"Retry-After": "30"})
        return body

    @app.get("/metrics")
    async def metrics_text():
        metrics.snapshot_prompt_batches(worker.prompt_calls)  # a copy in one C call (the GIL held): no lock needed
        text = metrics.render(worker.depth) + "\n".join(worker.first_item.lines()) + "\n"
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    if (STATIC / "index.html").exists():  # the web page (last: every API route takes precedence)
        app.mount("/", StaticFiles(directory=STATIC, html=True), name="static")
    return app


DEFAULT_KV_CAP_MB = 1024
# on a GPU, the defaults take at most these shares of the memory free once the model is loaded (the rest: the
# activations of prompt chunks, the allocator's slack)
GPU_KV_CAP_SHARE, GPU_KV_LIMIT_SHARE = 0.45, 0.85


def kv_memory(args: argparse.Namespace, engine) -> tuple[int, int]:
    """(--kv-cap-mb, --kv-limit-mb) in bytes. Defaults: 1024 MiB and twice the cap; on a GPU at most 45% and 85%
    of the memory free after the weights (a 6 GB card holding a 4 GB model has no 2 GiB for caches), and a
    warning where the given limit is more than that memory."""
    cap = (args.kv_cap_mb or DEFAULT_KV_CAP_MB) << 20
    device = engine.device
    free = None
    if device.type == "cuda":
        import torch

        free, total = torch.cuda.mem_get_info(device)
        if args.kv_cap_mb is None:
            cap = min(cap, int(free * GPU_KV_CAP_SHARE))
        if cap < 1 << 20:
            raise InfinichatError(
                f"{device} has {free >> 20} MiB free of {total >> 20} once the model is loaded: no room for KV "
                "caches; use --quant int4, a smaller model or --device cpu"
            )
    limit = (args.kv_limit_mb << 20) if args.kv_limit_mb else 2 * cap
    if free is not None and args.kv_limit_mb is None:
        limit = max(cap, min(limit, int(free * GPU_KV_LIMIT_SHARE)))
    if limit < cap:
        raise InfinichatError(f"--kv-limit-mb {args.kv_limit_mb} is below --kv-cap-mb {cap >> 20}")
    if free is not None:
        log.info(
            "%s: %d MiB free after the model: KV cap %d MiB, limit %d MiB", device, free >> 20, cap >> 20, limit >> 20
        )
        if limit > free:
            log.warning(
                "the KV limit (%d MiB) is more than the %d MiB free on %s: generations may run out of GPU memory "
                "(they are refused with 503, the sessions unchanged)",
                limit >> 20,
                free >> 20,
                device,
            )
    return cap, limit


def default_max_budget(engine, kv_cap_bytes: int) -> int:
    """The trained context, and no more tokens than half the KV memory cap holds (at least 64)."""
    cfg = getattr(engine, "cfg", None)
    trained = getattr(cfg, "max_position", None) or MAX_BUDGET
    per_token = kv_bytes_per_token(engine)
    by_memory = kv_cap_bytes // 2 // per_token if per_token else MAX_BUDGET
    return max(64, min(MAX_BUDGET, trained, by_memory))


def check_serve_options(args: argparse.Namespace) -> SessionSettings:
    """`serve`'s options checked before anything loads; the default settings of new sessions."""
    defaults = SessionSettings().updated(
        {k: v for k, v in (("budget", args.budget), ("policy", args.policy)) if v is not None}
    )
    if args.max_budget is not None and not 64 <= args.max_budget <= MAX_BUDGET:
        raise InfinichatError(f"--max-budget must be in [64, {MAX_BUDGET}] tokens, got {args.max_budget}")
    if not 1 <= args.max_batch <= MAX_BATCH:
        raise InfinichatError(f"--max-batch must be in [1, {MAX_BATCH}], got {args.max_batch}")
    if not 0 <= args.prefill_chunk <= MAX_PREFILL_CHUNK:
        raise InfinichatError(
            f"--prefill-chunk must be in [1, {MAX_PREFILL_CHUNK}] tokens, or 0 (prompts in one go), "
            f"got {args.prefill_chunk}"
        )
    if not 1 <= getattr(args, "max_header_kb", 64) <= 1024:
        raise InfinichatError(f"--max-header-kb must be in [1, 1024] KiB, got {args.max_header_kb}")
    if not 0 <= args.prefill_group <= MAX_PREFILL_GROUP:
        raise InfinichatError(
            f"--prefill-group must be in [2, {MAX_PREFILL_GROUP}] tokens, or 0 or 1 (no prompts of several requests "
            f"in one call), got {args.prefill_group}"
        )
    if args.kv_cap_mb is not None and args.kv_cap_mb < 1:
        raise InfinichatError(f"--kv-cap-mb must be at least 1, got {args.kv_cap_mb}")
    if args.kv_limit_mb is not None and args.kv_limit_mb < 1:
        raise InfinichatError(f"--kv-limit-mb must be at least 1, got {args.kv_limit_mb}")
    if getattr(args, "replicas", None) is None and getattr(args, "ray_address", None):
        raise InfinichatError("--ray-address needs --replicas N")
    return defaults


def build_served(
    args: argparse.Namespace, progress: startup.Progress, hold: contextlib.ExitStack
) -> tuple[FastAPI, str]:
    """`infinichat serve`'s app, built while the loading shell answers (server/startup.py: `serve`): the options
    checked, the data directory locked (one writer per directory; `hold` keeps the lock until the server stops),
    then the model loaded. (app, model name)."""
    defaults = check_serve_options(args)
    hold.enter_context(lock_data_dir(args.data_dir or default_data_dir(), f"serve on http://{args.host}:{args.port}"))
    app, name = build_app(args, defaults, progress)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        log.warning("serving on %s without --api-key: anyone who can reach it can use it", args.host)
    return app, name


def build_app(
    args: argparse.Namespace,
    defaults: SessionSettings,
    progress: startup.Progress | None = None,
    data_dir: str | Path | None = None,
    db_url: str | None = None,
    kv_dir: str | Path | None = None,
    shared: bool = False,
) -> tuple[FastAPI, str]:
    """The engine, the session manager and the app of `serve` (one process, or one replica of a cluster: then
    `shared`, with the cluster's store and its own `data_dir`); (app, model name)."""

    def say(stage: str, done: int = 0, total: int = 0) -> None:
        if progress is not None:
            progress(stage, done, total)

    say("loading the model")
    engine, tok, model_id, name = make_engine(args, say)
    say("opening the sessions")
    cap, limit = kv_memory(args, engine)
    max_budget = args.max_budget or default_max_budget(engine, cap)
    if defaults.budget > max_budget:
        raise InfinichatError(f"--budget {defaults.budget} is over --max-budget {max_budget}")
    manager = SessionManager(
        engine,
        tok,
        model_id,
        data_dir or args.data_dir,
        defaults,
        kv_cap_bytes=cap,
        max_budget=max_budget,
        kv_limit_bytes=limit,
        db_url=db_url or getattr(args, "db", None),
        kv_dir=kv_dir or getattr(args, "kv_dir", None),
        shared=shared,
    )
    hosts = args.allowed_hosts.split(",") if args.allowed_hosts else default_allowed_hosts(args.host)
    model_path = args.model or default_model_path()
    origins = [o for o in (args.cors_origins or "").split(",") if o.strip()]
    app = create_app(
        manager,
        engine,
        tok,
        name,
        args.backend,
        args.api_key,
        args.max_queue,
        allowed_hosts=hosts,
        cors_origins=origins,
        max_batch=args.max_batch,
        prefill_chunk=args.prefill_chunk or None,
        label=model_label(model_path, name),
        model_path=model_path,
        prefill_group=args.prefill_group,
    )
    return app, name


def serve_cluster(args: argparse.Namespace) -> int:
    """`infinichat serve --replicas N`: the Ray Serve application (server/cluster.py) on --host:--port."""
    defaults = check_serve_options(args)
    if not 1 <= args.replicas <= 256:
        raise InfinichatError(f"--replicas must be in [1, 256], got {args.replicas}")
    if not 0 <= args.port <= 65535:
        raise InfinichatError(f"--port must be in [0, 65535], got {args.port}")
    try:
        from infinichat.server import cluster
    except ImportError as e:
        raise InfinichatError(
            f"--replicas needs Ray Serve ({e.name} is missing): pip install 'infinichat[cluster]'"
        ) from None
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        log.warning("serving on %s without --api-key: anyone who can reach it can use it", args.host)
    # the driver holds the data directory (the replicas on this machine write under it)
    with lock_data_dir(args.data_dir or default_data_dir(), f"serve --replicas on http://{args.host}:{args.port}"):
        return cluster.serve_cluster(args, defaults.to_json())
