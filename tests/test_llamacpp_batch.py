"""Batched decode steps on the llama.cpp backend (engine/llamacpp.py `decode_rows`): several sequences of the one
context advanced in one `llama_decode` (one token each, its own seq id). Greedy replies equal each sequence
decoded alone; a step computed but never claimed (a cancel between the batched call and the generation's turn)
leaves no cell behind; parked sequences run alone. Logits: llama.cpp's matrix products for several rows are not
its one-row kernels (measured here: 2.1% of the largest logit apart on the default model), so logits are compared
within 5% of the largest logit, and the greedy tokens exactly. Batched prompts (`prefill_rows`): see below."""

from __future__ import annotations

import logging
import threading
import time

import pytest
import torch

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (bash scripts/setup.sh --test)")

from test_batch_decode import drive

from infinichat.engine.batch import DecodeBatcher
from infinichat.engine.sampling import SamplingParams

TEXTS = ["Once upon a time", "The capital of France is", "def fibonacci(n):", "My favourite fruit is", "In 1850,"]


@pytest.fixture(scope="module")
def prompts(default_tokenizer) -> list[list[int]]:
    return [default_tokenizer.encode(t, parse_special=False) for t in TEXTS]


def _hold(seqs, prompts, toks) -> None:
    """Each sequence holds its prompt and reply, one llama.cpp cell per token."""
    for s, p, t in zip(seqs, prompts, toks, strict=True):
        assert s.token_ids() == p + t
        assert s.store.cell_positions() == (0, s.length - 1)


def test_batched_greedy_replies_equal_each_alone(llamacpp_default_engine, prompts):
    eng = llamacpp_default_engine
    params = SamplingParams(temperature=0.0, max_tokens=12)
    alone = []
    for p in prompts:
        seq = eng.new_sequence(budget=256)
        alone.append([st.token for st in eng.generate(seq, p, params)])
        del seq
    seqs = [eng.new_sequence(budget=256) for _ in prompts]
    toks, sizes = drive(eng, [eng.generate(s, p, params) for s, p in zip(seqs, prompts, strict=True)])
    assert max(sizes) == len(prompts) and sizes[len(prompts)] >= 8  # the steps really ran together
    assert toks == alone
    _hold(seqs, prompts, toks)


def test_batched_logits_follow_the_one_token_step(llamacpp_default_engine, prompts):
    eng = llamacpp_default_engine
    seqs = [eng.new_sequence(budget=256) for _ in prompts[:3]]
    refs = [eng.new_sequence(budget=256) for _ in prompts[:3]]
    for s, r, p in zip(seqs, refs, prompts[:3], strict=True):
        eng.prefill(s, p)
        eng.prefill(r, p)
    got = eng.decode_rows([(s, 42) for s in seqs])
    for (pos, logits), s, r in zip(got, seqs, refs, strict=True):
        s.append(torch.tensor([42]), pos)
        want = eng.decode_one(r, 42)
        assert (logits - want).abs().max().item() <= 0.05 * want.abs().max().item()
        assert int(logits.argmax()) == int(want.argmax())


def test_an_unclaimed_step_leaves_no_cell(llamacpp_default_engine, prompts):
    eng = llamacpp_default_engine
    a, ref = eng.new_sequence(budget=256), eng.new_sequence(budget=256)
    eng.prefill(a, prompts[0])
    eng.prefill(ref, prompts[0])
    b = DecodeBatcher(eng, 4)
    b.offer(a, 7)
    assert b.run(b.take()) == 1
    assert eng._lib.llama_memory_seq_pos_max(eng._mem, a.store._sid) == a.length  # written, not committed
    b.clear()  # nobody claimed it (the generation was cancelled)
    assert a.store.cell_positions() == (0, a.length - 1)
    # the sequence goes on as if the step never happened
    got, want = eng.prefill(a, [11, 12]), eng.prefill(ref, [11, 12])
    assert int(got.argmax()) == int(want.argmax())
    # (two sequences of one context prefilled alike, no batching involved, differ as much at their second call:
    # 1.7% of the largest logit here; the cells they attend over sit elsewhere in the shared cache)
    assert (got - want).abs().max().item() <= 0.05 * want.abs().max().item()


