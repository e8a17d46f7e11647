"""The llama.cpp backend itself: parity with our torch engine, refused policies, parked sequences,
snapshot checks, the missing-package message and `--backend llamacpp` in the CLI.
(The protocol and sequence operations on both backends: test_engines.py.)"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from logit_checks import assert_close

from infinichat.cli.main import main
from infinichat.errors import InfinichatError
from infinichat.kv.policy import SlidingPolicy

pytestmark = pytest.mark.slow
pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (bash scripts/setup.sh --test)")
from infinichat.engine import llamacpp  # noqa: E402  (after the importorskip of llama_cpp)

TEXT = (Path(__file__).parent / "data" / "moby_dick_loomings.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def ids(default_tokenizer) -> list[int]:
    return default_tokenizer.encode(TEXT, add_bos=default_tokenizer.add_bos, parse_special=False)


@dataclass
class AttentionScoredPolicy(SlidingPolicy):
    """A stand-in for H2O / TOVA: it declares that it needs attention weights."""

    name: ClassVar[str] = "fake-h2o"
    needs_attention_weights: ClassVar[bool] = True


@dataclass
class PerStepSelection(SlidingPolicy):
    """A stand-in for OmniKV: selects at every decode step."""

    name: ClassVar[str] = "fake-omnikv"
    phase: ClassVar[str] = "decode"


def test_policies_needing_attention_weights_are_refused_by_name():
    assert llamacpp.supported_policies() == ["streaming", "turns", "window", "full", "recompute"]


@pytest.mark.parametrize("policy", [AttentionScoredPolicy(), PerStepSelection()])
def test_refusal_names_the_policies_that_work(llamacpp_default_engine, policy):
    with pytest.raises(InfinichatError) as e:
        llamacpp_default_engine.new_sequence(budget=64, policy=policy)
    msg = str(e.value)
    assert policy.name in msg and "streaming, turns, window, full, recompute" in msg and "--backend torch" in msg


def test_teacher_forced_top1_parity_with_the_torch_engine(torch_default_engine, llamacpp_default_engine, ids):
    """Both read the same Q4_1 weights; llama.cpp also quantizes activations, so exact equality is not
    expected: the argmax must agree on >= 95% of 500 positions of Moby Dick (measured: 96.4%)."""
    ids = ids[:500]
    assert len(ids) == 500
    ref = torch_default_engine.prefill(torch_default_engine.new_sequence(capacity=512), ids, all_logits=True)
    got = llamacpp_default_engine.prefill(llamacpp_default_engine.new_sequence(capacity=512), ids, all_logits=True)
    assert got.shape == ref.shape == (500, torch_default_engine.cfg.vocab_size)
    agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    print(f"top-1 agreement {agree:.4f}, max |diff| {(got - ref).abs().max().item():.3f}")
    assert agree >= 0.95


def test_remove_a_middle_span_follows_the_torch_engine(torch_default_engine, llamacpp_default_engine, ids):
    """Cutting a span shifts the later cells down (llama.cpp re-rotates their keys). Their K/V still saw the
    cut text, so no fresh run is a reference; our torch engine doing the same cut is (its re-rotation is
    tested exactly in test_kv_store): teacher-forced over the next 60 tokens, the top-1 agreement must be as
    high as the plain parity (>= 90% here, 60 positions)."""
    out = {}
    for name, engine in (("ref", torch_default_engine), ("got", llamacpp_default_engine)):
        seq = engine.new_sequence(capacity=256)
        engine.prefill(seq, ids[:120])
        seq.remove(30, 70)
        assert seq.token_ids() == ids[:30] + ids[70:120] and seq.positions() == list(range(80))
        out[name] = engine.prefill(seq, ids[120:180], all_logits=True)
        if name == "got":
            assert seq.store.cell_positions() == (0, 139)  # llama.cpp's own view: shifted, contiguous
    agree = (out["got"].argmax(-1) == out["ref"].argmax(-1)).float().mean().item()
    assert agree >= 0.9, agree


def test_parked_sequences_come_back_intact(ids):
    """A context of 256 cells and 4 sequence ids holds 5 sequences of 70 tokens only by parking the least
    recently used ones (for want of cells, then of ids); each one continues as if it had been alone
    (within llama.cpp's kernel noise, see logit_checks.py: its cells come back elsewhere in the cache)."""
    engine = llamacpp.LlamaCppEngine(n_ctx=256, n_seq_max=4, threads=1)
    seqs = [engine.new_sequence(capacity=128) for _ in range(5)]
    for i, seq in enumerate(seqs):
        engine.prefill(seq, ids[i * 70 : i * 70 + 70])
    assert engine.n_parked >= 2 and sum(s.store.resident for s in seqs) <= 3
    for i, seq in enumerate(seqs):  # least recently used first: every one of them is parked by now
        got = engine.decode_one(seq, ids[i * 70 + 70])
        assert seq.store.cell_positions() == (0, 70)
        single = engine.new_sequence(capacity=128)
        engine.prefill(single, ids[i * 70 : i * 70 + 70])
        assert_close(engine, got, engine.decode_one(single, ids[i * 70 + 70]))
    snap = seqs[0].snapshot()
    hlen = int.from_bytes(snap[4:8], "little")
    state = 8 + hlen + 16 * seqs[0].length  # where llama.cpp's state bytes start
    damaged = snap[:state] + bytes(8) + snap[state + 8 :]
    with pytest.raises(InfinichatError, match="refused"):
        seqs[1].restore(damaged)
    del seqs, seq, single  # dead sequences give their ids and cells back
    n_parked = engine.n_parked
    big = engine.new_sequence()
    engine.prefill(big, ids[:250])  # 250 of the 256 cells: nothing else holds any
    assert engine.n_parked == n_parked and big.capacity == 256
    with pytest.raises(InfinichatError, match=r"does not fit the llama\.cpp context"):
        engine.new_sequence(capacity=512)
    engine.close()
    with pytest.raises(InfinichatError, match="was closed"):
        engine.decode_one(big, ids[250])


def test_recompute_across_a_positional_gap_is_refused(llamacpp_default_engine, ids):
    engine = llamacpp_default_engine
    seq = engine.new_sequence(budget=64, capacity=128, policy="recompute", n_discard=16)
    engine.prefill(seq, ids[:40])
    seq.shift(20, 5)  # positions 0..19, 25..44
    with pytest.raises(InfinichatError, match="gap in their positions"):
        engine.prefill(seq, ids[40:70])  # evicts 16 tokens, then would re-evaluate 0..3, 9..28
    assert seq.token_ids() == ids[16:40] and seq.store.cell_positions() == (0, 28)


def test_snapshots_do_not_cross_backends(torch_default_engine, llamacpp_default_engine):
    t = torch_default_engine.new_sequence(capacity=64)
    torch_default_engine.prefill(t, [1, 2, 3])
    lseq = llamacpp_default_engine.new_sequence(capacity=64)
    with pytest.raises(InfinichatError, match="written by the torch engine"):
        lseq.restore(t.snapshot())
    llamacpp_default_engine.prefill(lseq, [1, 2, 3])
    with pytest.raises(InfinichatError, match="bad magic"):
        t.restore(lseq.snapshot())
    with pytest.raises(InfinichatError, match="another engine"):
        llamacpp_default_engine.prefill(t, [4])


def test_missing_llama_cpp_says_how_to_install(monkeypatch):
    llamacpp._lib.cache_clear()
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp -> ImportError
    try:
        with pytest.raises(InfinichatError) as e:
            llamacpp._lib()
    finally:
        monkeypatch.undo()
        llamacpp._lib.cache_clear()
    msg = str(e.value)
    assert 'CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"' in msg
    assert "pip install 'infinichat[llamacpp]'" in msg and "AMX" in msg


def test_cli_generate_with_the_llamacpp_backend(capsys):
    rc = main(
        [
            "generate",
            "The capital of France is",
            "-n",
            "8",
            "--temperature",
            "0",
            "--backend",
            "llamacpp",
            "--threads",
            "1",
            "--show-probs",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0 and "Paris" in out


def test_cli_llamacpp_needs_a_gguf_file(tmp_path, capsys):
    rc = main(["generate", "hi", "--backend", "llamacpp", "--model", str(tmp_path)])
    assert rc == 2 and ".gguf file" in capsys.readouterr().err


def test_logits_are_float32_tensors_of_the_vocab(llamacpp_default_engine):
    seq = llamacpp_default_engine.new_sequence(budget=32, policy="streaming", n_sink=4, n_discard=8)
    out = llamacpp_default_engine.prefill(seq, list(range(100, 140)), all_logits=True)
    assert out.dtype == torch.float32 and out.shape == (40, llamacpp_default_engine.cfg.vocab_size)
    assert seq.length <= 32 and seq.n_evictions >= 1 and torch.isfinite(out).all()
