"""Many sessions over one engine: create / get / list / delete, persistence, and a cap on resident KV memory.

Every change of a session is saved to the store at once (see `db.py`). The KV caches of the sessions in memory
count against `kv_cap_bytes`; when they pass it, the least recently used sessions' caches are written to
`kv/<id>.kv` (or the `kv_dir`) and freed. The next request for such a session restores its cache from that file
(or, if the file is missing or belongs to an older version of the session, e.g. after a crash, rebuilds it from the
transcript), so eviction from memory is invisible except for the time it takes.

Not thread-safe by itself: the server's single engine worker calls it (read-only listing is safe).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol, TypeVar

from infinichat.errors import DamagedSessionError, InfinichatError, OverloadedError, StorageError
from infinichat.session.cards import CharacterCard, load_card
from infinichat.session.chatformat import ChatFormat
from infinichat.session.db import SessionDB, check_session_id, damaged
from infinichat.session.limits import MAX_MESSAGE_CHARS, MAX_NAME_CHARS, check_image, check_text
from infinichat.session.lore import Lorebook, load_lorebook
from infinichat.session.prefix_cache import PrefixCache
from infinichat.session.session import Memento, Message, Session, default_name
from infinichat.session.settings import MAX_BUDGET, SessionSettings, check_budget
from infinichat.session.transfer import parse_chat

T = TypeVar("T")


class SpareKV(Protocol):
    """Other KV memory that counts against the cap (the server's cache of anonymous /v1 prompts)."""

    @property
    def nbytes(self) -> int: ...  # all of it, in use or idle

    @property
    def busy_bytes(self) -> int: ...  # the part in use by running generations

    def drop_idle(self) -> bool: ...  # free one idle sequence; False when none is left


class _Held:
    """Reserved KV bytes (SpareKV), in use until released."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = self.busy_bytes = nbytes

    def drop_idle(self) -> bool:
        return False


log = logging.getLogger(__name__)


def kv_bytes_per_token(engine) -> int:
    """Bytes of KV memory one cached token takes in `engine`'s stores (0 when the engine does not say)."""
    import torch

    from infinichat.kv.quantized import bytes_per_token

    cfg = getattr(engine, "cfg", None)
    if cfg is None:
        return 0
    dtype = getattr(getattr(engine, "model", None), "dtype", torch.float32)
    return int(bytes_per_token(cfg, getattr(engine, "kv_format", str(dtype))))


def kv_bytes_at(engine, n: int, capacity: int) -> int:
    """Bytes of KV memory a store of `engine` with room for `capacity` tokens takes once it holds `n` of them: its
    buffers start at INITIAL_SLOTS and double up to the capacity (kv/store.py), so this is what a request that may
    reach n tokens reserves. Exact for dense and int8 stores; an int4 store's full-precision residual rows are not
    counted (0 when the engine does not say its bytes per token)."""
    from infinichat.kv.store import INITIAL_SLOTS, grown_size

    capacity = max(1, capacity)
    slots = grown_size(min(capacity, INITIAL_SLOTS), min(max(1, n), capacity), capacity)
    return kv_bytes_per_token(engine) * slots


def fit_budget(n_system: int, default: int, cap: int) -> int:
    """A budget for a session whose system part (prompt or card) is `n_system` tokens: the default, or for a
    long card room for the card and as much conversation again (at least 1024 tokens), in steps of 256,
    within the server's cap. A system part of at most half the default keeps the default (`serve --budget 512`:
    sessions without one, or with a one-line system prompt, got 1024 or 1280)."""
    if 2 * n_system <= default:
        return default
    need = max(2 * n_system + 1, n_system + 1024)
    need = -(-need // 256) * 256
    return max(64, min(cap, max(default, need)))


def _mib(nbytes: int) -> str:
    if nbytes < 1 << 20:
        return f"{-(-nbytes // 1024)} KiB"
    return f"{nbytes / (1 << 20):.1f} MiB" if nbytes < 10 << 20 else f"{-(-nbytes // (1 << 20))} MiB"


def default_data_dir() -> Path:
    env = os.environ.get("INFINICHAT_DATA")
    if env:
        return Path(env)
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "infinichat"


class SessionManager:
    def __init__(
        self,
        engine,
        tokenizer,
        model_id: str,
        data_dir: str | Path | None = None,
        defaults: SessionSettings | None = None,
        kv_cap_bytes: int = 1 << 30,
        chat_template: str | None = None,
        max_budget: int | None = None,
        kv_limit_bytes: int | None = None,
        db_url: str | None = None,
        kv_dir: str | Path | None = None,
        shared: bool = False,
    ):
        """`db_url`: the session database (None: SQLite in the data directory; postgresql://... for a cluster);
        `kv_dir`: where idle KV caches are written (default: the data directory's kv/); `shared`: other
        processes (the replicas of a cluster) may change the sessions in the store, so a session held in memory
        is checked against the store's version before each use."""
        self.engine = engine
        self.tok = tokenizer
        self.db = SessionDB(data_dir or default_data_dir(), db_url, kv_dir)
        self.defaults = (defaults or SessionSettings()).validate()
        self.kv_cap_bytes = kv_cap_bytes  # past it, idle caches go to disk
        # past it, a new generation is refused (503) while running ones hold the memory: RSS stays bounded
        self.kv_limit_bytes = kv_limit_bytes if kv_limit_bytes is not None else 2 * kv_cap_bytes
        cfg = getattr(engine, "cfg", None)
        trained = getattr(cfg, "max_position", None)
        # the largest budget a client may ask for: by default the trained context (positions never pass it)
        self.max_budget = max_budget or min(MAX_BUDGET, trained if isinstance(trained, int) else MAX_BUDGET)
        self.spare: list[SpareKV] = []  # other KV memory counted in the cap
        self.fmt = ChatFormat(tokenizer, chat_template)
        # the KV of a prefix depends on the model file, the backend and the KV dtype
        kv_format = getattr(engine, "kv_format", None) or getattr(getattr(engine, "model", None), "dtype", "")
        kv_id = f"{model_id}:{type(engine).__name__}:{kv_format}"  # kv_format: torch.bfloat16, int8, int4, ...
        self.prefix = PrefixCache(self.db.dir / "prefix", kv_id)
        self.model_id = model_id
        self.sessions: dict[str, Session] = {}  # loaded (their KV may or may not be resident)
        self._saved: dict[str, list[tuple]] = {}  # per session: the fingerprints of the message rows on disk
        self.pinned: set[str] = set()  # sessions whose cache must stay resident (a generation is running)
        self.n_offloads = 0
        self.n_restores = 0
        self.shared = shared
        self.n_stale = 0  # cluster: copies in memory found older than the store (another replica moved on)
        self.kv_peak_bytes = 0  # the most KV memory counted when a generation or a reservation began (/metrics)

    # ------------------------------------------------------------------ lifecycle
    def create(
        self,
        sid: str | None = None,
        name: str = "",
        system_prompt: str | None = None,
        card: CharacterCard | dict | bytes | str | None = None,
        settings: dict | None = None,
        lorebook: Lorebook | dict | str | None = None,
        user_avatar: bytes | None = None,
    ) -> Session:
        """A new session. All or nothing: if any part fails (a system prompt over the budget, a full disk),
        nothing of it is left behind, in memory or on disk. Without a budget in `settings`, a long card gets
        one that fits it (see `fit_budget`); a PNG card's image becomes the character's avatar."""
        sid = check_session_id(sid) if sid is not None else secrets.token_hex(6)
        if sid in self.sessions or self.db.exists(sid):
            raise InfinichatError(f"a session named {sid!r} already exists")
        check_text(name, "session name", MAX_NAME_CHARS)
        st = self.defaults.updated(settings) if settings else self.defaults
        if settings and "budget" in settings:
            check_budget(st.budget, self.max_budget)
        image = bytes(card) if isinstance(card, (bytes, bytearray)) and bytes(card).startswith(b"\x89PNG") else None
        if card is not None and not isinstance(card, CharacterCard):
            card = load_card(card)
        if user_avatar is not None:
            check_image(user_avatar, "user avatar")
        book = lorebook if isinstance(lorebook, Lorebook) or lorebook is None else load_lorebook(lorebook)
        if system_prompt is not None:
            check_text(system_prompt, "system prompt", MAX_MESSAGE_CHARS)
        if card is not None:
            system_prompt = card.chat_system_prompt(st.user_name)
            name = name or card.char_name
            check_text(system_prompt, "character card's system prompt", MAX_MESSAGE_CHARS)
            check_text(name, "session name", MAX_NAME_CHARS)
            for i, g in enumerate(card.greetings(st.user_name)):  # a PNG card's JSON may escape lone surrogates
                check_text(g, f"character card's greeting {i}", MAX_MESSAGE_CHARS)
            check_text(card.post_history(st.user_name), "character card's post-history instructions")
            if card.character_book:
                own = load_lorebook(card.character_book, card.name)
                book = own if book is None else own.merged(book)
        if not (settings and "budget" in settings):
            n_sys = len(self.fmt.system_tokens(system_prompt)) if system_prompt else 0
            st = st.updated({"budget": fit_budget(n_sys, st.budget, self.max_budget)})
        s = self._session(sid, name, system_prompt, st, card, register=False)
        s.lorebook = book
        try:
            self.sessions[sid] = s
            s.reset()  # system part (from the prefix cache when seen before) and the card's greeting
            self.db.write_avatar(sid, "char", image)
            self.db.write_avatar(sid, "user", user_avatar)
            self._enforce_cap(keep=s)
        except BaseException:
            self._forget(sid)
            raise
        return s

    def import_chat(self, data, sid: str | None = None, name: str = "") -> Session:
        """A new session from an exported chat (see transfer.py), its cache evaluated. All or nothing."""
        imp = parse_chat(data)
        known = set(self.defaults.to_json())
        settings = {k: v for k, v in imp.settings.items() if k in known}
        if isinstance(settings.get("budget"), int) and settings["budget"] > self.max_budget:
            del settings["budget"]  # made on a server with a larger cap: a budget that fits is chosen
        if isinstance(settings.get("dry_sequence_breakers"), list):
            settings["dry_sequence_breakers"] = tuple(settings["dry_sequence_breakers"])
        prompt = imp.system_prompt
        s = self.create(sid, name or imp.name, prompt, imp.card, settings or None, imp.lorebook)
        try:
            if imp.card is not None and prompt is not None and prompt != s.system_prompt:
                s.system_prompt = check_text(prompt, "system prompt", MAX_MESSAGE_CHARS)
            vocab = getattr(self.tok, "vocab_size", None)
            for m in imp.messages:
                m.uid, s.next_uid = s.next_uid, s.next_uid + 1
                for a in m.alternatives:  # exported tokens are kept only if this tokenizer reads them as the text
                    if a.tokens is not None and (
                        (isinstance(vocab, int) and any(not 0 <= t < vocab for t in a.tokens))
                        or self.tok.decode(a.tokens, skip_special=True) != a.text
                    ):
                        a.tokens = None
            s.messages = imp.messages
            s.seq = None
            s.rebuild()
            if not s.name:
                first = next((m.text for m in s.messages if m.kind == "user"), "")
                s.name = default_name(first) if first else ""
            s._changed()
        except BaseException:
            self._forget(s.id)
            raise
        return s

    def inspect(self, card=None, system_prompt: str | None = None, user_name: str | None = None) -> dict:
        """What a create with this card (or system prompt) would get: its token count and the budget."""
        user = user_name or self.defaults.user_name
        check_text(user, "user name", 64)
        info: dict = {"name": None, "greetings": 0, "lore_entries": 0}
        if card is not None:
            c = card if isinstance(card, CharacterCard) else load_card(card)
            system_prompt = c.chat_system_prompt(user)
            info.update(
                name=c.char_name,
                greetings=len(c.greetings(user)),
                lore_entries=len(load_lorebook(c.character_book).entries) if c.character_book else 0,
            )
        if system_prompt is not None:
            check_text(system_prompt, "system prompt", MAX_MESSAGE_CHARS)
        n = len(self.fmt.system_tokens(system_prompt)) if system_prompt else 0
        return {
            **info,
            "system_tokens": n,
            "budget": fit_budget(n, self.defaults.budget, self.max_budget),
            "default_budget": self.defaults.budget,
            "max_budget": self.max_budget,
            "fits": 2 * n < self.max_budget,
        }

    def _forget(self, sid: str) -> None:
        """Remove every trace of a session that failed to be created."""
        self.sessions.pop(sid, None)
        self._saved.pop(sid, None)
        try:
            self.db.delete(sid)
        except StorageError as e:
            log.error("session %s: its failed creation could not be undone on disk: %s", sid, e)

    # ------------------------------------------------------------------ all or nothing
    @contextlib.contextmanager
    def atomic(self, s: Session, memo: Memento | None = None) -> Iterator[Session]:
        """Run an action on `s`: if it raises, the session is put back as it was, in memory and on disk."""
        memo = memo or s.memento()
        try:
            yield s
        except BaseException:
            self.roll_back(s, memo)
            raise

    def guarded(self, s: Session, items: Iterator[T], memo: Memento | None = None) -> Iterator[T]:
        """A generating action's items; if it fails before its first item, the session is put back as it was
        (after that, the partial reply is kept like a cancelled one: the session's generation saves it)."""
        memo = memo or s.memento()
        started = False
        try:
            for item in items:
                started = True
                yield item
        except Exception:
            if not started:
                self.roll_back(s, memo)
            raise

    def roll_back(self, s: Session, memo: Memento) -> None:
        saved = s.version != memo.version  # the failed action saved a part of itself
        version = s.version
        s.restore(memo)
        if s.id not in self.sessions:
            return
        if saved:  # write the old state back, under a new version (no KV file of the failed state is valid)
            s.version = version + 1
            try:
                self._save(s)
            except StorageError as e:
                log.error("session %s: could not write back its state after a failed action: %s", s.id, e)
        log.info("session %s: a failed action was rolled back", s.id)

    def check_room(self, s: Session | None = None) -> None:
        """Before a generation: offload idle caches down to the cap, then refuse it (OverloadedError) if the KV
        memory still resident (held by other running generations) is over the hard limit, rather than letting
        memory grow."""
        self._enforce_cap(keep=s)
        busy = [x for x in self.sessions.values() if x.seq is not None and x.id in self.pinned and x is not s]
        busy_bytes = sum(int(getattr(x.seq.store, "nbytes", 0)) for x in busy if x.seq is not None)
        busy_bytes += sum(sp.busy_bytes for sp in self.spare)
        self.kv_peak_bytes = max(self.kv_peak_bytes, self.total_kv_bytes())
        if busy_bytes > 0 and self.total_kv_bytes() > self.kv_limit_bytes:
            raise OverloadedError(
                f"the server's KV memory is in use by running generations ({self.total_kv_bytes() >> 20} MiB, "
                f"limit {self.kv_limit_bytes >> 20} MiB: serve --kv-limit-mb); retry when they finish"
            )

    def reserve(self, nbytes: int, what: str, per_token: int = 0) -> None:
        """Before `nbytes` of KV memory outside the sessions is allocated (a temporary or anonymous sequence,
        `what`): idle caches are offloaded until it fits under the cap with what stays resident; refused with an
        error that says so when it is more than the hard limit on its own (InfinichatError: a 400; `per_token`:
        the bytes of one token, to say how many fit), or when with the caches of running generations it would pass
        that limit (OverloadedError: a 503, retry later). The caller counts the bytes (a SpareKV) from here on."""
        if nbytes > self.kv_limit_bytes:
            fit = f" (about {self.kv_limit_bytes // per_token} tokens)" if per_token else ""
            raise InfinichatError(
                f"{what} needs {_mib(nbytes)} of KV memory, more than this server's limit of "
                f"{_mib(self.kv_limit_bytes)}{fit} (serve --kv-limit-mb); send a shorter prompt or fewer tokens"
            )
        self._enforce_cap(keep=None, extra=nbytes)
        total = self.total_kv_bytes()
        if total + nbytes > self.kv_limit_bytes:
            raise OverloadedError(
                f"{what} needs {_mib(nbytes)} of KV memory; with the caches of running generations "
                f"({_mib(total)}) that passes the limit of {_mib(self.kv_limit_bytes)} "
                "(serve --kv-limit-mb); retry when they finish"
            )
        self.kv_peak_bytes = max(self.kv_peak_bytes, total + nbytes)

    @contextlib.contextmanager
    def reserved(self, nbytes: int, what: str, per_token: int = 0) -> Iterator[None]:
        """`reserve`, then the bytes counted in the cap and the limit until the block ends (a temporary sequence
        the caller cannot hand over, e.g. a copy a session makes inside an action)."""
        self.reserve(nbytes, what, per_token)
        held = _Held(nbytes)
        self.spare.append(held)
        try:
            yield
        finally:
            self.spare.remove(held)

    def total_kv_bytes(self) -> int:
        return self.resident_bytes() + sum(sp.nbytes for sp in self.spare)

    def _session(self, sid, name, system_prompt, settings, card, register: bool = True) -> Session:
        s = Session(
            sid,
            self.engine,
            self.tok,
            name=name,
            system_prompt=system_prompt or None,
            settings=settings,
            card=card,
            chat_format=self.fmt,
            prefix_cache=self.prefix,
            on_change=self._save,
            max_budget=self.max_budget,
        )
        if register:
            self.sessions[sid] = s
        return s

    def get(self, sid: str) -> Session:
        """A session by id (loaded from disk if needed; its KV is made resident)."""
        check_session_id(sid)
        s = self.sessions.get(sid)
        if s is not None and self.shared and sid not in self.pinned and self.db.version(sid) != s.version:
            # another replica served it meanwhile (a failover, an ingress restart): the store is the truth
            log.info("session %s: the copy in memory is stale; reloading it from the store", sid)
            self.n_stale += 1
            self.sessions.pop(sid, None)
            self._saved.pop(sid, None)
            s = None
        if s is None:
            s = self._load(sid)
        if s.seq is None:
            self._restore_kv(s)
        s.last_used = time.monotonic()
        self._enforce_cap(keep=s)
        return s

    def list(self) -> list[dict]:
        out = self.db.list()
        for d in out:
            s = self.sessions.get(d["id"])
            d["resident"] = s is not None and s.seq is not None
        return out

    def delete(self, sid: str) -> None:
        check_session_id(sid)
        if sid not in self.sessions and not self.db.exists(sid):
            raise InfinichatError(f"no session {sid!r}")
        self.sessions.pop(sid, None)
        self._saved.pop(sid, None)
        self.db.delete(sid)

    def close(self) -> None:
        """Write every resident cache to disk (a clean shutdown restarts without re-evaluating)."""
        for s in list(self.sessions.values()):
            if s.seq is not None:
                self._offload(s)
        self.db.close()

    # ------------------------------------------------------------------ persistence
    def _save(self, s: Session) -> None:
        row = {
            "id": s.id,
            "name": s.name,
            "created": s.created,
            "version": s.version,
            "system_prompt": s.system_prompt,
            "card": s.card.to_json_dict() if s.card is not None else None,
            "settings": s.settings.to_json(),
            "next_uid": s.next_uid,
            "segments": s.seq.segments.to_json() if s.seq is not None else None,
            "lorebook": s.lorebook.to_json() if s.lorebook is not None else None,
        }
        # a reply still being generated is saved when it ends, never half-written
        done = [m for m in s.messages if m.alternatives[m.selected].finish_reason != "incomplete" or m.kind == "user"]
        prints = [m.fingerprint() for m in done]
        old = self._saved.get(s.id, [])
        changed = [
            (i, m.to_json())
            for i, (m, fp) in enumerate(zip(done, prints, strict=True))
            if i >= len(old) or old[i] != fp
        ]
        self.db.save(row, changed, len(done))  # only the rows that changed: a turn costs O(1), not O(history)
        self._saved[s.id] = prints

    def _load(self, sid: str) -> Session:
        got = self.db.load(sid)
        if got is None:
            raise InfinichatError(f"no session {sid!r}")
        row, msgs = got
        what = "its settings or card"
        try:  # everything parsed before the session is registered: a damaged one is refused, never half-loaded
            card = load_card(row["card"]) if row["card"] else None
            settings = SessionSettings.from_json(row["settings"] or {})
            s = self._session(sid, row["name"], row["system_prompt"], settings, card, register=False)
            s.lorebook = load_lorebook(row["lorebook"]) if row.get("lorebook") else None
            s.created = float(row["created"])
            messages = []
            for i, d in enumerate(msgs):
                what = f"message {i}"
                m = Message.from_json(d)
                if not m.alternatives or not 0 <= m.selected < len(m.alternatives):
                    raise ValueError("no alternative to show")
                messages.append(m)
            s.messages = messages
            s.next_uid = max([int(row["next_uid"]), *(m.uid + 1 for m in s.messages)])
            s.version = int(row["version"])
        except (KeyError, TypeError, ValueError, AttributeError, InfinichatError) as e:
            reason = f"{type(e).__name__}: {e}" if not isinstance(e, InfinichatError) else str(e)
            raise DamagedSessionError(damaged(sid, f"{what}: {reason[:200]}")) from None
        self._saved[sid] = [m.fingerprint() for m in s.messages]
        for m in s.messages:  # an alternative interrupted by a crash (saved incomplete) stays, marked
            for a in m.alternatives:
                if a.finish_reason == "incomplete" and m.kind != "user":
                    a.finish_reason = "interrupted"
        self.sessions[sid] = s
        return s

    def _offload(self, s: Session) -> None:
        try:
            s.kv.save(self.db.kv_path(s.id), {"version": s.version, "session": s.id})  # atomic
        except OSError as e:  # a full or read-only disk: the cache is dropped (rebuilt from the transcript)
            log.warning("session %s: cannot write its KV file (%s); it will be rebuilt when used", s.id, e)
            self.db.kv_path(s.id).with_suffix(".kv.tmp").unlink(missing_ok=True)
        s.seq = None
        s._logits = None
        self.n_offloads += 1

    def _restore_kv(self, s: Session) -> None:
        path = self.db.kv_path(s.id)
        if path.exists():
            seq = s._new_sequence()
            try:
                extra = seq.load(path)
                if extra.get("version") == s.version and extra.get("session") == s.id:
                    s.seq = seq
                    self.n_restores += 1
                    return
                log.info(
                    "session %s: its KV file is for version %s, the session is at %s; rebuilding",
                    s.id,
                    extra.get("version"),
                    s.version,
                )
            except InfinichatError as e:
                log.warning("session %s: cannot restore its KV (%s); rebuilding from the transcript", s.id, e)
        s.rebuild()

    def resident_bytes(self) -> int:
        return sum(s.seq.store.nbytes for s in self.sessions.values() if s.seq is not None)

    def _enforce_cap(self, keep: Session | None, extra: int = 0) -> None:
        """Offload idle caches (anonymous ones first, then the least recently used sessions but `keep`) until the
        resident KV memory plus `extra` bytes about to be allocated is within the cap."""
        resident = sorted(
            (s for s in self.sessions.values() if s.seq is not None and s is not keep and s.id not in self.pinned),
            key=lambda s: s.last_used,
        )
        cap = self.kv_cap_bytes - extra
        total = self.total_kv_bytes()
        for sp in self.spare:  # idle anonymous caches go first: they are only a speed-up
            while total > cap and sp.drop_idle():
                total = self.total_kv_bytes()
        for s in resident:
            if total <= cap:
                break
            total -= s.kv.store.nbytes
            self._offload(s)
