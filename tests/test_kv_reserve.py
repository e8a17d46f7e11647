"""Sequences without a session of their own reserve their KV memory before they are created, as sessions and echo
prompts do (SessionManager.reserve): anonymous ones (/v1/chat/completions, /v1/completions and llama-server's
/completion without a session: openai_compat.anonymous) and the copy of a session's cache a suggestion near its
budget drafts in (sessionops.suggestion). The KV memory actually allocated never passes the hard limit however
many requests arrive at once; a request that alone needs more than the limit is a 400 that says so; a full server
answers 503 and serves again once the running requests end; a failed, cancelled or abandoned request gives its
reservation back."""

from __future__ import annotations

import contextlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from gguf_util import EOS_ID
from server_util import LiveServer

from infinichat.errors import InfinichatError
from infinichat.kv.store import KVStore

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BUDGET = 1024  # the anonymous sequences' budget (create_app anon_budget)
STOP_IDS = (EOS_ID, EOS_ID + 2)  # <|endoftext|> and <|im_end|> (tiny_vocab.SPECIALS): both end a reply
NO_EOS = {str(i): -100 for i in STOP_IDS}  # the random model's replies run to max_tokens


@pytest.fixture(scope="module")
def live(tiny_chat_model, tmp_path_factory):
    with LiveServer(tiny_chat_model, tmp_path_factory.mktemp("data"), anon_budget=BUDGET) as srv:
        yield srv


@pytest.fixture
def limits(live):
    """Sets the cap and the hard limit (bytes) for a test, and puts the module's back after it."""
    m = live.manager
    old = m.kv_cap_bytes, m.kv_limit_bytes

    def set_(nbytes: int) -> None:
        m.kv_cap_bytes = m.kv_limit_bytes = nbytes

    yield set_
    m.kv_cap_bytes, m.kv_limit_bytes = old


def allocated(live) -> int:
    """The KV bytes the stores of the server's sequences hold right now (sessions, idle and running anonymous)."""
    lru = live.app.state.prefix_lru
    seqs = [s.seq for s in live.manager.sessions.values() if s.seq is not None] + lru.free + lru.busy
    return sum(q.store.nbytes for q in seqs)


def idle(live) -> None:
    """Nothing held: no request runs, no reservation is left, the count is what the stores hold."""
    lru, m = live.app.state.prefix_lru, live.manager
    deadline = time.monotonic() + 30
    while lru.busy or live.app.state.worker.depth:
        assert time.monotonic() < deadline, "requests still running"
        time.sleep(0.02)
    assert lru.held == {} and lru.busy_bytes == 0
    assert m.total_kv_bytes() == allocated(live)
    assert lru.overruns == 0  # no sequence took more than its request reserved


def body(max_tokens: int, **kw) -> dict:
    return {"prompt": "Once upon a time", "max_tokens": max_tokens, "logit_bias": NO_EOS, **kw}


