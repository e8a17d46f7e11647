"""Infinite generation on the real default model: 3,000 tokens through a 256-token budget with StreamingLLM
eviction (a dozen or more evictions, each re-rotating the kept keys).

Checked at every step: the cache never holds more than the budget and no position reaches the capacity.
At the end: the text is still fluent, measured as the share of distinct token 4-grams in the last 500
tokens (a degenerate repetition loop drives it towards 0; fluent text stays near 1), and as the zlib
compression ratio of their text (loops compress far better than prose). Runs in about 2-3 minutes.
"""

from __future__ import annotations

import logging
import time
import zlib

import pytest

from infinichat.engine.sampling import SamplingParams
from infinichat.engine.torch_engine import TorchEngine
from infinichat.model.loader import load_model

pytestmark = pytest.mark.slow
log = logging.getLogger(__name__)

BUDGET, N_TOKENS, TAIL = 256, 3000, 500
MESSAGES = [
    {"role": "system", "content": "You are a gifted storyteller. You write long, vivid stories."},
    {"role": "user", "content": "Tell me a very long story about a lighthouse keeper and a stray cat."},
]


def distinct_ngrams(tokens: list[int], n: int = 4) -> float:
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams)


def compression_ratio(text: str) -> float:
    raw = text.encode()
    return len(zlib.compress(raw, 9)) / len(raw)


def test_distinct_ngrams_flags_a_loop():
    assert distinct_ngrams([1, 2, 3, 4, 5, 6, 7] * 70) < 0.05
    assert distinct_ngrams(list(range(500))) == 1.0


def test_3000_tokens_of_streaming_generation_in_a_256_token_budget(tmp_path_factory):
    loaded = load_model(None, "bfloat16", cache_dir=tmp_path_factory.mktemp("cache"))
    tok = loaded.tokenizer
    engine = TorchEngine(loaded.model, eos_ids=())  # no stop at EOS: the text just goes on
    seq = engine.new_sequence(budget=BUDGET, policy="streaming")
    prompt = tok.encode(tok.apply_chat_template(MESSAGES, add_generation_prompt=True), add_bos=tok.add_bos)
    seq.create_segment("system", "prompt")  # pinned: the attention sinks
    logits = engine.prefill(seq, prompt)
    seq.create_segment("assistant")
    params = SamplingParams(temperature=0.7, top_p=0.9, repetition_penalty=1.1, seed=1, max_tokens=N_TOKENS)

    out: list[int] = []
    t0 = time.perf_counter()
    for step in engine.generate(seq, [], params, history=prompt, logits=logits):
        out.append(step.token)
        assert seq.length <= BUDGET, f"cache holds {seq.length} tokens > budget {BUDGET}"
        assert seq.store.next_position <= seq.capacity, "a position reached the capacity"
    elapsed = time.perf_counter() - t0

    assert len(out) == N_TOKENS
    assert seq.n_evictions >= 10, f"only {seq.n_evictions} evictions"
    assert seq.token_ids()[: len(prompt)] == prompt, "the pinned prompt was evicted"
    assert seq.positions() == list(range(seq.length))
    tail = out[-TAIL:]
    distinct, ratio = distinct_ngrams(tail), compression_ratio(tok.decode(tail))
    log.info(
        "%d tokens in %.0f s (%.1f tok/s), %d evictions; last %d tokens: distinct 4-grams %.3f, zlib ratio %.3f",
        N_TOKENS,
        elapsed,
        N_TOKENS / elapsed,
        seq.n_evictions,
        TAIL,
        distinct,
        ratio,
    )
    assert distinct >= 0.6, f"repetition loop: only {distinct:.0%} distinct 4-grams\n{tok.decode(tail)}"
    assert ratio >= 0.25, f"repetition loop: the text compresses to {ratio:.0%}\n{tok.decode(tail)}"