def test_parked_sequences_are_not_batched(llamacpp_default_engine, prompts):
    eng = llamacpp_default_engine
    seq = eng.new_sequence(budget=256)
    eng.prefill(seq, prompts[1])
    assert eng.can_batch(seq)
    seq.store.park()
    assert not eng.can_batch(seq)
    with pytest.raises(ValueError, match="parked"):
        eng.decode_rows([(seq, 5)])


# ---------------------------------------------------------------------------------------------- batched prompts
# Prompt chunks of several sequences in one `llama_decode` (`prefill_rows`). llama.cpp's logits depend on where a
# sequence's cells sit in the shared cache (README, benchmarks/llamacpp_placement.py), so exactness is checked at the
# same placement: two fresh engines, one prefilling the chunks one by one, the other in one batch, in the same order
# (so each sequence's cells land in the same cells of the cache): logits within 1e-4 of the largest logit (measured:
# equal), the same K/V cells (llama.cpp's state bytes of each sequence) and the same bookkeeping. Elsewhere (a shared
# engine, other sequences' cells in between) the greedy tokens are compared exactly and the logits within 5%.


def _fresh(**kw):
    from infinichat.engine.llamacpp import LlamaCppEngine

    return LlamaCppEngine(None, n_ctx=kw.pop("n_ctx", 512), threads=1, **kw)


# (history tokens prefilled alone first, chunk tokens): new and continued sequences, one-token chunks, ragged
PROMPT_CASES = [(0, 1), (0, 3), (9, 22), (4, 1), (0, 7)]


def _tokens(i: int, n: int) -> list[int]:
    return [100 + (37 * i + 11 * j) % 5000 for j in range(n)]


def test_batched_prompts_equal_each_alone_at_the_same_placement():
    alone_eng, batch_eng = _fresh(), _fresh()
    try:
        alone, batched = [], []
        for eng, seqs in ((alone_eng, alone), (batch_eng, batched)):
            for i, (h, _) in enumerate(PROMPT_CASES):
                seq = eng.new_sequence(budget=128)
                if h:
                    eng.prefill(seq, _tokens(100 + i, h))
                seqs.append(seq)
        chunks = [_tokens(i, n) for i, (_, n) in enumerate(PROMPT_CASES)]
        want = [alone_eng.prefill(s, c) for s, c in zip(alone, chunks, strict=True)]
        items = [(s, torch.tensor(c)) for s, c in zip(batched, chunks, strict=True)]
        assert all(batch_eng.can_batch_prompt(s, ids.shape[0]) for s, ids in items)
        got = batch_eng.prefill_rows(items)
        for a, b, x, y in zip(alone, batched, want, got, strict=True):
            assert (x - y).abs().max().item() <= 1e-4 * x.abs().max().item()
            assert int(x.argmax()) == int(y.argmax())
            assert (a.length, a.token_ids(), a.positions()) == (b.length, b.token_ids(), b.positions())
            assert a.store.cell_positions() == b.store.cell_positions() == (0, a.length - 1)
            assert a.store._state_bytes() == b.store._state_bytes()  # the same K/V cells
        # and the sequences go on alike: a batched next turn, and a decode step
        nxt = [alone_eng.prefill(s, [11, 12, 13]) for s in alone]
        got = batch_eng.prefill_rows([(s, torch.tensor([11, 12, 13])) for s in batched])
        for x, y in zip(nxt, got, strict=True):
            assert (x - y).abs().max().item() <= 1e-4 * x.abs().max().item()
        for a, b in zip(alone, batched, strict=True):
            x, y = alone_eng.decode_one(a, 42), batch_eng.decode_one(b, 42)
            assert (x - y).abs().max().item() <= 1e-4 * x.abs().max().item()
    finally:
        alone_eng.close()
        batch_eng.close()


