"""Issue 21's reproductions against a real server (tiny random model): input that used to corrupt a session,
lose a transcript, reserve memory, drive the server from another site, or outlive its client. Each test checks
the answer (status, a message naming what was wrong) and that nothing else changed: the session's history and
its rows on disk are as before, and the server still serves."""

from __future__ import annotations

import json
import sqlite3
import threading
import time

import httpx
import pytest
from server_util import LiveServer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GREEDY = {"temperature": 0.0, "max_tokens": 4}
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def live(tiny_chat_model, tmp_path_factory):
    with LiveServer(tiny_chat_model, tmp_path_factory.mktemp("data"), anon_budget=256) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(live):
    with httpx.Client(base_url=live.url, timeout=60) as c:
        yield c


def send(client, sid: str, text: str) -> None:
    with client.stream("POST", f"/api/sessions/{sid}/messages", json={"text": text, "params": GREEDY}) as r:
        assert r.status_code == 200, r.read()
        body = r.read().decode()
    assert "event: done" in body, body


def rows(live, sid: str) -> list[str]:
    """The session's message rows as stored."""
    with sqlite3.connect(live.manager.db.path) as c:
        return [d for (d,) in c.execute("SELECT data FROM messages WHERE session_id = ? ORDER BY turn", (sid,))]


def raw(client, method: str, path: str, body: str, headers: dict | None = None) -> httpx.Response:
    """A body with JSON escapes as written (a lone surrogate `\\ud800` survives only so)."""
    return client.request(method, path, content=body.encode(), headers={**JSON, **(headers or {})})


def session(client, sid: str, **kw) -> None:
    r = client.post("/api/sessions", json={"id": sid, **kw})
    assert r.status_code == 201, r.text


# ------------------------------------------------------------------ 1. lone surrogates
SURROGATE_CASES = [
    ("POST", "/api/sessions/{sid}/messages", '{"text": "hi \\ud800"}', "text"),
    ("POST", "/api/sessions/{sid}/rag", '{"text": "\\udfff x"}', "text"),
    ("PATCH", "/api/sessions/{sid}/messages/0", '{"text": "a\\ud83d"}', "text"),
    ("PATCH", "/api/sessions/{sid}/settings", '{"user_name": "u\\ud800"}', "user_name"),
    ("POST", "/api/sessions/{sid}/retry", '{"params": {"stop": ["\\ud800"]}}', "params.stop.0"),
    ("POST", "/api/sessions", '{"id": "new1", "name": "\\ud800"}', "name"),
    ("POST", "/api/sessions", '{"id": "new2", "system_prompt": "x\\udc00"}', "system_prompt"),
    ("POST", "/v1/chat/completions", '{"messages": [{"role": "user", "content": "\\ud800"}]}', "messages.0.content"),
    ("POST", "/v1/completions", '{"prompt": "\\ud800"}', "prompt"),
]


@pytest.mark.parametrize("method,path,body,field", SURROGATE_CASES, ids=[f"{c[0]} {c[1]}" for c in SURROGATE_CASES])
def test_lone_surrogate_is_a_400_naming_the_field_and_changes_nothing(live, client, method, path, body, field):
    sid = "sur"
    if client.get(f"/api/sessions/{sid}").status_code == 404:
        session(client, sid)
        send(client, sid, "hello")
    before, stored = client.get(f"/api/sessions/{sid}").json(), rows(live, sid)
    r = raw(client, method, path.format(sid=sid), body, {"X-Session-Id": sid} if "chat" in path else None)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == field and "invalid character" in err["message"], err
    after = client.get(f"/api/sessions/{sid}").json()
    assert after["messages"] == before["messages"] and after["settings"] == before["settings"]
    assert rows(live, sid) == stored
    send(client, sid, "still fine")  # the session keeps working
    assert client.get("/api/sessions/new1").status_code == 404


