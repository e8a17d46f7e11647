"""Hand a worker stream job's items to an async handler, and Server-Sent Events framing."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncGenerator, Callable, Iterator
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from infinichat.server.errors import ApiError, error_body, to_api_error
from infinichat.server.worker import END, EngineWorker, Job

DISCONNECT_POLL_S = 0.1  # how often a request waiting for its first item checks that its client is still there


async def open_stream(
    worker: EngineWorker, fn: Callable[[Any, Job], Iterator], session: str | None = None, request: Request | None = None
) -> tuple[Job, AsyncGenerator]:
    """Submit `fn` as a stream job and wait for its first item, so that an error before any output (bad
    parameters, a prompt over the budget) still becomes a plain JSON error with its 4xx status. With `request`, a
    client that goes away meanwhile (during a long prompt) cancels the job there and then (a 499 nobody reads):
    nothing watched it before the first item, so the whole prompt ran, and a session kept the message and a
    one-token reply its client never saw."""
    loop = asyncio.get_running_loop()
    q: asyncio.Queue = asyncio.Queue()
    job = worker.stream(fn, lambda item: loop.call_soon_threadsafe(q.put_nowait, item), session)
    try:
        first = await _first(q, request)
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


async def _first(q: asyncio.Queue, request: Request | None) -> Any:
    """The queue's first item; ApiError 499 if `request`'s client disconnects before it comes. (One get, waited
    on in steps: a get cancelled by a timeout could lose the item it was handed.)"""
    if request is None:
        return await q.get()
    getter = asyncio.ensure_future(q.get())
    try:
        while True:
            done, _ = await asyncio.wait({getter}, timeout=DISCONNECT_POLL_S)
            if done:
                return getter.result()
            if await request.is_disconnected():
                raise ApiError(499, "the client closed the request")
    finally:
        if not getter.done():
            getter.cancel()


async def collect(request: Request, items: AsyncGenerator) -> list | None:
    """Every item of a stream, for a non-streaming response; None if the client disconnected first: the
    generation is then cancelled, as a streamed one is."""

    async def gather() -> list:
        return [i async for i in items]

    async def gone() -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(0.1)

    task, watch = asyncio.ensure_future(gather()), asyncio.ensure_future(gone())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if not task.done():  # the client left: closing the iterator abandons the worker's job
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await items.aclose()
        return None
    return task.result()


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
            yield sse(error_event, error_body(a.status, a.message, a.param, a.type, a.code))
        finally:
            await items.aclose()

    return StreamingResponse(
        body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )
