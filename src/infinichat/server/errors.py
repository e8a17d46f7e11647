"""JSON errors: `{"error": {"message", "type", "param", "code"}}` (OpenAI's shape) with the right 4xx, for every
failure path, unknown paths included."""

from __future__ import annotations

import logging

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from infinichat.errors import DamagedSessionError, InfinichatError, OverloadedError, StorageError
from infinichat.server.worker import Busy, Cancelled, QueueFull

log = logging.getLogger(__name__)

TYPES = {
    400: "invalid_request_error",
    401: "auth",
    403: "forbidden",
    404: "not_found",
    405: "invalid_request_error",
    409: "busy",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "busy",
    503: "unavailable",  # (or overloaded, storage_error, out_of_memory)
}
RETRY_AFTER = 1  # seconds, sent with 429 and 503


class ApiError(Exception):
    def __init__(
        self, status: int, message: str, param: str | None = None, type: str | None = None, code: str | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


def _text(s: str | None) -> str | None:
    """`s` as valid UTF-8 text (a lone surrogate echoed from the input becomes an escape)."""
    return None if s is None else s.encode("utf-8", "backslashreplace").decode("utf-8")


def error_body(
    status: int, message: str, param: str | None = None, type: str | None = None, code: str | None = None
) -> dict:
    kind = type or TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": _text(message), "type": kind, "param": _text(param), "code": code}}


def to_api_error(e: BaseException) -> ApiError:
    """Any exception raised while serving a request, as the ApiError the client sees."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, ValidationError):  # a handler's own model_validate of a part of the body
        msg, param = _validation_message(e)
        return ApiError(400, msg, param=param)
    if isinstance(e, Busy):
        return ApiError(409, str(e), type="busy")
    if isinstance(e, QueueFull):
        return ApiError(429, str(e), type="busy")
    if isinstance(e, Cancelled):
        return ApiError(409, str(e), type="cancelled")
    if isinstance(e, DamagedSessionError):
        return ApiError(500, str(e), type="damaged_session")
    if isinstance(e, StorageError):
        return ApiError(503, str(e), type="storage_error")
    if isinstance(e, OverloadedError):
        return ApiError(503, str(e), type="overloaded")
    if isinstance(e, torch.OutOfMemoryError):
        return ApiError(
            503,
            "the GPU ran out of memory during this request; nothing was changed (a session is as it was before): "
            "retry later or with a shorter prompt; the server's --kv-cap-mb / --kv-limit-mb / --prefill-chunk bound "
            "the memory requests take",
            type="out_of_memory",
        )
    if isinstance(e, InfinichatError):
        return ApiError(400, str(e))
    log.error("internal error", exc_info=e)
    return ApiError(500, f"internal error ({type(e).__name__}); the server log has the details", type="server_error")


def retry_headers(status: int) -> dict[str, str] | None:
    return {"Retry-After": str(RETRY_AFTER)} if status in (429, 503) else None


def error_response(e: BaseException) -> JSONResponse:
    a = to_api_error(e)
    return JSONResponse(
        error_body(a.status, a.message, a.param, a.type, a.code), status_code=a.status, headers=retry_headers(a.status)
    )


def _validation_message(exc: RequestValidationError | ValidationError) -> tuple[str, str | None]:
    errs = exc.errors()
    if not errs:
        return "invalid request", None
    e = errs[0]
    loc = [str(p) for p in e.get("loc", ()) if p != "body"]
    if e.get("type") == "json_invalid":
        ctx = e.get("ctx", {}).get("error", "")
        return f"malformed JSON body: {ctx or e.get('msg')}; send a JSON object", None
    field = ".".join(loc) or None
    if e.get("type") == "missing":
        return f"missing required field {field!r}", field
    if e.get("type") == "extra_forbidden":
        return f"unknown field {field!r}", field
    got = repr(e.get("input"))[:80]
    where = f"field {field!r}" if field else "the request body"
    return f"{where}: {e.get('msg')} (got {got})", field


def _methods_at(router, path: str) -> set[str]:
    """The methods of the API routes whose path pattern matches `path` (empty: no API route there)."""
    out: set[str] = set()
    for r in router.routes:
        inner = getattr(r, "original_router", None)  # an included router (its routes carry their full paths)
        if inner is not None:
            out |= _methods_at(inner, path)
            continue
        rx, methods = getattr(r, "path_regex", None), getattr(r, "methods", None)
        if rx is not None and methods and rx.match(path):
            out |= set(methods) - {"HEAD"}
    return out


def install(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        msg, param = _validation_message(exc)
        return JSONResponse(error_body(400, msg, param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        msg = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        status = exc.status_code
        if status in (404, 405) and msg in ("Not Found", "Method Not Allowed"):
            # the web page's mount at "/" answers every path no API route took, so tell them apart here
            methods = _methods_at(request.scope.get("router") or request.app, request.url.path)
            if methods:
                status, msg = 405, f"method {request.method} is not allowed on {request.url.path}; accepted: "
                msg += ", ".join(sorted(methods))
            else:
                status, msg = 404, f"no such endpoint: {request.method} {request.url.path}"
        if status == 400 and msg == "There was an error parsing the body":
            msg = "the request body could not be parsed: send a JSON object encoded as UTF-8"
        return JSONResponse(error_body(status, msg, code="unknown_url" if status == 404 else None), status_code=status)

    async def _as_json(request: Request, exc: Exception):
        return error_response(exc)  # maps each exception type to its status and message

    # each type named here is answered by the app's own handler and the connection stays open (a handler's own
    # pydantic ValidationError: a part of the body it validates itself); any other exception is answered by
    # LastResort below, before Starlette's own last handler would answer it and re-raise it to the server, which
    # drops the connection (a keep-alive client's next request would fail)
    for kind in (ApiError, InfinichatError, Busy, QueueFull, ValidationError, Exception):
        app.add_exception_handler(kind, _as_json)
    app.add_middleware(LastResort)  # the innermost middleware: the Guard around it counts the 500


class LastResort:
    """An exception no handler took, raised before the response started: the JSON 500 (error_response, which logs
    the traceback), and the exception ends here, so the server keeps the connection. One raised after the
    response started (a stream cut halfway) goes on to the server: the client sees its stream end."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_seen(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_seen)
        except Exception as e:
            if started:
                raise
            await error_response(e)(scope, receive, send)
