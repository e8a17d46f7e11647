"""llama.cpp server (llama-server) endpoints that scripts call: /completion, /props, /slots, /apply-template.

- `/completion` runs on the shared prompt cache of /v1 (openai_compat.PrefixLRU: `cache_prompt` = reuse its
  longest common prefix, as a llama-server slot does); `n_predict` -1 = until EOS or the context budget; the
  sampling fields llama-server shares with /v1 (and `grammar`, `json_schema`, `logit_bias`, `n_probs`). Streaming
  sends `data: {...}` lines with `content` and `stop`, the last one with the totals, as llama-server does.
- Slots are our sessions: `/slots` lists them (`id`: the position in creation order, `id_session`: the
  session's id); `/slots/{id}?action=save|restore` writes / reads the session's transcript and KV snapshot
  (DATA/slots/FILENAME.json and .kv), `erase` drops its KV cache. `id_slot` on /completion may only be -1
  (any): a session holds chat turns, not a raw prompt (use /v1/chat/completions with `X-Session-Id`).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import time
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from infinichat.server.errors import ApiError, error_body
from infinichat.server.openai_compat import CompletionBody, SamplerExtras, anonymous, params_of
from infinichat.server.streaming import collect, open_stream, sse, sse_response
from infinichat.session.limits import MAX_NEW_TOKENS

router = APIRouter()


class LlamaCompletion(SamplerExtras):
    """llama-server's /completion body: the fields this server honours; any other is a 400."""

    model_config = ConfigDict(extra="forbid")
    prompt: str | list[int]
    n_predict: int = -1
    stream: bool = False
    cache_prompt: bool = True
    id_slot: int = -1
    n_probs: int = 0
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    seed: int = -1
    stop: list[str] = Field(default_factory=list)


def _probs(tok, item: dict) -> dict:
    def one(t: int, lp: float) -> dict:
        return {"id": t, "token": tok.decode([t]), "logprob": lp, "bytes": list(tok.token_bytes(t))}

    return {**one(item["token"], item["logprob"]), "top_logprobs": [one(t, lp) for t, lp in item["top"]]}


