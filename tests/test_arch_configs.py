"""Real checkpoints' config.json files (the 2026 families, as published, weights not needed) read by
ModelConfig.from_hf, against transformers' reading of the same dicts: per-layer windows, soft-caps, the
attention scale, and each layer type's RoPE frequencies and cos/sin multiplier (transformers' own rotary
modules). Older field names included (Gemma 3's rope_local_base_freq / sliding_window_pattern, Phi-3's
`type: longrope` in rope_scaling)."""

from __future__ import annotations

import pytest
import torch

from infinichat.model.config import ModelConfig
from infinichat.model.rope import Rope

transformers = pytest.importorskip("transformers")

_LONG = [1.0 + 0.05 * i for i in range(48)]  # Phi-3.5-mini's lists have 48 entries (head_dim 96)
CONFIGS = {
    "gemma-3-1b-it": {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "attn_logit_softcapping": None,
        "final_logit_softcapping": None,
        "head_dim": 256,
        "hidden_activation": "gelu_pytorch_tanh",
        "hidden_size": 1152,
        "intermediate_size": 6912,
        "max_position_embeddings": 32768,
        "num_attention_heads": 4,
        "num_hidden_layers": 26,
        "num_key_value_heads": 1,
        "query_pre_attn_scalar": 256,
        "rms_norm_eps": 1e-06,
        "rope_local_base_freq": 10000,
        "rope_scaling": None,
        "rope_theta": 1000000,
        "sliding_window": 512,
        "sliding_window_pattern": 6,
        "vocab_size": 262144,
    },
    "gemma-3-27b (text part, linear 8)": {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "head_dim": 128,
        "hidden_activation": "gelu_pytorch_tanh",
        "hidden_size": 5376,
        "intermediate_size": 21504,
        "max_position_embeddings": 131072,
        "num_attention_heads": 32,
        "num_hidden_layers": 62,
        "num_key_value_heads": 16,
        "query_pre_attn_scalar": 168,
        "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
        "rope_theta": 1000000.0,
        "rope_local_base_freq": 10000.0,
        "sliding_window": 1024,
        "sliding_window_pattern": 6,
        "vocab_size": 262208,
    },
    "gemma-2-2b-it": {
        "architectures": ["Gemma2ForCausalLM"],
        "model_type": "gemma2",
        "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0,
        "head_dim": 256,
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_activation": "gelu_pytorch_tanh",
        "hidden_size": 2304,
        "intermediate_size": 9216,
        "max_position_embeddings": 8192,
        "num_attention_heads": 8,
        "num_hidden_layers": 26,
        "num_key_value_heads": 4,
        "query_pre_attn_scalar": 256,
        "rms_norm_eps": 1e-06,
        "rope_theta": 10000.0,
        "sliding_window": 4096,
        "vocab_size": 256000,
    },
    "Phi-3.5-mini-instruct": {
        "architectures": ["Phi3ForCausalLM"],
        "model_type": "phi3",
        "hidden_act": "silu",
        "hidden_size": 3072,
        "intermediate_size": 8192,
        "max_position_embeddings": 131072,
        "original_max_position_embeddings": 4096,
        "num_attention_heads": 32,
        "num_hidden_layers": 32,
        "num_key_value_heads": 32,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {"long_factor": [2 * f for f in _LONG], "short_factor": _LONG, "type": "longrope"},
        "rope_theta": 10000.0,
        "sliding_window": 262144,
        "tie_word_embeddings": False,
        "vocab_size": 32064,
    },
    "Llama-3.2-1B-Instruct": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "head_dim": 64,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "max_position_embeddings": 131072,
        "num_attention_heads": 32,
        "num_hidden_layers": 16,
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {
            "factor": 32.0,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        "rope_theta": 500000.0,
        "tie_word_embeddings": True,
        "vocab_size": 128256,
    },
}


def _theirs(d: dict):
    kw = {k: v for k, v in d.items() if k not in ("architectures", "model_type")}
    return transformers.AutoConfig.for_model(d["model_type"], **kw)


def _rotary(hf_cfg):
    """transformers' rotary module of that family (no weights)."""
    mod = {"gemma3_text": "gemma3", "gemma2": "gemma2", "phi3": "phi3", "llama": "llama"}[hf_cfg.model_type]
    m = __import__(f"transformers.models.{mod}.modeling_{mod}", fromlist=["x"])
    cls = {"gemma3": "Gemma3RotaryEmbedding", "gemma2": "Gemma2RotaryEmbedding", "phi3": "Phi3RotaryEmbedding"}
    return getattr(m, cls.get(mod, "LlamaRotaryEmbedding"))(hf_cfg)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_published_configs_read_as_transformers_reads_them(name):
    d = CONFIGS[name]
    ours, theirs = ModelConfig.from_hf(d), _theirs(d)
    types = getattr(theirs, "layer_types", None) or ["full_attention"] * theirs.num_hidden_layers
    window = getattr(theirs, "sliding_window", None) or 0
    if theirs.model_type == "phi3":  # transformers' Phi-3 windows every layer (no layer_types)
        types = ["sliding_attention"] * theirs.num_hidden_layers
    want = [window if t == "sliding_attention" else 0 for t in types]
    assert [ours.layer_window(i) for i in range(ours.n_layers)] == want
    assert ours.attn_softcap == (getattr(theirs, "attn_logit_softcapping", None) or 0.0)
    assert ours.final_softcap == (getattr(theirs, "final_logit_softcapping", None) or 0.0)
    qpas = getattr(theirs, "query_pre_attn_scalar", None)
    assert (ours.attn_scale or ours.head_dim**-0.5) == pytest.approx((qpas or ours.head_dim) ** -0.5)
    assert ours.tie_embeddings == theirs.tie_word_embeddings
    rot = _rotary(theirs)
    rope = Rope(ours)
    if theirs.model_type == "gemma3_text":
        for lt in ("sliding_attention", "full_attention"):
            layer = types.index(lt)
            mine = rope.layer_rope(layer)
            assert torch.allclose(mine.inv_freq, getattr(rot, f"{lt}_inv_freq"), rtol=1e-6), lt
            assert mine.mscale == getattr(rot, f"{lt}_attention_scaling")
    else:
        assert torch.allclose(rope.inv_freq, rot.inv_freq, rtol=1e-6)
        assert rope.mscale == pytest.approx(rot.attention_scaling)
