"""The session store: sessions, messages with their alternatives and segment maps in SQL (SQLite in the data
directory by default, or PostgreSQL shared by the replicas of a cluster: `dbdialect.py`, one schema and one set
of migrations for both); KV snapshots as files (`kv/<session id>.kv` in the data directory, or `--kv-dir`).

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
from infinichat.session.dbdialect import Dialect, open_dialect, safe_url

log = logging.getLogger(__name__)

SESSION_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    created DOUBLE PRECISION NOT NULL,
    updated DOUBLE PRECISION NOT NULL,
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

# schema changes after the first, in order, in SQL both dialects run (e.g. "ALTER TABLE sessions ADD COLUMN x
# TEXT"); the database's schema version counts the ones applied (SQLite: PRAGMA user_version; PostgreSQL: the
# table infinichat_schema). Add a step at the end; never edit or reorder the ones already released.
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
    if type(e).__module__.split(".")[0] == "psycopg":
        return _pg_message(e, text)
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


def _pg_message(e: BaseException, text: str) -> str:
    kind = type(e).__name__
    if kind in ("OperationalError", "InterfaceError") or "connection" in text or "server closed" in text:
        return "the session database server cannot be reached; retry later"
    if "read-only" in text or "read only" in text:
        return "the session store cannot be written: the database is read-only"
    if "disk full" in text or "no space" in text:
        return "the session store cannot be written: the database server's disk is full"
    if "deadlock" in text or "lock" in text or "serializ" in text:
        return "the session database is busy; retry later"
    return f"the session store failed ({kind}); the server log has the details"


def _storage(fn: Callable[P, R]) -> Callable[P, R]:
    """Database and OS errors of a SessionDB method as StorageError (recorded in `db.fault` for /health)."""

    @functools.wraps(fn)
    def wrapped(*args: P.args, **kwargs: P.kwargs) -> R:
        db = args[0]
        errors = _driver_errors(db)
        try:
            out = fn(*args, **kwargs)
        except errors as e:
            msg = storage_message(e)
            log.error("session store: %s (%s: %s)", msg, type(e).__name__, e)
            if isinstance(db, SessionDB):
                db.last_fault = msg
            raise StorageError(msg) from None
        if isinstance(db, SessionDB) and db.last_fault is not None and fn.__name__ == "save":
            db.last_fault = None  # a write went through again
        return out

    return wrapped


def _driver_errors(db: object) -> tuple[type[BaseException], ...]:
    """The exceptions a store's database driver raises, and OSError (KV files)."""
    found: tuple[type[BaseException], ...] = db.dialect.errors if isinstance(db, SessionDB) else (sqlite3.Error,)
    return (*found, OSError)


def check_session_id(sid: object) -> str:
    if not isinstance(sid, str) or not SESSION_ID.match(sid):
        raise InfinichatError(
            f"invalid session id {str(sid)[:80]!r}: use 1 to 64 characters from A-Z, a-z, 0-9, '_' and '-'"
        )
    return sid


