"""Many sessions over one engine: create / get / list / delete, persistence, and a cap on resident KV memory.

Every change of a session is saved to SQLite at once (see `db.py`). The KV caches of the sessions in memory
count against `kv_cap_bytes`; when they pass it, the least recently used sessions' caches are written to
`kv/<id>.kv` and freed. The next request for such a session restores its cache from that file (or, if the
file is missing or belongs to an older version of the session, e.g. after a crash, rebuilds it from the
transcript), so eviction from memory is invisible except for the time it takes.

Not thread-safe by itself: the server's single engine worker calls it (read-only listing is safe).
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from pathlib import Path

from infinichat.errors import InfinichatError
from infinichat.session.cards import CharacterCard, load_card
from infinichat.session.chatformat import ChatFormat
from infinichat.session.db import SessionDB, check_session_id
from infinichat.session.prefix_cache import PrefixCache
from infinichat.session.session import Message, Session
from infinichat.session.settings import SessionSettings

log = logging.getLogger(__name__)


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
    ):
        self.engine = engine
        self.tok = tokenizer
        self.db = SessionDB(data_dir or default_data_dir())
        self.defaults = (defaults or SessionSettings()).validate()
        self.kv_cap_bytes = kv_cap_bytes
        self.fmt = ChatFormat(tokenizer, chat_template)
        # the KV of a prefix depends on the model file, the backend and the KV dtype
        kv_id = f"{model_id}:{type(engine).__name__}:{getattr(getattr(engine, 'model', None), 'dtype', '')}"
        self.prefix = PrefixCache(self.db.dir / "prefix", kv_id)
        self.model_id = model_id
        self.sessions: dict[str, Session] = {}  # loaded (their KV may or may not be resident)
        self._saved: dict[str, list[tuple]] = {}  # per session: the fingerprints of the message rows on disk
        self.pinned: set[str] = set()  # sessions whose cache must stay resident (a generation is running)
        self.n_offloads = 0
        self.n_restores = 0

    # ------------------------------------------------------------------ lifecycle
    def create(
        self,
        sid: str | None = None,
        name: str = "",
        system_prompt: str | None = None,
        card: CharacterCard | dict | bytes | str | None = None,
        settings: dict | None = None,
    ) -> Session:
        sid = check_session_id(sid) if sid is not None else secrets.token_hex(6)
        if sid in self.sessions or self.db.exists(sid):
            raise InfinichatError(f"a session named {sid!r} already exists")
        st = self.defaults.updated(settings) if settings else self.defaults
        if card is not None and not isinstance(card, CharacterCard):
            card = load_card(card)
        if system_prompt is not None:
            Session._check_text(system_prompt, "system prompt")
        if card is not None:
            system_prompt = card.chat_system_prompt(st.user_name)
            name = name or card.char_name
        s = self._session(sid, name, system_prompt, st, card)
        s.reset()  # system part (from the prefix cache when seen before) and the card's greeting
        self._enforce_cap(keep=s)
        return s

    def _session(self, sid, name, system_prompt, settings, card) -> Session:
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
        )
        self.sessions[sid] = s
        return s

    def get(self, sid: str) -> Session:
        """A session by id (loaded from disk if needed; its KV is made resident)."""
        check_session_id(sid)
        s = self.sessions.get(sid)
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
        card = load_card(row["card"]) if row["card"] else None
        s = self._session(sid, row["name"], row["system_prompt"], SessionSettings.from_json(row["settings"]), card)
        s.created = row["created"]
        s.messages = [Message.from_json(m) for m in msgs]
        self._saved[sid] = [m.fingerprint() for m in s.messages]
        for m in s.messages:  # an alternative interrupted by a crash (saved incomplete) stays, marked
            for a in m.alternatives:
                if a.finish_reason == "incomplete" and m.kind != "user":
                    a.finish_reason = "interrupted"
        s.next_uid = max([row["next_uid"], *(m.uid + 1 for m in s.messages)])
        s.version = row["version"]
        return s

    def _offload(self, s: Session) -> None:
        s.kv.save(self.db.kv_path(s.id), {"version": s.version, "session": s.id})  # atomic
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

    def _enforce_cap(self, keep: Session) -> None:
        resident = sorted(
            (s for s in self.sessions.values() if s.seq is not None and s is not keep and s.id not in self.pinned),
            key=lambda s: s.last_used,
        )
        total = self.resident_bytes()
        for s in resident:
            if total <= self.kv_cap_bytes:
                break
            total -= s.kv.store.nbytes
            self._offload(s)
