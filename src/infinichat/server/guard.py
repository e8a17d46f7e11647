"""The server's edge, one ASGI middleware in front of every route: what a request may be before a handler sees it.

- **Host allow-list**: a request whose `Host` header names another host is refused (400), so a web page that
  rebinds its own DNS name to 127.0.0.1 cannot read or drive the server (`--allowed-hosts`).
- **Cross-site requests**: a changing request (POST, PUT, PATCH, DELETE), to any path (`/api`, `/v1` and the
  llama-server endpoints `/completion`, `/tokenize`, `/slots/N`, ... alike), that carries an
  `Origin` other than the server's own (or one of `--cors-origins`) is refused (403), and a body must be sent
  as `Content-Type: application/json` (415 otherwise): the "simple" requests a browser sends to any site
  without asking (form posts, `text/plain`) never reach a handler.
- **Body size**: at most `max_body` bytes, counted as they arrive (a chunked body too), else 413.
- **Valid text**: a JSON body whose strings hold a lone surrogate (`"\\ud800"`, which no UTF-8 text can
  hold) is refused (400) naming the field, before any handler can half-apply it.
- **Metrics**: every response is counted by method, route and status.

The body, once read, is replayed to the application; after it, `receive` is the server's again, so a handler
still learns when its client disconnects.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any
from urllib.parse import urlsplit

from infinichat.server.errors import error_body
from infinichat.server.metrics import Metrics
from infinichat.session.limits import bad_code_point

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
MAX_JSON_DEPTH = 64
CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def host_name(host: str) -> str:
    """The name of a `Host` header value or an origin's netloc, without the port, lower case ('[::1]:80' -> '::1')."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def default_allowed_hosts(bind: str | None = None) -> list[str]:
    """Loopback names, plus the address the server binds when it is one specific address."""
    hosts = list(LOOPBACK_HOSTS)
    if bind and bind not in ("0.0.0.0", "::", "") and host_name(bind) not in hosts:
        hosts.append(host_name(bind))
    return hosts


def bad_string(data: object) -> tuple[str, int] | None:
    """(JSON path, index) of the first string (key or value) in parsed JSON holding an invalid character."""
    stack: list[tuple[str, object, int]] = [("", data, 0)]
    while stack:
        path, v, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            return path or "body", -1
        if isinstance(v, str):
            i = bad_code_point(v)
            if i is not None:
                return path or "body", i
        elif isinstance(v, dict):
            for k, x in v.items():
                key = str(k)
                i = bad_code_point(key)
                if i is not None:
                    return (f"{path}.{ascii(key)[1:-1]}" if path else ascii(key)[1:-1]), i
                stack.append((f"{path}.{key}" if path else key, x, depth + 1))
        elif isinstance(v, list):
            stack.extend((f"{path}.{j}" if path else str(j), x, depth + 1) for j, x in enumerate(v))
    return None


def _is_json(content_type: str) -> bool:
    mime = content_type.split(";", 1)[0].strip().lower()
    return mime == "application/json" or (mime.startswith("application/") and mime.endswith("+json"))


class Guard:
    def __init__(
        self,
        app: ASGIApp,
        metrics: Metrics,
        max_body: int,
        allowed_hosts: Iterable[str] | None = None,
        cors_origins: Iterable[str] = (),
    ):
        self.app = app
        self.metrics = metrics
        self.max_body = max_body
        hosts = [h.strip() for h in (allowed_hosts if allowed_hosts is not None else LOOPBACK_HOSTS) if h.strip()]
        self.any_host = "*" in hosts
        self.hosts = {host_name(h) for h in hosts}
        self.origins = {o.strip().rstrip("/").lower() for o in cors_origins if o.strip()}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = [500]

        async def counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self._serve(scope, receive, counted)
        finally:
            route = scope.get("route")
            self.metrics.request(scope["method"], getattr(route, "path", "other"), status[0])

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        method = scope["method"]
        host = headers.get("host")
        if host is not None and not self.any_host and host_name(host) not in self.hosts:
            shown = host[:100].encode("ascii", "backslashreplace").decode()
            await _refuse(
                send,
                400,
                f"host {shown!r} is not served here; accepted: {', '.join(sorted(self.hosts))} "
                "(start the server with --allowed-hosts to add names)",
                "Host",
            )
            return
        api = method in CHANGING  # every route that changes something, whatever its prefix
        if api:
            origin = headers.get("origin")
            if origin is not None and not self._origin_ok(origin, host):
                await _refuse(
                    send,
                    403,
                    f"cross-site request from origin {origin[:100]!r} refused; "
                    "allow it with --cors-origins, or call the API from its own page or a non-browser client",
                    "Origin",
                )
                return
        size = headers.get("content-length")
        if size is not None and (not size.isdigit() or int(size) > self.max_body):
            await _refuse(send, 413, f"request body of {size[:20]} bytes is over the limit of {self.max_body} bytes")
            return
        if method not in CHANGING:
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        total = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > self.max_body:
                await _refuse(send, 413, f"request body over the limit of {self.max_body} bytes")
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        if api and body:
            refusal = self._check_body(headers.get("content-type", ""), body)
            if refusal is not None:
                await _refuse(send, *refusal)
                return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _origin_ok(self, origin: str, host: str | None) -> bool:
        o = origin.strip().rstrip("/").lower()
        if "*" in self.origins or o in self.origins:
            return True
        netloc = urlsplit(o).netloc
        return host is not None and netloc == host.strip().lower()

    @staticmethod
    def _check_body(content_type: str, body: bytes) -> tuple[int, str, str | None] | None:
        if not _is_json(content_type):
            got = content_type.split(";", 1)[0].strip()[:80] or "none"
            return 415, f"send the request body as Content-Type: application/json (got {got!r})", "Content-Type"
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return None  # the route's own parser says what is wrong with it
        except RecursionError:
            return 400, f"the JSON body is nested too deeply (at most {MAX_JSON_DEPTH} levels)", None
        bad = bad_string(data)
        if bad is None:
            return None
        field, i = bad
        if i < 0:
            return 400, f"the JSON body is nested too deeply (at most {MAX_JSON_DEPTH} levels)", None
        return (
            400,
            (
                f"field {field!r} holds an invalid character at index {i} (a lone UTF-16 surrogate such as "
                "\\ud800, which is not Unicode text); send valid Unicode"
            ),
            field,
        )


async def _refuse(send: Send, status: int, message: str, param: str | None = None) -> None:
    body = json.dumps(error_body(status, message, param)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
