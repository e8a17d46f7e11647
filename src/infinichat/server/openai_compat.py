"""OpenAI-compatible generation, run in the engine worker: request bodies, the prefix cache of anonymous
requests, and the mapping of a chat onto a named session.

- With a session id (the `X-Session-Id` header), the chat's messages are mapped onto that session (created on
  first use, with the request's system message as its system prompt): the messages it already holds are kept,
  a divergence reverts the session to the common prefix, and only the new messages are evaluated.
- Without one, the prompt's tokens reuse the longest common token prefix among a few recently used caches
  (`PrefixLRU`), which are truncated to that prefix; only the rest is evaluated.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from infinichat.engine.sampling import DRY_BREAKERS, SamplingParams
from infinichat.engine.textgen import Generation, stream_text
from infinichat.server.constraints import grammar_of, logit_bias_of
from infinichat.server.errors import ApiError
from infinichat.server.openai_fields import refuse_unsupported
from infinichat.server.sessionops import check_max_tokens, check_stop, checked_id, get_session
from infinichat.session.limits import MAX_NEW_TOKENS
from infinichat.session.manager import kv_bytes_at, kv_bytes_per_token

log = logging.getLogger(__name__)


class Msg(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None  # passed to the chat template
    tool_calls: list[dict[str, Any]] | None = None  # an assistant's calls (tools.py)
    tool_call_id: str | None = None  # a tool message's answer to that call
    # what OpenAI's own reply message carries, so a client can send a reply back as it got it: null (or, for
    # annotations, citations of a web search, which have no effect) is accepted; anything else is a 400
    refusal: str | None = None
    annotations: list[Any] | None = None
    audio: None = None
    function_call: None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class SamplerExtras(BaseModel):
    """Sampling fields with llama.cpp server's names and defaults that /v1 and llama-server's /completion share
    (engine/sampling.py; DRY and XTC are off unless given; the constraints: server/constraints.py)."""

    model_config = ConfigDict(extra="forbid")
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    dry_multiplier: float = 0.0
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    dry_penalty_last_n: int = -1
    dry_sequence_breakers: list[str] = Field(default_factory=lambda: list(DRY_BREAKERS))
    xtc_probability: float = 0.0
    xtc_threshold: float = 0.1
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    logit_bias: dict[str, Any] | list[Any] | None = None  # OpenAI: {"id": bias}; llama.cpp: [[id, bias]]
    grammar: str | None = None  # llama.cpp: a GBNF grammar
    json_schema: dict[str, Any] | None = None  # llama.cpp: a JSON schema


class GenBody(SamplerExtras):
    """The fields both endpoints share. Every field is in openai_fields.FIELDS; any other is a 400."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    max_tokens: int | None = Field(None)
    max_completion_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = None  # -1 (llama.cpp's convention) or null: a random seed
    stream_options: StreamOptions | None = None
    top_k: int = 0
    min_p: float = 0.0
    response_format: dict[str, Any] | None = None
    user: str | None = None


class ChatBody(GenBody):
    messages: list[Msg]
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    safety_identifier: str | None = None
    metadata: dict[str, str] | None = None
    prompt_cache_key: str | None = None
    # refused unless neutral (openai_fields.py)
    service_tier: Any = None
    store: Any = None
    modalities: Any = None
    audio: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None
    web_search_options: Any = None
    functions: Any = None
    function_call: Any = None


class CompletionBody(GenBody):
    prompt: str | list[str] | list[int] | list[list[int]]  # a text, token ids, or a batch (echo only)
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: Any = None