def test_batched_prompts_then_greedy_replies_equal_each_alone(llamacpp_default_engine, prompts):
    eng = llamacpp_default_engine
    params = SamplingParams(temperature=0.0, max_tokens=10)
    alone = [[st.token for st in eng.generate(eng.new_sequence(budget=256), p, params)] for p in prompts]
    seqs = [eng.new_sequence(budget=256) for _ in prompts]
    ref = [eng.prefill(eng.new_sequence(budget=256), p) for p in prompts]
    first = eng.prefill_rows([(s, torch.tensor(p)) for s, p in zip(seqs, prompts, strict=True)])
    for x, y in zip(ref, first, strict=True):  # other placement: a tolerance (see above)
        assert (x - y).abs().max().item() <= 0.05 * x.abs().max().item()
    toks, _ = drive(eng, [eng.generate(s, [], params, logits=x) for s, x in zip(seqs, first, strict=True)])
    assert toks == alone
    _hold(seqs, prompts, toks)


def test_which_prompts_are_batched(llamacpp_default_engine, prompts):
    eng = llamacpp_default_engine
    new = eng.new_sequence(budget=64)
    assert eng.can_batch_prompt(new, 5)  # new: it takes an id in the call
    assert not eng.can_batch_prompt(new, 65)  # over its budget: eviction first, alone
    assert not eng.can_batch_prompt(eng.new_sequence(budget=4096), eng.n_batch + 1)  # more than one call holds
    seq = eng.new_sequence(budget=256)
    eng.prefill(seq, prompts[1])
    assert eng.can_batch_prompt(seq, 5)
    seq.store.park()
    assert not eng.can_batch_prompt(seq, 5)  # parked: it runs alone (its cells are copied back first)
    with pytest.raises(ValueError, match="parked"):
        eng.prefill_rows([(seq, torch.tensor([5, 6]))])
    assert seq.store.parked and seq.length == len(prompts[1])  # refused before anything changed


def test_more_sequences_than_ids_run_in_several_calls(default_tokenizer, prompts):
    """8 sequences on a context that holds 3 sequence ids: calls of at most 3 sequences, each new sequence takes an id
    (parking one outside its call); every chunk is recorded as alone, and evaluated as alone (greedy token, logits
    within 5%: other placement). Against the same chunks prefilled one by one on a second engine."""
    eng, ref = _fresh(n_seq_max=3), _fresh(n_seq_max=3)
    try:
        sizes: list[int] = []
        real = eng._prompt_call
        eng._prompt_call = lambda items: sizes.append(len(items)) or real(items)  # type: ignore[method-assign]
        more = ["The sun rises in the", "Water boils at", "Two plus two equals"]
        chunks = prompts + [default_tokenizer.encode(t, parse_special=False) for t in more]
        seqs = [eng.new_sequence(budget=64) for _ in chunks]
        eng.prefill(seqs[4], prompts[1])  # one continued sequence among the new ones
        refs = [ref.new_sequence(budget=64) for _ in chunks]
        ref.prefill(refs[4], prompts[1])
        got = eng.prefill_rows([(s, torch.tensor(c)) for s, c in zip(seqs, chunks, strict=True)])
        want = [ref.prefill(r, c) for r, c in zip(refs, chunks, strict=True)]
        assert sizes == [3, 3, 2]
        assert eng.n_parked >= 5
        for s, r, x, y in zip(seqs, refs, want, got, strict=True):
            assert s.token_ids() == r.token_ids() and s.positions() == r.positions()
            assert int(x.argmax()) == int(y.argmax())
            assert (x - y).abs().max().item() <= 0.05 * x.abs().max().item()
        for s in seqs:  # parked or resident, each one's cells are its tokens
            s.store.activate()
            assert s.store.cell_positions() == (0, s.length - 1)
    finally:
        eng.close()
        ref.close()


