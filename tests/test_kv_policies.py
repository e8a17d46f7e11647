"""Budgets and eviction policies through the engine, on a tiny random-weight model (fp32)."""

from __future__ import annotations

import pytest
import torch
from test_kv_store import TOL, fresh_keys, rand_ids, tiny_engine

from infinichat.engine.sampling import SamplingParams
from infinichat.engine.textgen import Generation, stream_text
from infinichat.errors import InfinichatError
from infinichat.kv import POLICIES


@pytest.fixture(scope="module")
def engine():
    return tiny_engine()


CAPABILITIES = {  # name: (phase, needs_attention_weights, offloads, drops_tokens, recompute)
    "streaming": ("overflow", False, False, True, False),
    "window": ("overflow", False, False, True, False),
    "turns": ("overflow", False, False, True, False),
    "full": ("overflow", False, False, False, False),
    "recompute": ("overflow", False, False, True, True),
    "h2o": ("overflow", True, False, True, False),
    "tova": ("overflow", True, False, True, False),
    "snapkv": ("prefill", True, False, True, False),
    "expected_attention": ("prefill", True, False, True, False),
    "kvzip": ("prefill", True, False, True, False),
    "omnikv": ("decode", True, False, False, False),
    "brutal-offload": ("decode", False, True, False, False),
}


def test_policies_declare_capabilities():
    assert set(POLICIES) == set(CAPABILITIES)
    for name, cls in POLICIES.items():
        assert cls.name == name
        assert (cls.phase, cls.needs_attention_weights, cls.offloads, cls.drops_tokens, cls.recompute) == CAPABILITIES[
            name
        ]
        assert cls.scoring_pass == (name == "kvzip")  # scratch forward calls before compressing


@pytest.mark.parametrize("policy", ["streaming", "window", "recompute", "turns"])
def test_generation_runs_forever_within_the_budget(engine, policy):
    seq = engine.new_sequence(budget=48, policy=policy, n_discard=16)
    params = SamplingParams(temperature=1.0, seed=0, max_tokens=400)
    seen = 0
    for _ in engine.generate(seq, rand_ids(10), params, should_stop=lambda: not _ok(seq)):
        seen += 1
    assert seen == 400 and _ok(seq)
    assert seq.n_evictions >= 20 and seq.positions() == list(range(seq.length))
    if policy in ("streaming", "turns"):  # turns without segments falls back to streaming
        assert seq.token_ids()[:4] == rand_ids(10)[:4]  # the sinks


def _ok(seq) -> bool:
    return seq.length <= seq.budget and seq.store.next_position <= seq.capacity


def test_streaming_eviction_leaves_layer0_kv_equal_to_a_fresh_run(engine):
    """Layer 0 K/V depend only on the token and its position: after evictions they must equal a fresh
    forward over the kept tokens at contiguous positions."""
    seq = engine.new_sequence(budget=40, policy="streaming", n_discard=10)
    engine.prefill(seq, rand_ids(100, seed=2), chunk=7)
    assert seq.n_evictions > 3
    kept = seq.token_ids()
    ref = fresh_keys(engine.model, kept, torch.arange(len(kept)))
    assert (seq.store.k_all[0, :, : len(kept)] - ref[0]).abs().max().item() <= TOL


def test_recompute_equals_a_fresh_evaluation_of_the_kept_text(engine):
    seq = engine.new_sequence(budget=32, policy="recompute", n_discard=8)
    seq.create_segment("system")
    engine.prefill(seq, rand_ids(4, seed=3))
    seq.create_segment("user")
    engine.prefill(seq, rand_ids(28, seed=4))
    assert seq.length == 32
    pinned = seq.store.k_all[:, :, :4].clone()
    got = engine.decode_one(seq, 11)  # evicts 8 unpinned tokens, recomputes the 20 after them
    assert seq.n_evicted == 8 and seq.stale_from is None
    fresh = engine.new_sequence(budget=32)
    want = engine.prefill(fresh, seq.token_ids())
    assert (got - want).abs().max().item() <= TOL
    assert torch.equal(seq.store.k_all[:, :, :4], pinned)  # the pinned part is not recomputed
    n = seq.length
    assert (seq.store.k_all[:, :, :n] - fresh.store.k_all[:, :, :n]).abs().max().item() <= TOL


def test_long_text_in_small_chunks_with_all_logits(engine):
    """The perplexity-evaluation path: a long text through a small budget, all logits returned."""
    ids = rand_ids(300, seed=5)
    seq = engine.new_sequence(budget=64, policy="streaming", n_discard=16)
    got = engine.prefill(seq, ids, all_logits=True, chunk=16)
    assert got.shape == (300, 97) and seq.length <= 64 and seq.n_evictions > 5
    unbounded = engine.prefill(engine.new_sequence(budget=300), ids[:64], all_logits=True)
    assert (got[:64] - unbounded).abs().max().item() <= TOL  # identical until the first eviction
    assert (got[64:] - unbounded[-1]).abs().max().item() > 0.01  # (and different afterwards, of course)


def test_full_policy_refuses_before_any_work_and_generation_stops_at_the_budget(engine):
    seq = engine.new_sequence(budget=20)
    engine.prefill(seq, rand_ids(15))
    with pytest.raises(InfinichatError, match=r"context is full: 15 cached \+ 6 new tokens > budget 20"):
        engine.prefill(seq, rand_ids(6))
    assert seq.length == 15
    result = Generation()
    params = SamplingParams(temperature=0, max_tokens=50)
    chunks = list(stream_text(engine, _ByteTok(), seq, [1], params, result=result))
    assert chunks and seq.length == 20 and len(result.tokens) == 5 and result.finish_reason == "length"
    with pytest.raises(InfinichatError, match="context is full"):
        engine.decode_one(seq, 1)


def test_a_prompt_longer_than_the_budget_streams_through(engine):
    seq = engine.new_sequence(budget=32, policy="streaming", n_discard=8)
    seq.create_segment("system")
    engine.prefill(seq, rand_ids(6, seed=7))
    seq.create_segment("user")
    engine.prefill(seq, rand_ids(200, seed=8))
    assert seq.length <= 32 and seq.token_ids()[:6] == rand_ids(6, seed=7)
    assert seq.token_ids()[-5:] == rand_ids(200, seed=8)[-5:]
    pinned = engine.new_sequence(budget=16, policy="streaming")
    pinned.create_segment("system")
    with pytest.raises(InfinichatError, match="evictable"):
        engine.prefill(pinned, rand_ids(40))  # a pinned segment cannot outgrow the budget


class _ByteTok:
    """Enough of a tokenizer for stream_text: every id decodes to one letter."""

    def decode(self, ids, skip_special=False):
        return "".join(chr(97 + i % 26) for i in ids)