def test_concurrent_requests_stay_under_the_limit(live, limits, monkeypatch):
    lru = live.app.state.prefix_lru
    per = lru.bytes_for(5 + 300 + 1)  # one request: a few prompt tokens + 300 (512 slots)
    limits(2 * per + per // 2)  # two such requests fit, not three
    peak = [0]
    grow = KVStore.reserve

    def watched(self, n):  # every growth of a store's buffers, in the worker: the bytes allocated now
        grow(self, n)
        peak[0] = max(peak[0], allocated(live))

    monkeypatch.setattr(KVStore, "reserve", watched)

    def one(i: int) -> int:
        with httpx.Client(base_url=live.url, timeout=120) as c:
            r = c.post("/v1/completions", json=body(300, seed=i))
            assert r.status_code in (200, 503), r.text
            if r.status_code == 503:
                assert r.json()["error"]["type"] == "overloaded" and "--kv-limit-mb" in r.json()["error"]["message"]
            return r.status_code

    with ThreadPoolExecutor(6) as pool:
        codes = list(pool.map(one, range(6)))
    assert codes.count(200) >= 2, codes
    assert 0 < peak[0] <= live.manager.kv_limit_bytes, (peak[0], live.manager.kv_limit_bytes)
    assert live.manager.kv_peak_bytes >= peak[0]
    idle(live)
    with httpx.Client(base_url=live.url, timeout=60) as c:
        c.post("/v1/completions", json=body(2))  # a round of the worker after the others: its metrics snapshot
        lines = dict(x.split(" ", 1) for x in c.get("/metrics").text.splitlines() if x.startswith("infinichat_kv_"))
    assert int(lines["infinichat_kv_limit_bytes"]) == live.manager.kv_limit_bytes
    assert peak[0] <= int(lines["infinichat_kv_peak_bytes"]) <= live.manager.kv_limit_bytes


def test_request_over_the_limit_alone_is_400(live, limits):
    lru = live.app.state.prefix_lru
    limits(lru.bytes_for(512))  # 1024 slots do not fit
    with httpx.Client(base_url=live.url, timeout=60) as c:
        before = c.get("/metrics").text
        for path, payload in (
            ("/v1/completions", body(900)),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 900}),
            ("/completion", {"prompt": "Once upon a time", "n_predict": -1}),  # -1: up to the budget
        ):
            r = c.post(path, json=payload)
            assert r.status_code == 400, (path, r.text)
            msg = r.json()["error"]["message"]
            assert "KV memory" in msg and "limit of" in msg and "--kv-limit-mb" in msg, msg
            assert "tokens)" in msg and "fewer tokens" in msg, msg  # how many fit, and what to change
        r = c.post("/v1/completions", json=body(100))  # what fits is served
        assert r.status_code == 200, r.text
        assert c.get("/metrics").status_code == 200 and before
    idle(live)


