"""Continuous batching of decode steps (engine/batch.py): generations advanced together in batched forward
calls give the same tokens, logits and caches as each run alone.

The driver here is the server worker's loop in miniature: step each generation once, take its offer, run all
offers batched before the next round. Tolerances: float32 tokens equal and logits within 1e-4 (the batched
rows go through the prompt kernels, a lone step through the one-token step: different summation orders);
bfloat16 and int4: the greedy tokens of the first 16 steps equal, logits within 0.1 max abs (bf16 rounding of
activations, ~0.4% relative, in a different order) on the first 8 steps. (On this random tiny model a near
tie flipped one int4 token at step 24: after a flip the replies legitimately diverge.)"""

from __future__ import annotations

import pytest
import torch
from gguf_util import tiny_llama, write_gguf

from infinichat.engine.batch import DecodeBatcher
from infinichat.engine.sampling import SamplingParams
from infinichat.engine.torch_engine import TorchEngine
from infinichat.model.loader import load_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = [[5 + (7 * i + j) % 200 for j in range(3 + 5 * i)] for i in range(8)]  # 8 prompts, 3..38 tokens


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-batch")
    write_gguf(d / "tiny.gguf", tiny_llama(seed=5, max_position_embeddings=256))
    return d


@pytest.fixture(scope="module")
def engine(tiny_path):
    loaded = load_model(tiny_path / "tiny.gguf", "float32", cache_dir=tiny_path / "cache")
    return TorchEngine(loaded.model, ())  # no EOS: every reply has its full length


class Recorder:
    """Wraps an engine's decode_one to record the logits each sequence got, in order."""

    def __init__(self, engine):
        self.engine, self.logits = engine, {}
        self._orig = engine.decode_one

    def __enter__(self):
        def rec(seq, token):
            out = self._orig(seq, token)
            self.logits.setdefault(id(seq), []).append(out.clone())
            return out

        self.engine.decode_one = rec
        return self

    def __exit__(self, *exc):
        del self.engine.decode_one


def drive(engine, gens, max_batch=8, between=None, stop_after=None):
    """Run generators together as the worker does; -> per generator its tokens, and the batch sizes run."""
    b = engine.batcher = DecodeBatcher(engine, max_batch)
    out = [[] for _ in gens]
    offers = [[] for _ in gens]
    live = set(range(len(gens)))
    rnd = 0
    try:
        while live:
            b.run(o for i in live for o in offers[i])
            for i in sorted(live):
                if stop_after is not None and stop_after.get(i) == len(out[i]):
                    gens[i].close()  # a cancel / disconnect: the generator is closed, never resumed
                    live.discard(i)
                    continue
                try:
                    out[i].append(next(gens[i]).token)
                except StopIteration:
                    live.discard(i)
                offers[i] = b.take()
            b.clear()
            rnd += 1
            if between is not None:
                between(rnd)
    finally:
        engine.batcher = None
    return out, b.sizes


def solo(engine, seq_args, prompt, params, n_close=None):
    seq = engine.new_sequence(**seq_args)
    gen = engine.generate(seq, prompt, params)
    toks = []
    for st in gen:
        toks.append(st.token)
        if len(toks) == n_close:  # closed without resuming, as the driver closes it
            gen.close()
            break
    return toks, seq


def assert_same_cache(a, b, atol=1e-5):
    assert a.token_ids() == b.token_ids()
    assert a.positions() == b.positions()
    n = a.length
    for ka, kb in zip(a.store.k, b.store.k, strict=True):
        torch.testing.assert_close(ka[:, :n], kb[:, :n], atol=atol, rtol=0)
    for va, vb in zip(a.store.v, b.store.v, strict=True):
        torch.testing.assert_close(va[:, :n], vb[:, :n], atol=atol, rtol=0)


def test_eight_greedy_sequences_batched_equal_each_alone(engine):
    params = SamplingParams(temperature=0.0, max_tokens=20)
    with Recorder(engine) as ref:
        alone = [solo(engine, {}, p, params) for p in PROMPTS]
    seqs = [engine.new_sequence() for _ in PROMPTS]
    with Recorder(engine) as rec:
        toks, sizes = drive(engine, [engine.generate(s, p, params) for s, p in zip(seqs, PROMPTS, strict=True)])
    assert sizes[8] >= 18  # the steps really ran 8 at a time
    for (t_alone, s_alone), t, s in zip(alone, toks, seqs, strict=True):
        assert t == t_alone
        assert_same_cache(s, s_alone)
    for (_, s_alone), s in zip(alone, seqs, strict=True):
        for x, y in zip(rec.logits[id(s)], ref.logits[id(s_alone)], strict=True):
            torch.testing.assert_close(x, y, atol=1e-4, rtol=0)


