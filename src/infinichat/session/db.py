"""Sessions on disk: SQLite (stdlib `sqlite3`, WAL mode) for sessions, messages with their alternatives and
segment maps; KV snapshots as files beside it (`kv/<session id>.kv`).

Every save is one transaction, so a process killed at any moment (SIGKILL included) leaves each session as
it was at its last completed save: a user message is saved before its reply starts, a reply when it ends.
A reply interrupted by a crash is therefore absent after a restart (never half-written), and the session
continues from its last complete turn.
"""

from __future__ import annotations

import json
import logging
import re
import sqlite3
import threading
import time
from pathlib import Path

from infinichat.errors import InfinichatError

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
        try:
            self.conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=NORMAL")  # durable across a process crash in WAL mode
            self.conn.execute("PRAGMA foreign_keys=ON")
            self.conn.executescript(SCHEMA)
        except sqlite3.DatabaseError as e:
            raise InfinichatError(f"cannot open the session database {self.path}: {e}") from None

    def kv_path(self, sid: str) -> Path:
        return self.dir / "kv" / f"{check_session_id(sid)}.kv"

    def save(self, row: dict, changed: list[tuple[int, dict]], n_messages: int) -> None:
        """Write a session, the messages that changed (turn, message) and its message count, in one
        transaction."""
        with self._lock:
            c = self.conn
            c.execute("BEGIN IMMEDIATE")
            try:
                c.execute(
                    "INSERT INTO sessions (id, name, created, updated, version, system_prompt, card, settings, "
                    "next_uid, segments) VALUES (:id, :name, :created, :updated, :version, :system_prompt, :card, "
                    ":settings, :next_uid, :segments) ON CONFLICT(id) DO UPDATE SET name=:name, updated=:updated, "
                    "version=:version, system_prompt=:system_prompt, card=:card, settings=:settings, "
                    "next_uid=:next_uid, segments=:segments",
                    {
                        **row,
                        "updated": time.time(),
                        "card": _dump(row.get("card")),
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

    def load(self, sid: str) -> tuple[dict, list[dict]] | None:
        with self._lock:
            cur = self.conn.execute(
                "SELECT id, name, created, updated, version, system_prompt, card, settings, next_uid, segments "
                "FROM sessions WHERE id = ?",
                (sid,),
            )
            r = cur.fetchone()
            if r is None:
                return None
            msgs = [
                json.loads(d)
                for (d,) in self.conn.execute("SELECT data FROM messages WHERE session_id = ? ORDER BY turn", (sid,))
            ]
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
        )
        row = dict(zip(keys, r, strict=True))
        for k in ("card", "settings", "segments"):
            row[k] = json.loads(row[k]) if row[k] else None
        return row, msgs

    def list(self) -> list[dict]:
        with self._lock:
            rows = self.conn.execute(
                "SELECT s.id, s.name, s.created, s.updated, COUNT(m.turn) FROM sessions s "
                "LEFT JOIN messages m ON m.session_id = s.id GROUP BY s.id ORDER BY s.updated DESC"
            ).fetchall()
        return [{"id": i, "name": n, "created": c, "updated": u, "messages": k} for i, n, c, u, k in rows]

    def exists(self, sid: str) -> bool:
        with self._lock:
            return self.conn.execute("SELECT 1 FROM sessions WHERE id = ?", (sid,)).fetchone() is not None

    def delete(self, sid: str) -> None:
        with self._lock:
            self.conn.execute("DELETE FROM sessions WHERE id = ?", (sid,))
        self.kv_path(sid).unlink(missing_ok=True)

    def close(self) -> None:
        with self._lock:
            self.conn.close()


def _dump(value) -> str | None:
    return None if value is None else json.dumps(value)