def params_of(body: GenBody, top: int, default_max: int, tok=None) -> SamplingParams:
    refuse_unsupported(body, "chat" if isinstance(body, ChatBody) else "completions")
    if body.n != 1:
        raise ApiError(400, f"n={body.n} is not supported: this server returns exactly one choice (n=1)", param="n")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    check_stop(tuple(stop), param="stop")
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    if max_tokens is not None and max_tokens > MAX_NEW_TOKENS:
        raise ApiError(
            400, f"max_tokens={max_tokens} is over this server's limit of {MAX_NEW_TOKENS}", param="max_tokens"
        )
    p = SamplingParams(
        temperature=body.temperature,
        top_k=body.top_k,
        top_p=body.top_p,
        min_p=body.min_p,
        repetition_penalty=body.repeat_penalty,
        repeat_last_n=body.repeat_last_n,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        dry_multiplier=body.dry_multiplier,
        dry_base=body.dry_base,
        dry_allowed_length=body.dry_allowed_length,
        dry_penalty_last_n=body.dry_penalty_last_n,
        dry_sequence_breakers=tuple(body.dry_sequence_breakers),
        xtc_probability=body.xtc_probability,
        xtc_threshold=body.xtc_threshold,
        seed=None if body.seed == -1 else body.seed,
        max_tokens=default_max if max_tokens is None else max_tokens,
        stop=tuple(stop),
        top_logprobs=top,
        logit_bias=logit_bias_of(body.logit_bias, tok.vocab_size if tok is not None else None),
        grammar=grammar_of(body.response_format, body.grammar, body.json_schema, tok) if tok is not None else None,
    )
    try:
        p.validate()
    except Exception as e:
        name = str(e).split("sampling parameter ", 1)[-1].split("=", 1)[0]
        raise ApiError(400, str(e), param=name) from None
    return p


def text_of(msg: Msg, i: int) -> str:
    if msg.content is None:
        return ""
    if isinstance(msg.content, str):
        return msg.content
    parts = []
    for part in msg.content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise ApiError(
                400,
                f"messages[{i}].content: only text parts ({{'type': 'text', 'text': ...}}) are "
                f"supported, got type {part.get('type')!r}",
                param=f"messages.{i}.content",
            )
        parts.append(part["text"])
    return "".join(parts)


def chat_messages(body: ChatBody, tools: bool = False) -> list[dict]:
    """The messages as the chat template reads them. `tools`: the request has tools, so `tool` messages and the
    assistant's `tool_calls` are accepted (server/tools.py)."""
    if not body.messages:
        raise ApiError(400, "messages must hold at least one message", param="messages")
    roles = ("system", "user", "assistant", "tool") if tools else ("system", "user", "assistant")
    out = []
    for i, m in enumerate(body.messages):
        role = "system" if m.role == "developer" else m.role
        if role not in roles:
            hint = "" if tools or m.role != "tool" else " (tool messages need the request's tools)"
            raise ApiError(
                400,
                f"messages[{i}].role {m.role!r} is not supported{hint}; accepted: developer, {', '.join(roles)}",
                param=f"messages.{i}.role",
            )
        if role == "system" and i > 0:
            raise ApiError(400, f"messages[{i}]: a system message is accepted only first", param=f"messages.{i}.role")
        if m.tool_calls is not None and (not tools or role != "assistant"):
            raise ApiError(
                400, f"messages[{i}].tool_calls: only on assistant messages of a request with tools", f"messages.{i}"
            )
        if m.refusal is not None:
            raise ApiError(400, f"messages[{i}].refusal: only null is accepted", param=f"messages.{i}.refusal")
        d: dict[str, Any] = {"role": role, "content": text_of(m, i)}
        for k in ("name", "tool_calls", "tool_call_id"):
            if getattr(m, k) is not None:
                d[k] = getattr(m, k)
        out.append(d)
    return out


