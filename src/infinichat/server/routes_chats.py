"""Session API, the role-play extras: rename and system prompt, lorebook, avatars, the stored per-token data
of a reply, export / import, and a card's token count before creating a chat. Each change is all or nothing."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import PlainTextResponse

from infinichat.server.errors import ApiError
from infinichat.server.markdown import code_css
from infinichat.server.routes_sessions import Strict, b64, card_of, edit_session
from infinichat.server.sessionops import checked_id, get_session, history_json, require_session, steps_json
from infinichat.session.limits import check_image, image_type
from infinichat.session.lore import load_lorebook
from infinichat.session.transfer import export_json, export_jsonl

router = APIRouter(prefix="/api")
public = APIRouter(prefix="/api")  # no API key: what a <link> of the page loads


class PatchBody(Strict):
    name: str | None = None
    system_prompt: str | None = None


class LoreBody(Strict):
    lorebook: dict[str, Any] | None


class AvatarBody(Strict):
    image: str | None  # base64 (or a data: URL); null removes it


class ImportBody(Strict):
    data: str | dict[str, Any] | list[Any]
    id: str | None = None
    name: str = ""


class InspectBody(Strict):
    card: dict[str, Any] | None = None
    card_png: str | None = None
    system_prompt: str | None = None
    user_name: str | None = None


def _worker(request: Request):
    return request.app.state.worker


@router.patch("/sessions/{sid}")
async def patch_session(sid: str, body: PatchBody, request: Request):
    """Rename a chat and/or replace its system prompt (the cache is cut at its first changed token)."""
    given = body.model_fields_set
    if not given:
        raise ApiError(400, "nothing to change; accepted fields: name, system_prompt", param="body")

    def action(s):
        if "name" in given:
            if body.name is None:
                raise ApiError(400, "name must be a string", param="name")
            s.rename(body.name)
        if "system_prompt" in given:
            s.set_system_prompt(body.system_prompt)

    return await edit_session(request, sid, action)


@router.put("/sessions/{sid}/lorebook")
async def put_lorebook(sid: str, body: LoreBody, request: Request):
    """Attach a lorebook (SillyTavern world info or a character book), or detach it with null."""
    book = load_lorebook(body.lorebook) if body.lorebook is not None else None
    return await edit_session(request, sid, lambda s: s.set_lorebook(book))


@router.get("/sessions/{sid}/avatar/{who}")
async def avatar(sid: str, who: str, request: Request):
    def run(m):
        require_session(m, sid)
        path = m.db.avatar_path(sid, who)
        if not path.exists():
            raise ApiError(404, f"session {sid!r} has no {who} avatar", param="who")
        return path.read_bytes()

    data = await _worker(request).acall(run, session=checked_id(sid), mutates=False)
    kind = image_type(data) or "application/octet-stream"
    return Response(data, media_type=kind, headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"})


@router.put("/sessions/{sid}/avatar/user")
async def put_user_avatar(sid: str, body: AvatarBody, request: Request):
    data = b64(body.image, "image", "image (PNG, JPEG, GIF or WebP)")

    def run(m):
        s = get_session(m, sid)
        if data is not None:
            check_image(data, "user avatar")
        m.db.write_avatar(sid, "user", data)
        return history_json(m, s)

    return await _worker(request).acall(run, session=checked_id(sid))


@router.get("/sessions/{sid}/messages/{turn}/tokens")
async def tokens(sid: str, turn: int, request: Request, alt: int | None = None):
    """The per-token data (token, logprob, top-n) kept with a generated message, as its stream showed it."""

    def run(m):
        s = get_session(m, sid)
        n = len(s.messages)
        if not 0 <= turn < n:
            raise ApiError(400, f"turn must be in [0, {n - 1}] (this session has {n} messages), got {turn}")
        msg = s.messages[turn]
        i = msg.selected if alt is None else alt
        if not 0 <= i < len(msg.alternatives):
            raise ApiError(400, f"alt must be in [0, {len(msg.alternatives) - 1}] for turn {turn}, got {i}")
        a = msg.alternatives[i]
        return {"turn": turn, "alt": i, "text": a.text, "tokens": steps_json(s.tok, a.steps)}

    return await _worker(request).acall(run, session=checked_id(sid), mutates=False)


@router.get("/sessions/{sid}/export")
async def export(sid: str, request: Request, format: str = "json"):
    if format not in ("json", "jsonl"):
        raise ApiError(400, f"format must be json (ours, with alternatives) or jsonl (SillyTavern), got {format!r}")

    def run(m):
        s = get_session(m, sid)
        return export_json(s) if format == "json" else export_jsonl(s)

    out = await _worker(request).acall(run, session=checked_id(sid), mutates=False)
    if format == "jsonl":
        return PlainTextResponse(out, media_type="application/x-ndjson")
    return out


@router.post("/sessions/import", status_code=201)
async def import_chat(body: ImportBody, request: Request):
    sid = checked_id(body.id) if body.id is not None else None

    def run(m):
        if sid is not None and (sid in m.sessions or m.db.exists(sid)):
            raise ApiError(409, f"a session named {sid!r} already exists", param="id", type="busy")
        return history_json(m, m.import_chat(body.data, sid, body.name))

    return await _worker(request).acall(run, session=sid)


@router.post("/cards/inspect")
async def inspect(body: InspectBody, request: Request):
    """A card's (or system prompt's) token count and the budget a new chat with it would get."""
    card = card_of(body.card, body.card_png)
    return await _worker(request).acall(lambda m: m.inspect(card, body.system_prompt, body.user_name), mutates=False)


@public.get("/highlight.css")
async def highlight_css():
    return PlainTextResponse(code_css(), media_type="text/css")