def hold(live, path: str, payload: dict, started: threading.Event, stop: threading.Event) -> threading.Thread:
    """A streaming request that runs until `stop`, then disconnects (the server cancels it)."""

    def run():
        with httpx.Client(base_url=live.url, timeout=120) as c, c.stream("POST", path, json=payload) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: "):
                    started.set()
                if stop.is_set():
                    break

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize(
    ("path", "payload"),
    [
        ("/v1/completions", body(BUDGET - 40, stream=True)),
        (
            "/v1/chat/completions",
            {
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": BUDGET - 40,
                "logit_bias": NO_EOS,
                "stream": True,
            },
        ),
        (
            "/completion",
            {
                "prompt": "Once upon a time",
                "n_predict": -1,
                "stream": True,
                "logit_bias": [[i, False] for i in STOP_IDS],
            },
        ),
    ],
)
def test_full_server_is_503_then_recovers_after_disconnect(live, limits, monkeypatch, path, payload):
    lru = live.app.state.prefix_lru
    metrics = live.app.state.metrics
    counted = metrics.tokens

    def slowly(**kw):  # each anonymous token, in the worker: the long request outlives the checks below
        counted(**kw)
        time.sleep(0.01)

    monkeypatch.setattr(metrics, "tokens", slowly)
    limits(lru.bytes_for(BUDGET) + lru.bytes_for(100) // 2)  # one long request fits, not a second small one
    started, stop = threading.Event(), threading.Event()
    t = hold(live, path, payload, started, stop)
    try:
        assert started.wait(60)
        assert lru.busy and lru.busy_bytes >= lru.bytes_for(BUDGET)  # its whole budget reserved from the start
        with httpx.Client(base_url=live.url, timeout=60) as c:
            r = c.post("/v1/completions", json=body(100))
            assert r.status_code == 503, r.text
            err = r.json()["error"]
            assert err["type"] == "overloaded" and "retry when they finish" in err["message"]
            assert r.headers["retry-after"]
            assert lru.busy, "the long request ended before the check: it must still be running here"
    finally:
        stop.set()
        t.join(60)
    idle(live)  # the abandoned request gave its reservation back
    with httpx.Client(base_url=live.url, timeout=60) as c:
        r = c.post("/v1/completions", json=body(100))
        assert r.status_code == 200, r.text
    idle(live)


def test_reservation_released_on_error(live, limits, monkeypatch):
    """A request that fails inside its generation (here: the engine refuses the prompt) releases its reservation
    too."""
    lru = live.app.state.prefix_lru
    limits(2 * lru.bytes_for(BUDGET))
    engine = live.app.state.engine

    def broken(*a, **kw):
        raise InfinichatError("injected engine failure")

    monkeypatch.setattr(engine, "prefill", broken)
    monkeypatch.setattr(engine, "prefill_rows", broken, raising=False)
    with httpx.Client(base_url=live.url, timeout=60) as c:
        r = c.post("/v1/completions", json=body(50, prompt="A fresh prompt nobody sent before"))
        assert r.status_code == 400 and "injected engine failure" in r.json()["error"]["message"], r.text
        monkeypatch.undo()
        idle(live)
        r = c.post("/v1/completions", json=body(50))
        assert r.status_code == 200, r.text
    idle(live)


def test_suggestion_copy_is_reserved(live, limits, monkeypatch):
    """/suggest near the session's budget drafts in a copy of its cache: that copy's KV memory is reserved first
    (400 when it alone passes the limit, the session unchanged) and counted while it lives, then released."""
    m = live.manager
    with httpx.Client(base_url=live.url, timeout=60) as c:
        assert c.post("/api/sessions", json={"id": "sg", "settings": {"temperature": 0.0}}).status_code == 201
        with c.stream("POST", "/api/sessions/sg/messages", json={"text": "hello", "params": {"max_tokens": 8}}) as r:
            assert r.status_code == 200 and "event: done" in r.read().decode()
        n = m.sessions["sg"].seq.length
        assert c.patch("/api/sessions/sg/settings", json={"budget": max(64, n + 8)}).status_code == 200
        before = c.get("/api/sessions/sg").json()
        s = m.sessions["sg"]
        need = s.suggest_scratch()
        assert need > 0  # the draft does not fit in the cache: it goes to a copy
        copy = s.seq.store.nbytes  # the copy is as large as the cache (its capacity: the budget)
        limits(copy + 1)  # the session's cache fits, not its copy beside it
        r = c.post("/api/sessions/sg/suggest", json={})
        assert r.status_code == 503 and r.json()["error"]["type"] == "overloaded", r.text
        assert c.get("/api/sessions/sg").json() == before
        limits(copy - 1)  # nor the copy alone
        r = c.post("/api/sessions/sg/suggest", json={})
        assert r.status_code == 400, r.text
        msg = r.json()["error"]["message"]
        assert "suggestion" in msg and "KV memory" in msg and "--kv-limit-mb" in msg and "KiB" in msg, msg
        assert c.get("/api/sessions/sg").json() == before

        limits(16 << 20)
        engine, seen = live.app.state.engine, []
        prefill = engine.prefill

        def watched(seq, ids, **kw):  # the copy's prompt call: what the manager counts meanwhile
            if seq is not m.sessions["sg"].seq:
                seen.append((m.total_kv_bytes(), allocated(live), seq.store.nbytes, len(m.spare)))
            return prefill(seq, ids, **kw)

        monkeypatch.setattr(engine, "prefill", watched)
        n_spare = len(m.spare)
        with c.stream("POST", "/api/sessions/sg/suggest", json={}) as r:
            assert r.status_code == 200 and "event: done" in r.read().decode()
        assert seen, "the suggestion was not drafted in a copy"
        total, resident, copy, spares = seen[0]
        assert spares == n_spare + 1 and total >= resident + copy  # counted beside the caches, while it lives
        assert len(m.spare) == n_spare and m.total_kv_bytes() == allocated(live)  # and released
        assert c.get("/api/sessions/sg").json()["messages"] == before["messages"]


@pytest.mark.parametrize(
    ("path", "extra", "param"),
    [
        ("/v1/completions", {"prompt": "word " * 1100}, "prompt"),  # was: param "messages"
        ("/completion", {"prompt": "word " * 1100, "n_predict": 4}, "prompt"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "word " * 1100}]}, "messages"),
    ],
)
def test_a_prompt_over_the_budget_names_its_field(live, path, extra, param):
    with httpx.Client(base_url=live.url, timeout=60) as c:
        r = c.post(path, json={"max_tokens": 4, **extra} if path != "/completion" else extra)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
        assert f"context budget of this server is {BUDGET} tokens" in r.json()["error"]["message"]
        r = c.post("/v1/completions", json={"prompt": "x", "max_tokens": BUDGET + 1})
        assert r.status_code == 400
        msg = r.json()["error"]["message"]  # was: "(the budget of 1024 tokens, and at most 16384 limit)"
        want = f"(the context budget of {BUDGET} tokens; 16384 at most)"
        assert msg == f"max_tokens={BUDGET + 1} is over the limit of {BUDGET} {want}"
    idle(live)


