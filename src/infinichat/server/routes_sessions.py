"""Session API: create, list, history, delete, and the non-generating edits (each returns the history)."""

from __future__ import annotations

import base64
import binascii
from typing import Any

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict

from infinichat.server.errors import ApiError
from infinichat.server.sessionops import checked_id, get_session, history_json, require_session

router = APIRouter(prefix="/api")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class CreateBody(Strict):
    id: str | None = None
    name: str = ""
    system_prompt: str | None = None
    card: dict[str, Any] | None = None
    card_png: str | None = None
    settings: dict[str, Any] | None = None
    lorebook: dict[str, Any] | None = None
    user_avatar: str | None = None  # base64 PNG / JPEG / GIF / WebP


class TurnBody(Strict):
    turn: int


class SelectBody(Strict):
    turn: int
    index: int


class TextBody(Strict):
    text: str


def _worker(request: Request):
    return request.app.state.worker


def b64(value: str | None, param: str, what: str) -> bytes | None:
    if value is None:
        return None
    if value.startswith("data:") and "," in value:  # a data: URL as the page's FileReader gives it
        value = value.split(",", 1)[1]
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{param} must be a base64-encoded {what}", param=param) from None


def card_of(card: dict | None, card_png: str | None):
    if card is not None and card_png is not None:
        raise ApiError(400, "give either card (JSON) or card_png (base64 PNG), not both", param="card")
    return card if card_png is None else b64(card_png, "card_png", "PNG file")


@router.post("/sessions", status_code=201)
async def create(body: CreateBody, request: Request):
    sid = checked_id(body.id) if body.id is not None else None
    card = card_of(body.card, body.card_png)
    avatar = b64(body.user_avatar, "user_avatar", "image (PNG, JPEG, GIF or WebP)")

    def run(m):
        if sid is not None and (sid in m.sessions or m.db.exists(sid)):
            raise ApiError(409, f"a session named {sid!r} already exists", param="id", type="busy")
        s = m.create(sid, body.name, body.system_prompt, card, body.settings, body.lorebook, avatar)
        return history_json(m, s)

    return await _worker(request).acall(run, session=sid)


@router.get("/sessions")
async def list_sessions(request: Request):
    return {"sessions": await _worker(request).acall(lambda m: m.list(), mutates=False)}


@router.get("/sessions/{sid}")
async def history(sid: str, request: Request):
    return await _worker(request).acall(lambda m: history_json(m, get_session(m, sid)), session=sid, mutates=False)


@router.get("/sessions/{sid}/kv")
async def kv(sid: str, request: Request):
    return await _worker(request).acall(lambda m: get_session(m, sid).kv_map(), session=sid, mutates=False)


@router.delete("/sessions/{sid}", status_code=204)
async def delete(sid: str, request: Request):
    await _worker(request).acall(lambda m: m.delete(require_session(m, sid)), session=checked_id(sid))
    return Response(status_code=204)


async def edit_session(request: Request, sid: str, action):
    def run(m):
        s = get_session(m, sid)
        with m.atomic(s):  # a failed edit leaves the session as it was
            action(s)
        return history_json(m, s)

    return await _worker(request).acall(run, session=checked_id(sid))


@router.post("/sessions/{sid}/revert")
async def revert(sid: str, body: TurnBody, request: Request):
    return await edit_session(request, sid, lambda s: s.revert_to(body.turn))


@router.post("/sessions/{sid}/select")
async def select(sid: str, body: SelectBody, request: Request):
    return await edit_session(request, sid, lambda s: s.select(body.turn, body.index))


@router.post("/sessions/{sid}/rag")
async def rag(sid: str, body: TextBody, request: Request):
    return await edit_session(request, sid, lambda s: s.inject_rag(body.text))


@router.patch("/sessions/{sid}/messages/{turn}")
async def edit(sid: str, turn: int, body: TextBody, request: Request):
    return await edit_session(request, sid, lambda s: s.edit(turn, body.text))


@router.delete("/sessions/{sid}/messages/{turn}")
async def delete_message(sid: str, turn: int, request: Request):
    return await edit_session(request, sid, lambda s: s.delete(turn))


@router.post("/sessions/{sid}/reset")
async def reset(sid: str, request: Request):
    return await edit_session(request, sid, lambda s: s.reset())


@router.patch("/sessions/{sid}/settings")
async def settings(sid: str, body: dict[str, Any], request: Request):
    return await edit_session(request, sid, lambda s: s.update_settings(body))