class PrefixLRU:
    """A few KV sequences of recent anonymous requests; a new prompt takes the one sharing the longest token
    prefix with it (truncated to that prefix), or a fresh one. A sequence in use is out of the list, and counts
    in the KV memory cap with the bytes its request reserved (`bytes_for`) until it is released, or its own
    bytes if they are more."""

    def __init__(self, engine, budget: int, size: int = 4):
        self.engine, self.budget, self.size = engine, budget, size
        self.free: list = []  # least recently used first
        self.busy: list = []  # in use by running requests
        self.held: dict[int, int] = {}  # id(a sequence in use) -> the KV bytes its request reserved (or it held)
        self.hits = 0
        self.overruns = 0  # released sequences that took more bytes than their request reserved (a wrong estimate)

    def bytes_for(self, n: int) -> int:
        """The KV bytes one of these sequences takes once it holds n tokens (at most the budget)."""
        return kv_bytes_at(self.engine, n, self.budget)

    # SpareKV (session/manager.py): counted in the server's KV memory cap
    @property
    def nbytes(self) -> int:
        return sum(_store_bytes(q) for q in self.free) + self.busy_bytes

    @property
    def busy_bytes(self) -> int:
        return sum(max(_store_bytes(q), self.held.get(id(q), 0)) for q in self.busy)

    def drop_idle(self) -> bool:
        if not self.free:
            return False
        self.free.pop(0)
        return True

    def acquire(self, ids: list[int], reuse: bool = True, reserved: int = 0):
        """(sequence, tokens of `ids` it already holds); `reuse=False`: none (a sequence from scratch). `reserved`:
        the KV bytes the request reserved (SessionManager.reserve), held until `release`."""
        best, keep = None, 0
        for seq in self.free:
            have = seq.token_ids()
            n = 0
            lim = min(len(have), len(ids) - 1) if reuse else 0
            while n < lim and have[n] == ids[n]:
                n += 1
            if best is None or n > keep:
                best, keep = seq, n
        if best is not None and (keep > 0 or len(self.free) >= self.size):
            self.free.remove(best)
            best.truncate(keep)
            self.hits += keep > 0
            self.busy.append(best)
            self.held[id(best)] = max(reserved, _store_bytes(best))  # its buffers may be larger already
            return best, keep
        seq = self.engine.new_sequence(budget=self.budget, policy="full")
        self.busy.append(seq)
        self.held[id(seq)] = reserved
        return seq, 0

    def release(self, seq) -> None:
        """The request is over (finished, failed, stopped or abandoned): its reservation ends, the sequence is
        idle (dropped first when memory is short)."""
        reserved = self.held.pop(id(seq), 0)
        if reserved and _store_bytes(seq) > reserved:  # grew past what its request reserved: a wrong estimate
            self.overruns += 1
            log.warning("an anonymous sequence took %d KV bytes, %d reserved", _store_bytes(seq), reserved)
        if seq in self.busy:
            self.busy.remove(seq)
        self.free.append(seq)
        while len(self.free) > self.size:
            self.free.pop(0)


def _store_bytes(seq) -> int:
    return int(getattr(getattr(seq, "store", None), "nbytes", 0))


def _item(tok, chunk_text: str, step) -> dict:
    d: dict[str, Any] = {"text": chunk_text, "token": None, "logprob": None, "top": []}
    if step is not None:
        d.update(token=step.token, logprob=step.logprob, top=list(step.top))
    return d


def anonymous(
    engine,
    tok,
    lru: PrefixLRU,
    ids: list[int],
    params: SamplingParams,
    should_stop,
    metrics,
    m=None,
    prompt_param: str = "messages",
) -> Iterator[dict]:
    """An anonymous generation; `prompt_param`: the request field its prompt came from (named in a 400)."""
    if len(ids) + 1 > lru.budget:
        raise ApiError(
            400,
            f"the prompt is {len(ids)} tokens; the context budget of this server is {lru.budget} "
            f"tokens (serve --budget)",
            param=prompt_param,
        )
    check_max_tokens(params.max_tokens, lru.budget, "max_tokens")
    # the KV bytes this request may take (its prompt and max_tokens, within the budget), reserved before its
    # sequence exists: idle caches offloaded to fit the cap; 400 past the hard limit alone, 503 past it with
    # the running generations' memory
    need = lru.bytes_for(len(ids) + params.max_tokens + 1)
    if m is not None:
        what = f"a prompt of {len(ids)} tokens + max_tokens {params.max_tokens}"
        m.reserve(need, what, kv_bytes_per_token(engine))
    # A seeded request evaluates its whole prompt from scratch: a prompt evaluated in other pieces (a cached prefix,
    # then the rest) gives logits that differ in the last float bits, enough to change a sampled token, so the same
    # request and seed would give another text depending on what the cache held.
    seq, keep = lru.acquire(ids, reuse=params.seed is None, reserved=need if m is not None else 0)
    result = Generation()
    n = 0
    try:
        for chunk in stream_text(
            engine, tok, seq, ids[keep:], params, history=ids[:keep], should_stop=should_stop, result=result
        ):
            if chunk.step is not None:
                n += 1
                metrics.tokens(n_in=len(ids) - keep if n == 1 else 0, n_out=1)
            yield _item(tok, chunk.text, chunk.step)
    finally:
        lru.release(seq)
    yield {
        "done": result.finish_reason,
        "stop_word": result.stop_word,
        "prompt_tokens": len(ids),
        "completion_tokens": n,
        "cached_tokens": keep,
    }


