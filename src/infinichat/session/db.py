"""Sessions on disk: SQLite (stdlib `sqlite3`, WAL mode) for sessions, messages with their alternatives and
segment maps; KV snapshots as files beside it (`kv/<session id>.kv`).

Every save is one transaction, so a process killed at any moment (SIGKILL included) leaves each session as
it was at its last completed save: a user message is saved before its reply starts, a reply when it ends.
A reply interrupted by a crash is therefore absent after a restart (never half-written), and the session
continues from its last complete turn.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import ParamSpec, TypeVar

from infinichat.errors import DamagedSessionError, InfinichatError, StorageError

log = logging.getLogger(__name__)

SESSION_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    version INTEGER NOT NULL,
    system_prompt TEXT,
    card TEXT,
    settings TEXT NOT NULL,
    next_uid INTEGER NOT NULL,
    segments TEXT
);
CREATE TABLE IF NOT EXISTS messages (
    session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    turn INTEGER NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (session_id, turn)
);
"""

# schema changes after the first, in order; PRAGMA user_version counts the ones applied
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    # 1: a session's lorebook (per-token top-n probabilities live in each message's JSON, "steps")
    ("ALTER TABLE sessions ADD COLUMN lorebook TEXT",),
)
AVATARS = ("char", "user")  # a session's avatar images: the character card's PNG, the user's picture


P = ParamSpec("P")
R = TypeVar("R")


def storage_message(e: BaseException) -> str:
    """What a storage fault means for the client, with no internal path in it."""
    text = str(e).lower()
    if isinstance(e, sqlite3.DatabaseError) and not isinstance(e, sqlite3.OperationalError):
        return "the session database is damaged; restore it from a backup or move it away and restart"
    if "readonly" in text or "read-only" in text or getattr(e, "errno", None) in (13, 30):
        return "the session store cannot be written: its data directory is read-only"
    if "full" in text or getattr(e, "errno", None) == 28:
        return "the session store cannot be written: the disk is full"
    if "malformed" in text or "not a database" in text or "corrupt" in text:
        return "the session database is damaged; restore it from a backup or move it away and restart"
    if "locked" in text or "busy" in text:
        return "the session database is locked by another process; retry later"
    return f"the session store failed ({type(e).__name__}); the server log has the details"


def _storage(fn: Callable[P, R]) -> Callable[P, R]:
    """sqlite3 and OS errors of a SessionDB method as StorageError (recorded in `db.fault` for /health)."""

    @functools.wraps(fn)
    def wrapped(*args: P.args, **kwargs: P.kwargs) -> R:
        db = args[0]
        try:
            out = fn(*args, **kwargs)
        except (sqlite3.Error, OSError) as e:
            msg = storage_message(e)
            log.error("session store: %s (%s: %s)", msg, type(e).__name__, e)
            if isinstance(db, SessionDB):
                db.last_fault = msg
            raise StorageError(msg) from None
        if isinstance(db, SessionDB) and db.last_fault is not None and fn.__name__ == "save":
            db.last_fault = None  # a write went through again
        return out

    return wrapped


def check_session_id(sid: object) -> str:
    if not isinstance(sid, str) or not SESSION_ID.match(sid):
        raise InfinichatError(
            f"invalid session id {str(sid)[:80]!r}: use 1 to 64 characters from A-Z, a-z, 0-9, '_' and '-'"
        )
    return sid


