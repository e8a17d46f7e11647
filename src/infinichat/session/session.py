"""A conversation whose every part lives in a named cache segment, so each turn evaluates only its new tokens.

Cache layout: the system part (system prompt or character card; pinned, never evicted), then one segment per
message in the model's context, in transcript order. Segment names are `m<uid>` (a message's stable id), so
the transcript and the cache map can always be matched. Every action keeps the two consistent:

- `send` appends the user message's segment and a reply segment (header, generated tokens, the template's
  end-of-turn suffix). The header's last token is always evaluated on its own, so a `retry` (which cuts the
  reply back to just before that token) reproduces the first attempt's logits bit for bit.
- `revert_to`, `edit`, `delete`, `select` cut the cache at the first affected segment and re-evaluate what
  follows; `suggest` works in a scratch segment (or a fork when the budget is tight) and leaves the cache
  bit-identical; `narrate` keeps only the last K narrations; `inject_rag` replaces the previous RAG segment.
- Over budget, the eviction policy (default `turns`: whole old turns, then token-level streaming) cuts old
  segments; `history()` reports per message how many of its tokens the model still holds.

"Turn" N means the N-th message of the transcript (0-based, a greeting included); `revert_to(N)` keeps
messages 0..N-1. Generating actions are generators of `Event`s; the last one has kind "done". Closing the
generator early (or `should_stop()` turning true) cancels cleanly: the partial reply is kept, marked
`finish_reason="cancelled"`, and the cache stays consistent.

Not thread-safe: one engine worker owns all sessions (the server queues requests to it).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

import torch

from infinichat.engine.sampling import SamplingParams
from infinichat.engine.textgen import Generation, TextChunk, stream_text
from infinichat.errors import InfinichatError
from infinichat.kv.quantized import bytes_per_token
from infinichat.kv.segments import Segment
from infinichat.kv.sequence import KVSequence
from infinichat.session.cards import substitute
from infinichat.session.chatformat import ChatFormat
from infinichat.session.limits import MAX_MESSAGE_CHARS, MAX_NAME_CHARS, check_text
from infinichat.session.lore import Lorebook
from infinichat.session.settings import SessionSettings, check_budget
from infinichat.session.speakers import speaker_cut

log = logging.getLogger(__name__)

NARRATOR_PREFIX = "Narrator: "
GENERATED = ("assistant", "narration")  # kinds whose content the model writes
SPOKEN = ("user", "assistant", "narration")  # kinds a lorebook scans for its keys
RAG_PREFIX = "Relevant information for the conversation:\n"
HISTORY_WINDOW = 4  # messages of context for rendering the next one (see _chat_history)


@dataclass
class Alternative:
    text: str
    tokens: list[int] | None = None  # the reply's tokens as generated (None: tokenize the text)
    finish_reason: str = "stop"
    logprobs: list[float] = field(default_factory=list)
    # what the user saw while it streamed: per generated token [token, logprob, [[token, logprob], ...top-n]]
    steps: list[list] = field(default_factory=list)


@dataclass
class Message:
    uid: int
    kind: str  # user | assistant | narration | rag
    role: str  # the chat-template role it is rendered with
    alternatives: list[Alternative]
    selected: int = 0
    in_context: bool = True  # False: left the model's context on purpose (an old narration, a replaced RAG)
    n_tokens: int = 0  # tokens its segment had when evaluated
    n_header: int = 0
    created: float = field(default_factory=time.time)
    meta: dict = field(default_factory=dict)  # a lore message: {"entry": id, "name": entry name, "seen": user turn}

    @property
    def text(self) -> str:
        return self.alternatives[self.selected].text

    @property
    def content(self) -> str:
        """What the template renders for it."""
        prefix = {"narration": NARRATOR_PREFIX, "rag": RAG_PREFIX}.get(self.kind, "")
        return prefix + self.text

    @property
    def segment_name(self) -> str:
        return f"m{self.uid}"

    def copy(self) -> Message:
        """A copy that later in-place edits of this message (text, selection, alternatives) leave alone."""
        return replace(self, alternatives=[replace(a) for a in self.alternatives], meta=dict(self.meta))

    def fingerprint(self) -> tuple:
        """Cheap, changes whenever to_json() would (str hashes are cached by Python)."""
        return (
            self.uid,
            self.kind,
            self.selected,
            self.in_context,
            self.n_tokens,
            self.n_header,
            tuple(
                (
                    hash(a.text),
                    a.finish_reason,
                    -1 if a.tokens is None else len(a.tokens),
                    len(a.logprobs),
                    len(a.steps),
                )
                for a in self.alternatives
            ),
            tuple(sorted(self.meta.items())),
        )

    def to_json(self) -> dict:
        return {
            "uid": self.uid,
            "kind": self.kind,
            "role": self.role,
            "selected": self.selected,
            "in_context": self.in_context,
            "n_tokens": self.n_tokens,
            "n_header": self.n_header,
            "created": self.created,
            "meta": self.meta,
            "alternatives": [
                {
                    "text": a.text,
                    "tokens": a.tokens,
                    "finish_reason": a.finish_reason,
                    "logprobs": a.logprobs,
                    "steps": a.steps,
                }
                for a in self.alternatives
            ],
        }

    @classmethod
    def from_json(cls, d: dict) -> Message:
        alts = [
            Alternative(
                a["text"],
                a.get("tokens"),
                a.get("finish_reason", "stop"),
                a.get("logprobs") or [],
                a.get("steps") or [],
            )
            for a in d["alternatives"]
        ]
        return cls(
            d["uid"],
            d["kind"],
            d["role"],
            alts,
            d.get("selected", 0),
            d.get("in_context", True),
            d.get("n_tokens", 0),
            d.get("n_header", 0),
            d.get("created", 0.0),
            dict(d.get("meta") or {}),
        )


@dataclass
class Memento:
    """A session's state before an action, to put back if the action fails (see Session.memento)."""

    name: str
    system_prompt: str | None
    settings: SessionSettings
    card: object
    lorebook: Lorebook | None
    next_uid: int
    version: int
    messages: list[Message]
    seq: KVSequence | None
    seq_state: tuple | None
    logits: torch.Tensor | None
    segments: list[Segment] | None = None  # copies of the cache's segments (to truncate back to them)