def session_chat(m, sid: str, messages: list[dict], params: SamplingParams, should_stop, metrics) -> Iterator[dict]:
    """Map the chat onto session `sid` (append only what it lacks) and generate the reply. All or nothing: a
    request that fails before its first token leaves the session as it was (or, if it created it, absent)."""
    checked_id(sid)
    named = [i for i, msg in enumerate(messages) if "name" in msg]
    if named:  # a session's turns are role and text only
        i = named[0]
        raise ApiError(400, f"messages[{i}].name is not supported with X-Session-Id", param=f"messages.{i}.name")
    system = messages[0]["content"] if messages[0]["role"] == "system" else None
    rest = messages[1:] if system is not None else messages
    if not rest:
        raise ApiError(400, "messages must hold a user or assistant message after the system message", param="messages")
    created = not (sid in m.sessions or m.db.exists(sid))
    if not created:
        s = get_session(m, sid)
        if (s.system_prompt or None) != (system or None):
            raise ApiError(
                400,
                f"session {sid!r} has a different system prompt than this request's system message; "
                f"use another X-Session-Id",
                param="messages",
            )
    else:
        s = m.create(sid, name=sid, system_prompt=system)
    memo = s.memento()
    try:
        check_max_tokens(params.max_tokens, None, "max_tokens")
        m.check_room(s)
        gen = _map_chat(s, rest, params, should_stop)
    except BaseException:
        if created:
            m.delete(sid)  # a request that fails leaves no session behind
        else:
            m.roll_back(s, memo)
        raise
    started = False
    try:
        for item in _chat_items(s, gen, metrics):
            started = True
            yield item
    except Exception:
        if not started:
            m.delete(sid) if created else m.roll_back(s, memo)
        raise


def _map_chat(s, rest: list[dict], params: SamplingParams, should_stop) -> Iterator:
    """Bring session s to the chat's history but its last message; the reply's generator."""
    k = 0
    while (
        k < min(len(s.messages), len(rest) - 1)
        and s.messages[k].kind == rest[k]["role"]
        and s.messages[k].text == rest[k]["content"]
    ):
        k += 1
    if k < len(s.messages):
        s.revert_to(k)
    for msg in rest[k:-1]:
        s.add_message(msg["role"], msg["content"])
    last = rest[-1]
    if last["role"] == "user":
        return s.send(last["content"], params, should_stop)
    s.add_message("assistant", last["content"])
    return s.continue_(params, should_stop)


def _chat_items(s, gen: Iterator, metrics) -> Iterator[dict]:
    from infinichat.server.sessionops import session_events

    n, prompt = 0, 0
    for name, data in session_events(s, gen, metrics):
        if name == "token":
            if data["token"] is not None:
                n += 1
                prompt = prompt or s.seq.length
            data["top"] = [(t["token"], t["logprob"]) for t in data["top"]]
            yield data
        elif name == "done":
            reason = data["finish_reason"]
            yield {
                "done": "stop" if reason == "cancelled" else reason,
                "prompt_tokens": prompt,
                "completion_tokens": n,
                "cached_tokens": 0,
            }
