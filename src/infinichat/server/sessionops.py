"""Worker-side helpers of the session API: look a session up, build sampling parameters, turn a session's
generation events into SSE items. These run in the engine worker thread (sessions are not thread-safe)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import fields, replace

from infinichat.engine.detok import StreamDecoder
from infinichat.engine.sampling import SamplingParams
from infinichat.errors import InfinichatError
from infinichat.server.constraints import GRAMMAR_FIELDS, grammar_of, logit_bias_of
from infinichat.server.errors import ApiError
from infinichat.server.markdown import render_markdown
from infinichat.session.db import AVATARS, check_session_id
from infinichat.session.limits import MAX_NEW_TOKENS, MAX_STOP_CHARS, MAX_STOP_STRINGS
from infinichat.session.manager import kv_bytes_at, kv_bytes_per_token

KV_EVERY = 16  # a kv event every this many tokens
SAMPLING_KEYS = tuple(f.name for f in fields(SamplingParams))
CONSTRAINT_KEYS = ("logit_bias", *GRAMMAR_FIELDS)  # read as the OpenAI API reads them (server/constraints.py)
PARAM_KEYS = tuple(dict.fromkeys(SAMPLING_KEYS + CONSTRAINT_KEYS))


def checked_id(sid: str) -> str:
    try:
        return check_session_id(sid)
    except InfinichatError as e:
        raise ApiError(400, str(e), param="id") from None


def require_session(m, sid: str) -> str:
    """sid, after checking that it is valid (400) and that the session exists (404); loads nothing."""
    checked_id(sid)
    if sid not in m.sessions and not m.db.exists(sid):
        raise ApiError(404, f"no session {sid!r}; list them with GET /api/sessions", param="id")
    return sid


def get_session(m, sid: str):
    return m.get(require_session(m, sid))


def sampling(s, overrides: dict | None) -> SamplingParams:
    """The session's sampling settings with per-request overrides (names of SamplingParams fields, and
    `logit_bias`, `grammar`, `json_schema`, `response_format` in the OpenAI API's forms)."""
    p = s.settings.sampling()
    if overrides:
        bad = sorted(set(overrides) - set(PARAM_KEYS))
        if bad:
            raise ApiError(
                400,
                f"unknown sampling parameter(s) {', '.join(bad)}; accepted: {', '.join(PARAM_KEYS)}",
                param="params",
            )
        p = replace(p, **{k: v for k, v in overrides.items() if k not in CONSTRAINT_KEYS})
        p.__post_init__()  # a stop given as a string or list
        p.validate()
        check_stop(p.stop)
        got = {k: overrides.get(k) for k in CONSTRAINT_KEYS}
        p = replace(
            p,
            logit_bias=logit_bias_of(got["logit_bias"], s.tok.vocab_size, "params."),
            grammar=grammar_of(got["response_format"], got["grammar"], got["json_schema"], s.tok, "params."),
        )
    check_max_tokens(p.max_tokens, None, "params.max_tokens")
    return p


def suggestion(m, s, params: SamplingParams, should_stop) -> Iterator:
    """`s.suggest`, with the KV memory of the copy of the cache it drafts in (when the cache has no room for the
    draft) reserved first and counted while it runs (SessionManager.reserved): 400 when it alone passes the hard
    limit, 503 when running generations leave no room for it."""
    n = s.suggest_scratch(params)
    if not n:
        yield from s.suggest(params, should_stop)
        return
    store = s.kv.store  # the copy starts as large as the cache, and grows with the draft
    nbytes = max(int(getattr(store, "nbytes", 0)), kv_bytes_at(m.engine, n, store.capacity))
    what = f"a suggestion in a copy of session {s.id}'s cache ({n} tokens)"
    with m.reserved(nbytes, what, kv_bytes_per_token(m.engine)):
        yield from s.suggest(params, should_stop)


def check_max_tokens(n: int, budget: int | None, param: str) -> None:
    """At most MAX_NEW_TOKENS per request; with `budget` (a cache that cannot evict), at most the budget too.
    A session's reply may outgrow its budget: its policy evicts old turns."""
    cap = MAX_NEW_TOKENS if budget is None else min(budget, MAX_NEW_TOKENS)
    if n > cap:
        why = "per request" if budget is None else f"the context budget of {budget} tokens; {MAX_NEW_TOKENS} at most"
        raise ApiError(400, f"max_tokens={n} is over the limit of {cap} ({why})", param=param)


def check_stop(stop: tuple[str, ...], param: str = "params.stop") -> None:
    if len(stop) > MAX_STOP_STRINGS:
        raise ApiError(400, f"stop accepts at most {MAX_STOP_STRINGS} strings, got {len(stop)}", param=param)
    for x in stop:
        if len(x) > MAX_STOP_CHARS:
            raise ApiError(400, f"each stop string is at most {MAX_STOP_CHARS} characters, got {len(x)}", param=param)


def top_json(tok, top) -> list[dict]:
    return [{"token": int(t), "text": tok.decode([int(t)]), "logprob": float(lp)} for t, lp in top]


def history_json(m, s) -> dict:
    """A session's history for the API: each message with its Markdown rendered as sanitized HTML, and the
    names and avatars the page shows on the messages."""
    h = s.history()
    for msg in h["messages"]:
        msg["html"] = render_markdown(msg["text"])
    h["name"] = h["name"] or "New chat"
    h["system_html"] = render_markdown(h["system_prompt"] or "")
    h["avatars"] = {who: m.db.avatar_path(s.id, who).exists() for who in AVATARS}
    return h


def message_json(s, turn: int | None) -> dict | None:
    if turn is None:
        return None
    msgs = s.history()["messages"]
    if not 0 <= turn < len(msgs):
        return None
    msgs[turn]["html"] = render_markdown(msgs[turn]["text"])
    return msgs[turn]


def steps_json(tok, steps: list) -> list[dict]:
    """Stored per-token data of a reply ([token, logprob, top]) as the stream's token events showed it; each
    token's text is what it added to the decoded text (whole characters, as streamed)."""
    dec = StreamDecoder(tok, skip_special=True)
    out = []
    for token, logprob, top in steps:
        out.append({"text": dec.push(int(token)), "token": token, "logprob": logprob, "top": top_json(tok, top)})
    if out:
        out[-1]["text"] += dec.flush()
    return out


def session_events(s, gen: Iterator, metrics=None) -> Iterator[tuple[str, dict]]:
    """(event, data) items of the session API stream: token..., kv after the first token and every KV_EVERY
    tokens, kv, done."""
    tok = s.tok
    n = 0
    start = s.seq.length if s.seq is not None else 0
    try:
        for ev in gen:
            if ev.kind == "token":
                if ev.token is not None:
                    n += 1
                    if metrics is not None:
                        metrics.tokens(n_in=max(0, s.seq.length - start) if n == 1 else 0, n_out=1)
                yield (
                    "token",
                    {
                        "text": ev.text,
                        "token": ev.token,
                        "logprob": ev.logprob,
                        "top": top_json(tok, ev.top),
                        "turn": ev.turn,
                    },
                )
                if ev.token is not None and (n == 1 or n % KV_EVERY == 0):  # the new turn shows at once
                    yield "kv", s.kv_map()
            else:
                yield "kv", s.kv_map()
                yield (
                    "done",
                    {
                        "turn": ev.turn,
                        "finish_reason": ev.finish_reason,
                        "text": ev.text,
                        "message": message_json(s, ev.turn),
                    },
                )
    finally:
        close = getattr(gen, "close", None)
        if close is not None:
            close()