class SessionDB:
    """The store of one server (or of every replica of a cluster, with a shared `url` and `kv_dir`)."""

    def __init__(self, data_dir: str | Path, url: str | None = None, kv_dir: str | Path | None = None):
        """`url`: None (SQLite in `data_dir`), postgresql://... or sqlite:///path; `kv_dir`: where KV snapshot
        files go (default `data_dir/kv`; a directory every replica reaches in a cluster)."""
        self.dir = Path(data_dir)
        self.kv_dir = Path(kv_dir) if kv_dir is not None else self.dir / "kv"
        for d, what in ((self.dir, "data directory"), (self.kv_dir, "KV directory")):
            try:
                d.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise InfinichatError(f"cannot create the {what} {d}: {e.strerror or e}") from None
        self._lock = threading.Lock()
        self.last_fault: str | None = None  # the last storage fault, until a save succeeds
        self.damage: str | None = None  # found by the integrity check at start: stays until a restart
        where = safe_url(url) if url else str(self.dir / "sessions.sqlite3")
        self.dialect: Dialect = _open(lambda: open_dialect(self.dir, url), where)
        self.path = Path(getattr(self.dialect, "path", self.dir / "sessions.sqlite3"))  # SQLite's file
        _open(self._create, self.dialect.where)
        bad = self.dialect.integrity()
        if bad is not None:  # served anyway (the damage may spare most sessions), reported by /health
            log.error("the session database %s is damaged: %s", self.dialect.where, bad)
            self.damage = "the session database is damaged; restore it from a backup or move it away and restart"

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
    def conn(self):
        """The driver's connection (sqlite3.Connection or psycopg.Connection)."""
        return self.dialect.conn  # type: ignore[attr-defined]

    def _create(self) -> None:
        """The tables, then the migrations not applied yet, one transaction per step (a crash leaves a whole
        step or none; on PostgreSQL one process at a time, so replicas starting together migrate once)."""
        d = self.dialect
        with d.transaction():
            d.migration_lock()
            for stmt in SCHEMA.split(";"):
                if stmt.strip():
                    d.execute(stmt)
        version = d.schema_version()
        for i in range(version, len(MIGRATIONS)):
            with d.transaction():
                d.migration_lock()
                if d.schema_version() > i:  # another replica did it meanwhile
                    continue
                for stmt in MIGRATIONS[i]:
                    d.execute(stmt)
                d.set_schema_version(i + 1)
            log.info("session database %s: schema migrated to version %d", d.where, i + 1)

    @property
    def fault(self) -> str | None:
        """What is wrong with the store now (reported by /health), or None."""
        return self.damage or self.last_fault

    def kv_path(self, sid: str) -> Path:
        return self.kv_dir / f"{check_session_id(sid)}.kv"

    @_storage
    def save(self, row: dict, changed: list[tuple[int, dict]], n_messages: int) -> None:
        """Write a session, the messages that changed (turn, message) and its message count, in one
        transaction."""
        with self._lock:
            c = self.dialect
            with c.transaction():  # BEGIN (IMMEDIATE on SQLite) ... COMMIT; ROLLBACK on an error
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
                    "INSERT INTO messages (session_id, turn, data) VALUES (?, ?, ?) "
                    "ON CONFLICT(session_id, turn) DO UPDATE SET data = excluded.data",
                    [(row["id"], i, json.dumps(m)) for i, m in changed],
                )

    @_storage
    def load(self, sid: str) -> tuple[dict, list[dict]] | None:
        with self._lock:
            found = self.dialect.execute(
                "SELECT id, name, created, updated, version, system_prompt, card, settings, next_uid, segments, "
                "lorebook FROM sessions WHERE id = ?",
                (sid,),
            )
            if not found:
                return None
            r = found[0]
            rows = self.dialect.execute("SELECT turn, data FROM messages WHERE session_id = ? ORDER BY turn", (sid,))
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
            rows = self.dialect.execute(
                "SELECT s.id, s.name, s.created, s.updated, COUNT(m.turn) FROM sessions s "
                "LEFT JOIN messages m ON m.session_id = s.id GROUP BY s.id ORDER BY s.updated DESC"
            )
        return [{"id": i, "name": n, "created": c, "updated": u, "messages": k} for i, n, c, u, k in rows]

    @_storage
    def exists(self, sid: str) -> bool:
        with self._lock:
            return bool(self.dialect.execute("SELECT 1 FROM sessions WHERE id = ?", (sid,)))

    @_storage
    def version(self, sid: str) -> int | None:
        """The stored version of a session (None: no such session): a replica compares it with its copy."""
        with self._lock:
            found = self.dialect.execute("SELECT version FROM sessions WHERE id = ?", (sid,))
        return int(found[0][0]) if found else None

    @_storage
    def delete(self, sid: str) -> None:
        with self._lock:
            self.dialect.execute("DELETE FROM sessions WHERE id = ?", (sid,))
        self.kv_path(sid).unlink(missing_ok=True)
        for who in AVATARS:
            self.avatar_path(sid, who).unlink(missing_ok=True)

    def close(self) -> None:
        with self._lock:
            self.dialect.close()


def _open(fn: Callable[[], R], where: str) -> R:
    """Opening the store: a driver error is a startup error naming the database (no password)."""
    try:
        return fn()
    except InfinichatError:
        raise
    except Exception as e:
        if type(e).__module__.split(".")[0] not in ("sqlite3", "psycopg") and not isinstance(e, sqlite3.Error):
            raise
        raise InfinichatError(f"cannot open the session database {where}: {str(e).strip()[:300]}") from None


def damaged(sid: str, what: str) -> str:
    return (
        f"session {sid!r} cannot be loaded: its stored data is damaged ({what}). It is left untouched on disk; "
        f"delete it with DELETE /api/sessions/{sid}, or restore the database from a backup"
    )


def _dump(value) -> str | None:
    return None if value is None else json.dumps(value)
