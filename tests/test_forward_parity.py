"""Our forward pass against transformers, per architecture, on tiny random-weight models (fp32, 1e-4).

Each model is built with transformers, saved as a HF folder, loaded by our HF loader and compared for a
prefill and for 20 decode steps after it (both sides decode incrementally with their own KV cache).
"""

from __future__ import annotations

import pytest
import torch

from infinichat.kv.cache import KVCache
from infinichat.model.hf_loader import load_hf_folder
from infinichat.model.transformer import Transformer

transformers = pytest.importorskip("transformers")
from transformers import DynamicCache  # noqa: E402  (after the importorskip of transformers)

TOL = 1e-4
PREFILL, DECODE = 24, 20

_small = {
    "vocab_size": 211,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 3,
    "initializer_range": 0.08,
}


def _llama(**kw):
    return transformers.LlamaConfig(**{**_small, "num_attention_heads": 4, "num_key_value_heads": 4, **kw})


ARCHS = {
    "llama2": lambda: _llama(max_position_embeddings=128),
    "llama3-gqa": lambda: _llama(num_key_value_heads=2, rope_theta=500000.0, max_position_embeddings=128),
    "llama3.1-rope-scaling": lambda: _llama(
        num_key_value_heads=2,
        max_position_embeddings=128,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    ),
    "llama-linear-scaling": lambda: _llama(
        max_position_embeddings=128, rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}
    ),
    # max_position 32 < 44 tokens: the dynamic NTK base changes at every decode step past 32
    "llama-dynamic-ntk": lambda: _llama(
        max_position_embeddings=32, rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}
    ),
    "smollm-tied": lambda: _llama(num_key_value_heads=1, tie_word_embeddings=True, max_position_embeddings=128),
    "tinyllama": lambda: _llama(num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=128),
    "mistral": lambda: transformers.MistralConfig(
        **{**_small, "num_attention_heads": 4, "num_key_value_heads": 2, "sliding_window": None}
    ),
    "qwen2-qkv-bias": lambda: transformers.Qwen2Config(
        **{**_small, "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": False}
    ),
    # q/k norms (per-head RMSNorm before RoPE) and an explicit head_dim
    "qwen3-qk-norm": lambda: transformers.Qwen3Config(
        **{**_small, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "tie_word_embeddings": False}
    ),
    "pythia": lambda: transformers.GPTNeoXConfig(
        **{**_small, "num_attention_heads": 4, "rotary_pct": 0.25, "use_parallel_residual": True}
    ),
    "gptneox-sequential": lambda: transformers.GPTNeoXConfig(
        **{**_small, "num_attention_heads": 4, "rotary_pct": 0.5, "use_parallel_residual": False}
    ),
}


def _build(name, tmp_path, kernels="auto"):
    torch.manual_seed(0)
    hf_cfg = ARCHS[name]()
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg).eval().float()
    with torch.no_grad():  # biases are zero-initialised: give them values so they are really tested
        for n, p in model.named_parameters():
            if n.endswith(".bias"):
                p.normal_(0, 0.05)
    folder = tmp_path / name
    model.save_pretrained(folder)
    cfg, weights = load_hf_folder(folder)
    return model, cfg, Transformer(cfg, weights, torch.float32, kernels=kernels)