def test_surrogate_inside_a_png_card_is_a_400(live, client):
    """A card_png is base64, so the edge cannot see into it: its JSON may escape a lone surrogate."""
    import base64

    from test_cards import png, text_chunk

    card = {"spec": "chara_card_v2", "data": {"name": "C", "description": "d", "first_mes": "hi \ud800"}}
    blob = png(text_chunk("chara", base64.b64encode(json.dumps(card).encode())))  # json.dumps escapes the surrogate
    r = client.post("/api/sessions", json={"id": "pngsur", "card_png": base64.b64encode(blob).decode()})
    assert r.status_code == 400 and "greeting" in r.json()["error"]["message"], r.text
    assert client.get("/api/sessions/pngsur").status_code == 404


def test_surrogate_in_the_session_layer_is_refused_before_any_change(live):
    """Defence in depth: a caller that bypasses the HTTP edge (the CLI) gets the same clear error."""
    from infinichat.errors import InfinichatError

    def run(m):
        s = m.create("layer")
        n = len(s.messages)
        with pytest.raises(InfinichatError, match="invalid character"):
            list(s.send("bad \ud800"))
        with pytest.raises(InfinichatError, match="user_name"):
            s.update_settings({"user_name": "u\ud800"})
        return n, len(s.messages)

    n0, n1 = live.app.state.worker.call(run).result(60)
    assert n0 == n1


# ------------------------------------------------------------------ 2. a damaged message row
def test_a_damaged_row_is_refused_and_left_on_disk(live, client):
    session(client, "dmg")
    session(client, "ok2")
    for i in range(3):
        send(client, "dmg", f"turn {i}")
    send(client, "ok2", "hi")
    stored = rows(live, "dmg")
    assert len(stored) == 6
    bad = json.loads(stored[2])
    del bad["alternatives"]
    with sqlite3.connect(live.manager.db.path) as c:
        c.execute("UPDATE messages SET data = ? WHERE session_id = 'dmg' AND turn = 2", (json.dumps(bad),))
    live.app.state.worker.call(lambda m: m.sessions.pop("dmg")).result(30)  # as after a restart
    for _ in range(2):
        r = client.get("/api/sessions/dmg")
        assert r.status_code == 500, r.text
        err = r.json()["error"]
        assert err["type"] == "damaged_session" and "message 2" in err["message"] and "alternatives" in err["message"]
        assert "/" not in err["message"].split("DELETE")[0]  # no internal path
        r = client.post("/api/sessions/dmg/messages", json={"text": "again"})
        assert r.status_code == 500 and r.json()["error"]["type"] == "damaged_session"
    assert len(rows(live, "dmg")) == 6  # nothing overwritten
    assert client.get("/api/sessions/ok2").status_code == 200  # other sessions unaffected
    assert client.get("/health").json()["status"] == "ok"
    assert client.delete("/api/sessions/dmg").status_code == 204  # and it can be removed


# ------------------------------------------------------------------ 3. memory
def test_budget_over_the_server_limit_is_refused(live, client):
    r = client.post("/api/sessions", json={"id": "big", "settings": {"budget": 1048576}})
    assert r.status_code == 400 and "max-budget" in r.json()["error"]["message"], r.text
    assert client.get("/api/sessions/big").status_code == 404
    session(client, "grow")
    r = client.patch("/api/sessions/grow/settings", json={"budget": live.manager.max_budget + 1})
    assert r.status_code == 400 and "max-budget" in r.json()["error"]["message"]


def test_kv_is_grown_not_reserved(live, client):
    session(client, "lazy", settings={"budget": live.manager.max_budget})
    h = client.get("/api/sessions/lazy").json()
    store = live.app.state.worker.call(lambda m: m.get("lazy").seq.store, mutates=False).result(30)
    assert store.capacity == live.manager.max_budget
    assert store.allocated < store.capacity and h["cache"]["bytes"] == store.nbytes


