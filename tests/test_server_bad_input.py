"""Bad requests get a JSON error with the right 4xx and a message naming what was wrong; the server keeps
serving (checked with /health after each). A full queue answers 429; a missing or wrong API key 401."""

from __future__ import annotations

import threading

import httpx
import pytest
from server_util import LiveServer


@pytest.fixture(scope="module")
def live(tiny_chat_model, tmp_path_factory):
    with LiveServer(tiny_chat_model, tmp_path_factory.mktemp("data"), anon_budget=256) as srv:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            assert c.post("/api/sessions", json={"id": "s1"}).status_code == 201
        yield srv


@pytest.fixture(scope="module")
def client(live):
    with httpx.Client(base_url=live.url, timeout=60) as c:
        yield c


CASES = [  # (method, path, raw body or json, status, words the message must contain)
    ("POST", "/api/sessions", b"{not json", 400, ["malformed JSON"]),
    ("POST", "/api/sessions", b'{"text": "\xff\xfe"}', 400, ["UTF-8"]),
    ("POST", "/api/sessions", [1, 2], 400, ["request body"]),
    ("POST", "/api/sessions", {"id": 5}, 400, ["'id'", "string"]),
    ("POST", "/api/sessions", {"id": "../etc/passwd"}, 400, ["invalid session id", "A-Z"]),
    ("POST", "/api/sessions", {"id": "s1"}, 409, ["already exists"]),
    ("POST", "/api/sessions", {"nme": "x"}, 400, ["unknown field", "nme"]),
    ("POST", "/api/sessions", {"settings": {"budget": -5}}, 400, ["budget", "[64"]),
    ("POST", "/api/sessions", {"settings": {"colour": 1}}, 400, ["unknown setting", "colour"]),
    ("POST", "/api/sessions", {"card": {"spec": "chara_card_v2"}}, 400, ["card"]),
    ("POST", "/api/sessions", {"card_png": "%%%"}, 400, ["base64"]),
    ("GET", "/api/sessions/nope", None, 404, ["no session 'nope'"]),
    ("GET", "/api/sessions/a.b", None, 400, ["invalid session id"]),
    ("POST", "/api/sessions/nope/messages", {"text": "hi"}, 404, ["no session"]),
    ("POST", "/api/sessions/s1/messages", {"text": 3}, 400, ["'text'", "string"]),
    ("POST", "/api/sessions/s1/messages", {}, 400, ["missing", "'text'"]),
    ("POST", "/api/sessions/s1/messages", {"text": "hi", "params": {"temperature": -1}}, 400, ["temperature"]),
    ("POST", "/api/sessions/s1/messages", {"text": "hi", "params": {"max_tokens": 0}}, 400, ["max_tokens", ">= 1"]),
    ("POST", "/api/sessions/s1/messages", {"text": "hi", "params": {"top_p": 7}}, 400, ["top_p"]),
    ("POST", "/api/sessions/s1/messages", {"text": "hi", "params": {"top_logprobs": 1000}}, 400, ["top_logprobs"]),
    ("POST", "/api/sessions/s1/messages", {"text": "hi", "params": {"wat": 1}}, 400, ["unknown sampling", "wat"]),
    ("POST", "/api/sessions/s1/messages", {"text": "x" * 300_000}, 400, ["characters", "at most"]),
    ("POST", "/api/sessions/s1/retry", None, 400, ["nothing to retry"]),
    ("POST", "/api/sessions/s1/revert", {"turn": 99}, 400, ["turn must be", "[0, 0]"]),
    ("POST", "/api/sessions/s1/revert", {"turn": "1"}, 400, ["'turn'", "integer"]),
    ("PATCH", "/api/sessions/s1/messages/7", {"text": "x"}, 400, ["turn must be"]),
    ("PATCH", "/api/sessions/s1/settings", {"policy": "magic"}, 400, ["unknown policy", "magic"]),
    ("GET", "/api/nothing", None, 404, ["no such endpoint"]),
    ("PUT", "/api/sessions", None, 405, ["not allowed"]),
    ("POST", "/v1/chat/completions", {"messages": "hi"}, 400, ["'messages'"]),
    ("POST", "/v1/chat/completions", {"messages": []}, 400, ["at least one message"]),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, ["role", "wizard"]),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": 3}, 400, ["n=3"]),
    (
        "POST",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "max_tokens": -4},
        400,
        ["max_tokens"],
    ),
    (
        "POST",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "temperature": "hot"},
        400,
        ["'temperature'"],
    ),
    (
        "POST",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "stop": ["a"] * 9},
        400,
        ["stop", "at most 4"],
    ),
    (
        "POST",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "word " * 400}]},
        400,
        ["prompt is", "budget"],
    ),
    ("POST", "/v1/completions", {"prompt": [10**9]}, 400, ["token ids"]),
    # llama-server's endpoints (benchmarks/bad_input_sweep.py found the first five as 500s or a stalled server)
    ("POST", "/completion", b'{"prompt": "Once \\ud800", "n_predict": 2}', 400, ["'prompt'", "invalid character"]),
    ("POST", "/tokenize", b'{"content": "\\udfff"}', 400, ["'content'", "invalid character"]),
    ("POST", "/tokenize", {"content": "x" * 1_000_001, "with_pieces": True}, 400, ["1000001 characters", "at most"]),
    ("POST", "/apply-template", {"messages": [{"content": "hi"}]}, 400, ["missing", "messages.0.role"]),
    ("POST", "/apply-template", {"messages": [{"role": "user", "content": [1]}]}, 400, ["messages.0.content"]),
    ("POST", "/completion", {"prompt": "Once", "n_predict": 2**70}, 400, ["n_predict"]),
    ("POST", "/completion", {"prompt": [2**70]}, 400, ["token ids"]),
    ("POST", "/detokenize", {"tokens": [2**70]}, 400, ["not a token id"]),
    ("POST", "/slots/99999999999999999999999?action=save", {"filename": "f"}, 404, ["no slot"]),
    ("POST", "/slots/0?action=delete", {"filename": "f"}, 400, ["action", "save, restore, erase"]),
    ("POST", "/slots/0?action=save", {"filename": "../x"}, 400, ["filename"]),
]