def test_a_stopped_prompt_leaves_no_cell(llamacpp_default_engine, default_tokenizer, tmp_path):
    """Sessions b and c send together; b is stopped while their prompts' call runs: b gets `Cancelled` and its cache
    is truncated back (the same tokens, positions and llama.cpp cells as before the request), c's reply equals its
    reply alone (greedy), and b's next message works."""
    from infinichat.server.worker import END, Cancelled, EngineWorker
    from infinichat.session.manager import SessionManager

    eng = llamacpp_default_engine
    m = SessionManager(eng, default_tokenizer, "default", tmp_path)
    b, c, solo = m.create("b"), m.create("c"), m.create("solo")
    params = SamplingParams(temperature=0.0, max_tokens=6)
    worker = EngineWorker(m, prefill_chunk=256, prefill_group=1024).start()
    try:
        worker.call(lambda mm: list(mm.guarded(b, b.send("hello", params))), session="b").result(120)
        want = worker.call(lambda mm: list(mm.guarded(solo, solo.send("Name a colour.", params))), "solo").result(120)
        seq = b.seq
        assert seq is not None
        before = (seq.length, seq.token_ids(), seq.positions(), seq.store._state_bytes())
        transcript = [(x.kind, x.text) for x in b.messages]
        rows: list[int] = []
        real = eng.prefill_rows

        def spy(items):
            rows.append(len(items))
            if len(items) > 1:
                worker.stop_session("b")
            return real(items)

        eng.prefill_rows = spy
        got: dict[str, list] = {"b": [], "c": []}
        ends = threading.Semaphore(0)
        gate = threading.Event()
        worker.call(lambda mm: gate.wait(60))  # holds the worker until both requests are queued
        try:
            for s, text in ((b, "Tell me a long story about the sea."), (c, "Name a colour.")):
                worker.stream(
                    lambda mm, job, s=s, text=text: mm.guarded(s, s.send(text, params, job.should_stop)),
                    lambda item, k=s.id: ends.release() if item is END else got[k].append(item),
                    session=s.id,
                )
            gate.set()
            assert ends.acquire(timeout=120) and ends.acquire(timeout=120)
        finally:
            del eng.prefill_rows
        assert rows and rows[0] == 2, rows  # b's and c's prompts in one call
        assert len(got["b"]) == 1 and isinstance(got["b"][0], Cancelled), got["b"]
        assert b.seq is seq
        assert (seq.length, seq.token_ids(), seq.positions(), seq.store._state_bytes()) == before
        assert seq.store.cell_positions() == (0, seq.length - 1)
        assert [(x.kind, x.text) for x in b.messages] == transcript
        assert [e.token for e in got["c"] if e.kind == "token"] == [e.token for e in want if e.kind == "token"]
        reply = worker.call(lambda mm: list(mm.guarded(b, b.send("again", params))), session="b").result(120)
        assert reply[-1].kind == "done"
    finally:
        worker.close()


