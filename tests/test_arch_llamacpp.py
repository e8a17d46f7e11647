"""The llama.cpp backend on the 2026 families (issue 18): it reads the model's shape from llama.cpp itself
(`LlamaModelInfo`), so it runs whatever its build runs, including architectures the torch side's table does
not know. Tiny llama.cpp-layout GGUF files of random transformers models; llama.cpp's logits against
transformers': KL(transformers || llama.cpp) per position (measured <= 4e-7) and the same top token.
"""

from __future__ import annotations

import gguf_archs
import pytest
import torch

from infinichat.errors import ModelLoadError
from infinichat.model.loader import load_model

pytest.importorskip("transformers")
pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (bash scripts/setup.sh --test)")
from infinichat.engine import llamacpp

KL = 1e-4
# (transformers model, GGUF architecture, sliding window llama.cpp reports)
FAMILIES = {
    "gemma2-gguf": ("gemma2", 8),
    "gemma3-6layers": ("gemma3", 8),
    "llama3.2": ("llama", 0),
    "qwen3": ("qwen3", 0),
}


def _compare(engine, ref, n=40):
    ids = torch.randint(0, ref.config.vocab_size, (n,), generator=torch.Generator().manual_seed(1)).tolist()
    got = engine.prefill(engine.new_sequence(capacity=64), ids, all_logits=True)  # (n, V)
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0]
    logp, logq = torch.log_softmax(want.double(), -1), torch.log_softmax(got.double(), -1)
    kl = (logp.exp() * (logp - logq)).sum(-1).max().item()
    assert kl < KL, kl
    assert torch.equal(got.argmax(-1), want.argmax(-1))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_llamacpp_runs_the_new_families_as_transformers_does(name, tmp_path):
    ref = gguf_archs.tiny(name)
    path = tmp_path / f"{name}.gguf"
    gguf_archs.write_arch_gguf(path, ref)
    engine = llamacpp.LlamaCppEngine(path, n_ctx=128, threads=1)
    try:
        arch, window = FAMILIES[name]
        c = ref.config
        info = engine.cfg
        assert (info.arch, info.n_layers, info.n_kv_heads, info.head_dim) == (
            arch,
            c.num_hidden_layers,
            c.num_key_value_heads,
            c.head_dim,
        )
        assert (info.vocab_size, info.max_position, info.sliding_window) == (c.vocab_size, 128, window)
        _compare(engine, ref)
    finally:
        engine.close()


def test_an_architecture_only_llamacpp_knows(tmp_path):
    """Granite: the torch side refuses it by name; the llama.cpp backend runs it, matching transformers."""
    ref = gguf_archs.tiny_granite()
    path = tmp_path / "granite.gguf"
    gguf_archs.write_granite_gguf(path, ref)
    with pytest.raises(ModelLoadError, match="unsupported architecture 'granite'"):
        load_model(path, dtype="float32", cache_dir=tmp_path / "cache")
    engine = llamacpp.LlamaCppEngine(path, n_ctx=128, threads=1)
    try:
        assert engine.cfg.arch == "granite" and engine.cfg.n_layers == 3
        _compare(engine, ref)
    finally:
        engine.close()


def test_a_file_llamacpp_cannot_load_names_its_architecture(tmp_path):
    ref = gguf_archs.tiny("llama3.2")
    path = tmp_path / "broken.gguf"
    gguf_archs.write_arch_gguf(path, ref, drop=("blk.1.attn_k.weight",))
    with pytest.raises(ModelLoadError, match=r"llama\.cpp could not load this GGUF file \(architecture 'llama'"):
        llamacpp.LlamaCppEngine(path, n_ctx=128, threads=1)


def _kl(want: torch.Tensor, got: torch.Tensor) -> float:
    logp, logq = torch.log_softmax(want.double(), -1), torch.log_softmax(got.double(), -1)
    return (logp.exp() * (logp - logq)).sum(-1).max().item()


@pytest.mark.parametrize("name", list(FAMILIES))
def test_removal_and_streaming_follow_the_torch_engine(name, tmp_path):
    """The same GGUF on both backends: spans cut from the middle (llama.cpp's K-shift, our re-rotation,
    windowed layers included), then a streaming sequence over its budget, teacher-forced: every step's
    logits agree (KL < 1e-4; measured <= 3e-7) and the positions are the same contiguous ones."""
    from infinichat.engine.torch_engine import TorchEngine

    ref = gguf_archs.tiny(name)
    path = tmp_path / f"{name}.gguf"
    gguf_archs.write_arch_gguf(path, ref)
    torch_engine = TorchEngine(load_model(path, dtype="float32", cache_dir=tmp_path / "c", kernels="torch").model)
    llama = llamacpp.LlamaCppEngine(path, n_ctx=256, threads=1)
    ids = torch.randint(0, gguf_archs.V, (100,), generator=torch.Generator().manual_seed(1)).tolist()
    try:
        out = {}
        for key, engine in (("torch", torch_engine), ("llama", llama)):
            seq = engine.new_sequence(capacity=128)
            engine.prefill(seq, ids[:40])
            seq.remove_spans([(3, 9), (20, 31)])
            cut = torch.stack([engine.decode_one(seq, t) for t in ids[40:55]])
            stream = engine.new_sequence(budget=24, policy="streaming", n_discard=8)
            engine.prefill(stream, ids[:10])
            steps = torch.stack([engine.decode_one(stream, t) for t in ids[10:100]])
            out[key] = (cut, steps, seq.positions(), stream.positions())
        (cut_t, steps_t, pos_t, spos_t), (cut_l, steps_l, pos_l, spos_l) = out["torch"], out["llama"]
        assert _kl(cut_t, cut_l) < KL and _kl(steps_t, steps_l) < KL
        assert pos_t == pos_l == list(range(len(pos_t))) and spos_t == spos_l == list(range(len(spos_t)))
        assert len(spos_t) <= 24
    finally:
        llama.close()


@pytest.mark.parametrize("name", ["phi3-longrope", "phi3-partial-rotary"])
def test_llamacpp_runs_phi3(name, tmp_path, monkeypatch):
    """Phi-3 (fused attn_qkv / ffn_up, LongRoPE factors as tensors, partial rotary) with a vocabulary holding
    Phi-3's special tokens (llama.cpp's phi3 loader looks them up). 40 tokens > the original context 16: both
    take the long factors (llama.cpp picks them by n_ctx, transformers per call; shorter calls differ:
    measured KL 1e-3 at 12 tokens). llama.cpp ignores Phi-3's sliding window (its log says so)."""
    monkeypatch.setitem(gguf_archs._SMALL, "vocab_size", gguf_archs.PHI3_V)
    ref = gguf_archs.tiny(name)
    path = tmp_path / f"{name}.gguf"
    gguf_archs.write_arch_gguf(path, ref, vocab="spm-phi3")
    engine = llamacpp.LlamaCppEngine(path, n_ctx=128, threads=1)
    try:
        assert engine.cfg.arch == "phi3" and engine.cfg.sliding_window == 0
        _compare(engine, ref, n=40)
    finally:
        engine.close()
