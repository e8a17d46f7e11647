"""`infinichat serve --replicas N`: the same HTTP surface, served by a Ray Serve application.

Two deployments:
- `EngineReplica` (N replicas): each one engine, one worker and its sessions: the app of the single-process
  server (create_app), called in-process with each request the ingress hands it (asgi_call.py). Every
  replica writes to the shared store (`--db`, default the SQLite file of the data directory, which only
  replicas on one machine can share) and the shared KV directory (`--kv-dir`).
- `Ingress` (1 replica, no CPU): the HTTP entry. It derives each request's routing key (its session; the
  prompt prefixes of an OpenAI request without a session) and calls the engine deployment, whose request
  router (cluster_router.py) pins the session to its replica. The reply streams back as it is produced,
  with the header `X-Infinichat-Replica`. `/metrics` and `/health` gather every replica; `/cluster` lists
  them.

Failover: a call that fails before the replica accepted it (the replica is dead) is retried on another
replica; the session is opened there from the store (the KV snapshot when fresh, else the transcript is
re-evaluated). A replica that dies in the middle of a request answers 503 for that request (the store
keeps every completed turn; the interrupted reply is absent, as after a crash of the single server).
"""

# no `from __future__ import annotations`: Ray Serve's class-based FastAPI ingress resolves the handlers'
# annotations (Request) where the string form cannot be evaluated

import argparse
import asyncio
import hashlib
import json
import logging
import os
import re
import secrets
import signal
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast
from urllib.parse import unquote

import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.serve.config import RequestRouterConfig
from ray.serve.handle import DeploymentHandle

from infinichat.errors import InfinichatError
from infinichat.server import cluster_table  # by attribute: Ray pickles the ingress class by value
from infinichat.server.asgi_call import call_asgi

log = logging.getLogger(__name__)

APP_NAME = "infinichat"
REPLICA_HEADER = "x-infinichat-replica"
ROUTER = "infinichat.server.cluster_router.SessionRouter"
RETRY_FOR_S = 60.0  # how long a request waits for a live replica (after a death Ray starts a new one)
INFO_TIMEOUT_S = 10.0  # /metrics, /health, /cluster: a replica that does not answer in time is left out
# The router asks a replica for its queue length before each call (0.1 s to 1 s by default); a replica busy
# generating (the engine holds the GIL between tokens) can miss that and be skipped: a pinned session's only
# choice would then back off again and again. Wait longer.
RAY_ENV = {"RAY_SERVE_QUEUE_LENGTH_RESPONSE_DEADLINE_S": "1.0", "RAY_SERVE_MAX_QUEUE_LENGTH_RESPONSE_DEADLINE_S": "5.0"}
PREFIX_CHARS = 256  # /v1/completions: the prompt's prefixes are hashed every this many characters
SESSION_PATH = re.compile(r"^/api/sessions/([^/]+)")
DEAD = (RayActorError, ActorDiedError, ActorUnavailableError)


def error(status: int, message: str, kind: str = "unavailable") -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": None, "code": None}}
    return JSONResponse(body, status_code=status, headers={"Retry-After": "5"} if status == 503 else None)


def _hash(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, ensure_ascii=True).encode()).hexdigest()[:16]