@dataclass
class Event:
    """A streamed piece of a generation: kind "token" (text may be empty while a character or a possible
    stop string is incomplete) or "done" (`message` set, or `text` for a suggestion)."""

    kind: str
    text: str = ""
    token: int | None = None
    logprob: float | None = None
    top: list[tuple[int, float]] = field(default_factory=list)
    turn: int | None = None
    finish_reason: str | None = None
    message: Message | None = None


def default_name(text: str, words: int = 6, chars: int = 48) -> str:
    """A readable chat name from a first message: its first words, on one line."""
    flat = " ".join(text.split())
    short = " ".join(flat.split(" ")[:words])
    if len(short) > chars:
        short = short[:chars].rsplit(" ", 1)[0] or short[:chars]
    return short + ("…" if len(short) < len(flat) else "") if short else "New chat"


class Session:
    def __init__(
        self,
        sid: str,
        engine,
        tokenizer,
        *,
        name: str = "",
        system_prompt: str | None = None,
        settings: SessionSettings | None = None,
        card=None,
        chat_format: ChatFormat | None = None,
        prefix_cache=None,
        on_change: Callable[[Session], None] | None = None,
        max_budget: int | None = None,
        lorebook: Lorebook | None = None,
    ):
        self.id = sid
        self.name = name  # "" until set: the first words of the first user message name it (see send)
        self.engine = engine
        self.tok = tokenizer
        self.fmt = chat_format or ChatFormat(tokenizer)
        self.settings = (settings or SessionSettings()).validate()
        self.card = card
        self.lorebook = lorebook
        self.system_prompt = system_prompt
        self.messages: list[Message] = []
        self.seq: KVSequence | None = None
        self.prefix_cache = prefix_cache
        self.on_change = on_change
        self.max_budget = max_budget  # the server's cap on the budget a client may set (None: MAX_BUDGET)
        self.next_uid = 1
        self.version = 0  # bumped on every change; a KV snapshot is valid for one version
        self.last_used = time.monotonic()
        self.created = time.time()  # wall clock; a stored session keeps the time it was first made
        self._logits: torch.Tensor | None = None  # next-token logits after the last cached token

    # ------------------------------------------------------------------ all or nothing
    def _seq_state(self) -> tuple | None:
        seq = self.seq
        if seq is None:
            return None
        segs = seq.segments
        return (seq.store.edits, seq.length, segs.next_id, segs.open is None, len(segs.segments))

    def memento(self) -> Memento:
        """The state to put back with `restore` if the next action fails: O(messages) small copies, no KV copy."""
        return Memento(
            self.name,
            self.system_prompt,
            self.settings,
            self.card,
            self.lorebook,
            self.next_uid,
            self.version,
            [m.copy() for m in self.messages],
            self.seq,
            self._seq_state(),
            self._logits,
            [replace(x) for x in self.seq.segments.segments] if self.seq is not None else None,
        )

    def restore(self, memo: Memento) -> None:
        """Back to `memo` (from `memento`). The cache is kept if the failed action left it as it was, truncated
        back if the action only appended tokens to it (e.g. a prompt cancelled half-way), else dropped: the next
        use rebuilds it from the restored transcript."""
        same_cache = self.seq is memo.seq and (self._seq_state() == memo.seq_state or self._truncate_back(memo))
        self.name, self.system_prompt, self.settings, self.card, self.lorebook = (
            memo.name,
            memo.system_prompt,
            memo.settings,
            memo.card,
            memo.lorebook,
        )
        self.next_uid, self.version, self.messages = memo.next_uid, memo.version, memo.messages
        if same_cache:
            self._logits = memo.logits
        else:
            self.seq, self._logits = None, None

    def _truncate_back(self, memo: Memento) -> bool:
        """Put the cache back to `memo`'s if the failed action only appended to it (no eviction or other edit,
        no attention statistics gathered): truncate to the old length, restore the segments. False: not possible."""
        seq = self.seq
        if seq is None or memo.seq_state is None or memo.segments is None:
            return False
        edits, length, next_id = memo.seq_state[:3]
        p = seq.policy
        if (
            seq.store.edits != edits
            or seq.length < length
            or p.needs_attention_weights
            or p.offloads
            or seq.stale_from is not None
            or not seq.store.truncate_is_exact(length)
        ):
            return False
        seq.truncate(length)
        seq.segments.segments = [replace(x) for x in memo.segments]
        seq.segments.next_id = next_id
        return True

    # ------------------------------------------------------------------ queries
    def history(self) -> dict:
        seq = self.seq
        held = {s.name: len(s) for s in seq.segments.segments} if seq is not None else None
        msgs = []
        for i, m in enumerate(self.messages):
            d = m.to_json()
            d.pop("alternatives")
            d["turn"] = i
            d["text"] = m.text
            d["alternatives"] = [
                {"text": a.text, "finish_reason": a.finish_reason, "has_steps": bool(a.steps)} for a in m.alternatives
            ]
            d["complete"] = m.alternatives[m.selected].finish_reason != "incomplete"
            if held is not None:
                kept = held.get(m.segment_name, 0) if m.in_context else 0
                d["tokens_in_cache"] = kept
                d["evicted_tokens"] = max(0, m.n_tokens - kept) if m.in_context else 0
            msgs.append(d)
        return {
            "id": self.id,
            "name": self.name,
            "system_prompt": self.system_prompt,
            "settings": self.settings.to_json(),
            "character": self.card.char_name if self.card is not None else None,
            "lorebook": self.lorebook_summary(),
            "messages": msgs,
            "cache": self.cache_stats(),
        }

    def lorebook_summary(self) -> dict | None:
        book = self.lorebook
        if book is None:
            return None
        live = {m.meta.get("entry") for m in self.messages if m.kind == "lore" and m.in_context}
        return {
            "name": book.name,
            "scan_depth": book.scan_depth,
            "entries": [
                {"id": e.id, "name": e.name, "keys": e.keys, "constant": e.constant, "active": e.id in live}
                for e in book.entries
            ],
        }

    def cache_stats(self) -> dict:
        seq = self.seq
        if seq is None:
            return {"resident": False}
        return {
            "resident": True,
            "tokens": seq.length,
            "budget": seq.budget,
            "policy": seq.policy.name,
            "evictions": seq.n_evictions,
            "evicted_tokens": seq.n_evicted,
            "bytes": seq.store.nbytes,
            "kv_format": kv_bytes(seq.store)[0],
        }

    def kv_map(self) -> dict:
        """The cache map: segments in slot order with kind, tokens, pinned, and the message they hold."""
        seq = self.ensure_cache()
        by_name = {m.segment_name: (i, m) for i, m in enumerate(self.messages)}
        fmt, per_token = kv_bytes(seq.store)
        segs = []
        for s in seq.segments.segments:
            turn, msg = by_name.get(s.name, (None, None))
            segs.append(
                {
                    "id": s.id,
                    "kind": s.kind,
                    "name": s.name,
                    "start": s.start,
                    "tokens": len(s),
                    "bytes": round(len(s) * per_token),
                    "pinned": s.pinned,
                    "turn": turn,
                    "label": msg.meta.get("name", "") if msg is not None else "",
                    "evicted": max(0, msg.n_tokens - len(s)) if msg is not None else 0,
                }
            )
        gone = [
            {"turn": i, "kind": m.kind, "tokens": m.n_tokens, "label": m.meta.get("name", "")}
            for i, m in enumerate(self.messages)
            if m.in_context and m.segment_name not in {s.name for s in seq.segments.segments}
        ]
        return {
            "length": seq.length,
            "budget": seq.budget,
            "free": seq.budget - seq.length,
            "policy": seq.policy.name,
            "kv_format": fmt,
            "bytes": seq.store.nbytes,  # allocated K/V memory
            "bytes_per_token": per_token,
            "segments": segs,
            "evicted_turns": gone,
            "evictions": seq.n_evictions,
            "evicted_tokens": seq.n_evicted,
        }

    def next_logits(self) -> torch.Tensor:
        """Next-token logits after the cached conversation (re-evaluates the last token if needed)."""
        if self._logits is None:
            seq = self.ensure_cache()
            if seq.length == 0:
                raise InfinichatError("the cache is empty: there is nothing to predict from")
            last = seq.token_ids()[-1]
            self._cut(seq.length - 1)
            self._logits = self.engine.prefill(seq, [last])
        return self._logits

    # ------------------------------------------------------------------ the cache
    def _chat_history(self, upto: int | None = None) -> list[dict]:
        """The conversation before message `upto` as the template sees it, for cutting the next message's
        pieces: the system message and the last few messages only, starting at a user message (the template
        renders a message from its neighbours; rendering the whole transcript would make every turn cost
        O(history))."""
        sys = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        upto = len(self.messages) if upto is None else upto
        window: list[Message] = []
        for i in range(upto - 1, -1, -1):  # newest first, no copy of the transcript
            m = self.messages[i]
            if m.in_context:
                window.append(m)
                if len(window) >= HISTORY_WINDOW and m.role == "user":
                    break
        return sys + [{"role": m.role, "content": m.content} for m in reversed(window)]

    def _new_sequence(self) -> KVSequence:
        s = self.settings
        return self.engine.new_sequence(budget=s.budget, policy=s.policy, **s.policy_params())

    @property
    def kv(self) -> KVSequence:
        """The resident KV sequence, for the steps that run after `ensure_cache` (a parked session has none)."""
        if self.seq is None:
            raise InfinichatError(f"session {self.id!r}: its cache is not resident (ensure_cache first)")
        return self.seq

    def ensure_cache(self) -> KVSequence:
        """The session's KV sequence, rebuilt from the transcript if it is not resident."""
        if self.seq is None:
            self.rebuild()
        self.last_used = time.monotonic()
        return self.kv

    def rebuild(self) -> None:
        """A fresh cache: the system part (from the prefix cache when possible), then every message."""
        self.seq = self._new_sequence()
        self._logits = None
        self._eval_system()
        self._eval_live_messages()

    def _eval_live_messages(self) -> None:
        """Evaluate the messages in the model's context after the system part (skipping the old ones the
        policy would evict at once)."""
        seq = self.kv
        live = [i for i, m in enumerate(self.messages) if m.in_context]
        first = 0
        if seq.policy.drops_tokens:  # skip turns the policy would evict anyway: rebuilds cost O(budget)
            room, first = (seq.budget - seq.length) * 3 // 4, len(live)
            while first > 0 and self.messages[live[first - 1]].n_tokens <= room:
                first -= 1
                room -= self.messages[live[first]].n_tokens
            first = min(first, max(0, len(live) - 1))
        for i in live[first:]:
            self._eval_message(i)

    def _eval_system(self) -> None:
        seq = self.kv
        ids = self.fmt.system_tokens(self.system_prompt)
        if not ids:
            return
        if len(ids) > seq.budget // 2:
            raise InfinichatError(
                f"the system prompt / character card is {len(ids)} tokens, more than half the budget of "
                f"{seq.budget}: raise the budget or shorten the card"
            )
        cache, key = self.prefix_cache, None
        if cache is not None:
            key = cache.key(ids)
            data = cache.get(key)
            if data is not None:
                try:
                    seq.restore(data)
                    if seq.token_ids() == ids:
                        return
                except InfinichatError as e:
                    log.warning("prefix cache entry unusable (%s); evaluating the system prompt", e)
                seq.truncate(0)
                seq.segments = type(seq.segments)()
        seq.create_segment("system", "system", pinned=True)
        self._logits = self.engine.prefill(seq, ids)
        seq.close_segment()
        if cache is not None:
            cache.put(key, seq.snapshot())

    def _segment(self, m: Message):
        for s in self.kv.segments.segments:
            if s.name == m.segment_name:
                return s
        return None

    def _message_tokens(self, i: int) -> tuple[list[int], int]:
        """All tokens of message i as it sits in the context (header, content, suffix)."""
        m = self.messages[i]
        hist = self._chat_history(i)
        if m.kind in GENERATED:
            header = self._gen_header(hist, m)
            alt = m.alternatives[m.selected]
            body = alt.tokens if alt.tokens is not None else self.fmt.encode_plain(alt.text)
            return header + body + self.fmt.encode_special(self.fmt.pieces(hist, m.role).suffix), len(header)
        return self.fmt.message_tokens(hist, m.role, m.content)

    def _eval_message(self, i: int) -> None:
        m = self.messages[i]
        ids, m.n_header = self._message_tokens(i)
        self.kv.create_segment(m.kind, m.segment_name)
        self._logits = self.engine.prefill(self.kv, ids)
        self.kv.close_segment()
        m.n_tokens = len(ids)

    def _cut(self, n: int) -> None:
        self.kv.truncate(n)
        self._logits = None

    def _cut_from_turn(self, turn: int) -> None:
        """Drop the cache from the first surviving segment of messages[turn:] on."""
        names = {m.segment_name for m in self.messages[turn:]}
        for s in self.kv.segments.segments:
            if s.name in names:
                self.kv.revert_to(s.id)
                self._logits = None
                return

    def _repair_from(self, turn: int) -> None:
        """After messages[turn:] changed: cut the cache there and re-evaluate what follows."""
        self.ensure_cache()
        self._cut_from_turn(turn)
        for i in range(turn, len(self.messages)):
            if self.messages[i].in_context and self._segment(self.messages[i]) is None:
                self._eval_message(i)

    def _changed(self) -> None:
        self.version += 1
        self.last_used = time.monotonic()
        if self.on_change is not None:
            self.on_change(self)

    def _new_message(self, kind: str, role: str, text: str) -> Message:
        m = Message(self.next_uid, kind, role, [Alternative(text)])
        self.next_uid += 1
        return m

    def _check_turn(self, turn: int, allow_end: bool = False) -> int:
        n = len(self.messages)
        hi = n if allow_end else n - 1
        if not isinstance(turn, int) or isinstance(turn, bool) or not 0 <= turn <= hi:
            raise InfinichatError(f"turn must be an integer in [0, {hi}] (this session has {n} messages), got {turn!r}")
        return turn

    @staticmethod
    def _check_text(text: str, what: str = "message") -> str:
        return check_text(text, what, MAX_MESSAGE_CHARS)

    # ------------------------------------------------------------------ generation
    def _gen_header(self, hist: list[dict], m: Message) -> list[int]:
        """Tokens before the generated content of m: the reply header, or a narration's header + prefix."""
        if m.kind == "assistant":
            return self._reply_header(hist)
        return self.fmt.encode_special(self.fmt.pieces(hist, m.role).header) + self.fmt.encode_plain(NARRATOR_PREFIX)

    def _reply_header(self, hist: list[dict]) -> list[int]:
        ids = self.fmt.encode_special(self.fmt.generation_header(hist))
        phi = self.card.post_history(self.settings.user_name) if self.card is not None else ""
        if phi:  # the card's post-history instructions sit right before each reply, inside its segment
            pre, _ = self.fmt.message_tokens(hist, "system", phi)
            ids = pre + ids
        return ids

    def _generate(
        self,
        m: Message,
        turn: int,
        header: list[int],
        body: list[int],
        params,
        should_stop,
        after: Callable[[], None] | None = None,
    ) -> Iterator[Event]:
        """Generate into message m's open segment, which holds a prefix of `header` + `body` (all but the last token,
        or less: the rest is evaluated here, in the generation's first forward call); append the new alternative
        text/tokens to `body`. Closes the segment consistently at the end."""
        seq = self.kv
        seg = seq.segments.open
        held = seq.length - seg.start if seg is not None else len(header) + len(body) - 1
        prompt = (header + body)[min(held, len(header) + len(body) - 1) :]
        history = seq.token_ids()  # the cache; generate adds the prompt
        result = Generation()
        logprobs: list[float] = []
        steps: list[list] = []
        alt = m.alternatives[m.selected]
        prior_text = alt.text
        chunks = stream_text(
            self.engine, self.tok, seq, prompt, params, history=history, should_stop=should_stop, result=result
        )
        if m.kind == "narration":  # a narration ends at a paragraph or where a character starts to speak
            chunks = self._bounded(chunks, result, ())
        try:
            for chunk in chunks:
                if chunk.step is not None:
                    st = chunk.step
                    logprobs.append(st.logprob)
                    steps.append([int(st.token), float(st.logprob), [[int(t), float(lp)] for t, lp in st.top]])
                    yield Event("token", chunk.text, st.token, st.logprob, st.top, turn)
                elif chunk.text:
                    yield Event("token", chunk.text, turn=turn)
        except GeneratorExit:
            result.finish_reason = "cancelled"
            raise
        finally:
            alt.text = prior_text + result.text
            alt.finish_reason = result.finish_reason
            alt.logprobs = alt.logprobs + logprobs
            gen = self._tokens_for(result)
            if [st[0] for st in steps[: len(gen)]] == gen:
                steps = steps[: len(gen)]  # a stop string or a speaker cut: only the tokens of the kept text
            alt.steps = alt.steps + steps
            alt.tokens = body + gen
            self._close_reply(m, turn, header, alt.tokens)
            if after is not None:
                after()
            self._make_headroom(params.max_tokens)
            self._changed()
        yield Event("done", turn=turn, finish_reason=result.finish_reason, message=m, text=alt.text)

    def _bounded(self, chunks: Iterator[TextChunk], result: Generation, own: tuple[str, ...]) -> Iterator[TextChunk]:
        """`chunks` up to a paragraph end or another speaker's line (see speakers.py); `result` is cut to match."""
        try:
            for chunk in chunks:
                emitted = len(result.text) - len(chunk.text)
                cut = speaker_cut(result.text, own)
                if cut is None:
                    yield chunk
                    continue
                part = result.text[emitted:cut] if cut > emitted else ""
                result.text = result.text[:cut].rstrip()
                result.finish_reason = "stop"
                yield TextChunk(part, chunk.step)
                return
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()

    def _tokens_for(self, result: Generation) -> list[int]:
        """The generated tokens that make exactly the final text (a stop string may have cut it)."""
        toks = list(result.tokens)
        while toks and self.tok.decode(toks, skip_special=True) != result.text:
            if len(self.tok.decode(toks, skip_special=True)) <= len(result.text):
                return self.fmt.encode_plain(result.text)
            toks.pop()
        return toks

    def _close_reply(self, m: Message, turn: int, header: list[int], body: list[int]) -> None:
        """Make m's open segment hold exactly header + body + the template's suffix, and close it."""
        seq = self.kv
        seg = seq.segments.open
        suffix = self.fmt.encode_special(self.fmt.pieces(self._chat_history(turn), m.role).suffix)
        want = header + body
        rest = suffix
        if seg is None:  # cannot happen while generating; be safe
            seg = seq.create_segment(m.kind, m.segment_name)
        have = seq.token_ids()[seg.start : seg.end]
        if have[: len(header)] == header:  # intact (a reply longer than the budget may have lost its start)
            p = 0
            while p < min(len(have), len(want)) and have[p] == want[p]:
                p += 1
            if p < len(have):
                self._cut(seg.start + p)  # e.g. the tokens of a stop string, or a token never evaluated
            rest = want[p:] + suffix
        if rest:
            self._logits = self.engine.prefill(seq, rest)
        seq.close_segment()
        m.n_header = len(header)
        m.n_tokens = len(header) + len(body) + len(suffix)

    def _make_headroom(self, max_tokens: int) -> None:
        """Evict now, while the user reads the reply, what the next turn would need evicted: the eviction
        cost (cut + re-rotation) then never lands in the next reply's time to first token."""
        seq = self.kv
        reserve = min(seq.budget // 4, max_tokens + 64)
        if seq.policy.drops_tokens and seq.budget - seq.length < reserve:
            seq.make_room(reserve)
            self._logits = None

    def _start_reply(
        self, kind: str, role: str, params, should_stop, after: Callable[[], None] | None = None
    ) -> Iterator[Event]:
        """Append a new message of `kind` and generate its content."""
        self.ensure_cache()
        m = self._new_message(kind, role, "")
        m.alternatives[0].finish_reason = "incomplete"
        header = self._gen_header(self._chat_history(), m)
        self.messages.append(m)
        turn = len(self.messages) - 1
        self.kv.create_segment(kind, m.segment_name)  # the header is evaluated with the generation's first call
        yield from self._generate(m, turn, header, [], params, should_stop, after)

    # ------------------------------------------------------------------ actions
    def send(self, text: str, params=None, should_stop=None) -> Iterator[Event]:
        """Add a user message and stream the reply."""
        self._check_text(text)
        params = params or self.settings.sampling()
        params.validate()
        self.ensure_cache()
        self.messages.append(self._new_message("user", "user", text))
        self._eval_message(len(self.messages) - 1)
        if not self.name:
            self.name = default_name(text)
        self._update_lore()  # entries whose keys just appeared enter the cache, stale ones leave it
        self._changed()  # the user's message is saved before the reply starts
        yield from self._start_reply("assistant", "assistant", params, should_stop)

    def add_message(self, kind: str, text: str) -> int:
        """Append a message without generating (a user message, or a greeting as an assistant message)."""
        self._check_text(text)
        roles = {"user": "user", "assistant": "assistant"}
        if kind not in roles:
            raise InfinichatError(f"add_message kind must be one of {', '.join(roles)}, got {kind!r}")
        self.ensure_cache()
        self.messages.append(self._new_message(kind, roles[kind], text))
        self._eval_message(len(self.messages) - 1)
        self._changed()
        return len(self.messages) - 1

    def retry(self, params=None, should_stop=None) -> Iterator[Event]:
        """A new reply to the last user message; earlier replies stay as alternatives. After a trailing user
        message (e.g. an interrupted reply), this generates its missing reply."""
        if not self.messages:
            raise InfinichatError("nothing to retry: the session has no messages")
        params = params or self.settings.sampling()
        params.validate()
        last = self.messages[-1]
        if last.kind == "user":
            self.ensure_cache()
            self._update_lore()  # the user's message as it is now (it may have been edited since)
            yield from self._start_reply("assistant", "assistant", params, should_stop)
            return
        if last.kind not in ("assistant", "narration"):
            raise InfinichatError(
                f"the last message is a {last.kind} message: only a reply or a narration can be retried"
            )
        self.ensure_cache()
        self._lore_before_last(own_text=False)
        turn = len(self.messages) - 1
        seg = self._segment(last)
        header, body = self._gen_header(self._chat_history(turn), last), list[int]()
        if (
            seg is None
            or seg.start + last.n_header > self.kv.length
            or self.kv.token_ids()[seg.start : seg.start + len(header)] != header
        ):
            self._cut_from_turn(turn)  # evicted or damaged: rebuild the header
            self.kv.create_segment(last.kind, last.segment_name)
            if len(header) > 1:
                self.engine.prefill(self.kv, header[:-1])
        else:
            self._cut(seg.start + len(header) - 1)
            self.kv.reopen_segment(seg.id)
        last.alternatives.append(Alternative("", finish_reason="incomplete"))
        last.selected = len(last.alternatives) - 1
        after = self._trim_narrations if last.kind == "narration" else None
        yield from self._generate(last, turn, header, body, params, should_stop, after)

    def select(self, turn: int, index: int) -> None:
        """Show alternative `index` of message `turn` (a "swipe"); the cache follows."""
        self._check_turn(turn)
        m = self.messages[turn]
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(m.alternatives):
            raise InfinichatError(
                f"alternative must be in [0, {len(m.alternatives) - 1}] for turn {turn}, got {index!r}"
            )
        if index == m.selected:
            return
        m.selected = index
        self._repair_from(turn)
        self._changed()

    def continue_(self, params=None, should_stop=None) -> Iterator[Event]:
        """Extend the last reply (or narration)."""
        if not self.messages or self.messages[-1].kind not in ("assistant", "narration"):
            raise InfinichatError("continue needs the last message to be a reply or a narration")
        params = params or self.settings.sampling()
        params.validate()
        self.ensure_cache()
        self._lore_before_last(own_text=True)
        turn = len(self.messages) - 1
        m = self.messages[turn]
        alt = m.alternatives[m.selected]
        header = self._gen_header(self._chat_history(turn), m)
        body = list(alt.tokens if alt.tokens is not None else self.fmt.encode_plain(alt.text))
        seg = self._segment(m)
        intact = (
            seg is not None
            and seg.end == self.kv.length
            and self.kv.token_ids()[seg.start : seg.start + len(header) + len(body)] == header + body
        )
        if intact and header + body:
            self._cut(seg.start + len(header) + len(body) - 1)
            self.kv.reopen_segment(seg.id)
        else:
            self._cut_from_turn(turn)
            self.kv.create_segment(m.kind, m.segment_name)
            if len(header + body) > 1:
                self.engine.prefill(self.kv, (header + body)[:-1])
        alt.tokens = body
        yield from self._generate(m, turn, header, body, params, should_stop)

    def narrate(self, params=None, should_stop=None) -> Iterator[Event]:
        """A narration in the narrator's voice; only the last `narrations_kept` stay in the cache."""
        params = params or self.settings.sampling()
        params = replace(params, max_tokens=min(params.max_tokens, self.settings.narrate_max_tokens))
        params.validate()
        self.ensure_cache()
        self._update_lore()  # the reply just given counts too
        yield from self._start_reply("narration", "system", params, should_stop, after=self._trim_narrations)

    def _trim_narrations(self) -> None:
        keep = self.settings.narrations_kept
        live = [m for m in self.messages if m.kind == "narration" and m.in_context]
        for m in live[: max(0, len(live) - keep)]:
            seg = self._segment(m)
            if seg is not None:
                self.kv.remove_segment(seg.id)
                self._logits = None
            m.in_context = False

    def _suggest_plan(self, params) -> tuple[SamplingParams, KVSequence, list[int], int]:
        """(params, cache, the user turn's header, tokens the draft's sequence reaches at most)."""
        params = params or self.settings.sampling()
        params = replace(params, max_tokens=min(params.max_tokens, self.settings.suggest_max_tokens))
        params.validate()
        seq = self.ensure_cache()
        header = self.fmt.encode_special(self.fmt.pieces(self._chat_history(), "user").header)
        return params, seq, header, seq.length + len(header) + params.max_tokens + 1

    def suggest_scratch(self, params=None) -> int:
        """Tokens the copy of the cache that `suggest` drafts in may reach (at most its capacity); 0 when it drafts
        in the cache itself, which has room for the draft. The server reserves that copy's KV memory first."""
        _, seq, _, need = self._suggest_plan(params)
        return 0 if need <= seq.budget else min(need, seq.store.capacity)

    def suggest(self, params=None, should_stop=None) -> Iterator[Event]:
        """Draft the user's next message. The cache afterwards is bit-identical to before."""
        params, seq, header, need = self._suggest_plan(params)
        in_place = need <= seq.budget
        work = seq if in_place else seq.fork()
        logits0, next_id = self._logits, seq.segments.next_id
        result = Generation()
        scratch = work.create_segment("scratch", "suggestion")
        try:
            if len(header) > 1:
                self.engine.prefill(work, header[:-1])
            chunks = stream_text(
                self.engine,
                self.tok,
                work,
                header[-1:],
                params,
                history=work.token_ids(),
                should_stop=should_stop,
                result=result,
            )
            for chunk in self._bounded(chunks, result, (self.settings.user_name,)):
                yield Event(
                    "token",
                    chunk.text,
                    *(
                        (chunk.step.token, chunk.step.logprob, chunk.step.top)
                        if chunk.step is not None
                        else (None, None, [])
                    ),
                )
        finally:
            if in_place:
                seq.revert_to(scratch.id)
                seq.segments.next_id = next_id  # the segment map too is exactly as before
                self._logits = logits0
        yield Event("done", text=result.text.strip(), finish_reason=result.finish_reason)

    def inject_rag(self, text: str) -> int:
        """Put retrieved text in the context, replacing the previous RAG segment. Returns its turn."""
        self._check_text(text, "RAG text")
        self.ensure_cache()
        for m in self.messages:
            if m.kind == "rag" and m.in_context:
                seg = self._segment(m)
                if seg is not None:
                    self.kv.remove_segment(seg.id)
                    self._logits = None
                m.in_context = False
        self.messages.append(self._new_message("rag", "system", text))
        self._eval_message(len(self.messages) - 1)
        self._changed()
        return len(self.messages) - 1

    def revert_to(self, turn: int) -> None:
        """The session as it was before message `turn`: messages[turn:] and their cache are dropped."""
        self._check_turn(turn, allow_end=True)
        self.ensure_cache()
        self._cut_from_turn(turn)
        del self.messages[turn:]
        self._changed()

    def edit(self, turn: int, text: str) -> None:
        """Replace a message's text; the cache is cut there and what follows is re-evaluated."""
        self._check_turn(turn)
        self._check_text(text)
        m = self.messages[turn]
        alt = m.alternatives[m.selected]
        alt.text, alt.tokens, alt.steps = text, None, []
        if alt.finish_reason == "incomplete":
            alt.finish_reason = "stop"
        self._repair_from(turn)
        self._changed()

    def delete(self, turn: int) -> None:
        """Remove a message; the cache is cut there and what follows is re-evaluated."""
        self._check_turn(turn)
        self.ensure_cache()
        self._cut_from_turn(turn)
        del self.messages[turn]
        self._repair_from(turn)
        self._changed()

    def reset(self) -> None:
        """Back to the start: the system part (and the card's greeting, if any)."""
        self.messages = []
        self.seq = None
        self.ensure_cache()
        self._update_lore()  # the book's constant entries
        self._add_greeting()
        self._changed()

    # ------------------------------------------------------------------ lorebook
    def _update_lore(self) -> None:
        """Scan the newest messages for the lorebook's keys: entries that match and are not in the cache enter
        it (one `lore` message each, at the end, in insertion order); entries that have not matched for
        `lore_ttl` user turns (or that left the book) have their tokens cut out of the cache (the keys after
        them re-rotated) and stay in the transcript only."""
        book = self.lorebook
        active = [m for m in self.messages if m.kind == "lore" and m.in_context]
        if book is None and not active:
            return
        self.ensure_cache()
        n_user = sum(m.kind == "user" for m in self.messages)
        recent = [m.text for m in self.messages if m.kind in SPOKEN]
        hits = book.matching(recent) if book is not None else []
        hit_ids, ttl = {e.id for e in hits}, self.settings.lore_ttl
        for m in active:
            entry = str(m.meta.get("entry"))
            if self._segment(m) is None:  # evicted by the budget policy: out, free to enter again
                m.in_context = False
            elif entry in hit_ids:
                _seen(m, n_user)
            elif book is None or book.get(entry) is None or n_user - int(m.meta.get("seen", 0)) >= ttl:
                self._drop_from_cache(m)
        self._enter_lore(hits, n_user)

    def _enter_lore(self, hits: list, n_user: int) -> None:
        """The entries of `hits` not in the cache yet enter it: one `lore` message each, at the end."""
        present = {str(m.meta.get("entry")) for m in self.messages if m.kind == "lore" and m.in_context}
        user = self.settings.user_name
        for e in hits:
            if e.id in present:
                continue
            text = self._render(e.content, user)
            m = self._new_message("lore", "system", text)
            m.meta = {"entry": e.id, "name": e.name, "seen": n_user}
            self.messages.append(m)
            self._eval_message(len(self.messages) - 1)

    def _lore_before_last(self, own_text: bool) -> None:
        """Before the last message (a reply or a narration) is generated again (`own_text` False: a retry, whose
        old text is being replaced and does not count) or extended (True: a continue, whose text so far counts):
        scan the transcript as it is now (an edited message counts with its new text) and let the entries it
        triggers enter the cache before that message, whose tokens are cut and evaluated again after them.
        Entries in the cache that still match count as seen this turn. One seen this turn that no longer matches
        (its key was edited away) goes back to when it was seen before, and leaves if that is `lore_ttl` user
        turns ago or if it entered this turn."""
        book = self.lorebook
        if book is None:
            return
        last = self.messages[-1]
        recent = [m.text for m in self.messages[:-1] if m.kind in SPOKEN] + ([last.text] if own_text else [])
        hits = book.matching(recent)
        n_user = sum(m.kind == "user" for m in self.messages)
        hit_ids = {e.id for e in hits}
        live = {str(m.meta.get("entry")): m for m in self.messages if m.kind == "lore" and m.in_context}
        stale = []
        for entry, m in live.items():
            if entry in hit_ids:
                _seen(m, n_user)
            elif int(m.meta.get("seen", -1)) == n_user:  # seen this turn, for a text that is gone
                prev = m.meta.pop("prev_seen", None)
                if prev is None or n_user - int(prev) >= self.settings.lore_ttl:
                    stale.append(m)
                else:
                    m.meta["seen"] = int(prev)
        if not stale and all(e.id in live for e in hits):
            return
        self._cut_from_turn(len(self.messages) - 1)  # the last message's tokens leave; it is evaluated after the lore
        self.messages.pop()
        try:
            for m in stale:
                self._drop_from_cache(m)
            self._enter_lore(hits, n_user)
        finally:
            self.messages.append(last)

    def _render(self, text: str, user: str) -> str:
        """A lorebook text with `{{char}}` / `{{user}}` filled in."""
        return substitute(text, self.card.char_name if self.card is not None else "Assistant", user)

    def _drop_from_cache(self, m: Message) -> None:
        """Cut message m's tokens out of the cache (later keys re-rotated); it stays in the transcript."""
        seg = self._segment(m)
        if seg is not None:
            self.kv.remove_segment(seg.id, recompute=self.settings.lore_recompute)
            self._logits = None
        m.in_context = False

    def set_lorebook(self, book: Lorebook | None) -> None:
        """Attach (or with None, detach) a lorebook: it is scanned from the next message on; entries of the old
        book that are not in the new one leave the cache now."""
        self.lorebook = book
        self._update_lore()
        self._changed()

    # ------------------------------------------------------------------ names, system prompt
    def rename(self, name: str) -> None:
        self.name = check_text(name, "session name", MAX_NAME_CHARS, allow_empty=False).strip() or self.name
        self._changed()

    def set_system_prompt(self, text: str | None) -> None:
        """Replace the system prompt (a card's is replaced too); the cache is cut at its first changed token and
        everything after it is re-evaluated."""
        if text is not None:
            self._check_text(text, "system prompt")
        self._resystem(text or None)
        self._changed()

    def _resystem(self, text: str | None) -> None:
        old_ids = self.fmt.system_tokens(self.system_prompt)
        new_ids = self.fmt.system_tokens(text)
        self.system_prompt = text
        seq = self.seq
        if seq is None:
            return
        if len(new_ids) > seq.budget // 2:
            raise InfinichatError(
                f"the system prompt is {len(new_ids)} tokens, more than half the budget of {seq.budget}: "
                "raise the budget or shorten it"
            )
        segs = seq.segments.segments
        sys_seg = segs[0] if segs and segs[0].kind == "system" else None
        if (sys_seg is None and old_ids) or seq.token_ids()[: len(old_ids)] != old_ids:
            self.seq = None  # the cache does not start as expected: rebuild it all
            self.rebuild()
            return
        p = 0
        while p < min(len(old_ids), len(new_ids)) and old_ids[p] == new_ids[p]:
            p += 1
        if p == len(old_ids) == len(new_ids):
            return
        self._cut(p)  # drops every message segment; keeps the system segment's first p tokens
        if seq.segments.segments:
            seq.reopen_segment(seq.segments.segments[0].id)
        elif new_ids:
            seq.create_segment("system", "system", pinned=True)
        if new_ids[p:]:
            self._logits = self.engine.prefill(seq, new_ids[p:])
        seq.close_segment()
        self._eval_live_messages()

    def _rerender_user(self, old: str, new: str) -> int | None:
        """`{{user}}` became `new`: re-render what a card or lorebook wrote with it (system prompt, greetings,
        lore entries) where the text is still as rendered for `old`. Returns the first changed turn."""
        card = self.card
        first, greeting = None, True
        for i, m in enumerate(self.messages):
            greeting = greeting and m.kind != "user"
            if m.kind == "assistant" and greeting and card is not None:
                was, now = card.greetings(old), card.greetings(new)
                for a in m.alternatives:
                    if a.text in was:
                        text = now[was.index(a.text)]
                        if text != a.text:
                            a.text, a.tokens, a.steps = text, None, []
                            first = i if first is None else first
            elif m.kind == "lore" and self.lorebook is not None:
                e = self.lorebook.get(str(m.meta.get("entry")))
                if e is not None and m.text == self._render(e.content, old):
                    text = self._render(e.content, new)
                    if text != m.text:
                        m.alternatives[m.selected].text, m.alternatives[m.selected].tokens = text, None
                        first = i if first is None else first
        if card is not None and card.post_history(old) != card.post_history(new):  # in every reply's header
            replies = [i for i, m in enumerate(self.messages) if m.kind == "assistant"]
            if replies:
                first = replies[0] if first is None else min(first, replies[0])
        return first

    def _add_greeting(self, index: int = 0) -> None:
        if self.card is None:
            return
        greetings = self.card.greetings(self.settings.user_name)
        if greetings:
            m = self._new_message("assistant", "assistant", greetings[0])
            m.alternatives += [Alternative(g) for g in greetings[1:]]
            self.messages.append(m)
            self._eval_message(len(self.messages) - 1)

    def update_settings(self, changes: dict) -> SessionSettings:
        """Apply setting changes; a new budget or policy rebuilds the cache (from the old one when it fits)."""
        new = self.settings.updated(changes)
        if "budget" in changes:
            check_budget(new.budget, self.max_budget)
        old = self.settings
        self.settings = new
        if new.user_name != old.user_name:
            first = self._rerender_user(old.user_name, new.user_name)
            card = self.card
            prompt = card.chat_system_prompt(new.user_name) if card is not None else self.system_prompt
            if (
                card is not None
                and self.system_prompt == card.chat_system_prompt(old.user_name)
                and prompt != self.system_prompt
            ):
                self._resystem(prompt)  # re-evaluates every message after it too
            elif first is not None:
                self._repair_from(first)
        if self.seq is not None and (new.budget, new.policy, new.n_sink) != (old.budget, old.policy, old.n_sink):
            seq = self._new_sequence()
            if self.seq.length <= seq.budget:
                seq.restore(self.seq.snapshot())
                self.seq = seq
            else:
                self.seq = None
                self.rebuild()
        self._changed()
        return new


def kv_bytes(store) -> tuple[str, float]:
    """(format, bytes per cached token) of a KV store: a torch store's dtype name / int8 / int4 and its nominal
    size per token; another backend's store ("llama.cpp"): its memory over its capacity."""
    fmt = getattr(store, "kv_format", None)
    if fmt is None:
        return "llama.cpp", store.nbytes / max(1, store.capacity)
    return fmt, bytes_per_token(store.cfg, fmt)


def _seen(m: Message, n_user: int) -> None:
    """Lore message m's entry matched at user turn n_user (the turn before is kept: an edit may take it back)."""
    if m.meta.get("seen") != n_user:
        m.meta["prev_seen"] = m.meta.get("seen")
    m.meta["seen"] = n_user