def test_anonymous_caches_count_in_the_kv_cap(live, client):
    lru = live.app.state.prefix_lru
    assert lru in live.manager.spare
    for i in range(3):
        r = client.post(
            "/v1/completions", json={"prompt": f"number {i} " * 5, "max_tokens": 2, "temperature": 0}, timeout=60
        )
        assert r.status_code == 200, r.text
    assert lru.nbytes > 0 and live.manager.total_kv_bytes() >= lru.nbytes
    cap = live.manager.kv_cap_bytes
    live.manager.kv_cap_bytes = 1
    try:  # the next request makes room: idle anonymous caches are dropped first
        r = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1, "temperature": 0})
        assert r.status_code == 200, r.text
        assert len(lru.free) <= 1
    finally:
        live.manager.kv_cap_bytes = cap


def test_echo_sequences_count_in_the_kv_cap(tiny_chat_model, tmp_path):
    """/v1/completions with echo evaluates each prompt in a temporary sequence of its own: its KV memory is reserved
    first (idle session caches are offloaded to make room under --kv-cap-mb), counted while it lives, and a prompt
    whose sequence alone passes the hard limit (--kv-limit-mb) is refused with a message that says so."""
    from infinichat.session.manager import kv_bytes_per_token

    with LiveServer(tiny_chat_model, tmp_path) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        m = srv.manager
        session(c, "idle")
        send(c, "idle", "Hello there.")
        history = c.get("/api/sessions/idle").json()["messages"]
        resident = m.total_kv_bytes()
        assert m.sessions["idle"].seq is not None and resident > 0
        prompt = list(range(10, 110))
        body = {"prompt": prompt, "echo": True, "logprobs": 1, "max_tokens": 1, "temperature": 0}
        need = kv_bytes_per_token(srv.app.state.engine) * (len(prompt) + 1 + 1)
        seen: list[int] = []
        engine = srv.app.state.engine
        prefill = engine.prefill

        def watched(seq, ids, **kw):  # the KV memory the manager counts while the echo sequence is evaluated
            seen.append(m.total_kv_bytes())
            return prefill(seq, ids, **kw)

        n_spare = len(m.spare)
        m.kv_cap_bytes = resident + need - 1  # the session's cache and the echo sequence do not both fit
        engine.prefill = watched
        try:
            r = c.post("/v1/completions", json=body)
        finally:
            del engine.prefill
        assert r.status_code == 200, r.text
        assert len(r.json()["choices"][0]["logprobs"]["token_logprobs"]) == len(prompt) + 1
        assert m.sessions["idle"].seq is None  # offloaded to make room
        assert seen and set(seen) == {need}  # while it lived, the echo sequence was counted, and was all there was
        assert len(m.spare) == n_spare  # and is no longer
        assert c.get("/api/sessions/idle").json()["messages"] == history
        send(c, "idle", "Still here?")  # its cache comes back from disk
        m.kv_limit_bytes = need - 1
        r = c.post("/v1/completions", json=body)
        assert r.status_code == 400, r.text
        msg = r.json()["error"]["message"]
        assert "KV memory" in msg and "--kv-limit-mb" in msg and f"{len(prompt)} tokens" in msg


def test_generations_over_the_kv_cap_get_503(live, client):
    session(client, "hog", settings={"temperature": 0.0})
    session(client, "late")
    done = threading.Event()

    def hog():
        body = {"text": "Long.", "params": {"max_tokens": 16000}}
        with (
            httpx.Client(base_url=live.url, timeout=60) as c,
            c.stream("POST", "/api/sessions/hog/messages", json=body) as r,
        ):
            for _ in r.iter_lines():
                if done.is_set():
                    break

    t = threading.Thread(target=hog)
    t.start()
    limit = live.manager.kv_limit_bytes
    try:
        deadline = time.monotonic() + 30
        while "hog" not in live.manager.pinned:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        live.manager.kv_limit_bytes = 1
        r = client.post("/api/sessions/late/messages", json={"text": "hi", "params": GREEDY})
        assert r.status_code == 503, r.text
        assert r.json()["error"]["type"] == "overloaded" and r.headers["retry-after"]
        assert client.get("/api/sessions/late").json()["messages"] == []  # nothing half-done
    finally:
        live.manager.kv_limit_bytes = limit
        client.post("/api/sessions/hog/stop")
        done.set()
        t.join(30)


