"""Chunked prefill interleaved with other sessions' decode steps (engine/batch.py `PrefillPacer`, the worker's
pause): a prompt evaluated in chunks equals the one-shot prefill (float32: logits within 1e-4, K/V within 1e-5:
later chunks attend through a mask, a different summation order); while one stream generates, another's long
prompt goes in chunks with the first stream's tokens in between; a stop between two chunks abandons the
prefill and leaves the session as it was before the request."""

from __future__ import annotations

import threading
import time
import types

import pytest
import torch

from infinichat.engine.batch import PrefillPacer
from infinichat.engine.sampling import SamplingParams
from infinichat.engine.torch_engine import TorchEngine
from infinichat.server.worker import END, Cancelled, EngineWorker
from infinichat.session.manager import SessionManager

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LONG = [5 + (11 * j) % 250 for j in range(300)]


@pytest.fixture(scope="module")
def engine(tiny_chat_model):
    return TorchEngine(tiny_chat_model.model, ())  # no EOS: every reply has its full length


def test_chunked_prefill_equals_one_shot(engine):
    one = engine.new_sequence()
    want = engine.prefill(one, LONG)
    pauses = []
    engine.pacer = PrefillPacer(64, lambda: True, lambda: pauses.append(1))
    try:
        seq = engine.new_sequence()
        got = engine.prefill(seq, LONG)
    finally:
        engine.pacer = None
    assert len(pauses) == 4  # 5 calls of <= 64 tokens
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert seq.token_ids() == one.token_ids() and seq.positions() == one.positions()
    n = seq.length
    for a, b in zip(seq.store.k + seq.store.v, one.store.k + one.store.v, strict=True):
        torch.testing.assert_close(a[:, :n], b[:, :n], atol=1e-5, rtol=0)


def test_nobody_waiting_means_one_call(engine):
    calls = []
    real = engine._append
    engine._append = lambda seq, ids, *a, **k: calls.append(len(ids)) or real(seq, ids, *a, **k)
    engine.pacer = PrefillPacer(64, lambda: False, lambda: None)
    try:
        engine.prefill(engine.new_sequence(), LONG)
    finally:
        engine.pacer = None
        del engine._append
    assert calls == [len(LONG)]


def test_bad_chunk_is_refused():
    with pytest.raises(ValueError, match="at least 1 token"):
        PrefillPacer(0, lambda: True, lambda: None)


class Log:
    """What the worker did, in order: ("A", token) items of the streaming session, ("B", n) prompt calls of B."""

    def __init__(self, engine, seq_b):
        self.items, self.lock = [], threading.Lock()
        self.engine, self.seq_b = engine, seq_b
        self._real, self._real_rows = engine._append, engine.prefill_rows

    def __enter__(self):
        def rec(seq, ids, *a, **k):
            if seq is self.seq_b and len(ids) > 1:
                self.add(("B", len(ids)))
            return self._real(seq, ids, *a, **k)

        def rec_rows(items):  # the worker's batched prompt calls
            for seq, ids in items:
                if seq is self.seq_b and len(ids) > 1:
                    self.add(("B", len(ids)))
            return self._real_rows(items)

        self.engine._append = rec
        self.engine.prefill_rows = rec_rows
        return self

    def __exit__(self, *exc):
        del self.engine._append
        del self.engine.prefill_rows

    def add(self, item):
        with self.lock:
            self.items.append(item)


def _gen_stream(engine, seq, prompt, n, tag, log):
    params = SamplingParams(temperature=0.0, max_tokens=n)

    def fn(m, job):
        return ((tag, st.token) for st in engine.generate(seq, prompt, params, should_stop=job.should_stop))

    def sink(item):
        if isinstance(item, tuple) and item[0] == "A":
            log.add(item)
        elif isinstance(item, BaseException):
            log.add(("error", item))
        elif item is END:
            log.add((tag + "-end", None))

    return fn, sink


def _wait(cond, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_a_streaming_session_gets_tokens_between_the_chunks_of_a_long_prompt(engine):
    seq_a, seq_b = engine.new_sequence(), engine.new_sequence()
    manager = types.SimpleNamespace(engine=engine, close=lambda: None)
    worker = EngineWorker(manager, prefill_chunk=32).start()
    try:
        with Log(engine, seq_b) as log:
            fa, sa = _gen_stream(engine, seq_a, [3, 4, 5], 400, "A", log)
            worker.stream(fa, sa, session="a")
            _wait(lambda: sum(1 for x in log.items if x[0] == "A") >= 3)
            fb, sb = _gen_stream(engine, seq_b, LONG, 2, "B", log)
            worker.stream(fb, sb, session="b")
            _wait(lambda: any(x[0] == "B-end" for x in log.items))
            worker.stop_session("a")
            _wait(lambda: any(x[0] == "A-end" for x in log.items))
        kinds = [x[0] for x in log.items]
        b_calls = [i for i, k in enumerate(kinds) if k == "B"]
        assert len(b_calls) == 10  # 300 tokens in calls of 32
        between = [k for k in kinds[b_calls[0] : b_calls[-1]] if k == "A"]
        assert len(between) >= 9  # one A token per pause, at least
        assert not any(k == "error" for k in kinds)
    finally:
        worker.close()
    # B's cache is the one-shot prefill's, within the float32 tolerance above
    ref = engine.new_sequence()
    engine.prefill(ref, LONG)
    assert seq_b.token_ids()[: len(LONG)] == LONG
    n = len(LONG)
    for a, b in zip(seq_b.store.k, ref.store.k, strict=True):
        torch.testing.assert_close(a[:, :n], b[:, :n], atol=1e-5, rtol=0)


def test_a_stop_between_chunks_cancels_the_prefill_and_changes_nothing(tiny_chat_model, tmp_path):
    """Session b sends a long message while session a streams; b is stopped during its third prompt call:
    b gets `Cancelled` (no output), its transcript and settings are as before, a is unaffected, and b's next
    message works."""
    tok = tiny_chat_model.tokenizer
    engine = TorchEngine(tiny_chat_model.model, ())
    m = SessionManager(engine, tok, tiny_chat_model.file_hash, tmp_path)
    a, b = m.create("a"), m.create("b")
    params = SamplingParams(temperature=0.0, max_tokens=400)
    worker = EngineWorker(m, prefill_chunk=16).start()
    long_text = " ".join(f"word{i}" for i in range(120))
    try:
        list(b.send("hello", SamplingParams(temperature=0.0, max_tokens=3)))  # b has a turn already
        before = [(x.kind, x.text) for x in b.messages]
        assert len(before) == 2
        got_a, got_b, b_error = [], [], []
        done = threading.Event()

        def sink_a(item):
            if item is END:
                done.set()
            elif not isinstance(item, BaseException):
                got_a.append(item)

        def sink_b(item):
            if item is not END:
                (b_error if isinstance(item, BaseException) else got_b).append(item)

        worker.stream(lambda mm, job: mm.guarded(a, a.send("tell me", params, job.should_stop)), sink_a, session="a")
        _wait(lambda: len(got_a) >= 3)
        calls = []
        real = engine.prefill_rows

        def spy(items):  # the worker's batched prompt calls
            for seq, ids in items:
                if seq is b.seq and len(ids) > 1:
                    calls.append(len(ids))
                    if len(calls) == 3:
                        worker.stop_session("b")
            return real(items)

        engine.prefill_rows = spy
        try:
            worker.stream(lambda mm, job: mm.guarded(b, b.send(long_text, params, job.should_stop)), sink_b, "b")
            _wait(lambda: b_error or got_b)
        finally:
            del engine.prefill_rows
        assert got_b == [] and len(b_error) == 1 and isinstance(b_error[0], Cancelled)
        assert len(calls) == 3 and max(calls) <= 16
        assert [(x.kind, x.text) for x in b.messages] == before
        n_a = len(got_a)
        _wait(lambda: len(got_a) > n_a + 2)  # a keeps streaming
        worker.stop_session("a")
        assert done.wait(60)
        again = SamplingParams(temperature=0.0, max_tokens=3)
        reply = worker.call(lambda mm: list(mm.guarded(b, b.send("again", again))), session="b").result(60)
        assert reply[-1].kind == "done" and len(b.messages) == 4
    finally:
        worker.close()


@pytest.mark.parametrize(
    "flag, value, says",
    [
        ("--prefill-chunk", "-1", "--prefill-chunk must be in [1, 65536]"),
        ("--max-batch", "0", "--max-batch must"),
        ("--prefill-group", "-1", "--prefill-group must be in [2, 65536] tokens, or 0 or 1 (no prompts of several"),
        ("--prefill-group", "65537", "got 65537"),
    ],
)
def test_serve_refuses_bad_batching_flags(tmp_path, capsys, flag, value, says):
    from infinichat.cli.main import main

    assert main(["serve", flag, value, "--data-dir", str(tmp_path)]) == 2
    assert says in capsys.readouterr().err


def test_prefill_group_reaches_the_worker(tiny_chat_model, tmp_path):
    """`serve --prefill-group N` (config key `prefill_group`, default 32) is checked with the other options and
    handed to the worker by `create_app`."""
    from infinichat.cli.main import build_parser
    from infinichat.config_file import namespace
    from infinichat.server.app import check_serve_options, create_app

    parse = build_parser().parse_args
    assert parse(["serve"]).prefill_group == 32
    for n in (0, 1, 65536):
        check_serve_options(parse(["serve", "--prefill-group", str(n)]))  # accepted
    cfg = tmp_path / "serve.toml"
    cfg.write_text("[serve]\nprefill_group = 4\n")
    assert namespace(cfg, "serve").prefill_group == 4
    engine = TorchEngine(tiny_chat_model.model, tiny_chat_model.tokenizer.eos_ids)
    manager = SessionManager(engine, tiny_chat_model.tokenizer, tiny_chat_model.file_hash, tmp_path)
    app = create_app(manager, engine, tiny_chat_model.tokenizer, "tiny", prefill_group=5)
    assert app.state.worker.prefill_group == 5
    with pytest.raises(ValueError, match="prefill_group must be at least 0"):
        EngineWorker(manager, prefill_group=-1)
