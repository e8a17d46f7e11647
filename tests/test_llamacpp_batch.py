"""Batched decode steps on the llama.cpp backend (engine/llamacpp.py `decode_rows`): several sequences of the one
context advanced in one `llama_decode` (one token each, its own seq id). Greedy replies equal each sequence
decoded alone; a step computed but never claimed (a cancel between the batched call and the generation's turn)
leaves no cell behind; parked sequences run alone. Logits: llama.cpp's matrix products for several rows are not
its one-row kernels (measured here: 2.1% of the largest logit apart on the default model), so logits are compared
within 5% of the largest logit, and the greedy tokens exactly."""

from __future__ import annotations

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
    for s, p, t in zip(seqs, prompts, toks, strict=True):
        assert s.token_ids() == p + t
        assert s.store.cell_positions() == (0, s.length - 1)


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
