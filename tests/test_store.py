"""The session store on both backends: SQLite (embedded default) and PostgreSQL (a real server, pg_util.py).

One suite, parametrized over the database: rows round-trip exactly, a save writes only what changed and
truncates, deletion cascades, damage is refused per session, migrations run once (also when two processes open
the database together), a lost PostgreSQL connection is reopened, and a second manager on the same store (a
replica after a failover) continues a session with every turn and alternative intact.
"""

from __future__ import annotations

import threading

import pytest
from gguf_util import tiny_llama, write_gguf
from pg_util import postgres  # noqa: F401  (fixture)
from server_util import free_port

from infinichat.engine.torch_engine import TorchEngine
from infinichat.errors import DamagedSessionError, InfinichatError, StorageError
from infinichat.model.loader import load_model
from infinichat.session import db as dbmod
from infinichat.session.db import SessionDB
from infinichat.session.dbdialect import safe_url, to_pyformat
from infinichat.session.manager import SessionManager


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request) -> str | None:
    """The database of one test: None (SQLite in the data directory) or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return None
    return request.getfixturevalue("postgres").new_database()


@pytest.fixture
def store(url, tmp_path):
    db = SessionDB(tmp_path / "data", url)
    yield db
    db.close()


def row(sid: str, version: int = 1, **kw) -> dict:
    return {
        "id": sid,
        "name": kw.get("name", "n"),
        "created": kw.get("created", 1733390000.123456),
        "version": version,
        "system_prompt": kw.get("system_prompt"),
        "card": kw.get("card"),
        "settings": {"budget": 256},
        "next_uid": 7,
        "segments": kw.get("segments"),
    }


def test_rows_round_trip_exactly(store):
    text = "caf\u00e9 \U0001f600 \"quotes\" 100% ?:name 'x'"  # % ? : and quotes reach the driver as data
    odd = text + " nul:\x00 lone:\ud800"  # JSON escapes them; plain columns never get them (check_text)
    msgs = [(0, {"kind": "user", "text": odd}), (1, {"kind": "assistant", "text": "b"})]
    store.save(row("s1", system_prompt=text, segments=[{"kind": "system", "n": 3}]), msgs, 2)
    got = store.load("s1")
    assert got is not None
    r, m = got
    assert m == [{"kind": "user", "text": odd}, {"kind": "assistant", "text": "b"}]
    assert r["system_prompt"] == text and r["segments"] == [{"kind": "system", "n": 3}]
    assert r["created"] == 1733390000.123456  # full double precision (PostgreSQL's REAL would round it)
    assert r["settings"] == {"budget": 256} and r["next_uid"] == 7 and r["version"] == 1 and r["card"] is None
    assert store.load("nope") is None


def test_save_writes_changes_and_truncates(store):
    store.save(row("s"), [(i, {"t": i}) for i in range(4)], 4)
    store.save(row("s", 2), [(1, {"t": "one"})], 4)  # only turn 1 changed
    assert store.load("s")[1] == [{"t": 0}, {"t": "one"}, {"t": 2}, {"t": 3}]
    store.save(row("s", 3), [], 2)  # a revert: the turns from 2 on go
    assert store.load("s")[1] == [{"t": 0}, {"t": "one"}]
    store.save(row("t"), [(0, {"t": 0})], 1)
    listed = {d["id"]: d["messages"] for d in store.list()}
    assert listed == {"s": 2, "t": 1}
    assert store.exists("s") and not store.exists("u")


def test_delete_cascades_and_removes_kv(store):
    store.save(row("s"), [(0, {"t": 0}), (1, {"t": 1})], 2)
    store.kv_path("s").write_bytes(b"kv")
    store.delete("s")
    assert store.load("s") is None and not store.kv_path("s").exists()
    assert store.dialect.execute("SELECT COUNT(*) FROM messages WHERE session_id = ?", ("s",))[0][0] == 0


def test_damaged_session_refused_others_served(store):
    store.save(row("good"), [(0, {"t": 0})], 1)
    store.save(row("bad"), [(0, {"t": 0})], 1)
    with store.dialect.transaction():
        store.dialect.execute("UPDATE messages SET data = ? WHERE session_id = ?", ("{not json", "bad"))
    with pytest.raises(DamagedSessionError, match="message 0 is not valid JSON"):
        store.load("bad")
    assert store.load("good")[1] == [{"t": 0}]


def test_failed_save_leaves_store_as_it_was(store):
    store.save(row("s"), [(0, {"t": 0})], 1)
    with pytest.raises(TypeError):  # a message that is not JSON-able fails inside the transaction
        store.save(row("s", 2, name="changed"), [(0, {"t": 1}), (1, {"t": {2}})], 2)
    r, m = store.load("s")
    assert r["name"] == "n" and r["version"] == 1 and m == [{"t": 0}]


def test_migrations_run_once_even_concurrently(url, tmp_path, monkeypatch):
    steps = (*dbmod.MIGRATIONS, ("ALTER TABLE sessions ADD COLUMN note TEXT",), ("CREATE TABLE extra (k TEXT)",))
    monkeypatch.setattr(dbmod, "MIGRATIONS", ())
    SessionDB(tmp_path / "d0", url).close()  # a database of the first release: no migration applied
    monkeypatch.setattr(dbmod, "MIGRATIONS", steps)
    if url is None:
        opened = [SessionDB(tmp_path / "d0", url)]
    else:  # two replicas start together: one migrates, the other waits and finds it done
        opened, errors = [], []

        def open_one() -> None:
            try:
                opened.append(SessionDB(tmp_path / f"d{len(opened) + 1}", url))
            except Exception as e:  # reported below
                errors.append(e)

        threads = [threading.Thread(target=open_one) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
    for db in opened:
        assert db.dialect.schema_version() == len(steps)
    db = opened[0]
    db.dialect.execute("INSERT INTO extra (k) VALUES (?)", ("x",))
    assert db.dialect.execute("SELECT lorebook, note FROM sessions") == []
    for d in opened:
        d.close()
    again = SessionDB(tmp_path / "d0", url)  # reopening runs nothing twice (ADD COLUMN would fail)
    assert again.dialect.schema_version() == len(steps)
    again.close()


def test_lost_postgres_connection_is_reopened(postgres, tmp_path):  # noqa: F811
    import psycopg

    url = postgres.new_database()
    db = SessionDB(tmp_path, url)
    db.save(row("s"), [(0, {"t": 0})], 1)
    pid = db.conn.info.backend_pid
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    with pytest.raises(StorageError, match="cannot be reached"):
        db.load("s")  # the call that finds the connection dead fails cleanly...
    assert db.fault is not None
    assert db.load("s")[1] == [{"t": 0}]  # ...and the next one reconnects
    db.save(row("s", 2), [(1, {"t": 1})], 2)
    assert db.fault is None and db.conn.info.backend_pid != pid
    db.close()


def test_bad_database_urls_are_clear_errors(tmp_path):
    with pytest.raises(InfinichatError, match="unknown database URL 'mysql://u:\\*\\*\\*@h/x'"):
        SessionDB(tmp_path, "mysql://u:secret@h/x")
    port = free_port()  # nothing listens there
    with pytest.raises(InfinichatError, match="cannot open the session database postgresql://u:\\*\\*\\*@127") as e:
        SessionDB(tmp_path, f"postgresql://u:secret@127.0.0.1:{port}/db")
    assert "secret" not in str(e.value)
    db = SessionDB(tmp_path / "d", f"sqlite://{tmp_path}/elsewhere.sqlite3")  # sqlite:///tmp/...
    assert db.path == tmp_path / "elsewhere.sqlite3" and db.path.exists()
    db.close()
    assert safe_url("postgresql://a@h/d") == "postgresql://a@h/d"
    assert to_pyformat("x = :a AND y = ? AND z::text = 'b'") == "x = %(a)s AND y = %s AND z::text = 'b'"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    write_gguf(d / "tiny.gguf", tiny_llama(seed=5, max_position_embeddings=4096))
    return load_model(d / "tiny.gguf", "float32", cache_dir=d / "cache")


def test_another_manager_continues_a_session(tiny, url, tmp_path):
    """A replica that takes over a session (its own data directory, the shared store and KV directory) finds
    every turn and alternative, restores the KV snapshot when fresh, and rebuilds it from the transcript when
    the snapshot is stale; the continued session's cache equals one rebuilt from scratch."""
    kv = tmp_path / "kv"
    url = url or f"sqlite://{tmp_path}/shared.sqlite3"  # one store for all, as PostgreSQL is
    engine = TorchEngine(tiny.model, tiny.tokenizer.eos_ids)

    def manager(name: str) -> SessionManager:
        return SessionManager(engine, tiny.tokenizer, tiny.file_hash, tmp_path / name, db_url=url, kv_dir=kv)

    a = manager("a")
    s = a.create("chat", system_prompt="Be brief.", settings={"temperature": 0.0, "max_tokens": 6})
    for text in ("one", "two"):
        list(s.send(text))
    list(s.retry())  # a second alternative of the last reply
    want = [(m.kind, [alt.text for alt in m.alternatives], m.selected) for m in s.messages]
    ids = s.seq.token_ids()
    a.close()  # writes the KV snapshot

    b = manager("b")
    t = b.get("chat")
    assert [(m.kind, [alt.text for alt in m.alternatives], m.selected) for m in t.messages] == want
    assert b.n_restores == 1 and t.seq.token_ids() == ids  # the fresh snapshot
    list(t.send("three"))
    b.db.close()  # a crash: no snapshot of the new version

    c = manager("c")
    u = c.get("chat")
    assert c.n_restores == 0 and len(u.messages) == len(want) + 2  # rebuilt from the transcript
    assert u.seq.token_ids() == t.seq.token_ids()
    c.db.close()