def test_a_prompt_call_without_free_cells_parks_others_or_runs_one_by_one(caplog):
    """A context of 256 cells. (1) A sequence outside the call holds 200 cells; two new sequences' chunks of 40 tokens
    do not fit the 56 free cells: the outside sequence is parked and the call runs. (2) The call's own sequences fill
    the context (a resident one of 180 cells + 40, a new one + 60): nothing outside to park, so the chunks run one
    by one (the second parks the first). Each time every chunk is recorded and evaluated as alone (logits within 5%:
    other placement) against an engine with room for all."""
    eng, ref = _fresh(n_ctx=256), _fresh(n_ctx=2048)
    try:
        other = eng.new_sequence(budget=256)
        eng.prefill(other, _tokens(9, 200))
        for history, sizes in (((0, 0), (40, 40)), ((180, 0), (40, 60))):
            seqs = [eng.new_sequence(budget=256) for _ in sizes]
            refs = [ref.new_sequence(budget=256) for _ in sizes]
            for i, h in enumerate(history):
                if h:
                    eng.prefill(seqs[i], _tokens(20 + i, h))
                    ref.prefill(refs[i], _tokens(20 + i, h))
            parked = eng.n_parked
            chunks = [_tokens(i, n) for i, n in enumerate(sizes)]
            caplog.clear()
            with caplog.at_level(logging.DEBUG, logger="infinichat.engine.llamacpp"):
                got = eng.prefill_rows([(s, torch.tensor(c)) for s, c in zip(seqs, chunks, strict=True)])
            one_by_one = any("one by one" in r.getMessage() for r in caplog.records)
            assert one_by_one == (history[0] > 0)
            want = [ref.prefill(r, c) for r, c in zip(refs, chunks, strict=True)]
            assert eng.n_parked > parked
            for s, r, x, y in zip(seqs, refs, want, got, strict=True):
                assert s.token_ids() == r.token_ids() and s.positions() == r.positions()
                assert (x - y).abs().max().item() <= 0.05 * x.abs().max().item()
            del seqs  # free their cells for the next case
        assert other.store.parked
    finally:
        eng.close()
        ref.close()


def test_a_session_cut_halfway_through_its_batched_prompt_is_left_as_it_was(
    llamacpp_default_engine, default_tokenizer, tmp_path
):
    """`serve --backend llamacpp`: three sessions send long messages at once (their prompts' chunks in shared
    llama_decode calls); one client goes away in the middle of its prompt. Its session keeps neither the message nor
    a reply (the same tokens and llama.cpp cells), the others get their replies, and all three go on. (Before, the
    cut session's whole prompt ran and the session kept the message and a one-token reply.)"""
    from types import SimpleNamespace

    import httpx
    from server_util import LiveServer

    loaded = SimpleNamespace(tokenizer=default_tokenizer, file_hash="default", name="smollm2", path=None)
    eng = llamacpp_default_engine
    greedy = {"temperature": 0.0, "max_tokens": 3}
    text = "The quick brown fox jumps over the lazy dog. " * 60  # ~600 tokens: seconds of prompt on one thread
    srv = LiveServer(loaded, tmp_path, engine=eng, backend="llamacpp", prefill_chunk=64, prefill_group=256)
    with srv, httpx.Client(base_url=srv.url, timeout=300) as c:
        for sid in ("a", "b", "cut"):
            assert c.post("/api/sessions", json={"id": sid}).status_code == 201
            with c.stream("POST", f"/api/sessions/{sid}/messages", json={"text": "hi", "params": greedy}) as r:
                r.read()
        seq = srv.manager.sessions["cut"].seq
        before = (c.get("/api/sessions/cut").json()["messages"], seq.token_ids(), seq.store.cell_positions())
        done: dict[str, str] = {}

        def send(sid: str, timeout: float) -> None:
            try:
                with httpx.Client(base_url=srv.url, timeout=timeout) as cc:
                    r = cc.post(f"/api/sessions/{sid}/messages", json={"text": text, "params": greedy})
                    done[sid] = "event: done" if "event: done" in r.text else r.text
            except httpx.ReadTimeout:
                done[sid] = "cut"

        threads = [threading.Thread(target=send, args=(s, t)) for s, t in (("a", 300), ("b", 300), ("cut", 0.5))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert done == {"a": "event: done", "b": "event: done", "cut": "cut"}, done
        deadline = time.monotonic() + 60
        while srv.app.state.worker.depth and time.monotonic() < deadline:
            time.sleep(0.05)
        seq = srv.manager.sessions["cut"].seq
        after = (c.get("/api/sessions/cut").json()["messages"], seq.token_ids(), seq.store.cell_positions())
        assert after == before
        for sid in ("a", "b", "cut"):
            with c.stream("POST", f"/api/sessions/{sid}/messages", json={"text": "and?", "params": greedy}) as r:
                assert "event: done" in r.read().decode()
