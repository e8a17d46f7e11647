"""Hand a worker stream job's items to an async handler, and Server-Sent Events framing."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, Callable, Iterator
from typing import Any

from fastapi.responses import StreamingResponse

from infinichat.server.errors import error_body, to_api_error
from infinichat.server.worker import END, EngineWorker, Job


async def open_stream(
    worker: EngineWorker, fn: Callable[[Any, Job], Iterator], session: str | None = None
) -> tuple[Job, AsyncGenerator]:
    """Submit `fn` as a stream job and wait for its first item, so that an error before any output (bad
    parameters, a prompt over the budget) still becomes a plain JSON error with its 4xx status."""
    loop = asyncio.get_running_loop()
    q: asyncio.Queue = asyncio.Queue()
    job = worker.stream(fn, lambda item: loop.call_soon_threadsafe(q.put_nowait, item), session)
    try:
        first = await q.get()
    except BaseException:
        worker.abandon(job)
        raise
    if isinstance(first, BaseException):
        raise first

    async def items():
        finished = first is END
        try:
            if finished:
                return
            yield first
            while True:
                item = await q.get()
                if item is END:
                    finished = True
                    return
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                yield item
        finally:
            if not finished:  # the client went away (or stopped reading): cancel the generation
                worker.abandon(job)

    return job, items()


def sse(event: str | None, data: Any) -> str:
    head = f"event: {event}\n" if event else ""
    body = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"{head}data: {body}\n\n"


def sse_response(
    items: AsyncGenerator, frame: Callable[[Any], str], error_event: str | None = "error", tail: str = ""
) -> StreamingResponse:
    """Stream `items` as SSE frames; an error mid-stream becomes one error frame, then the stream ends."""

    async def body():
        try:
            async for item in items:
                yield frame(item)
            if tail:
                yield tail
        except Exception as e:
            a = to_api_error(e)
            yield sse(error_event, error_body(a.status, a.message, a.param, a.type))
        finally:
            await items.aclose()

    return StreamingResponse(
        body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )
