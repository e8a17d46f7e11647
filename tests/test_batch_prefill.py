"""Batched prefill (engine `prefill_rows`, the server worker's prompt rounds): several sessions' prompt chunks in
one forward call equal each prompt evaluated alone (float32: logits within 1e-4, K/V within 1e-5: the stacked
matrix products may sum in another order; greedy continuations identical); the worker evaluates simultaneous
prompts together; a prompt cancelled half-way truncates the session's cache back to what it was (no rebuild)."""

from __future__ import annotations

import threading
import time
import types

import pytest
import torch

from infinichat.engine.sampling import SamplingParams
from infinichat.engine.torch_engine import TorchEngine
from infinichat.server.worker import END, Cancelled, EngineWorker
from infinichat.session.manager import SessionManager

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GREEDY = SamplingParams(temperature=0.0, max_tokens=8)


@pytest.fixture(scope="module")
def engine(tiny_chat_model):
    return TorchEngine(tiny_chat_model.model, ())  # no EOS: every reply has its full length


def _prompt(i: int, n: int) -> list[int]:
    return [3 + (7 * i + 13 * j) % 240 for j in range(n)]


# (history tokens already cached, prompt tokens, policy, its parameters): new and continued sessions, ragged
CASES = [
    (0, 12, "full", {}),
    (9, 5, "streaming", {"n_sink": 4}),
    (30, 17, "window", {}),
    (0, 1, "full", {}),
    (4, 33, "h2o_free", {}),
]


def _seq(engine, policy, params):
    if policy == "h2o_free":  # a second full-attention sequence with a small budget it does not reach
        return engine.new_sequence(budget=256)
    return engine.new_sequence(budget=512, policy=policy, **params)


def test_batched_prefill_equals_each_alone(engine):
    alone, batched = [], []
    for i, (h, _, policy, params) in enumerate(CASES):
        for out in (alone, batched):
            seq = _seq(engine, policy, params)
            if h:
                engine.prefill(seq, _prompt(100 + i, h))
            out.append(seq)
    want = [engine.prefill(s, _prompt(i, n)) for i, (s, (_, n, _, _)) in enumerate(zip(alone, CASES, strict=True))]
    items = [(s, torch.tensor(_prompt(i, n))) for i, (s, (_, n, _, _)) in enumerate(zip(batched, CASES, strict=True))]
    assert all(engine.can_batch_prompt(s, ids.shape[0]) for s, ids in items)
    got = engine.prefill_rows(items)
    for a, b, x, y in zip(alone, batched, want, got, strict=True):
        torch.testing.assert_close(y, x, atol=1e-4, rtol=0)
        assert b.token_ids() == a.token_ids() and b.positions() == a.positions()
        n = a.length
        for ka, kb in zip(a.store.k + a.store.v, b.store.k + b.store.v, strict=True):
            torch.testing.assert_close(kb[:, :n], ka[:, :n], atol=1e-5, rtol=0)
        ga = [st.token for st in engine.generate(a, [], GREEDY, logits=x)]
        gb = [st.token for st in engine.generate(b, [], GREEDY, logits=y)]
        assert ga == gb and len(ga) == GREEDY.max_tokens


def test_a_prompt_that_needs_eviction_is_not_batched(engine):
    seq = engine.new_sequence(budget=16, policy="streaming", n_sink=2)
    assert engine.can_batch_prompt(seq, 16) and not engine.can_batch_prompt(seq, 17)
    with pytest.raises(ValueError, match="needs eviction"):
        engine.prefill_rows([(seq, torch.tensor(_prompt(0, 17)))])
    assert seq.length == 0


def _collect(got, ends):
    return lambda item: ends.release() if item is END else got.append(item)


