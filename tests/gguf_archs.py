"""Test helper: tiny transformers models of the 2026 families and their llama.cpp-style GGUF files.

`tiny(name)` builds a random-weight model (fp32, eager attention; norm weights randomised too, as Gemma's
start at zero); `write_arch_gguf` lays it out as llama.cpp's `convert_hf_to_gguf.py` does for its
architecture: Gemma's norm weights stored with the +1 folded in, no Q/K interleaving outside `llama`,
Phi-3's fused attn_qkv / ffn_up and LongRoPE factors as `rope_factors_short/long` tensors, Llama 3's scaling
as a `rope_freqs` tensor (divisors per frequency) instead of metadata. The vocabulary is gguf_util's tiny
byte-level one, so `load_model` can build a tokenizer from the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import tiny_vocab
import torch

if TYPE_CHECKING:
    from gguf import GGUFWriter

# the tiny transformers models need neither gguf nor gguf_util (the CUDA tests run where gguf is not installed);
# the GGUF writers import them
V = tiny_vocab.VOCAB_SIZE
# a Gemma/Phi-3-style SentencePiece vocabulary with byte fallback: specials, the 256 byte pieces, a few pieces
SPM_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<|end|>", "<|endoftext|>"]
SPM_PIECES = ["▁the", "▁hello", "▁world", "▁wor", "▁he", "▁th", "he", "ll", "lo", "or", "ld", "▁w", "▁h", "▁t"]
SPM_PIECES += ["▁", "e", "h", "l", "o", "w", "r", "d", "t", "a", "n", "▁a", "an", "s", "▁is", "i", "!", ",", "中"]


# Phi-3's specials: llama.cpp's phi3 vocabulary loader looks some of them up by text
PHI3_SPECIALS = ["<unk>", "<s>", "</s>", "<|assistant|>", "<|placeholder1|>", "<|system|>", "<|end|>", "<|user|>"]
PHI3_SPECIALS += ["<|endoftext|>"]


def spm_vocab(specials: list[str] = SPM_SPECIALS) -> list[tuple[str, float, int]]:
    """(piece, score, GGUF token type): control 3, byte 6, normal 1; earlier pieces score higher."""
    out = [(t, 0.0, 3 if t != "<unk>" else 2) for t in specials]
    out += [(f"<0x{b:02X}>", 0.0, 6) for b in range(256)]
    return out + [(p, -float(k), 1) for k, p in enumerate(SPM_PIECES)]


SPM_V = len(SPM_SPECIALS) + 256 + len(SPM_PIECES)
PHI3_V = len(PHI3_SPECIALS) + 256 + len(SPM_PIECES)
_SMALL = {
    "vocab_size": V,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "initializer_range": 0.08,
    "bos_token_id": tiny_vocab.EOS_ID,
    "eos_token_id": tiny_vocab.EOS_ID,
    "pad_token_id": 0,
}
_LONG = {  # LongRoPE divisors for 8 frequencies (head_dim 16)
    "short_factor": [1.0, 1.05, 1.1, 1.3, 1.6, 2.0, 2.5, 3.0],
    "long_factor": [1.0, 1.2, 1.6, 2.4, 3.5, 5.0, 7.0, 9.0],
}


def configs() -> dict:
    import transformers as tf

    return {
        # sliding window 8 on layers 0 and 2 (Gemma 2's even layers), both soft-caps, query_pre_attn_scalar
        # 24 != head_dim 16; caps small enough that tanh bends the tiny model's scores and logits
        "gemma2": lambda: tf.Gemma2Config(
            **_SMALL,
            sliding_window=8,
            attn_logit_softcapping=5.0,
            final_logit_softcapping=3.0,
            query_pre_attn_scalar=24,
            max_position_embeddings=128,
        ),
        # the same for GGUF: llama.cpp has no query_pre_attn_scalar key and uses head_dim below 27B
        "gemma2-gguf": lambda: tf.Gemma2Config(
            **_SMALL,
            sliding_window=8,
            attn_logit_softcapping=5.0,
            final_logit_softcapping=3.0,
            query_pre_attn_scalar=16,
            max_position_embeddings=128,
        ),
        # q/k norms, two RoPE bases (windowed 10000, global 1e6 with linear scaling 2), windowed/global/windowed
        "gemma3": lambda: tf.Gemma3TextConfig(
            **_SMALL,
            sliding_window=8,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            query_pre_attn_scalar=24,
            max_position_embeddings=128,
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1_000_000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            },
        ),
        # llama.cpp's layout (no sliding_window_pattern key): period 6, layers 0-4 windowed, 5 global;
        # query_pre_attn_scalar = head_dim as llama.cpp assumes for every size but 27B
        "gemma3-6layers": lambda: tf.Gemma3TextConfig(
            **{**_SMALL, "num_hidden_layers": 6},
            sliding_window=8,
            query_pre_attn_scalar=16,
            max_position_embeddings=128,
        ),
        # LongRoPE: original context 16 < the 44 tokens of the test: transformers and we take the long factors
        "phi3-longrope": lambda: tf.Phi3Config(
            **_SMALL,
            max_position_embeddings=64,
            original_max_position_embeddings=16,
            rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, **_LONG},
            sliding_window=None,
        ),
        # short factors (original 64 > 44 tokens), attention factor sqrt(1 + ln 4 / ln 64), every layer windowed
        "phi3-short-swa": lambda: tf.Phi3Config(
            **_SMALL,
            max_position_embeddings=256,
            original_max_position_embeddings=64,
            rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, **_LONG},
            sliding_window=10,
        ),
        # Phi-4-mini style partial rotary (half the head dimensions rotate), no scaling
        "phi3-partial-rotary": lambda: tf.Phi3Config(
            **_SMALL,
            max_position_embeddings=64,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
            sliding_window=None,
        ),
        # Llama 3.2 1B/3B: tied embeddings, llama3 scaling (factor 32, original 16 here)
        "llama3.2": lambda: tf.LlamaConfig(
            **_SMALL,
            tie_word_embeddings=True,
            max_position_embeddings=128,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 32.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        ),
        # Mistral 7B v0.1 style: every layer windowed
        "mistral-swa": lambda: tf.MistralConfig(**_SMALL, sliding_window=10, max_position_embeddings=128),
        "qwen3": lambda: tf.Qwen3Config(**_SMALL, tie_word_embeddings=False, max_position_embeddings=128),
    }


def tiny(name: str, seed: int = 0):
    import transformers as tf

    torch.manual_seed(seed)
    cfg = configs()[name]()
    cfg._attn_implementation = "eager"  # soft-capping needs it; the same reference for every family
    model = tf.AutoModelForCausalLM.from_config(cfg).eval().float()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # zero-initialised norms (Gemma's (1 + w)) and biases get values
        for n, p in model.named_parameters():
            if n.endswith(("norm.weight", ".bias")):
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


# ------------------------------------------------------------------------------------------- GGUF layout
def _np(sd, name) -> np.ndarray:
    return sd[name].detach().float().numpy().copy()


def _tensors(model) -> tuple[str, dict[str, np.ndarray]]:
    import gguf_util

    c = model.config
    sd = model.state_dict()
    kind = c.model_type
    arch = {"gemma2": "gemma2", "gemma3_text": "gemma3", "phi3": "phi3", "llama": "llama", "qwen3": "qwen3"}[kind]
    gemma = arch.startswith("gemma")
    shift = 1.0 if gemma else 0.0  # llama.cpp's converter folds Gemma's (1 + w) into the norm weights
    out = {"token_embd.weight": _np(sd, "model.embed_tokens.weight")}
    out["output_norm.weight"] = _np(sd, "model.norm.weight") + shift
    if not c.tie_word_embeddings:
        out["output.weight"] = _np(sd, "lm_head.weight")
    for i in range(c.num_hidden_layers):
        hf, b = f"model.layers.{i}.", f"blk.{i}."
        out[b + "attn_norm.weight"] = _np(sd, hf + "input_layernorm.weight") + shift
        out[b + "attn_output.weight"] = _np(sd, hf + "self_attn.o_proj.weight")
        out[b + "ffn_down.weight"] = _np(sd, hf + "mlp.down_proj.weight")
        if arch == "phi3":
            out[b + "attn_qkv.weight"] = _np(sd, hf + "self_attn.qkv_proj.weight")
            out[b + "ffn_up.weight"] = _np(sd, hf + "mlp.gate_up_proj.weight")
        else:
            q, k = _np(sd, hf + "self_attn.q_proj.weight"), _np(sd, hf + "self_attn.k_proj.weight")
            if arch == "llama":
                q = gguf_util.interleave_rope_rows(q, c.num_attention_heads)
                k = gguf_util.interleave_rope_rows(k, c.num_key_value_heads)
            out[b + "attn_q.weight"], out[b + "attn_k.weight"] = q, k
            out[b + "attn_v.weight"] = _np(sd, hf + "self_attn.v_proj.weight")
            out[b + "ffn_gate.weight"] = _np(sd, hf + "mlp.gate_proj.weight")
            out[b + "ffn_up.weight"] = _np(sd, hf + "mlp.up_proj.weight")
        if gemma:
            out[b + "post_attention_norm.weight"] = _np(sd, hf + "post_attention_layernorm.weight") + 1
            out[b + "ffn_norm.weight"] = _np(sd, hf + "pre_feedforward_layernorm.weight") + 1
            out[b + "post_ffw_norm.weight"] = _np(sd, hf + "post_feedforward_layernorm.weight") + 1
        else:
            out[b + "ffn_norm.weight"] = _np(sd, hf + "post_attention_layernorm.weight")
        if arch in ("gemma3", "qwen3"):
            out[b + "attn_q_norm.weight"] = _np(sd, hf + "self_attn.q_norm.weight") + shift
            out[b + "attn_k_norm.weight"] = _np(sd, hf + "self_attn.k_norm.weight") + shift
    return arch, out


def _rope(c) -> dict:
    rp = c.rope_parameters or {}
    return rp.get("full_attention", rp)


def write_arch_gguf(
    path: Path | str,
    model,
    drop: tuple[str, ...] = (),
    add: dict[str, np.ndarray] | None = None,
    vocab: str = "bpe",
) -> None:
    """`model` (from `tiny`) as llama.cpp's converter writes it, all tensors F32; `drop`: names left out,
    `add`: tensors added (ones no loader knows, for the strictness tests); `vocab`: "bpe" (gguf_util's tiny
    byte-level one), "spm" (`spm_vocab`, Gemma-style: no space prefix; the model needs SPM_V tokens) or
    "spm-phi3" (with Phi-3's special tokens, which llama.cpp's phi3 loader needs; PHI3_V tokens)."""
    import gguf_util
    from gguf import GGUFWriter

    c = model.config
    arch, tensors = _tensors(model)
    rope = _rope(c)
    w = GGUFWriter(str(path), arch)
    w.add_string("general.name", f"tiny-{arch}")
    w.add_uint32(f"{arch}.block_count", c.num_hidden_layers)
    w.add_uint32(f"{arch}.context_length", c.max_position_embeddings)
    w.add_uint32(f"{arch}.embedding_length", c.hidden_size)
    w.add_uint32(f"{arch}.feed_forward_length", c.intermediate_size)
    w.add_uint32(f"{arch}.attention.head_count", c.num_attention_heads)
    w.add_uint32(f"{arch}.attention.head_count_kv", c.num_key_value_heads)
    w.add_uint32(f"{arch}.attention.key_length", c.head_dim)
    w.add_uint32(f"{arch}.attention.value_length", c.head_dim)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", c.rms_norm_eps)
    w.add_float32(f"{arch}.rope.freq_base", float(rope.get("rope_theta", 10000.0)))
    rot = int(c.head_dim * rope.get("partial_rotary_factor", 1.0))
    w.add_uint32(f"{arch}.rope.dimension_count", rot)
    if arch == "gemma2":
        w.add_float32(f"{arch}.attn_logit_softcapping", c.attn_logit_softcapping)
        w.add_float32(f"{arch}.final_logit_softcapping", c.final_logit_softcapping)
    if arch.startswith("gemma") or (arch == "phi3" and c.sliding_window):
        w.add_uint32(f"{arch}.attention.sliding_window", c.sliding_window)
    if rope.get("rope_type") == "linear":
        w.add_string(f"{arch}.rope.scaling.type", "linear")
        w.add_float32(f"{arch}.rope.scaling.factor", float(rope["factor"]))
    extra: dict[str, np.ndarray] = {}
    if arch == "phi3":
        orig = c.original_max_position_embeddings or c.max_position_embeddings
        w.add_uint32(f"{arch}.rope.scaling.original_context_length", orig)
        if rope.get("rope_type") == "longrope":
            scale = c.max_position_embeddings / orig
            w.add_float32(f"{arch}.rope.scaling.attn_factor", float(np.sqrt(1 + np.log(scale) / np.log(orig))))
            extra["rope_factors_long.weight"] = np.array(rope["long_factor"], dtype=np.float32)
            extra["rope_factors_short.weight"] = np.array(rope["short_factor"], dtype=np.float32)
    if arch == "llama" and rope.get("rope_type") == "llama3":  # llama.cpp stores the scaling as divisors
        from infinichat.model.config import ModelConfig
        from infinichat.model.rope import base_inv_freq, inv_freq_for

        ours = ModelConfig.from_hf(c.to_dict() | {"architectures": ["LlamaForCausalLM"]})
        extra["rope_freqs.weight"] = (base_inv_freq(ours) / inv_freq_for(ours)).numpy().astype(np.float32)
    if vocab == "spm":
        _spm_metadata(w, add_space_prefix=not arch.startswith("gemma"))
    elif vocab == "spm-phi3":
        _spm_metadata(w, add_space_prefix=True, specials=PHI3_SPECIALS)
    else:
        gguf_util._vocab_metadata(w, pre="gpt-2")  # llama.cpp's name of GPT-2's pre-tokenizer (ours reads both)
    for name, arr in {**tensors, **extra, **(add or {})}.items():
        if name not in drop:
            w.add_tensor(name, np.ascontiguousarray(arr, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _spm_metadata(w: GGUFWriter, add_space_prefix: bool, specials: list[str] = SPM_SPECIALS) -> None:
    tokens = spm_vocab(specials)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list([t for t, _, _ in tokens])
    w.add_token_scores([s for _, s, _ in tokens])
    w.add_token_types([k for _, _, k in tokens])
    ids = {t: i for i, t in enumerate(specials)}
    w.add_bos_token_id(ids.get("<bos>", ids.get("<s>", 0)))
    w.add_eos_token_id(ids.get("<eos>", ids.get("</s>", 0)))
    w.add_unk_token_id(ids["<unk>"])
    w.add_pad_token_id(ids.get("<pad>", 0))
    w.add_add_space_prefix(add_space_prefix)


# ------------------------------------------------------------------- an architecture only llama.cpp knows
def tiny_granite(seed: int = 0):
    """IBM Granite 3: a Llama with four scalar multipliers (attention, embedding, residual, logits); llama.cpp
    runs it, the torch side's architecture table has no entry for it."""
    import transformers as tf

    torch.manual_seed(seed)
    kw = {k: v for k, v in _SMALL.items() if k != "head_dim"}
    cfg = tf.GraniteConfig(
        **kw,
        max_position_embeddings=128,
        attention_multiplier=0.2,
        embedding_multiplier=3.0,
        residual_multiplier=0.5,
        logits_scaling=2.0,
        tie_word_embeddings=False,
    )
    cfg._attn_implementation = "eager"
    return tf.AutoModelForCausalLM.from_config(cfg).eval().float()