class SessionDB:
    def __init__(self, data_dir: str | Path):
        self.dir = Path(data_dir)
        try:
            (self.dir / "kv").mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InfinichatError(f"cannot create the data directory {self.dir}: {e.strerror or e}") from None
        self.path = self.dir / "sessions.sqlite3"
        self._lock = threading.Lock()
        self.last_fault: str | None = None  # the last storage fault, until a save succeeds
        self.damage: str | None = None  # found by the integrity check at start: stays until a restart
        try:
            self.conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=NORMAL")  # durable across a process crash in WAL mode
            self.conn.execute("PRAGMA foreign_keys=ON")
            self.conn.executescript(SCHEMA)
            self._migrate()
        except sqlite3.DatabaseError as e:
            raise InfinichatError(f"cannot open the session database {self.path}: {e}") from None
        try:
            ok = self.conn.execute("PRAGMA quick_check").fetchone()
        except sqlite3.DatabaseError as e:
            ok = (str(e),)
        if ok is None or ok[0] != "ok":  # served anyway (the damage may spare most sessions), reported by /health
            log.error("the session database %s is damaged: %s", self.path, ok[0] if ok else "no answer")
            self.damage = "the session database is damaged; restore it from a backup or move it away and restart"

    def _migrate(self) -> None:
        """Bring an older database up to date, one transaction per step (a crash leaves a whole step or none)."""
        (version,) = self.conn.execute("PRAGMA user_version").fetchone()
        for i, step in enumerate(MIGRATIONS[version:], start=version + 1):
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                for stmt in step:
                    self.conn.execute(stmt)
                self.conn.execute(f"PRAGMA user_version = {i}")
                self.conn.execute("COMMIT")
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
            log.info("session database %s: schema migrated to version %d", self.path, i)

    def avatar_path(self, sid: str, who: str) -> Path:
        if who not in AVATARS:
            raise InfinichatError(f"unknown avatar {who!r}; accepted: {', '.join(AVATARS)}")
        return self.dir / "avatars" / f"{check_session_id(sid)}-{who}"

    @_storage
    def write_avatar(self, sid: str, who: str, data: bytes | None) -> None:
        """Store (None: remove) an avatar image; written to a temporary file and renamed (never half-written)."""
        path = self.avatar_path(sid, who)
        if data is None:
            path.unlink(missing_ok=True)
            return
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(data)
        tmp.replace(path)

    @property
    def fault(self) -> str | None:
        """What is wrong with the store now (reported by /health), or None."""
        return self.damage or self.last_fault

    def kv_path(self, sid: str) -> Path:
        return self.dir / "kv" / f"{check_session_id(sid)}.kv"

    @_storage
    def save(self, row: dict, changed: list[tuple[int, dict]], n_messages: int) -> None:
        """Write a session, the messages that changed (turn, message) and its message count, in one
        transaction."""
        with self._lock:
            c = self.conn
            c.execute("BEGIN IMMEDIATE")
            try:
                c.execute(
                    "INSERT INTO sessions (id, name, created, updated, version, system_prompt, card, settings, "
                    "next_uid, segments, lorebook) VALUES (:id, :name, :created, :updated, :version, :system_prompt, "
                    ":card, :settings, :next_uid, :segments, :lorebook) ON CONFLICT(id) DO UPDATE SET name=:name, "
                    "updated=:updated, version=:version, system_prompt=:system_prompt, card=:card, "
                    "settings=:settings, next_uid=:next_uid, segments=:segments, lorebook=:lorebook",
                    {
                        **row,
                        "updated": time.time(),
                        "card": _dump(row.get("card")),
                        "lorebook": _dump(row.get("lorebook")),
                        "settings": _dump(row["settings"]),
                        "segments": _dump(row.get("segments")),
                    },
                )
                c.execute("DELETE FROM messages WHERE session_id = ? AND turn >= ?", (row["id"], n_messages))
                c.executemany(
                    "INSERT OR REPLACE INTO messages (session_id, turn, data) VALUES (?, ?, ?)",
                    [(row["id"], i, json.dumps(m)) for i, m in changed],
                )
                c.execute("COMMIT")
            except BaseException:
                c.execute("ROLLBACK")
                raise

    @_storage
    def load(self, sid: str) -> tuple[dict, list[dict]] | None:
        with self._lock:
            cur = self.conn.execute(
                "SELECT id, name, created, updated, version, system_prompt, card, settings, next_uid, segments, "
                "lorebook FROM sessions WHERE id = ?",
                (sid,),
            )
            r = cur.fetchone()
            if r is None:
                return None
            raw = self.conn.execute("SELECT turn, data FROM messages WHERE session_id = ? ORDER BY turn", (sid,))
            rows = raw.fetchall()
        msgs = []
        for turn, d in rows:
            try:
                msgs.append(json.loads(d))
            except (ValueError, TypeError) as e:
                raise DamagedSessionError(damaged(sid, f"message {turn} is not valid JSON: {e}")) from None
        keys = (
            "id",
            "name",
            "created",
            "updated",
            "version",
            "system_prompt",
            "card",
            "settings",
            "next_uid",
            "segments",
            "lorebook",
        )
        row = dict(zip(keys, r, strict=True))
        for k in ("card", "settings", "segments", "lorebook"):
            try:
                row[k] = json.loads(row[k]) if row[k] else None
            except (ValueError, TypeError) as e:
                raise DamagedSessionError(damaged(sid, f"its {k} are not valid JSON: {e}")) from None
        return row, msgs

    @_storage
    def list(self) -> list[dict]:
        with self._lock:
            rows = self.conn.execute(
                "SELECT s.id, s.name, s.created, s.updated, COUNT(m.turn) FROM sessions s "
                "LEFT JOIN messages m ON m.session_id = s.id GROUP BY s.id ORDER BY s.updated DESC"
            ).fetchall()
        return [{"id": i, "name": n, "created": c, "updated": u, "messages": k} for i, n, c, u, k in rows]

    @_storage
    def exists(self, sid: str) -> bool:
        with self._lock:
            return self.conn.execute("SELECT 1 FROM sessions WHERE id = ?", (sid,)).fetchone() is not None

    @_storage
    def delete(self, sid: str) -> None:
        with self._lock:
            self.conn.execute("DELETE FROM sessions WHERE id = ?", (sid,))
        self.kv_path(sid).unlink(missing_ok=True)
        for who in AVATARS:
            self.avatar_path(sid, who).unlink(missing_ok=True)

    def close(self) -> None:
        with self._lock:
            self.conn.close()


def damaged(sid: str, what: str) -> str:
    return (
        f"session {sid!r} cannot be loaded: its stored data is damaged ({what}). It is left untouched on disk; "
        f"delete it with DELETE /api/sessions/{sid}, or restore the database from a backup"
    )


def _dump(value) -> str | None:
    return None if value is None else json.dumps(value)