@pytest.mark.parametrize("kernels", ["cpu-native", "torch"])
@pytest.mark.parametrize("name", list(ARCHS))
def test_prefill_and_decode_match_transformers(name, kernels, tmp_path):
    """Both kernel sets: `torch` is the code a CUDA device runs, `cpu-native` the CPU's default."""
    ref, cfg, ours = _build(name, tmp_path, kernels)
    assert ours.kernels.name == kernels
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, cfg.vocab_size, (PREFILL,), generator=g)
    follow = torch.randint(0, cfg.vocab_size, (DECODE,), generator=g)

    cache = KVCache(cfg, 64)
    got = [ours(prompt, torch.arange(PREFILL), cache, 0, all_logits=True)]  # (T, V)
    with torch.no_grad():
        hf_cache = DynamicCache(config=ref.config)
        out = ref(prompt[None], past_key_values=hf_cache, use_cache=True)
        want = [out.logits[0]]
        for t, tok in enumerate(follow.tolist()):
            pos = PREFILL + t
            got.append(ours(torch.tensor([tok]), torch.tensor([pos]), cache, pos)[None])
            out = ref(torch.tensor([[tok]]), past_key_values=out.past_key_values, use_cache=True)
            want.append(out.logits[0])
    got_t, want_t = torch.cat(got), torch.cat(want)
    assert got_t.shape == (PREFILL + DECODE, cfg.vocab_size)
    assert want_t.abs().max() > 0.05, "logits too small for the comparison to mean anything"
    diff = (got_t - want_t).abs().max().item()
    assert diff <= TOL, f"{name}: max abs diff {diff:.2e} > {TOL}"


@pytest.mark.parametrize("kernels", ["cpu-native", "torch"])
@pytest.mark.parametrize("name", ["llama3-gqa", "qwen2-qkv-bias", "qwen3-qk-norm", "pythia"])
def test_a_batch_gives_each_sequence_its_solo_logits(name, kernels, tmp_path):
    """forward_batch over sequences of different cached lengths and new-token counts (one decoding, two
    prompt chunks, one from slot 0) = each sequence run alone, fp32, to 1e-5."""
    from infinichat.model.transformer import BatchItem

    _, cfg, ours = _build(name, tmp_path, kernels)
    g = torch.Generator().manual_seed(5)
    cached, new = (9, 0, 17, 4), (1, 6, 3, 1)
    ids = [torch.randint(0, cfg.vocab_size, (c + n,), generator=g) for c, n in zip(cached, new, strict=True)]
    solo_caches, batch_caches = [KVCache(cfg, 32) for _ in ids], [KVCache(cfg, 32) for _ in ids]
    for t, c, a, b in zip(ids, cached, solo_caches, batch_caches, strict=True):
        if c:
            ours(t[:c], torch.arange(c), a, 0)
            ours(t[:c], torch.arange(c), b, 0)
    solo = [
        ours(t[c:], torch.arange(c, c + n), a, c, all_logits=True)
        for t, c, n, a in zip(ids, cached, new, solo_caches, strict=True)
    ]
    items = [
        BatchItem(t[c:], torch.arange(c, c + n), b, c)
        for t, c, n, b in zip(ids, cached, new, batch_caches, strict=True)
    ]
    batched = ours.forward_batch(items, all_logits=True)
    last = ours.forward_batch(
        [
            BatchItem(t[-1:], torch.tensor([c + n]), b, c + n)
            for t, c, n, b in zip(ids, cached, new, batch_caches, strict=True)
        ]
    )  # a decode step of all four at once, last logits only: it reads the K/V the batched call wrote
    for i, (a, b) in enumerate(zip(solo, batched, strict=True)):
        assert b.shape == a.shape
        assert (a - b).abs().max().item() <= 1e-5, f"sequence {i}"
    for i, (t, c, n, a) in enumerate(zip(ids, cached, new, solo_caches, strict=True)):
        want = ours(t[-1:], torch.tensor([c + n]), a, c + n)
        assert (last[i] - want).abs().max().item() <= 1e-5, f"sequence {i}, decode step"