def test_a_stale_copy_in_memory_is_reloaded(tiny, url, tmp_path):
    """Cluster replicas share the store (`shared=True`): a replica still holding a session that another replica
    has since moved on (a failover, then the session routed back) reloads it instead of overwriting it."""
    url = url or f"sqlite://{tmp_path}/shared.sqlite3"
    engine = TorchEngine(tiny.model, tiny.tokenizer.eos_ids)

    def manager(name: str) -> SessionManager:
        return SessionManager(engine, tiny.tokenizer, tiny.file_hash, tmp_path / name, db_url=url, shared=True)

    a, b = manager("a"), manager("b")
    s = a.create("chat", system_prompt="Be brief.", settings={"temperature": 0.0, "max_tokens": 4})
    list(s.send("one"))
    list(b.get("chat").send("two"))  # b took over
    again = a.get("chat")  # a's copy (one turn) is stale: reloaded from the store
    assert a.n_stale == 1 and again is not s
    assert [m.text for m in again.messages][::2] == ["one", "two"]
    list(again.send("three"))
    assert [m.text for m in b.get("chat").messages][::2] == ["one", "two", "three"]  # and b sees a's turn
    assert b.n_stale == 1
    unshared = SessionManager(engine, tiny.tokenizer, tiny.file_hash, tmp_path / "c", db_url=url)
    assert unshared.get("chat").version == again.version and unshared.n_stale == 0
    for m in (a, b, unshared):
        m.db.close()