@pytest.mark.parametrize(
    "group, calls",
    # all in one call; or [5, 9], [40], [3, 25] (at most 32 tokens a call); or each alone (no grouping: 1 or 0)
    [(1024, {5: 1}), (32, {2: 2, 1: 1}), (1, {1: 5}), (0, {1: 5})],
)
def test_the_worker_evaluates_simultaneous_prompts_together(engine, group, calls):
    """Five streams submitted together: their prompts (one chunk each, different lengths) go in calls of at most
    `prefill_group` tokens, oldest first, and each stream's tokens are those of its generation alone."""
    manager = types.SimpleNamespace(engine=engine, close=lambda: None)
    worker = EngineWorker(manager, prefill_chunk=256, prefill_group=group)
    lens = [5, 9, 40, 3, 25]
    got: list[list] = [[] for _ in lens]
    ends = threading.Semaphore(0)

    def fn(i):
        return lambda m, job: (st.token for st in engine.generate(engine.new_sequence(), _prompt(i, lens[i]), GREEDY))

    for i in range(len(lens)):  # queued before the worker starts: it takes them in one go
        worker.stream(fn(i), _collect(got[i], ends), session=f"s{i}")
    worker.start()
    try:
        for _ in lens:
            assert ends.acquire(timeout=120)
        assert worker.prompt_calls == calls
    finally:
        worker.close()
    for i, n in enumerate(lens):
        assert got[i] == [st.token for st in engine.generate(engine.new_sequence(), _prompt(i, n), GREEDY)]


def test_prompts_share_the_round_budget_while_a_stream_generates(engine):
    """While one stream generates, two long prompts arrive: each round's prompt call holds at most the budget
    (32 tokens), the oldest prompt first, and the generating stream gets a token every round."""
    manager = types.SimpleNamespace(engine=engine, close=lambda: None)
    worker = EngineWorker(manager, prefill_chunk=32, prefill_group=32).start()
    sizes: list[list[int]] = []
    real = engine.prefill_rows
    engine.prefill_rows = lambda items: sizes.append([ids.shape[0] for _, ids in items]) or real(items)
    a, got_b, got_c = [], [], []
    ends = threading.Semaphore(0)
    long_params = SamplingParams(temperature=0.0, max_tokens=400)
    try:
        job_a = worker.stream(
            lambda m, job: (
                st.token
                for st in engine.generate(engine.new_sequence(), [3, 4], long_params, should_stop=job.should_stop)
            ),
            _collect(a, ends),
            session="a",
        )
        deadline = time.monotonic() + 60
        while len(a) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        b_prompt, c_prompt = _prompt(1, 50), _prompt(2, 45)
        for p, out, sid in ((b_prompt, got_b, "b"), (c_prompt, got_c, "c")):
            worker.stream(
                lambda m, job, p=p: (st.token for st in engine.generate(engine.new_sequence(), p, GREEDY)),
                _collect(out, ends),
                session=sid,
            )
        assert ends.acquire(timeout=120) and ends.acquire(timeout=120)
        worker.stop_session("a")
        assert ends.acquire(timeout=120)
    finally:
        del engine.prefill_rows
        worker.close()
    prompt_calls = [s for s in sizes if sum(s) > 2]  # a's 2-token prompt went alone before the others came
    assert all(sum(s) <= 32 for s in prompt_calls), sizes
    assert sum(sum(s) for s in prompt_calls) == 95
    assert any(len(s) == 2 for s in prompt_calls), sizes  # b's tail and c's head shared a call
    assert job_a.stop.is_set() and len(a) >= len(prompt_calls)
    assert got_b == [st.token for st in engine.generate(engine.new_sequence(), b_prompt, GREEDY)]
    assert got_c == [st.token for st in engine.generate(engine.new_sequence(), c_prompt, GREEDY)]


