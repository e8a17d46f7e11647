"""One HTTP request through an ASGI app in this process, its response as a stream of parts.

A cluster replica runs the very app of the single-process server (create_app): the ingress hands it the request
as plain data (method, path, query, headers, body) and relays what comes back: first `{"status", "headers"}`,
then the body's chunks as they are sent (a streamed reply stays streamed). Closing the iterator early (the
client went away) tells the app the client disconnected, as uvicorn would.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

END = None


async def call_asgi(
    app: Any,
    method: str,
    path: str,
    query: bytes,
    headers: list[tuple[bytes, bytes]],
    body: bytes,
    client: tuple[str, int] = ("127.0.0.1", 0),
) -> AsyncIterator[dict | bytes]:
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": query,
        "headers": headers,
        "client": client,
        "server": ("127.0.0.1", 80),
        "state": {},
    }
    parts: asyncio.Queue[dict | bytes | BaseException | None] = asyncio.Queue()
    gone = asyncio.Event()
    sent_body = False

    async def receive() -> dict:
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()  # a streaming response listens for the disconnect while it sends
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            hs = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in message.get("headers", [])]
            await parts.put({"status": message["status"], "headers": hs})
        elif message["type"] == "http.response.body":
            chunk = message.get("body", b"")
            if chunk:
                await parts.put(bytes(chunk))
            if not message.get("more_body", False):
                await parts.put(END)

    async def run() -> None:
        try:
            await app(scope, receive, send)
        except BaseException as e:  # handed to the reader (the app's own error handling ran already)
            await parts.put(e)
        finally:
            await parts.put(END)

    task = asyncio.ensure_future(run())
    try:
        while True:
            item = await parts.get()
            if item is END:
                break
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        gone.set()
        with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError, Exception):
            await asyncio.wait_for(task, 30)