def test_torch_and_cpu_native_kernels_agree_in_bfloat16(tmp_path):
    """bf16: cpu-native computes long prompts in float32 and packs weights; torch stays in bf16 throughout.
    Both stay close to the fp32 model, and to each other (bf16 rounding: 5% of the logits' scale + 0.02)."""
    _, cfg, ours32 = _build("llama3-gqa", tmp_path)
    folder = tmp_path / "llama3-gqa"
    cfg, weights = load_hf_folder(folder)
    models = [Transformer(cfg, weights, torch.bfloat16, kernels=k) for k in ("cpu-native", "torch")]
    ids = torch.randint(0, cfg.vocab_size, (44,), generator=torch.Generator().manual_seed(4))
    caches = [KVCache(cfg, 64, torch.bfloat16) for _ in models]
    ref_cache = KVCache(cfg, 64)
    outs = [m(ids[:40], torch.arange(40), c, 0) for m, c in zip(models, caches, strict=True)]
    ref = ours32(ids[:40], torch.arange(40), ref_cache, 0)
    for t in range(40, 45):
        scale = ref.abs().max().item()
        for o in outs:
            assert (o - ref).abs().max().item() <= 0.05 * scale + 0.02
        assert (outs[0] - outs[1]).abs().max().item() <= 0.05 * scale + 0.02
        if t < 44:
            outs = [m(ids[t : t + 1], torch.tensor([t]), c, t) for m, c in zip(models, caches, strict=True)]
            ref = ours32(ids[t : t + 1], torch.tensor([t]), ref_cache, t)


def test_chunked_prefill_equals_one_prefill(tmp_path):
    """Prefill in chunks (the causal mask with an offset) gives the same logits as one prefill."""
    _, cfg, ours = _build("llama3-gqa", tmp_path)
    ids = torch.randint(0, cfg.vocab_size, (30,), generator=torch.Generator().manual_seed(2))
    whole = ours(ids, torch.arange(30), KVCache(cfg, 32), 0, all_logits=True)
    cache = KVCache(cfg, 32)
    parts = [ours(ids[a:b], torch.arange(a, b), cache, a, all_logits=True) for a, b in ((0, 7), (7, 19), (19, 30))]
    assert (torch.cat(parts) - whole).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", ["llama3-gqa", "pythia"])
def test_bfloat16_paths(name, tmp_path):
    """bf16: the oneDNN-packed decode path equals the plain one bit for bit, and a float32-computed
    prefill (prompts of >= FP32_PREFILL_MIN tokens) plus bf16 decode stay close to the fp32 model."""
    from infinichat.kernels import cpu_native

    _, cfg, ours32 = _build(name, tmp_path)
    weights = dict(
        [("embed.weight", ours32.embed), ("norm.weight", ours32.norm[0])]
        + ([("norm.bias", ours32.norm[1])] if ours32.norm[1] is not None else [])
        + ([] if cfg.tie_embeddings else [("lm_head.weight", ours32.lm_head)])
        + [(f"layers.{i}.{n}", t) for i, L in enumerate(ours32.layers) for n, t in L.items()]
    )
    bf = Transformer(cfg, weights, torch.bfloat16)
    plain = Transformer(cfg, weights, torch.bfloat16)
    plain.kernels.packed.clear()
    n = cpu_native.FP32_PREFILL_MIN + 8
    ids = torch.randint(0, cfg.vocab_size, (n + 4,), generator=torch.Generator().manual_seed(3))
    caches = [KVCache(cfg, 64, torch.bfloat16) for _ in range(2)] + [KVCache(cfg, 64)]
    outs = [m(ids[:n], torch.arange(n), c, 0) for m, c in zip((bf, plain, ours32), caches, strict=True)]
    for t in range(n, n + 4):
        outs = [m(ids[t : t + 1], torch.tensor([t]), c, t) for m, c in zip((bf, plain, ours32), caches, strict=True)]
        assert torch.equal(outs[0], outs[1]), "packed and plain bf16 decode differ"
        scale = outs[2].abs().max().item()
        assert (outs[0] - outs[2]).abs().max().item() <= 0.05 * scale + 0.02, "bf16 drifted from fp32"
    # where oneDNN is available the packed path must really be in use, or the equality above proves nothing
    assert bf.kernels.packed or not torch.backends.mkldnn.is_available()