def test_max_batch_splits_the_calls(engine):
    params = SamplingParams(temperature=0.0, max_tokens=6)
    seqs = [engine.new_sequence() for _ in PROMPTS[:5]]
    gens = [engine.generate(s, p, params) for s, p in zip(seqs, PROMPTS[:5], strict=True)]
    toks, sizes = drive(engine, gens, 2)
    assert set(sizes) == {1, 2} and sizes[2] == 2 * sizes[1]  # 5 = 2 + 2 + 1 each round
    for t, p in zip(toks, PROMPTS[:5], strict=True):
        assert t == solo(engine, {}, p, params)[0]


def test_evicting_attention_policy_cancelled_and_reverted_sequences_match_solo(engine):
    """Different lengths; one evicts mid-batch (streaming, small budget: its eviction steps run alone); one
    needs attention weights (h2o: always alone); one is cancelled after 5 tokens; one is cut back (a revert)
    between rounds and generates again from there. Each transcript and cache equals a solo run."""
    params = SamplingParams(temperature=0.0, max_tokens=24)
    setups = [
        ({}, PROMPTS[0]),
        ({"budget": 24, "policy": "streaming", "n_sink": 2}, PROMPTS[3]),  # evicts every few steps
        ({"policy": "h2o", "budget": 40, "n_recent": 8}, PROMPTS[2]),
        ({}, PROMPTS[5]),  # cancelled
        ({}, PROMPTS[7]),
    ]
    seqs = [engine.new_sequence(**a) for a, _ in setups]
    toks, sizes = drive(
        engine,
        [engine.generate(s, p, params) for s, (_, p) in zip(seqs, setups, strict=True)],
        stop_after={3: 5},
    )
    assert seqs[1].n_evictions > 0 and sizes[3] > 0  # evictions happened while the others batched
    for i, (a, p) in enumerate(setups):
        t, s = solo(engine, a, p, params, n_close=5 if i == 3 else None)
        assert toks[i] == t, i
        assert_same_cache(seqs[i], s)

    # revert: cut the first sequence back to its prompt + 3 tokens and generate again, batched with another
    keep = len(PROMPTS[0]) + 3
    seqs[0].truncate(keep)
    again = engine.new_sequence()
    toks2, _ = drive(
        engine,
        [engine.generate(seqs[0], [toks[0][3]], params), engine.generate(again, PROMPTS[6], params)],
    )
    ref = engine.new_sequence()
    engine.prefill(ref, PROMPTS[0] + toks[0][:3])
    t_ref = [st.token for st in engine.generate(ref, [toks[0][3]], params)]
    assert toks2[0] == t_ref
    assert_same_cache(seqs[0], ref)
    assert toks2[1] == solo(engine, {}, PROMPTS[6], params)[0]


def test_seeded_sampling_is_the_same_batched_and_alone(engine):
    params = [SamplingParams(temperature=1.0, top_p=0.9, seed=100 + i, max_tokens=16) for i in range(4)]
    alone = [solo(engine, {}, p, q)[0] for p, q in zip(PROMPTS, params, strict=False)]
    seqs = [engine.new_sequence() for _ in params]
    toks, _ = drive(engine, [engine.generate(s, p, q) for s, p, q in zip(seqs, PROMPTS, params, strict=False)])
    assert toks == alone
    assert len({tuple(t) for t in toks}) == 4


def test_a_driver_that_never_runs_changes_nothing(engine):
    """Offers nobody computes: every claim misses and each step runs alone (the CLI's case)."""
    params = SamplingParams(temperature=0.0, max_tokens=8)
    engine.batcher = DecodeBatcher(engine, 8)
    try:
        t, _ = solo(engine, {}, PROMPTS[1], params)
    finally:
        engine.batcher = None
    assert t == solo(engine, {}, PROMPTS[1], params)[0]


@pytest.mark.parametrize("quant", ["none", "int4"])
def test_bf16_and_int4_batched_tokens_equal_alone(tiny_path, quant):
    loaded = load_model(tiny_path / "tiny.gguf", "bfloat16", cache_dir=tiny_path / "cache", quant=quant)
    eng = TorchEngine(loaded.model, ())
    params = SamplingParams(temperature=0.0, max_tokens=24)
    with Recorder(eng) as ref:
        alone = [solo(eng, {}, p, params) for p in PROMPTS]
    seqs = [eng.new_sequence() for _ in PROMPTS]
    with Recorder(eng) as rec:
        toks, _ = drive(eng, [eng.generate(s, p, params) for s, p in zip(seqs, PROMPTS, strict=True)])
    assert [t[:16] for t in toks] == [t[:16] for t, _ in alone]
    for (_, s_alone), s in zip(alone, seqs, strict=True):
        for x, y in zip(rec.logits[id(s)][:8], ref.logits[id(s_alone)][:8], strict=True):
            torch.testing.assert_close(x, y, atol=0.1, rtol=0)


def test_bad_max_batch_is_refused(engine):
    with pytest.raises(ValueError, match="max_batch must be at least 1"):
        DecodeBatcher(engine, 0)
