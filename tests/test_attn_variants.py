"""Attention variants (kernels/attn_variants.py): learned attention sinks (gpt-oss), soft-capping, sliding
windows, against transformers' own gpt-oss attention and a float64 reference written here, on both kernel
sets and on the policies' explicit path; and a whole model with sinks against transformers (its Llama with
gpt-oss's attention function registered through the public AttentionInterface), fp32, 1e-4.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from infinichat.kernels.attn_variants import AttnVariant, variant_probs
from infinichat.kernels.cpu_native import CpuNativeKernels
from infinichat.kernels.torch_ops import TorchKernels
from infinichat.kv.cache import KVCache
from infinichat.model.attention import AttentionRequest, requested_attention
from infinichat.model.config import ModelConfig
from infinichat.model.hf_loader import canonical_weights
from infinichat.model.transformer import Transformer

transformers = pytest.importorskip("transformers")

H, HKV, HD, SCALE = 4, 2, 16, 0.3


def reference(q, k, v, start, scale, window=0, softcap=0.0, sinks=None):
    """float64, one query head at a time, straight from the definitions. q (H, T, hd), k/v (Hkv, S, hd)."""
    q, k, v = q.double(), k.double(), v.double()
    Hq, T, _ = q.shape
    out = torch.zeros(Hq, T, v.shape[-1], dtype=torch.float64)
    for h in range(Hq):
        kv = h // (Hq // k.shape[0])
        for t in range(T):
            i = start + t
            js = [j for j in range(i + 1) if not window or j > i - window]
            x = torch.stack([(q[h, t] * k[kv, j]).sum() * scale for j in js])
            if softcap:
                x = softcap * torch.tanh(x / softcap)
            denom = x.exp().sum() + (math.exp(float(sinks[h])) if sinks is not None else 0.0)
            p = x.exp() / denom
            out[h, t] = (p[:, None] * v[kv, js]).sum(0)
    return out


def _qkv(T, S, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(H, T, HD, generator=g),
        torch.randn(HKV, S, HD, generator=g),
        torch.randn(HKV, S, HD, generator=g),
        torch.randn(H, generator=g) * 2,
    )


def _kernels(cls):
    k = cls()
    k.H, k.Hkv, k.hd, k.scale, k.dtype = H, HKV, HD, SCALE, torch.float32
    if cls is CpuNativeKernels:  # what bind sets for a float32 model
        k.quant, k.prompt_attn, k.flash_decode, k.prompt_ops = "none", None, True, None
    return k


CASES = [  # (window, softcap, sinks)
    (0, 0.0, True),
    (5, 0.0, True),
    (5, 0.0, False),
    (0, 2.0, False),
    (6, 2.0, True),
]


@pytest.mark.parametrize("kernels", [TorchKernels, CpuNativeKernels])
@pytest.mark.parametrize("window,softcap,sinks", CASES)
@pytest.mark.parametrize("start,T", [(0, 12), (9, 7), (20, 1)])
def test_kernel_attention_equals_the_float64_reference(kernels, window, softcap, sinks, start, T):
    q, k, v, s = _qkv(T, start + T)
    var = AttnVariant(window, softcap, s if sinks else None)
    got = _kernels(kernels).attention(q, k, v, start, None, var)  # (T, H*hd)
    want = reference(q, k, v, start, SCALE, window, softcap, s if sinks else None)
    assert (got - want.transpose(0, 1).reshape(T, -1).float()).abs().max().item() <= 1e-5


@pytest.mark.parametrize("window", [0, 5])
def test_sinks_equal_transformers_gpt_oss_attention(window):
    """transformers' gpt-oss eager attention (the sink logit joins the softmax, dropped before V)."""
    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

    start, T = 9, 7
    q, k, v, s = _qkv(T, start + T, seed=3)
    module = SimpleNamespace(sinks=s, num_key_value_groups=H // HKV, training=False)
    i = torch.arange(start, start + T)[:, None]
    j = torch.arange(start + T)[None, :]
    ok = (j <= i) & ((j > i - window) if window else True)
    mask = torch.zeros(T, start + T).masked_fill(~ok, float("-inf"))[None, None]
    want, _ = eager_attention_forward(module, q[None], k[None], v[None], mask, scaling=SCALE)  # (1, T, H, hd)
    got = _kernels(TorchKernels).attention(q, k, v, start, None, AttnVariant(window, 0.0, s))
    assert (got - want[0].reshape(T, -1)).abs().max().item() <= 1e-5


def test_policy_path_weights_and_outputs_follow_the_variant():
    """requested_attention (H2O/SnapKV/OmniKV's path): the observed weights are the variant's, rows sum to
    1 - the sink's share, outputs equal the kernel's; with a subset the window counts slots."""
    start, T = 10, 4
    q, k, v, s = _qkv(T, start + T, seed=5)
    var = AttnVariant(6, 0.0, s)
    seen = {}
    req = AttentionRequest(layers=frozenset({0}), rows=T, observe=lambda li, p, r0: seen.setdefault(r0, p))
    out = requested_attention(req, 0, q, k, v, start, SCALE, var)  # (H, T, hd)
    want = reference(q, k, v, start, SCALE, 6, 0.0, s).float()
    assert (out - want).abs().max().item() <= 1e-5
    probs = seen[0]  # (H, T, S)
    assert probs.shape == (H, T, start + T)
    assert (probs[:, :, : start - 6 + 1] == 0).all()  # outside every row's window
    assert (probs.sum(-1) < 1).all() and (probs.sum(-1) > 0).all()
    subset = torch.tensor([0, 3, 8, 11, 12, 13])  # OmniKV-style picks, the new slots included
    req2 = AttentionRequest(subset={0: subset})
    out2 = requested_attention(req2, 0, q, k, v, start, SCALE, var)
    p = variant_probs(q, k[:, subset], subset, start, SCALE, var)
    assert p.shape == (H, T, 6) and (p[:, :, :2] == 0).all()  # slots 0, 3 are outside the window of 6
    kk, vv = k[:, subset], v[:, subset]
    direct = torch.matmul(variant_probs(q, kk, subset, start, SCALE, var).view(HKV, -1, 6), vv).view(H, T, HD)
    assert (out2 - direct).abs().max().item() <= 1e-5


# ------------------------------------------------------------------------------------ a whole model with sinks
def _sink_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kw):
    """gpt-oss's attention function for the Llama modules, with the bool masks some paths pass made additive."""
    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

    if attention_mask is not None and attention_mask.dtype == torch.bool:
        attention_mask = torch.zeros(attention_mask.shape).masked_fill(~attention_mask, float("-inf"))
    return eager_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout)