def test_chunked_body_over_the_limit_is_413(live, client):
    def chunks():
        for _ in range(20):
            yield b" " * (1 << 20)

    r = client.post("/api/sessions", content=chunks(), headers=JSON)
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]


# ------------------------------------------------------------------ 4. browser safety
def test_cross_site_simple_requests_fail(live, client):
    session(client, "victim")
    send(client, "victim", "mine")
    before = client.get("/api/sessions/victim").json()["messages"]
    r = client.post("/api/sessions/victim/revert", content=b'{"turn": 0}', headers={"Content-Type": "text/plain"})
    assert r.status_code == 415 and "application/json" in r.json()["error"]["message"]
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    assert client.post("/api/sessions/victim/rag", content=b'{"text":"x"}', headers=form).status_code == 415
    evil = {**JSON, "Origin": "http://evil.example"}
    r = client.post("/api/sessions/victim/revert", json={"turn": 0}, headers=evil)
    assert r.status_code == 403 and "cross-site" in r.json()["error"]["message"]
    assert client.post("/api/sessions/victim/reset", headers={"Origin": "http://evil.example"}).status_code == 403
    assert client.get("/api/sessions/victim").json()["messages"] == before
    own = {"Origin": live.url}  # the server's own page
    assert client.post("/api/sessions/victim/revert", json={"turn": 2}, headers=own).status_code == 200


def test_host_header_is_checked(live, client):
    r = client.get("/api/sessions", headers={"Host": "attacker.example"})
    assert r.status_code == 400 and "allowed-hosts" in r.json()["error"]["message"]
    assert client.get("/health", headers={"Host": "attacker.example:8000"}).status_code == 400
    assert client.get("/health", headers={"Host": f"localhost:{live.port}"}).status_code == 200


def test_cors_origins_allow_a_named_site(tiny_chat_model, tmp_path):
    with (
        LiveServer(tiny_chat_model, tmp_path, cors_origins=["https://app.example"]) as srv,
        httpx.Client(base_url=srv.url, timeout=60) as c,
    ):
        pre = c.options(
            "/api/sessions",
            headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"},
        )
        assert pre.status_code == 200
        assert pre.headers["access-control-allow-origin"] == "https://app.example"
        ok = c.post("/api/sessions", json={"id": "c1"}, headers={"Origin": "https://app.example"})
        assert ok.status_code == 201
        bad = c.post("/api/sessions", json={"id": "c2"}, headers={"Origin": "https://other.example"})
        assert bad.status_code == 403


# ------------------------------------------------------------------ 5. cancellation and max_tokens
def test_non_streaming_request_is_cancelled_when_its_client_leaves(live, client):
    body = {"messages": [{"role": "user", "content": "Go on."}], "max_tokens": 16000, "temperature": 0}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{live.url}/v1/chat/completions", json=body, headers={"X-Session-Id": "n2"}, timeout=1.0)
    deadline = time.monotonic() + 20
    while True:  # the worker notices at its next step, not after 16000 tokens
        h = client.get("/api/sessions/n2")
        if h.status_code == 200 and h.json()["messages"][-1]["alternatives"][-1]["finish_reason"] == "cancelled":
            break
        assert time.monotonic() < deadline, h.text
        time.sleep(0.1)
    r = client.post("/api/sessions/n2/messages", json={"text": "next", "params": GREEDY})
    assert r.status_code == 200  # not 409: the session is free


