"""Session API, generating actions (SSE): send, retry, continue, narrate, suggest; and stop."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict

from infinichat.server.sessionops import (
    checked_id,
    get_session,
    require_session,
    sampling,
    session_events,
    suggestion,
)
from infinichat.server.streaming import open_stream, sse, sse_response

router = APIRouter(prefix="/api")


class SendBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    text: str
    params: dict[str, Any] | None = None


class ActionBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    params: dict[str, Any] | None = None


async def _stream(request: Request, sid: str, action: str, params: dict | None, text: str | None = None):
    checked_id(sid)
    metrics = request.app.state.metrics

    def run(m, job):
        s = get_session(m, sid)
        p = sampling(s, params)
        m.check_room(s)
        if action == "send":
            gen = s.send(text, p, job.should_stop)
        elif action == "suggest":
            gen = suggestion(m, s, p, job.should_stop)
        else:
            gen = getattr(s, {"continue": "continue_"}.get(action, action))(p, job.should_stop)
        return m.guarded(s, session_events(s, gen, metrics))  # a failure before the first token changes nothing

    _, items = await open_stream(request.app.state.worker, run, session=sid, request=request)
    return sse_response(items, lambda item: sse(item[0], item[1]))


@router.post("/sessions/{sid}/messages")
async def send(sid: str, body: SendBody, request: Request):
    return await _stream(request, sid, "send", body.params, body.text)


def _action(name: str):
    async def handler(sid: str, request: Request, body: ActionBody | None = None):
        return await _stream(request, sid, name, body.params if body is not None else None)

    handler.__name__ = f"action_{name}"
    return handler


for _name in ("retry", "continue", "narrate", "suggest"):
    router.add_api_route(f"/sessions/{{sid}}/{_name}", _action(_name), methods=["POST"])


@router.post("/sessions/{sid}/stop")
async def stop(sid: str, request: Request):
    worker = request.app.state.worker
    checked_id(sid)
    if worker.stop_session(sid):
        return {"stopped": True}
    await worker.acall(lambda m: require_session(m, sid), mutates=False)  # 404 for an unknown session
    return {"stopped": False}