@pytest.mark.parametrize("method,path,body,status,words", CASES, ids=[f"{c[0]} {c[1]} {c[3]}" for c in CASES])
def test_bad_request(client, method, path, body, status, words):
    kw = {"content": body} if isinstance(body, bytes) else ({"json": body} if body is not None else {})
    r = client.request(method, path, headers={"Content-Type": "application/json"}, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    for w in words:
        assert w in err["message"], err
    assert client.get("/health").json()["status"] == "ok"  # still serving


def test_a_refusal_keeps_the_connection(client):
    """A 400 from a handler's own validation (/apply-template validates its messages itself) is answered like
    any other: the keep-alive connection stays usable (it used to be a 500 that dropped it)."""
    for _ in range(3):
        r = client.post("/apply-template", json={"messages": [{"a": 1}]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages.0.role", r.text
        assert client.get("/health").status_code == 200  # on the same connection


@pytest.mark.parametrize(
    "path",
    ["/completion", "/tokenize", "/detokenize", "/apply-template", "/slots/0?action=save", "/slots/0?action=erase"],
)
def test_llama_server_endpoints_are_guarded_like_the_api(client, live, path):
    """The llama-server endpoints sit outside /api and /v1 but change things (a slot restore overwrites a session):
    a cross-site page cannot drive them, and a body must be JSON."""
    before = client.get("/api/sessions/s1").json()
    r = client.post(path, content=b'{"prompt": "x"}', headers={"Origin": "http://evil.example"})
    assert r.status_code == 403 and "cross-site" in r.json()["error"]["message"], r.text
    r = client.post(path, content=b'{"prompt": "x"}', headers={"Content-Type": "text/plain"})
    assert r.status_code == 415 and "application/json" in r.json()["error"]["message"], r.text
    assert client.get("/api/sessions/s1").json() == before


def test_api_key(live, client):
    live.app.state.api_key = "sekrit"
    try:
        r = client.get("/api/sessions")
        assert r.status_code == 401 and "missing API key" in r.json()["error"]["message"]
        r = client.get("/v1/models", headers={"Authorization": "Bearer nope"})
        assert r.status_code == 401 and "wrong API key" in r.json()["error"]["message"]
        assert client.get("/api/sessions", headers={"Authorization": "Bearer sekrit"}).status_code == 200
        assert client.get("/health").status_code == 200  # no key needed
    finally:
        live.app.state.api_key = None


def test_full_queue_is_429(live, client):
    worker = live.app.state.worker
    gate = threading.Event()
    held = [worker.call(lambda m: gate.wait(30))]  # occupies the worker
    try:
        while True:  # fill the queue up to its bound
            try:
                held.append(worker.call(lambda m: None))
            except Exception:
                break
        r = client.get("/api/sessions")
        assert r.status_code == 429 and "retry later" in r.json()["error"]["message"]
        assert r.json()["error"]["type"] == "busy"
    finally:
        gate.set()
    for f in held:
        f.result(30)
    assert client.get("/api/sessions").status_code == 200
