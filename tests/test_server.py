"""The HTTP server end to end (a real uvicorn server on 127.0.0.1, a tiny random model): the session API,
SSE streaming, fair interleaving of two sessions, cancellation by stop and by disconnect, the OpenAI
client, metrics. The one test on the real default model is marked slow."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
from server_util import LiveServer, events

from infinichat.model.loader import load_model
from infinichat.session.session import Session

GREEDY = {"temperature": 0.0, "max_tokens": 8}


@pytest.fixture(scope="module")
def client(live):
    with httpx.Client(base_url=live.url, timeout=60) as c:
        yield c


def stream(client, path, body) -> list[tuple[str, dict]]:
    with client.stream("POST", path, json=body) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        return events(r)


def new_session(client, sid, **kw) -> dict:
    r = client.post("/api/sessions", json={"id": sid, **kw})
    assert r.status_code == 201, r.text
    return r.json()


def test_session_lifecycle(client):
    h = new_session(client, "life", system_prompt="You are terse.", settings={"temperature": 0})
    assert h["messages"] == [] and h["cache"]["resident"]
    ev = stream(
        client, "/api/sessions/life/messages", {"text": "Hello", "params": {"max_tokens": 20, "top_logprobs": 3}}
    )
    kinds = [k for k, _ in ev]
    assert kinds[-1] == "done" and "kv" in kinds and kinds.count("token") >= 1
    toks = [d for k, d in ev if k == "token" and d["token"] is not None]
    assert all(len(d["top"]) == 3 and d["turn"] == 1 for d in toks)
    done = ev[-1][1]
    assert done["turn"] == 1 and done["message"]["text"] == done["text"] == "".join(
        d["text"] for k, d in ev if k == "token"
    )
    h = client.get("/api/sessions/life").json()
    assert [m["kind"] for m in h["messages"]] == ["user", "assistant"]
    assert h["messages"][1]["tokens_in_cache"] == h["messages"][1]["n_tokens"] > 0
    first = h["messages"][1]["text"]
    ev = stream(client, "/api/sessions/life/retry", {"params": {"seed": 5, "temperature": 1.0, "max_tokens": 6}})
    h = client.get("/api/sessions/life").json()
    assert len(h["messages"][1]["alternatives"]) == 2 and h["messages"][1]["selected"] == 1
    h = client.post("/api/sessions/life/select", json={"turn": 1, "index": 0}).json()
    assert h["messages"][1]["text"] == first
    stream(client, "/api/sessions/life/continue", {"params": {"max_tokens": 3}})
    stream(client, "/api/sessions/life/narrate", {"params": {"max_tokens": 4}})
    sug = stream(client, "/api/sessions/life/suggest", {"params": {"max_tokens": 4}})
    assert sug[-1][0] == "done" and sug[-1][1]["turn"] is None and sug[-1][1]["message"] is None
    h = client.post("/api/sessions/life/rag", json={"text": "The sky is green."}).json()
    assert h["messages"][-1]["kind"] == "rag"
    h = client.patch("/api/sessions/life/messages/0", json={"text": "Hi there"}).json()
    assert h["messages"][0]["text"] == "Hi there"
    n = len(h["messages"])
    h = client.delete(f"/api/sessions/life/messages/{n - 1}").json()
    assert len(h["messages"]) == n - 1
    kv = client.get("/api/sessions/life/kv").json()
    assert {"length", "budget", "free", "policy", "segments", "evicted_turns", "evictions", "evicted_tokens"} <= set(kv)
    assert kv["segments"][0]["kind"] == "system" and kv["segments"][0]["pinned"]
    assert sum(s["tokens"] for s in kv["segments"]) == kv["length"]
    h = client.post("/api/sessions/life/revert", json={"turn": 1}).json()
    assert len(h["messages"]) == 1
    h = client.patch("/api/sessions/life/settings", json={"budget": 512}).json()
    assert h["settings"]["budget"] == 512 and h["cache"]["budget"] == 512
    assert any(s["id"] == "life" for s in client.get("/api/sessions").json()["sessions"])
    h = client.post("/api/sessions/life/reset").json()
    assert h["messages"] == []
    assert client.delete("/api/sessions/life").status_code == 204
    assert client.get("/api/sessions/life").status_code == 404
    info = client.get("/api/info").json()
    assert info["backend"] == "torch" and "turns" in info["policies"]


def test_card_session(client):
    card = {
        "spec": "chara_card_v2",
        "spec_version": "2.0",
        "data": {"name": "Ada", "description": "A robot.", "first_mes": "Hello, {{user}}."},
    }
    h = new_session(client, "card1", card=card)
    assert h["name"] == "Ada" and h["messages"][0]["text"] == "Hello, User."


def _reader(client, sid, body, log, done, stop_after=None):
    toks = []
    with client.stream("POST", f"/api/sessions/{sid}/messages", json=body) as r:
        name = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                log.append((sid, name, time.monotonic()))
                data = json.loads(line[6:])
                if name == "token":
                    toks.append(data)
                if name == "done":
                    done[sid] = {**data, "_tokens": toks}
                if stop_after is not None and sum(1 for s, k, _ in log if s == sid and k == "token") >= stop_after:
                    return  # leaving the block closes the connection: a disconnect


def test_two_sessions_interleave_and_stop(live, client):
    cap = live.manager.kv_cap_bytes
    live.manager.kv_cap_bytes = 1  # every request offloads the idle caches; a generating one must stay
    try:
        _interleave_and_stop(live, client)
    finally:
        live.manager.kv_cap_bytes = cap


def _interleave_and_stop(live, client):
    for sid in ("fa", "fb"):
        new_session(client, sid, settings={"temperature": 0.0})  # greedy: no EOS in 3000 tokens, so only stop ends it
    log, done = [], {}
    body = {"text": "Tell me everything.", "params": {"max_tokens": 16000, "repetition_penalty": 1.0}}
    threads = [
        threading.Thread(target=_reader, args=(httpx.Client(base_url=live.url, timeout=60), sid, body, log, done))
        for sid in ("fa", "fb")
    ]
    threads[0].start()
    while not any(s == "fa" and k == "token" for s, k, _ in log):
        time.sleep(0.01)
    threads[1].start()
    deadline = time.monotonic() + 30
    while sum(1 for s, k, _ in log if s == "fb" and k == "token") < 20 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert "fa" not in done, "the first reply ended before the second started: cannot check fairness"
    # both progress while both run: after fb's first token, fa got tokens too (round robin, not FIFO)
    fb_first = next(t for s, k, t in log if s == "fb" and k == "token")
    assert sum(1 for s, k, t in log if s == "fa" and k == "token" and t > fb_first) >= 5
    for sid in ("fa", "fb"):
        assert client.post(f"/api/sessions/{sid}/stop").json() == {"stopped": True}
    for t in threads:
        t.join(30)
    for sid in ("fa", "fb"):
        assert done[sid]["finish_reason"] == "cancelled"
        h = client.get(f"/api/sessions/{sid}").json()
        assert h["messages"][1]["alternatives"][0]["finish_reason"] == "cancelled"
        assert h["messages"][1]["text"] == "".join(d["text"] for d in done[sid]["_tokens"])
    assert client.post("/api/sessions/fa/stop").json() == {"stopped": False}
    assert live.manager.n_offloads > 0


def test_disconnect_cancels_and_session_stays_consistent(live, client):
    # greedy: this tiny model samples no EOS in 3000 tokens here, so the reply can only end by the disconnect
    # (seeded sampling at temperature 1 ended with EOS after 121 tokens: a race with noticing the disconnect)
    new_session(client, "dc", settings={"temperature": 0.0})
    log, done = [], {}
    body = {"text": "Go on forever.", "params": {"max_tokens": 16000, "repetition_penalty": 1.0}}
    _reader(httpx.Client(base_url=live.url, timeout=60), "dc", body, log, done, stop_after=5)
    assert "dc" not in done
    deadline = time.monotonic() + 20
    while True:  # the worker notices the disconnect at its next step
        h = client.get("/api/sessions/dc").json()
        if len(h["messages"]) == 2 and h["messages"][1]["alternatives"][0]["finish_reason"] == "cancelled":
            break
        assert time.monotonic() < deadline, h
        time.sleep(0.05)
    ev = stream(client, "/api/sessions/dc/messages", {"text": "Next.", "params": GREEDY})
    assert ev[-1][0] == "done"
    h = client.get("/api/sessions/dc").json()
    assert [m["kind"] for m in h["messages"]] == ["user", "assistant", "user", "assistant"]
    kv = client.get("/api/sessions/dc/kv").json()
    assert [m["n_tokens"] for m in h["messages"]] == [x["tokens"] for x in kv["segments"]]

    def same_as_rebuilt(m):  # the cache holds exactly the transcript, as recomputed from scratch
        s = m.get("dc")
        r = Session("ref", s.engine, s.tok, settings=s.settings, chat_format=s.fmt)
        r.messages = s.messages
        r.rebuild()
        return s.seq.token_ids() == r.seq.token_ids()

    assert live.app.state.worker.call(same_as_rebuilt, session="dc").result(30)


def test_busy_session_is_409(live, client):
    new_session(client, "busy", settings={"temperature": 0.0})  # greedy: this tiny model never samples EOS here
    log, done = [], {}
    body = {"text": "Long.", "params": {"max_tokens": 16000, "repetition_penalty": 1.0}}
    t = threading.Thread(target=_reader, args=(httpx.Client(base_url=live.url, timeout=60), "busy", body, log, done))
    t.start()
    while not log:
        time.sleep(0.01)
    r = client.post("/api/sessions/busy/messages", json={"text": "again"})
    assert r.status_code == 409 and "busy" in r.json()["error"]["message"]
    assert client.post("/api/sessions/busy/revert", json={"turn": 0}).status_code == 409
    assert client.get("/api/sessions/busy").status_code == 200  # reads still work
    client.post("/api/sessions/busy/stop")
    t.join(30)
    assert done["busy"]["finish_reason"] == "cancelled"


def test_a_session_is_free_when_its_client_sees_the_outcome():
    """The moment a client sees a stream's end or a call's result, the session takes its next request: the
    worker marks the job finished first (it used to end the stream, then free the session, so a client that
    answered at once could get 409 busy). Here the next request is submitted from inside the worker's own
    hand-over (the sink receiving END, the future's done-callback), the earliest a client could send it."""
    import concurrent.futures
    import types

    from infinichat.server.worker import END, Busy, EngineWorker

    worker = EngineWorker(manager=types.SimpleNamespace(close=lambda: None)).start()
    seen: list[str] = []

    def submit_next(follow_up: concurrent.futures.Future) -> None:
        try:  # admission is immediate: Busy is raised here, before anything runs
            worker.call(lambda m: "next", session="s").add_done_callback(lambda f: follow_up.set_result(f.result()))
        except Exception as e:
            follow_up.set_exception(e)

    try:
        for _ in range(3):
            follow_up = concurrent.futures.Future()
            sink = lambda item, fu=follow_up: submit_next(fu) if item is END else seen.append(item)  # noqa: E731  (binds fu per round)
            worker.stream(lambda m, job: iter(["a", "b"]), sink, session="s")
            assert follow_up.result(timeout=10) == "next"
            follow_up = concurrent.futures.Future()
            worker.call(lambda m: "first", session="s").add_done_callback(lambda f, fu=follow_up: submit_next(fu))
            assert follow_up.result(timeout=10) == "next"
        assert seen == ["a", "b"] * 3
        gate = threading.Event()
        worker.call(lambda m: gate.wait(10), session="s")
        try:
            with pytest.raises(Busy):  # while a job runs, the session is still busy
                worker.call(lambda m: None, session="s")
        finally:
            gate.set()
    finally:
        worker.close()


def test_openai_client(live):
    openai = pytest.importorskip("openai")
    oc = openai.OpenAI(base_url=live.url + "/v1", api_key="unused")
    models = oc.models.list()
    assert [m.id for m in models.data] == ["tiny-llama"]
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    r = oc.chat.completions.create(model="x", messages=msgs, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2)
    c = r.choices[0]
    assert c.finish_reason in ("stop", "length") and r.usage.completion_tokens == len(c.logprobs.content) > 0
    assert all(len(t.top_logprobs) == 2 for t in c.logprobs.content)
    parts = list(oc.chat.completions.create(model="x", messages=msgs, max_tokens=6, temperature=0, stream=True))
    assert "".join(p.choices[0].delta.content or "" for p in parts) == c.message.content  # greedy: same text
    assert parts[-1].choices[0].finish_reason == c.finish_reason
    # the second identical request reused the cached prompt prefix
    again = oc.chat.completions.create(model="x", messages=msgs, max_tokens=6, temperature=0)
    assert again.usage.prompt_tokens_details.cached_tokens == r.usage.prompt_tokens - 1
    comp = oc.completions.create(model="x", prompt="Once upon", max_tokens=5, temperature=0, logprobs=2, seed=1)
    assert comp.choices[0].text and len(comp.choices[0].logprobs.token_logprobs) == comp.usage.completion_tokens
    st = list(oc.completions.create(model="x", prompt="Once upon", max_tokens=5, temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in st) == comp.choices[0].text
    with pytest.raises(openai.BadRequestError, match="n=2"):
        oc.chat.completions.create(model="x", messages=msgs, n=2)


def test_openai_session_header_reuses_the_session(live, client):
    openai = pytest.importorskip("openai")
    oc = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", default_headers={"X-Session-Id": "oai"})
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    r1 = oc.chat.completions.create(model="x", messages=msgs, max_tokens=5, temperature=0)
    msgs += [{"role": "assistant", "content": r1.choices[0].message.content}, {"role": "user", "content": "More"}]
    oc.chat.completions.create(model="x", messages=msgs, max_tokens=5, temperature=0)
    h = client.get("/api/sessions/oai").json()
    assert [m["text"] for m in h["messages"][:3]] == [m["content"] for m in msgs[1:]]
    assert len(h["messages"]) == 4 and h["system_prompt"] == "Be brief."
    # a diverging history reverts the session to the common prefix
    oc.chat.completions.create(model="x", messages=[*msgs[:1], {"role": "user", "content": "Other"}], max_tokens=3)
    h = client.get("/api/sessions/oai").json()
    assert [m["text"] for m in h["messages"]][:1] == ["Other"] and len(h["messages"]) == 2


def test_metrics_and_health(client):
    assert client.get("/health").json()["status"] == "ok"
    text = client.get("/metrics").text
    for name in (
        "infinichat_requests_total{",
        "infinichat_tokens_in_total",
        "infinichat_tokens_out_total",
        "infinichat_tokens_per_second",
        "infinichat_queue_depth",
        "infinichat_cache_tokens",
        "infinichat_evictions_total",
        "infinichat_tokens_per_second_10s",
    ):
        assert name in text
    assert 'endpoint="/health",status="200"' in text


def test_metrics_batch_size_histogram(client):
    """Two sessions generating at once: their decode steps are counted per forward call in the histogram."""
    for sid in ("hist-a", "hist-b"):
        new_session(client, sid, settings={"temperature": 0})

    def one(sid):
        stream(client, f"/api/sessions/{sid}/messages", {"text": "Count to ten", "params": {"max_tokens": 24}})

    threads = [threading.Thread(target=one, args=(sid,)) for sid in ("hist-a", "hist-b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    lines = dict(
        ln.rsplit(" ", 1) for ln in client.get("/metrics").text.splitlines() if ln.startswith("infinichat_decode_batch")
    )
    count, total = int(lines["infinichat_decode_batch_size_count"]), int(lines["infinichat_decode_batch_size_sum"])
    assert count > 0 and total >= count
    assert int(lines['infinichat_decode_batch_size_bucket{le="+Inf"}']) == count
    buckets = [int(lines[f'infinichat_decode_batch_size_bucket{{le="{le}"}}']) for le in (1, 2, 4, 8)]
    assert buckets == sorted(buckets) and buckets[-1] <= count
    text = client.get("/metrics").text  # the prompts went through the worker's batched prompt calls
    lines = dict(ln.rsplit(" ", 1) for ln in text.splitlines() if ln.startswith("infinichat_prefill_batch"))
    assert int(lines["infinichat_prefill_batch_size_count"]) > 0
    parts = dict(ln.rsplit(" ", 1) for ln in text.splitlines() if ln.startswith("infinichat_first_item_seconds"))
    assert (
        int(parts["infinichat_first_item_seconds_count"]) >= 2
        and float(parts['infinichat_first_item_seconds{part="prefill"}']) > 0
    )


@pytest.mark.slow
def test_default_model_through_the_openai_client(tmp_path):
    openai = pytest.importorskip("openai")
    loaded = load_model(None, "bfloat16")
    with LiveServer(loaded, tmp_path / "data") as srv:
        oc = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused")
        r = oc.chat.completions.create(
            model=loaded.name,
            temperature=0,
            max_tokens=16,
            messages=[{"role": "user", "content": "What is the capital of France?"}],
        )
        assert "Paris" in r.choices[0].message.content
        parts = list(
            oc.chat.completions.create(
                model=loaded.name,
                temperature=0,
                max_tokens=16,
                stream=True,
                messages=[{"role": "user", "content": "What is the capital of France?"}],
            )
        )
        assert "".join(p.choices[0].delta.content or "" for p in parts) == r.choices[0].message.content


@pytest.fixture(params=["http", "local"])
def backend(request, live, tiny_chat_model, tmp_path):
    from infinichat.cli.chat_backends import HttpBackend, LocalBackend
    from infinichat.engine.torch_engine import TorchEngine
    from infinichat.session.manager import SessionManager

    if request.param == "http":
        b = HttpBackend(live.url)
    else:
        m = tiny_chat_model
        b = LocalBackend(
            SessionManager(TorchEngine(m.model, m.tokenizer.eos_ids), m.tokenizer, m.file_hash, tmp_path / "local"),
            m.name,
        )
    yield b
    b.close()


def test_terminal_client_commands(backend):
    """The same command loop drives a server and an in-process manager."""
    from rich.console import Console

    from infinichat.cli.chat import ChatClient
    from infinichat.cli.chat_io import ScriptReader
    from infinichat.errors import InfinichatError

    console = Console(record=True, width=200, force_terminal=False)
    client = ChatClient(console, backend, ScriptReader(console, []))  # no input: :suggest's offer is declined
    run_command = client.run_line
    sid = f"cli-{type(backend).__name__}"
    backend.open(sid, {"temperature": 0.0, "max_tokens": 6}, "Be kind.")
    for line in (
        "Hello",
        ":retry",
        ":continue",
        ":narrate",
        ":suggest",
        ":rag The code is 42.",
        ":history",
        ":sessions",
        ":help",
    ):
        assert run_command(line)
    h = backend.history()
    assert [m["kind"] for m in h["messages"]] == ["user", "assistant", "narration", "rag"]
    assert len(h["messages"][1]["alternatives"]) == 2
    assert run_command(":revert 1")
    assert len(backend.history()["messages"]) == 1
    for bad in (":revert x", ":rag", ":nope", ":revert 9"):
        with pytest.raises(InfinichatError):
            run_command(bad)
    assert not run_command(":exit")
    out = console.export_text()
    assert "bot>" in out and "narrator>" in out and "suggestion>" in out and sid in out and ":revert N" in out


def test_a_disconnect_during_the_prompt_leaves_the_session_as_it_was(tiny_chat_model, tmp_path, monkeypatch):
    """A client that goes away while its long prompt is still being computed (before any token) cancels the
    message: the session keeps neither it nor a reply, and takes the next message. (Nothing watched the client
    before the first item: the whole prompt ran, and the session kept the message and a one-token reply its client
    never saw.) Anonymous requests cut the same way leave nothing behind either."""
    with LiveServer(tiny_chat_model, tmp_path) as srv:
        engine = srv.app.state.engine
        prefill, rows = engine.prefill, engine.prefill_rows

        def slow(seq, ids, **kw):  # prompt tokens, in the worker: 1 ms each
            time.sleep(0.001 * len(ids))
            return prefill(seq, ids, **kw)

        def slow_rows(items):
            time.sleep(0.001 * sum(len(ids) for _, ids in items))
            return rows(items)

        monkeypatch.setattr(engine, "prefill", slow)
        monkeypatch.setattr(engine, "prefill_rows", slow_rows)
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            new_session(c, "dc", settings={"temperature": 0.0})
            stream(c, "/api/sessions/dc/messages", {"text": "hi", "params": GREEDY})
            before = c.get("/api/sessions/dc").json()
            text = "alpha beta gamma delta " * 100  # 2300 tokens of the byte-level vocabulary: 2 s or more
            for path, body in (
                ("/api/sessions/dc/messages", {"text": text, "params": GREEDY}),
                ("/v1/completions", {"prompt": text[:1500], "max_tokens": 4, "stream": True}),
                ("/completion", {"prompt": text[:1500], "n_predict": 4}),
            ):
                with pytest.raises(httpx.ReadTimeout), httpx.Client(base_url=srv.url, timeout=0.5) as short:
                    short.post(path, json=body)
                deadline = time.monotonic() + 60
                while (srv.app.state.worker.depth or srv.app.state.prefix_lru.busy) and time.monotonic() < deadline:
                    time.sleep(0.05)
                after = c.get("/api/sessions/dc").json()
                assert after["messages"] == before["messages"], path
                assert after["cache"]["tokens"] == before["cache"]["tokens"], path
                assert srv.app.state.prefix_lru.held == {} and srv.app.state.prefix_lru.busy_bytes == 0
            assert stream(c, "/api/sessions/dc/messages", {"text": "again", "params": GREEDY})[-1][0] == "done"