def routing_key(method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[dict[str, Any], bytes]:
    """The router's key of a request (`session`, or `prefixes` of an OpenAI prompt), and the body to send: a new
    session without an id is given one here, so that the router can pin it before the replica creates it."""
    m = SESSION_PATH.match(path)
    if m:
        return {"session": unquote(m.group(1))}, body
    if method == "POST" and path.rstrip("/") == "/api/sessions":
        try:
            data = json.loads(body or b"{}")
        except ValueError:
            return {}, body  # the replica answers 400
        if isinstance(data, dict):
            if data.get("id") is None:
                data["id"] = secrets.token_hex(6)
                body = json.dumps(data).encode()
            if isinstance(data["id"], str):
                return {"session": data["id"]}, body
        return {}, body
    sid = headers.get("x-session-id")
    if path.startswith("/v1/") and sid:
        return {"session": sid}, body
    if method == "POST" and path in ("/v1/chat/completions", "/v1/completions"):
        try:
            data = json.loads(body)
        except ValueError:
            return {}, body
        if not isinstance(data, dict):
            return {}, body
        msgs, prompt = data.get("messages"), data.get("prompt")
        if isinstance(msgs, list) and msgs:
            return {"prefixes": [_hash(msgs[:k]) for k in range(1, len(msgs) + 1)]}, body
        if isinstance(prompt, str) and prompt:
            cuts = [*range(PREFIX_CHARS, len(prompt), PREFIX_CHARS), len(prompt)]
            return {"prefixes": [_hash(prompt[:n]) for n in cuts]}, body
    return {}, body


# ---------------------------------------------------------------------------------------------- engine replicas
@serve.deployment(
    request_router_config=RequestRouterConfig(request_router_class=ROUTER),  # type: ignore[arg-type]
    health_check_period_s=2,
    health_check_timeout_s=30,
)
class EngineReplica:
    def __init__(self, opts: dict[str, Any]):
        import torch

        from infinichat.server.app import build_app
        from infinichat.session.settings import SessionSettings

        self.rid = serve.get_replica_context().replica_id.unique_id
        args = argparse.Namespace(**opts)
        torch.set_num_threads(max(1, args.threads or 1))
        defaults = SessionSettings.from_json(opts["defaults"]).validate()
        data = Path(opts["replica_dir"]) / self.rid
        self.app, self.name = build_app(
            args, defaults, data_dir=data, db_url=opts["db_url"], kv_dir=opts["kv_dir"], shared=True
        )
        self.app.state.worker.start()
        log.info("replica %s (pid %d) serves %s", self.rid, os.getpid(), self.name)

    async def http(
        self, route: dict, method: str, path: str, query: bytes, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> AsyncIterator[dict | bytes]:
        yield {"accepted": self.rid}  # from here on the request has reached this replica
        async for part in call_asgi(self.app, method, path, query, headers, body):
            if isinstance(part, dict):
                part["headers"].append((REPLICA_HEADER, self.rid))
            yield part

    async def info(self, route: dict) -> AsyncIterator[dict[str, Any]]:
        """This replica's state, as a stream of one item (every call of the ingress goes through one handle)."""
        st = self.app.state
        m = st.manager
        yield {
            "replica": self.rid,
            "pid": os.getpid(),
            "sessions": sorted(sid for sid, s in m.sessions.items() if s.seq is not None),
            "queue_depth": st.worker.depth,
            "storage": m.db.fault,
            "metrics": st.metrics.render(st.worker.depth),
        }

    def __del__(self) -> None:
        worker = getattr(getattr(getattr(self, "app", None), "state", None), "worker", None)
        if worker is not None:
            worker.close()


# ---------------------------------------------------------------------------------------------- ingress
async def _result(response: Any) -> Any:
    """The one item of a streamed call."""
    async for item in response:
        return item
    raise RuntimeError("the replica answered nothing")


def _headers(pairs: list[tuple[str, str]]) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in pairs:
        if k.lower() not in ("content-length", "transfer-encoding"):
            out[k] = v
    return out


def merge_metrics(infos: list[dict[str, Any]]) -> str:
    """Each replica's metrics with a `replica` label, preceded by the cluster-wide sums (the same names)."""
    order: list[str] = []
    meta: dict[str, list[str]] = {}
    series: dict[str, dict[str, list[tuple[str, float, str]]]] = {}  # family -> labels -> [(replica, v, text)]
    for info in infos:
        rid = info["replica"]
        for line in info["metrics"].splitlines():
            if line.startswith("#"):
                name = line.split()[2]
                if name not in meta:
                    meta[name] = []
                    order.append(name)
                if line not in meta[name]:
                    meta[name].append(line)
                continue
            if not line.strip():
                continue
            key, value = line.rsplit(" ", 1)
            name, _, labels = key.partition("{")
            series.setdefault(name, {}).setdefault(labels.rstrip("}"), []).append((rid, float(value), value))
    pinned = cluster_table.TABLE.pinned_per_replica()
    lines = [
        "# HELP infinichat_replicas engine replicas answering",
        "# TYPE infinichat_replicas gauge",
        f"infinichat_replicas {len(infos)}",
        "# HELP infinichat_pinned_sessions sessions the router pins to each replica",
        "# TYPE infinichat_pinned_sessions gauge",
    ]
    lines += [f'infinichat_pinned_sessions{{replica="{i["replica"]}"}} {pinned.get(i["replica"], 0)}' for i in infos]
    for name in order:
        lines += meta[name]
        for labels, values in series.get(name, {}).items():
            total = sum(v for _, v, _ in values)
            lines.append(f"{name}{{{labels}}} {total:g}" if labels else f"{name} {total:g}")
            for rid, _, text in values:
                sep = "," if labels else ""
                lines.append(f'{name}{{{labels}{sep}replica="{rid}"}} {text}')
    return "\n".join(lines) + "\n"


ingress_app = FastAPI(title="infinichat cluster", docs_url=None, redoc_url=None)


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
@serve.ingress(ingress_app)
class Ingress:
    def __init__(self, engine: DeploymentHandle, api_key: str | None = None):
        self.stream = engine.options(stream=True)
        self.api_key = api_key
        self.warm = False

    async def _replicas(self) -> list[dict[str, Any]]:
        """Every live replica's info (one call routed to each)."""
        table = cluster_table.TABLE
        if not self.warm or not table.replicas:  # a handle's router learns the replicas with its first call
            await asyncio.wait_for(_result(self.stream.info.remote({})), INFO_TIMEOUT_S)
            self.warm = True
        live = sorted(table.replicas - set(table.dead))
        out: dict[str, dict] = {}
        for rid in live:  # one at a time: calls made inside one HTTP request share Ray's request id, and the
            # router matches its choices to pending calls by that id, so concurrent ones could swap replicas
            try:
                got = await asyncio.wait_for(_result(self.stream.info.remote({"replica": rid})), INFO_TIMEOUT_S)
            except Exception as e:  # left out of the answer; the others still count
                log.warning("replica %s did not answer: %s", rid, repr(e))
                continue
            out[got["replica"]] = got
        return [out[k] for k in sorted(out)]

    @ingress_app.get("/cluster")
    async def cluster(self, request: Request) -> Response:
        """The replicas, their pids and sessions (session ids: behind the API key, like /api)."""
        got = request.headers.get("authorization", "")
        if self.api_key and not secrets.compare_digest(got.encode(), f"Bearer {self.api_key}".encode()):
            return error(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'", "auth")
        infos = await self._replicas()
        pinned = cluster_table.TABLE.pinned_per_replica()
        return JSONResponse(
            {
                "replicas": [
                    {k: i[k] for k in ("replica", "pid", "sessions", "queue_depth", "storage")}
                    | {"pinned": pinned.get(i["replica"], 0)}
                    for i in infos
                ],
                "repins": cluster_table.TABLE.repins,
                "ingress_pid": os.getpid(),
            }
        )

    @ingress_app.get("/health")
    async def health(self) -> Response:
        infos = await self._replicas()
        faults = [i["storage"] for i in infos if i["storage"]]
        body = {
            "status": "ok" if infos and not faults else "degraded",
            "replicas": len(infos),
            "queue_depth": sum(i["queue_depth"] for i in infos),
        }
        if not infos or faults:
            return JSONResponse({**body, "storage": faults[0] if faults else None}, status_code=503)
        return JSONResponse(body)

    @ingress_app.get("/metrics")
    async def metrics(self) -> PlainTextResponse:
        infos = await self._replicas()
        return PlainTextResponse(merge_metrics(infos), media_type="text/plain; version=0.0.4")

    @ingress_app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"])
    async def forward(self, request: Request, path: str) -> Response:
        body = await request.body()
        route, body = routing_key(request.method, request.url.path, dict(request.headers), body)
        headers = [(k.lower(), v) for k, v in request.headers.raw]
        deadline = time.monotonic() + RETRY_FOR_S
        while True:
            route["nonce"] = secrets.token_hex(8)
            gen: Any = self.stream.http.remote(
                route, request.method, request.url.path, request.url.query.encode(), headers, body
            )
            accepted = False
            try:
                first = await gen.__anext__()
                accepted = True
                head = await gen.__anext__()
                break
            except DEAD as e:
                rid = cluster_table.TABLE.routed.pop(route["nonce"], None)
                if rid is not None:
                    cluster_table.TABLE.mark_dead(rid)
                if accepted and request.method not in ("GET", "HEAD"):
                    log.warning("replica %s died during %s %s: %s", rid, request.method, request.url.path, e)
                    return error(
                        503,
                        "the replica serving this request went away before it finished; the session keeps every "
                        "completed turn and continues on another replica: retry",
                    )
                if time.monotonic() > deadline:
                    return error(503, "no engine replica is available; retry later")
                await asyncio.sleep(0.2)
            except StopAsyncIteration:
                return error(502, "the engine replica closed the request without an answer", "server_error")
        assert isinstance(first, dict) and isinstance(head, dict)
        sid = route.get("session")
        if request.method == "DELETE" and head["status"] == 204 and sid and request.url.path.count("/") == 3:
            cluster_table.TABLE.pins.pop(sid, None)  # a deleted session holds no replica

        async def rest() -> AsyncIterator[bytes]:
            try:
                async for part in gen:
                    yield part
            except DEAD:
                log.warning("replica %s died while streaming %s", first.get("accepted"), request.url.path)

        return StreamingResponse(rest(), status_code=head["status"], headers=_headers(head["headers"]))


# ---------------------------------------------------------------------------------------------- serve
def replica_options(args: argparse.Namespace, defaults: dict[str, Any]) -> dict[str, Any]:
    """What every replica needs to build its engine and store, as plain data."""
    data_dir = Path(args.data_dir) if args.data_dir else None
    if data_dir is None:
        from infinichat.session.manager import default_data_dir

        data_dir = default_data_dir()
    opts: dict[str, Any] = {k: v for k, v in vars(args).items() if isinstance(v, str | int | float | bool | type(None))}
    opts.update(
        defaults=defaults,
        replica_dir=str(data_dir.resolve() / "replicas"),
        db_url=args.db or f"sqlite://{data_dir.resolve() / 'sessions.sqlite3'}",
        kv_dir=str(Path(args.kv_dir).resolve()) if args.kv_dir else str(data_dir.resolve() / "kv"),
    )
    return opts


def build(args: argparse.Namespace, defaults: dict[str, Any]):
    """The Ray Serve application of `serve --replicas N`."""
    threads = max(1, args.threads or 1)
    engine = (
        cast(Any, EngineReplica)
        .options(
            num_replicas=args.replicas,
            ray_actor_options={"num_cpus": threads},
            max_ongoing_requests=max(8, args.max_queue),
        )
        .bind(replica_options(args, defaults))
    )
    return cast(Any, Ingress).bind(engine, args.api_key)


def start(args: argparse.Namespace, defaults: dict[str, Any]) -> None:
    """Connect to (or start) the Ray cluster and deploy the application on --host:--port."""
    connect(args)
    deploy(args, defaults)


def connect(args: argparse.Namespace) -> None:
    """Join (--ray-address) or start the Ray cluster, and Serve's HTTP proxy on --host:--port."""
    if args.replicas < 1:
        raise InfinichatError(f"--replicas must be at least 1, got {args.replicas}")
    threads = max(1, args.threads or 1)
    env = {"env_vars": RAY_ENV}
    if args.ray_address:
        ray.init(address=args.ray_address, runtime_env=env, logging_level=logging.WARNING)
    else:  # a local cluster of this machine, just big enough for the replicas
        cpus = max(os.cpu_count() or 1, args.replicas * threads)
        ray.init(num_cpus=cpus, runtime_env=env, logging_level=logging.WARNING, include_dashboard=False)
    serve.start(http_options={"host": args.host, "port": args.port})


def deploy(args: argparse.Namespace, defaults: dict[str, Any]) -> None:
    """The application: the replicas load their models; returns when it serves."""
    serve.run(build(args, defaults), name=APP_NAME, route_prefix="/")


def serve_cluster(args: argparse.Namespace, defaults: dict[str, Any]) -> int:
    connect(args)
    stop = threading.Event()  # SIGINT / SIGTERM (after ray.init, which installs its own), even while starting
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    deploy(args, defaults)
    # the line a person starting the server reads, on stdout even when it is not a terminal (logging may be off)
    print(  # noqa: T201
        f"infinichat: serving on http://{args.host}:{args.port} with {args.replicas} engine replicas "
        f"(Ray Serve; web page /, API /api and /v1, replicas /cluster)",
        flush=True,
    )
    stop.wait()
    serve.delete(APP_NAME)
    if not args.ray_address:
        serve.shutdown()
        ray.shutdown()
    return 0