@router.post("/completion")
async def completion(body: LlamaCompletion, request: Request):
    st = request.app.state
    tok = st.tokenizer
    if body.id_slot != -1:
        raise ApiError(
            400,
            f"id_slot={body.id_slot}: /completion runs on the shared prompt cache (id_slot -1); slots are chat "
            "sessions here: continue one with POST /v1/chat/completions and the header X-Session-Id",
            param="id_slot",
        )
    if body.n_predict < -1 or body.n_predict == 0:
        raise ApiError(400, f"n_predict={body.n_predict}: -1 (until EOS or the budget) or >= 1", param="n_predict")
    v1: dict[str, Any] = {
        k: getattr(body, k)
        for k in (
            "prompt", "temperature", "top_k", "top_p", "min_p", "repeat_penalty", "repeat_last_n",
            "presence_penalty", "frequency_penalty", "seed", "stop", "dry_multiplier", "dry_base",
            "dry_allowed_length", "dry_penalty_last_n", "dry_sequence_breakers", "xtc_probability",
            "xtc_threshold", "grammar", "json_schema", "logit_bias",
        )
    }  # fmt: skip
    lru = st.prefix_lru
    v1["max_tokens"] = body.n_predict if body.n_predict > 0 else 1
    try:
        v1body = CompletionBody.model_validate(v1)
    except ValidationError as e:
        err = e.errors()[0]
        raise ApiError(400, f"{err['loc'][0]}: {err['msg']}", param=str(err["loc"][0])) from None
    try:
        params = params_of(v1body, body.n_probs, 1, tok)
    except ApiError as e:  # named as this endpoint names them
        names = {"top_logprobs": "n_probs", "max_tokens": "n_predict"}
        if e.param in names:
            e.message = e.message.replace(e.param, names[e.param])
            e.param = names[e.param]
        raise
    ids = tok.encode(body.prompt, add_bos=tok.add_bos) if isinstance(body.prompt, str) else list(body.prompt)
    if not ids or any(not 0 <= t < tok.vocab_size for t in ids):
        raise ApiError(400, f"prompt: a non-empty text or token ids in [0, {tok.vocab_size})", param="prompt")
    if body.n_predict == -1:  # until EOS or the budget of the shared cache
        params.max_tokens = max(1, min(lru.budget - len(ids) - 1, MAX_NEW_TOKENS))
    if not body.cache_prompt:  # a seeded request evaluates its whole prompt (openai_compat.anonymous)
        params.seed = params.seed if params.seed is not None else secrets.randbits(63)

    def run(m, job):
        return anonymous(st.engine, tok, lru, ids, params, job.should_stop, st.metrics, m, "prompt")

    t0 = time.perf_counter()
    _, items = await open_stream(st.worker, run, request=request)

    def final(done: dict, text: str, n: int, probs: list) -> dict:
        dt = time.perf_counter() - t0
        word = done.get("stop_word")
        # llama-server's: "word" (a stop string ended it), "limit" (n_predict or the budget), else "eos"
        stop_type = "word" if word is not None else "limit" if done["done"] == "length" else "eos"
        out = {
            "content": text,
            "id_slot": -1,
            "stop": True,
            "model": st.info["model"],
            "tokens_predicted": n,
            "tokens_evaluated": done["prompt_tokens"],
            "tokens_cached": done["cached_tokens"],
            "stop_type": stop_type,
            "stopping_word": word or "",
            "truncated": False,
            "timings": {"predicted_n": n, "predicted_ms": dt * 1e3, "prompt_n": done["prompt_tokens"]},
        }
        if body.n_probs:
            out["completion_probabilities"] = probs
        return out

    if body.stream:

        def frame(item):
            if "done" in item:
                return sse(None, final(item, "", item["completion_tokens"], []))
            d: dict[str, Any] = {"content": item["text"], "stop": False, "id_slot": -1}
            if body.n_probs and item["token"] is not None:
                d["completion_probabilities"] = [_probs(tok, item)]
            return sse(None, d)

        return sse_response(items, frame, error_event=None)
    got = await collect(request, items)
    if got is None:
        return JSONResponse(error_body(499, "the client closed the request"), status_code=499)
    done = got[-1]
    toks = [i for i in got if "done" not in i and i["token"] is not None]
    text = "".join(i.get("text", "") for i in got if "done" not in i)
    return final(done, text, len(toks), [_probs(tok, i) for i in toks])


@router.get("/props")
async def props(request: Request):
    st = request.app.state
    tok = st.tokenizer
    d = st.manager.defaults
    return {
        "default_generation_settings": {"n_ctx": st.prefix_lru.budget, "params": d.to_json()},
        "total_slots": len(st.manager.sessions),
        "model_path": st.info["path"],  # the loaded .gguf file or checkpoint folder, as llama-server's
        "model_alias": st.info["model"],  # the id /v1/models serves (llama-server: --alias)
        "chat_template": tok.chat_template or "",
        "bos_token": tok.bos_token,
        "eos_token": tok.eos_token,
        "build_info": f"infinichat ({st.info['backend']})",
        "modalities": {"vision": False, "audio": False},
    }


class TemplateBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None


@router.post("/apply-template")
async def apply_template(body: TemplateBody, request: Request):
    from infinichat.server.openai_compat import ChatBody, chat_messages

    tok = request.app.state.tokenizer
    chat = ChatBody.model_validate({"messages": body.messages, "tools": body.tools})
    extra = {"tools": body.tools} if body.tools else {}
    return {"prompt": tok.apply_chat_template(chat_messages(chat, tools=bool(body.tools)), True, **extra)}


def _slot_ids(m) -> list[str]:
    """Session ids in slot order: by creation (a slot keeps its number while sessions are used)."""
    return [d["id"] for d in sorted(m.list(), key=lambda d: (d["created"], d["id"]))]


@router.get("/slots")
async def slots(request: Request):
    st = request.app.state
    busy = st.worker.busy_sessions()

    def run(m):
        out = []
        by_id = {d["id"]: d for d in m.list()}
        for i, sid in enumerate(_slot_ids(m)):
            s = m.sessions.get(sid)
            seq = s.seq if s is not None else None
            out.append(
                {
                    "id": i,
                    "id_session": sid,
                    "n_ctx": s.settings.budget if s is not None else None,
                    "n_past": seq.length if seq is not None else 0,
                    "is_processing": sid in busy,
                    "messages": by_id[sid]["messages"],
                }
            )
        return out

    return await st.worker.acall(run, mutates=False)


class SlotFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    filename: str | None = None


_FILENAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")


@router.post("/slots/{id_slot}")
async def slot_action(id_slot: int, request: Request, action: str = "", body: SlotFile | None = None):
    """save: the session's transcript and KV snapshot to DATA/slots/FILENAME(.json, .kv); restore: the session
    becomes what the file holds (its cache from the snapshot when it matches, else rebuilt from the transcript);
    erase: its KV cache is dropped (the transcript stays; the cache is rebuilt on next use)."""
    st = request.app.state
    if action not in ("save", "restore", "erase"):
        raise ApiError(400, f"action={action!r}; accepted: save, restore, erase", param="action")
    name = body.filename if body is not None else None
    if action != "erase" and (name is None or not _FILENAME.fullmatch(name)):
        raise ApiError(
            400, f"filename {name!r}: 1-128 letters, digits, _ . - (no folders), not starting with . or -", "filename"
        )
    sid = await st.worker.acall(lambda m: _slot_session(m, id_slot), mutates=False)
    t0 = time.perf_counter()

    def run(m):
        folder = m.db.dir / "slots"
        if action == "save":
            return _save_slot(m, sid, folder, name or "")
        if action == "restore":
            return _restore_slot(m, sid, folder, name or "")
        s = m.get(sid)
        n = s.seq.length if s.seq is not None else 0
        s.seq, s._logits = None, None
        m.db.kv_path(sid).unlink(missing_ok=True)
        return {"n_erased": n}

    out = await st.worker.acall(run, session=sid)
    ms = (time.perf_counter() - t0) * 1e3
    timing = {f"{action}_ms": ms} if action != "erase" else {}
    return {"id_slot": id_slot, "id_session": sid, **({"filename": name} if name else {}), **out, "timings": timing}


def _slot_session(m, id_slot: int) -> str:
    ids = _slot_ids(m)
    if not 0 <= id_slot < len(ids):
        raise ApiError(404, f"no slot {id_slot}; slots are the {len(ids)} sessions (GET /slots)", param="id_slot")
    return ids[id_slot]


def _save_slot(m, sid: str, folder: Path, name: str) -> dict:
    s = m.get(sid)  # the cache resident
    got = m.db.load(sid)
    if got is None:
        raise ApiError(404, f"no session {sid!r}")
    row, msgs = got
    folder.mkdir(parents=True, exist_ok=True)
    kv = folder / f"{name}.kv"
    s.kv.save(kv, {"version": s.version, "session": sid})
    data = json.dumps({"row": row, "messages": msgs}, ensure_ascii=False).encode()
    tmp = folder / f".{name}.json.tmp"
    tmp.write_bytes(data)
    os.replace(tmp, folder / f"{name}.json")
    return {"n_saved": s.kv.length, "n_written": len(data) + kv.stat().st_size}


def _restore_slot(m, sid: str, folder: Path, name: str) -> dict:
    src = folder / f"{name}.json"
    if not src.is_file():
        raise ApiError(404, f"no saved slot {name!r} (POST /slots/N?action=save first)", param="filename")
    try:
        saved = json.loads(src.read_text("utf-8"))
        row, msgs = dict(saved["row"]), list(saved["messages"])
    except (ValueError, KeyError, TypeError) as e:
        raise ApiError(400, f"the saved slot {name!r} cannot be read: {e}", param="filename") from None
    old = m.db.load(sid)
    row["id"] = sid
    m.db.save(row, list(enumerate(msgs)), len(msgs))
    kv = folder / f"{name}.kv"
    m.db.kv_path(sid).unlink(missing_ok=True)
    if kv.is_file():
        shutil.copyfile(kv, m.db.kv_path(sid))  # used when it is this session's, at this version
    m.sessions.pop(sid, None)
    try:
        s = m.get(sid)  # loads the transcript, then the cache from the snapshot or by rebuilding it
    except Exception:
        if old is not None:  # all or nothing: the session as it was
            m.db.save(old[0], list(enumerate(old[1])), len(old[1]))
        m.sessions.pop(sid, None)
        raise
    return {"n_restored": s.kv.length, "n_read": src.stat().st_size + (kv.stat().st_size if kv.is_file() else 0)}