def test_max_tokens_is_capped(client):
    msg = [{"role": "user", "content": "x"}]
    r = client.post("/v1/chat/completions", json={"messages": msg, "max_tokens": 1000000000})
    assert r.status_code == 400 and "max_tokens" in r.json()["error"]["message"]
    r = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1000})  # over the anonymous budget 256
    assert r.status_code == 400 and "budget" in r.json()["error"]["message"]
    session(client, "cap")
    r = client.post("/api/sessions/cap/messages", json={"text": "x", "params": {"max_tokens": 10**9}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "params.max_tokens"
    assert client.patch("/api/sessions/cap/settings", json={"max_tokens": 10**9}).status_code == 400


# ------------------------------------------------------------------ 6. a failed create leaves nothing
def test_failed_create_leaves_no_ghost(live, client):
    kv_dir = live.manager.db.dir / "kv"
    files = set(kv_dir.iterdir())
    r = client.post("/api/sessions", json={"id": "ghost", "system_prompt": "word " * 2000})
    assert r.status_code == 400 and "half the budget" in r.json()["error"]["message"], r.text
    assert client.get("/api/sessions/ghost").status_code == 404
    assert "ghost" not in [s["id"] for s in client.get("/api/sessions").json()["sessions"]]
    session(client, "ghost")  # the id is free
    assert set(kv_dir.iterdir()) == files
    msgs = [{"role": "system", "content": "word " * 2000}, {"role": "user", "content": "hi"}]
    r = client.post("/v1/chat/completions", json={"messages": msgs}, headers={"X-Session-Id": "ghost2"})
    assert r.status_code == 400
    assert client.get("/api/sessions/ghost2").status_code == 404


# ------------------------------------------------------------------ 8. sampling extremes
@pytest.mark.parametrize("params", [{"temperature": 1e-300}, {"repetition_penalty": 1e-300}, {"temperature": 1e300}])
def test_extreme_sampling_values_are_refused(live, client, params):
    if client.get("/api/sessions/temp").status_code == 404:
        session(client, "temp")
    r = client.post("/api/sessions/temp/messages", json={"text": "hi", "params": params})
    assert r.status_code == 400, r.text
    assert next(iter(params)) in r.json()["error"]["message"]
    assert client.get("/api/sessions/temp").json()["messages"] == []
    msg = [{"role": "user", "content": "x"}]
    if "temperature" in params:
        r = client.post("/v1/chat/completions", json={"messages": msg, **params})
        assert r.status_code == 400


# ------------------------------------------------------------------ 9. storage faults
def test_unwritable_store_is_503_without_paths_and_health_says_so(live, client):
    session(client, "ro")
    send(client, "ro", "before")
    before = client.get("/api/sessions/ro").json()["messages"]
    live.manager.db.conn.execute("PRAGMA query_only=ON")  # every write now fails, as on a read-only disk
    try:
        r = client.post("/api/sessions/ro/messages", json={"text": "lost?", "params": GREEDY})
        assert r.status_code == 503, r.text
        err = r.json()["error"]
        assert err["type"] == "storage_error" and "read-only" in err["message"]
        assert str(live.manager.db.dir) not in r.text
        assert r.headers["retry-after"]
        r = client.post("/api/sessions", json={"id": "ro2"})
        assert r.status_code == 503
        h = client.get("/health")
        assert h.status_code == 503 and h.json()["status"] == "degraded" and "read-only" in h.json()["storage"]
        assert client.get("/api/sessions/ro").json()["messages"] == before  # rolled back in memory too
    finally:
        live.manager.db.conn.execute("PRAGMA query_only=OFF")
    assert client.get("/api/sessions/ro2").status_code == 404  # the failed create left nothing
    send(client, "ro", "after")
    assert client.get("/health").json()["status"] == "ok"
    assert len(client.get("/api/sessions/ro").json()["messages"]) == 4


def test_damaged_database_is_reported(tmp_path):
    from infinichat.errors import StorageError
    from infinichat.session.db import SessionDB

    db = SessionDB(tmp_path)
    db.save(
        {"id": "a", "name": "a", "created": 0.0, "version": 1, "system_prompt": None, "settings": {}, "next_uid": 1},
        [(i, {"text": "x" * 3000}) for i in range(40)],
        40,
    )
    db.close()
    data = bytearray((tmp_path / "sessions.sqlite3").read_bytes())
    page = 4096
    data[3 * page : 4 * page] = b"\xa5" * page  # one garbage page
    (tmp_path / "sessions.sqlite3").write_bytes(bytes(data))
    (tmp_path / "sessions.sqlite3-wal").unlink(missing_ok=True)
    damaged = SessionDB(tmp_path)  # it opens (other sessions may be readable), reports, and refuses what it cannot
    assert damaged.fault is not None and "damaged" in damaged.fault
    with pytest.raises(StorageError, match="damaged") as e:
        damaged.load("a")
    assert str(tmp_path) not in str(e.value)


def test_damaged_kv_file_means_a_rebuild(live, client):
    session(client, "flip")
    send(client, "flip", "keep me")
    want = client.get("/api/sessions/flip").json()["messages"]

    def offload(m):
        s = m.sessions["flip"]
        tokens = s.seq.token_ids()
        m._offload(s)
        path = m.db.kv_path("flip")
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
        n = m.n_restores
        return tokens, m.get("flip").seq.token_ids(), m.n_restores - n

    before, after, restores = live.app.state.worker.call(offload).result(60)
    assert restores == 0 and after == before  # not restored from the damaged file: rebuilt, the same tokens
    assert client.get("/api/sessions/flip").json()["messages"] == want


# ------------------------------------------------------------------ 11, 12. sizes and status details
def test_sizes_are_bounded(client):
    assert client.post("/api/sessions", json={"name": "n" * 5_000_000}).status_code == 400
    r = client.post("/api/sessions", json={"name": "n" * 300})
    assert r.status_code == 400 and "256" in r.json()["error"]["message"]
    msg = [{"role": "user", "content": "x"}]
    r = client.post("/v1/chat/completions", json={"messages": msg, "stop": ["s"] * 1000})
    assert r.status_code == 400
    r = client.post("/v1/chat/completions", json={"messages": msg, "stop": "s" * 5_000_000})
    assert r.status_code == 400 and "64" in r.json()["error"]["message"]
    session(client, "sizes")
    r = client.post("/api/sessions/sizes/messages", json={"text": "x", "params": {"stop": ["a"] * 9}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "params.stop"


def test_status_details(live, client):
    r = client.put("/api/sessions")
    assert r.status_code == 405 and r.json()["error"]["type"] == "invalid_request_error"
    r = client.post("/api/sessions/nobody/stop")
    assert r.status_code == 404 and "no session" in r.json()["error"]["message"]
    worker = live.app.state.worker
    gate = threading.Event()
    held = [worker.call(lambda m: gate.wait(30))]
    try:
        while True:
            try:
                held.append(worker.call(lambda m: None))
            except Exception:
                break
        r = client.get("/api/sessions")
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
    finally:
        gate.set()
    for f in held:
        f.result(30)


def test_an_unexpected_error_is_a_json_500_and_the_connection_serves_on(live, client, monkeypatch):
    """A bug in a handler (an exception no handler names): a readable JSON 500, and the same keep-alive connection
    serves the next request (Starlette's last handler re-raised to the server, which dropped the connection)."""

    def broken():
        raise RuntimeError("a bug")

    monkeypatch.setattr(live.manager, "list", broken)
    for _ in range(2):  # the second on the connection the first one used
        r = client.get("/api/sessions")
        assert r.status_code == 500, r.text
        err = r.json()["error"]
        assert err["type"] == "server_error" and "RuntimeError" in err["message"] and "a bug" not in err["message"]
    monkeypatch.undo()
    assert client.get("/api/sessions").status_code == 200
