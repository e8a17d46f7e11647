"""The two SQL databases behind the session store, behind one small interface.

`db.py` writes its SQL once, in the subset SQLite and PostgreSQL share (`INSERT ... ON CONFLICT DO UPDATE`,
`DOUBLE PRECISION`, `?` and `:name` parameters); a dialect runs it: it opens the connection, translates the
parameter style, runs a transaction, and keeps the schema version (SQLite: `PRAGMA user_version`;
PostgreSQL: the one-row table `infinichat_schema`, updated under an advisory lock so that replicas starting
together migrate once).

- `SQLiteDialect`: the embedded default, a file in the data directory (stdlib `sqlite3`, WAL mode).
- `PostgresDialect`: `postgresql://user:password@host:port/dbname` (psycopg 3, the `infinichat[cluster]`
  extra), shared by every replica of a cluster. A lost connection is reopened at the next call.
"""

from __future__ import annotations

import contextlib
import functools
import re
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from infinichat.errors import InfinichatError

Params = Sequence[Any] | dict[str, Any]
PG_SCHEMES = ("postgresql", "postgres")
PG_LOCK_KEY = 0x1F1C4A7  # pg_advisory_xact_lock key: one migrator at a time across replicas


def safe_url(url: str) -> str:
    """A database URL without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def is_postgres_url(url: str | None) -> bool:
    return url is not None and urlsplit(url).scheme in PG_SCHEMES


class Dialect:
    """One connection to one database; the caller (SessionDB) serialises calls with its own lock."""

    name = ""
    errors: tuple[type[BaseException], ...] = ()  # the driver's errors, mapped to StorageError by db.py
    where = ""  # what the database is, for messages (no password)

    def execute(self, sql: str, params: Params = ()) -> list[tuple]:
        raise NotImplementedError

    def executemany(self, sql: str, rows: Iterable[Params]) -> None:
        raise NotImplementedError

    def transaction(self) -> contextlib.AbstractContextManager[None]:
        raise NotImplementedError

    def schema_version(self) -> int:
        raise NotImplementedError

    def set_schema_version(self, version: int) -> None:
        raise NotImplementedError

    def migration_lock(self) -> None:
        """Inside a transaction: wait until no other process is migrating the same database."""

    def integrity(self) -> str | None:
        """A problem found by a quick integrity check at start, or None."""
        return None

    def close(self) -> None:
        raise NotImplementedError


class SQLiteDialect(Dialect):
    name = "sqlite"
    errors = (sqlite3.Error,)

    def __init__(self, path: Path):
        self.path = path
        self.where = str(path)
        self.conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=NORMAL")  # durable across a process crash in WAL mode
        self.conn.execute("PRAGMA foreign_keys=ON")

    def execute(self, sql: str, params: Params = ()) -> list[tuple]:
        return self.conn.execute(sql, params).fetchall()

    def executemany(self, sql: str, rows: Iterable[Params]) -> None:
        self.conn.executemany(sql, rows)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield
            self.conn.execute("COMMIT")
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise

    def schema_version(self) -> int:
        return int(self.conn.execute("PRAGMA user_version").fetchone()[0])

    def set_schema_version(self, version: int) -> None:
        self.conn.execute(f"PRAGMA user_version = {int(version)}")

    def integrity(self) -> str | None:
        try:
            ok = self.conn.execute("PRAGMA quick_check").fetchone()
        except sqlite3.DatabaseError as e:
            ok = (str(e),)
        return None if ok is not None and ok[0] == "ok" else (ok[0] if ok else "no answer")

    def close(self) -> None:
        self.conn.close()


_NAMED = re.compile(r"(?<![:\w]):([A-Za-z_]\w*)")


@functools.lru_cache(maxsize=256)
def to_pyformat(sql: str) -> str:
    """SQLite's parameter style (`?`, `:name`) in psycopg's (`%s`, `%(name)s`); the SQL has no `%` of its own."""
    if "%" in sql:
        raise ValueError("the store's SQL must not contain '%'")
    return _NAMED.sub(r"%(\1)s", sql).replace("?", "%s")


class PostgresDialect(Dialect):
    name = "postgresql"

    def __init__(self, url: str, connect_timeout: float = 10.0):
        try:
            import psycopg
        except ImportError:
            raise InfinichatError(
                "a postgresql:// database needs psycopg 3: pip install 'infinichat[cluster]'"
            ) from None
        self._psycopg = psycopg
        self.errors = (psycopg.Error,)
        self.url = url
        self.where = safe_url(url)
        self.timeout = connect_timeout
        self._tx = threading.local()
        self.conn = self._connect()

    def _connect(self):
        return self._psycopg.connect(self.url, autocommit=True, connect_timeout=max(1, int(self.timeout)))

    def _live(self):
        """The connection, reopened if the server dropped it (a restart, a failover)."""
        if self.conn.closed or self.conn.broken:
            if getattr(self._tx, "open", False):  # never silently continue a transaction on a new connection
                raise self._psycopg.OperationalError("the connection to the database was lost mid-transaction")
            with contextlib.suppress(Exception):
                self.conn.close()
            self.conn = self._connect()
        return self.conn

    def execute(self, sql: str, params: Params = ()) -> list[tuple]:
        cur = self._live().execute(to_pyformat(sql), params or None)
        return cur.fetchall() if cur.description is not None else []

    def executemany(self, sql: str, rows: Iterable[Params]) -> None:
        rows = list(rows)
        if rows:
            with self._live().cursor() as cur:
                cur.executemany(to_pyformat(sql), rows)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        conn = self._live()
        self._tx.open = True
        try:
            with conn.transaction():
                yield
        finally:
            self._tx.open = False

    def schema_version(self) -> int:
        self.execute("CREATE TABLE IF NOT EXISTS infinichat_schema (version INTEGER NOT NULL)")
        rows = self.execute("SELECT version FROM infinichat_schema")
        return int(rows[0][0]) if rows else 0

    def set_schema_version(self, version: int) -> None:
        self.execute("DELETE FROM infinichat_schema")
        self.execute("INSERT INTO infinichat_schema (version) VALUES (?)", (int(version),))

    def migration_lock(self) -> None:
        self.execute(f"SELECT pg_advisory_xact_lock({PG_LOCK_KEY})")

    def close(self) -> None:
        self.conn.close()


def open_dialect(data_dir: Path, url: str | None) -> Dialect:
    """SQLite in `data_dir` (url None or sqlite:///PATH), or PostgreSQL (postgresql://...)."""
    if url is None:
        return SQLiteDialect(data_dir / "sessions.sqlite3")
    scheme = urlsplit(url).scheme
    if scheme in PG_SCHEMES:
        return PostgresDialect(url)
    if scheme == "sqlite":
        path = url.split("://", 1)[1]
        if not path:
            raise InfinichatError("a sqlite:// database URL needs a file path, e.g. sqlite:///srv/sessions.sqlite3")
        return SQLiteDialect(Path(path))
    raise InfinichatError(
        f"unknown database URL {safe_url(url)!r}: use postgresql://user:password@host:port/dbname "
        "or sqlite:///path (default: sessions.sqlite3 in the data directory)"
    )