def test_a_prompt_cancelled_half_way_truncates_the_cache_back(tiny_chat_model, tmp_path):
    """Session b (two turns cached) sends a long message while a streams, and is stopped during its third prompt
    call: b's cache is the same sequence, truncated back to the tokens, positions, K/V and segments it had
    (no rebuild), its transcript is as before, and its next message works."""
    tok = tiny_chat_model.tokenizer
    eng = TorchEngine(tiny_chat_model.model, ())
    m = SessionManager(eng, tok, tiny_chat_model.file_hash, tmp_path)
    a, b = m.create("a"), m.create("b")
    worker = EngineWorker(m, prefill_chunk=16).start()
    try:
        list(b.send("hello", SamplingParams(temperature=0.0, max_tokens=3)))
        seq = b.seq
        assert seq is not None
        before = (seq.length, seq.token_ids(), seq.positions(), [vars(s).copy() for s in seq.segments.segments])
        kv_before = [t[:, : seq.length].clone() for t in seq.store.k + seq.store.v]
        transcript = [(x.kind, x.text) for x in b.messages]
        got_a, b_items = [], []
        a_done = threading.Event()
        params = SamplingParams(temperature=0.0, max_tokens=400)
        worker.stream(
            lambda mm, job: mm.guarded(a, a.send("go on", params, job.should_stop)),
            lambda item: a_done.set() if item is END else got_a.append(item),
            session="a",
        )
        deadline = time.monotonic() + 60
        while len(got_a) < 3:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        calls, rebuilds = [], []
        real_rows = eng.prefill_rows

        def spy(items):
            for s, ids in items:
                if s is b.seq and ids.shape[0] > 1:
                    calls.append(ids.shape[0])
                    if len(calls) == 3:
                        worker.stop_session("b")
            return real_rows(items)

        eng.prefill_rows = spy
        b.rebuild = lambda: rebuilds.append(1)  # type: ignore[method-assign]
        b_done = threading.Event()
        try:
            long_text = " ".join(f"word{i}" for i in range(120))
            worker.stream(
                lambda mm, job: mm.guarded(b, b.send(long_text, params, job.should_stop)),
                lambda item: b_done.set() if item is END else b_items.append(item),
                session="b",
            )
            assert b_done.wait(120)
        finally:
            del eng.prefill_rows
            del b.rebuild
        assert len(b_items) == 1 and isinstance(b_items[0], Cancelled), b_items
        assert len(calls) == 3 and rebuilds == []
        assert b.seq is seq
        after = (seq.length, seq.token_ids(), seq.positions(), [vars(s).copy() for s in seq.segments.segments])
        assert after == before
        for x, y in zip(kv_before, [t[:, : seq.length] for t in seq.store.k + seq.store.v], strict=True):
            assert torch.equal(x, y)
        assert [(x.kind, x.text) for x in b.messages] == transcript
        worker.stop_session("a")
        assert a_done.wait(60)
        again = SamplingParams(temperature=0.0, max_tokens=3)
        reply = worker.call(lambda mm: list(mm.guarded(b, b.send("again", again))), session="b").result(60)
        assert reply[-1].kind == "done" and len(b.messages) == 4
    finally:
        worker.close()


def test_shutdown_cancels_a_prompt_still_waiting(engine):
    """A stream suspended in its prompt when the worker shuts down gets `Cancelled` (then END); its cache is
    untouched."""
    worker = EngineWorker(types.SimpleNamespace(engine=engine, close=lambda: None), prefill_chunk=256).start()
    gate = threading.Event()
    blocked = worker.call(lambda m: gate.wait(60))  # holds the worker while the stream and the shutdown queue up
    seq = engine.new_sequence()
    items: list = []
    worker.stream(lambda m, job: (st.token for st in engine.generate(seq, _prompt(0, 9), GREEDY)), items.append, "s")
    closing = threading.Thread(target=worker.close)
    closing.start()
    deadline = time.monotonic() + 60
    while worker._q.qsize() < 2:  # the stream, then the shutdown
        assert time.monotonic() < deadline
        time.sleep(0.005)
    gate.set()
    closing.join(60)
    assert blocked.result(1) is True
    assert len(items) == 2 and isinstance(items[0], Cancelled) and items[1] is END, items
    assert seq.length == 0