def _sink_models():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register("test_sinks", _sink_attention)
    AttentionMaskInterface.register("test_sinks", eager_mask)  # additive float masks, as gpt-oss's eager takes
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=H,
        num_key_value_heads=HKV,
        max_position_embeddings=128,
        initializer_range=0.08,
    )
    ref = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
    g = torch.Generator().manual_seed(2)
    for layer in ref.model.layers:  # what a gpt-oss attention module holds
        layer.self_attn.sinks = torch.nn.Parameter(torch.randn(H, generator=g) * 2)
    ref.config._attn_implementation = "test_sinks"
    ours_cfg = ModelConfig.from_hf(cfg.to_dict() | {"architectures": ["LlamaForCausalLM"]}).with_(attn_sinks=True)
    weights = canonical_weights(ours_cfg, dict(ref.state_dict()), "test")
    assert all(f"layers.{i}.sinks" in weights for i in range(3))
    return ref, ours_cfg, weights


@pytest.mark.parametrize("kernels", ["torch", "cpu-native"])
def test_a_model_with_sinks_equals_transformers(kernels):
    from transformers import DynamicCache

    ref, cfg, weights = _sink_models()
    ours = Transformer(cfg, weights, torch.float32, kernels=kernels)
    assert "attn_sinks" in ours.features
    ids = torch.randint(0, 97, (30,), generator=torch.Generator().manual_seed(1))
    cache = KVCache(cfg, 64)
    got = [ours(ids[:20], torch.arange(20), cache, 0, all_logits=True)]
    with torch.no_grad():
        out = ref(ids[None, :20], past_key_values=DynamicCache(config=ref.config), use_cache=True)
        want = [out.logits[0]]
        for t in range(20, 30):
            got.append(ours(ids[t : t + 1], torch.tensor([t]), cache, t)[None])
            out = ref(ids[None, t : t + 1], past_key_values=out.past_key_values, use_cache=True)
            want.append(out.logits[0])
    got_t, want_t = torch.cat(got), torch.cat(want)
    assert (got_t - want_t).abs().max().item() <= 1e-4
    plain = Transformer(cfg.with_(attn_sinks=False), {n: t for n, t in weights.items() if "sinks" not in n})
    assert (plain(ids[:20], torch.arange(20), KVCache(cfg, 64), 0) - got_t[19]).abs().max().item() > 1e-3
