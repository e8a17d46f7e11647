"""The engine protocol and KV sequence operations on the real default model, on both backends (the torch
engine in float32, and llama.cpp on the Q4_1 GGUF file), through the `default_engine` fixture.

References: a fresh evaluation of the tokens the cache should hold; tolerances in logit_checks.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from logit_checks import assert_close

from infinichat.engine.sampling import Sampler, SamplingParams
from infinichat.errors import InfinichatError

pytestmark = pytest.mark.slow

TEXT = (Path(__file__).parent / "data" / "moby_dick_loomings.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def ids(default_tokenizer) -> list[int]:
    return default_tokenizer.encode(TEXT, add_bos=default_tokenizer.add_bos, parse_special=False)


def fresh(engine, tokens: list[int]) -> torch.Tensor:
    """Next-token logits (V,) of a new sequence holding `tokens`."""
    return engine.prefill(engine.new_sequence(capacity=len(tokens) + 8), tokens)


def greedy(engine, seq, logits: torch.Tensor, n: int) -> list[int]:
    params = SamplingParams(temperature=0, max_tokens=n)
    return [s.token for s in engine.generate(seq, [], params, logits=logits)]


def test_append_and_truncate_equal_a_fresh_evaluation(default_engine, ids):
    engine = default_engine
    seq = engine.new_sequence(capacity=256)
    logits = engine.prefill(seq, ids[:80], all_logits=True)  # (80, V)
    assert logits.shape == (80, engine.cfg.vocab_size) and logits.dtype == torch.float32
    assert_close(engine, logits[-1], fresh(engine, ids[:80]))
    seq.truncate(50)
    assert seq.token_ids() == ids[:50] and seq.positions() == list(range(50))
    got = engine.prefill(seq, ids[100:120])
    assert_close(engine, got, fresh(engine, ids[:50] + ids[100:120]))
    assert_close(engine, engine.decode_one(seq, ids[120]), fresh(engine, ids[:50] + ids[100:121]))


def test_recompute_eviction_equals_a_fresh_evaluation_of_the_kept_tokens(default_engine, ids):
    """A middle span is evicted (the first 4 tokens are pinned); the kept tokens after it are re-evaluated,
    so the next logits equal a fresh evaluation of exactly the remaining tokens."""
    engine = default_engine
    seq = engine.new_sequence(budget=96, policy="recompute", n_discard=40)
    seq.create_segment("system", "sinks")
    engine.prefill(seq, ids[:4])
    seq.create_segment("user")
    engine.prefill(seq, ids[4:90])
    got = engine.prefill(seq, ids[90:110])  # 110 > 96: evicts 40 tokens after the pinned 4
    assert seq.n_evictions == 1 and seq.length <= 96
    kept = seq.token_ids()
    assert kept[:4] == ids[:4] and kept[4:] == ids[110 - len(kept) + 4 : 110]
    assert seq.positions() == list(range(len(kept)))
    assert_close(engine, got, fresh(engine, kept))


def test_shifting_every_position_keeps_the_logits(default_engine, ids):
    """RoPE attention depends on position differences only: moving the whole cache up by 100 positions
    (re-rotating every key) must not change what comes next."""
    engine = default_engine
    seq = engine.new_sequence(capacity=512)
    engine.prefill(seq, ids[:60])
    seq.shift(0, 100)
    assert seq.positions() == list(range(100, 160))
    assert_close(engine, engine.prefill(seq, ids[60:64]), fresh(engine, ids[:64]))
    with pytest.raises(InfinichatError, match="increasing, below the capacity"):
        seq.shift(10, -20)


def test_segments_revert_and_remove(default_engine, ids):
    engine = default_engine
    seq = engine.new_sequence(capacity=512)
    seq.create_segment("system")
    engine.prefill(seq, ids[:30])
    user = seq.create_segment("user")
    engine.prefill(seq, ids[30:60])
    reply = seq.create_segment("assistant")
    engine.prefill(seq, ids[60:90])
    seq.create_segment("user")
    engine.prefill(seq, ids[90:100])

    seq.revert_to(reply.id)  # retry: drop the reply and what follows
    assert seq.token_ids() == ids[:60]
    seq.create_segment("assistant")
    assert_close(engine, engine.prefill(seq, ids[200:210]), fresh(engine, ids[:60] + ids[200:210]))
    seq.remove_segment(user.id)
    assert seq.token_ids() == ids[:30] + ids[200:210] and seq.positions() == list(range(40))
    assert [s.kind for s in seq.segments.segments] == ["system", "assistant"]
    out = greedy(engine, seq, engine.decode_one(seq, ids[210]), 8)
    assert len(out) == 8 and all(0 <= t < engine.cfg.vocab_size for t in out)


def test_streaming_eviction_in_a_small_budget_keeps_generating(default_engine, default_tokenizer):
    engine, tok = default_engine, default_tokenizer
    msgs = [{"role": "user", "content": "Tell me a long story about a lighthouse keeper and a stray cat."}]
    prompt = tok.encode(tok.apply_chat_template(msgs, add_generation_prompt=True), add_bos=tok.add_bos)
    seq = engine.new_sequence(budget=96, policy="streaming", n_discard=16)
    seq.create_segment("system", "prompt")
    logits = engine.prefill(seq, prompt)
    seq.create_segment("assistant")
    sampler = Sampler(SamplingParams(temperature=0.7, top_p=0.9, repetition_penalty=1.1, seed=3), engine.cfg.vocab_size)
    out: list[int] = []
    for _ in range(160):  # sampled by hand: an end-of-text token does not stop this run
        token = sampler.sample(logits, prompt + out).token
        out.append(token)
        logits = engine.decode_one(seq, token)
        assert seq.length <= 96 and max(seq.positions()) < seq.capacity
    assert seq.n_evictions >= 3 and seq.token_ids()[: len(prompt)] == prompt  # the pinned prompt survives
    tail = out[-80:]
    grams = [tuple(tail[i : i + 4]) for i in range(len(tail) - 3)]
    assert len(set(grams)) / len(grams) > 0.6, tok.decode(tail)  # not a repetition loop


def test_snapshot_restore_and_file_round_trip(default_engine, ids, tmp_path):
    engine = default_engine
    seq = engine.new_sequence(capacity=256)
    seq.create_segment("system")
    engine.prefill(seq, ids[:40])
    seq.create_segment("user", "q")
    engine.prefill(seq, ids[40:70])
    snap = seq.snapshot()
    seq.save(tmp_path / "kv.bin")
    want = engine.decode_one(seq, ids[70])
    engine.prefill(seq, ids[100:150])  # move on, then go back
    seq.restore(snap)
    assert seq.token_ids() == ids[:70] and [(s.kind, s.name) for s in seq.segments.segments][1] == ("user", "q")
    got = engine.decode_one(seq, ids[70])
    assert torch.equal(got, want)  # the same K/V cells and the same kernels: bit-exact on both backends

    other = engine.new_sequence(capacity=256)
    other.load(tmp_path / "kv.bin")
    assert other.token_ids() == ids[:70] and other.positions() == list(range(70))
    assert_close(engine, engine.decode_one(other, ids[70]), want)
    with pytest.raises(InfinichatError, match="budget"):
        engine.new_sequence(budget=50).restore(snap)
    with pytest.raises(InfinichatError):
        other.restore(snap[:-10])


def test_fork_is_independent(default_engine, ids):
    engine = default_engine
    parent = engine.new_sequence(capacity=256)
    engine.prefill(parent, ids[:50])
    child = parent.fork()
    a = engine.prefill(parent, ids[50:60])
    b = engine.prefill(child, ids[200:205])
    child.truncate(20)
    c = engine.decode_one(parent, ids[60])
    assert parent.token_ids() == ids[:61] and child.token_ids() == ids[:20]
    assert_close(engine, a, fresh(engine, ids[:60]))
    assert_close(engine, b, fresh(engine, ids[:50] + ids[200:205]))
    assert_close(engine, c, fresh(engine, ids[:61]))
    assert_close(engine, engine.decode_one(child, ids[20]), fresh(engine, ids[:21]))


def test_several_sequences_alive_do_not_interfere(default_engine, ids):
    engine = default_engine
    starts = [0, 150, 300, 450]
    seqs = [engine.new_sequence(capacity=128) for _ in starts]
    for s, seq in zip(starts, seqs, strict=True):
        engine.prefill(seq, ids[s : s + 40])
    for k in range(3):  # interleaved decoding
        for s, seq in zip(starts, seqs, strict=True):
            logits = engine.decode_one(seq, ids[s + 40 + k])
    for s, seq in zip(starts, seqs, strict=True):
        assert seq.token_ids() == ids[s : s + 43]
    assert_close(engine, logits, fresh(engine, ids[450:493]))
    assert_close(engine, engine.decode_one(seqs[0], ids[43]), fresh(engine, ids[:44]))