def write_granite_gguf(path: Path | str, model) -> None:
    """`tiny_granite` as llama.cpp's converter writes it (the Llama layout, Q/K rows interleaved)."""
    import gguf_util
    from gguf import GGUFWriter

    c = model.config
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    a = "granite"
    w = GGUFWriter(str(path), a)
    w.add_string("general.name", "tiny-granite")
    for key, value in (
        ("block_count", c.num_hidden_layers),
        ("context_length", c.max_position_embeddings),
        ("embedding_length", c.hidden_size),
        ("feed_forward_length", c.intermediate_size),
        ("attention.head_count", c.num_attention_heads),
        ("attention.head_count_kv", c.num_key_value_heads),
        ("rope.dimension_count", c.hidden_size // c.num_attention_heads),
        ("vocab_size", c.vocab_size),
    ):
        w.add_uint32(f"{a}.{key}", value)
    for key, fvalue in (
        ("attention.layer_norm_rms_epsilon", c.rms_norm_eps),
        ("rope.freq_base", 10000.0),
        ("attention.scale", c.attention_multiplier),
        ("embedding_scale", c.embedding_multiplier),
        ("residual_scale", c.residual_multiplier),
        ("logit_scale", c.logits_scaling),
    ):
        w.add_float32(f"{a}.{key}", float(fvalue))
    gguf_util._vocab_metadata(w, pre="gpt-2")
    for name, arr in gguf_util._llama_tensors(sd, c).items():
        w.add_tensor(name, np.ascontiguousarray(arr, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