def reserved_gauge(c: httpx.Client) -> int:
    lines = dict(x.split(" ", 1) for x in c.get("/metrics").text.splitlines() if x.startswith("infinichat_kv_"))
    return int(lines["infinichat_kv_reserved_bytes"])


def test_concurrent_requests_cut_halfway_give_every_reservation_back(live, limits, monkeypatch):
    """Anonymous /v1/completions, /v1/chat/completions, /completion (n_predict -1) and a session's /suggest, 12 at
    once, most cut by their client halfway (a stream closed after its first token, a response not waited for):
    while they run /metrics' infinichat_kv_reserved_bytes counts them, and once they are gone nothing is held and
    the gauge is 0 again; the session a cut /suggest ran on is as it was."""
    metrics = live.app.state.metrics
    counted = metrics.tokens

    def slowly(**kw):  # each token, in the worker: the requests are still running when their clients go
        counted(**kw)
        time.sleep(0.005)

    monkeypatch.setattr(metrics, "tokens", slowly)
    limits(64 << 20)
    with httpx.Client(base_url=live.url, timeout=60) as c:
        assert c.post("/api/sessions", json={"id": "cut", "settings": {"temperature": 0.0}}).status_code == 201
        with c.stream("POST", "/api/sessions/cut/messages", json={"text": "hi", "params": {"max_tokens": 4}}) as r:
            r.read()
        before = c.get("/api/sessions/cut").json()
        chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 200, "logit_bias": NO_EOS}
        requests = [
            ("/v1/completions", body(900, stream=True)),  # request 0: it outlives the gauge's check
            ("/v1/chat/completions", {**chat, "stream": True}),
            (
                "/completion",
                {"prompt": "Once", "n_predict": -1, "stream": True, "logit_bias": [[i, False] for i in STOP_IDS]},
            ),
            ("/api/sessions/cut/suggest", {"params": {"max_tokens": 60}}),
        ]
        seen: list[int] = []

        def one(i: int) -> None:
            path, payload = requests[i % len(requests)]
            if i % 3 == 2:  # a client that does not wait for its answer
                with contextlib.suppress(httpx.TimeoutException):
                    httpx.post(live.url + path, json={**payload, "stream": False}, timeout=0.2)
                return
            with httpx.Client(base_url=live.url, timeout=60) as cc, cc.stream("POST", path, json=payload) as r:
                assert r.status_code in (200, 409, 503), r.read()  # 409: the session runs another suggestion
                for line in r.iter_lines():
                    if line.startswith(("data: ", "event: token")):
                        if i == 0:  # the gauge is a snapshot between the worker's rounds: wait for one
                            deadline = time.monotonic() + 10
                            while not reserved_gauge(c) and time.monotonic() < deadline:
                                time.sleep(0.02)
                            seen.append(reserved_gauge(c))
                        break  # cut halfway: the server cancels the rest

        with ThreadPoolExecutor(12) as pool:
            list(pool.map(one, range(12)))
        assert seen == [seen[0]] and seen[0] > 0  # request 0's reservation, counted while it streamed
        idle(live)
        c.post("/v1/completions", json=body(2))  # a round of the worker after the others: its metrics snapshot
        assert reserved_gauge(c) == 0
        assert live.manager.spare == [live.app.state.prefix_lru]  # no /suggest copy left
        assert c.get("/api/sessions/cut").json()["messages"] == before["messages"]
