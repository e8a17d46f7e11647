"""Test helper: write llama.cpp-style GGUF files from tiny transformers models.

`write_gguf` lays a model out as llama.cpp's `convert_hf_to_gguf.py` does (metadata keys, tensor names,
Q/K rows of `llama` interleaved for its RoPE kernel, GPT-NeoX `attn_qkv` rows as [all q | all k | all v]),
quantizes each 2-D tensor to a chosen type with `gguf.quants.quantize` (F32 where the package has no
quantizer for it or the row length is not a multiple of the block size), and stores a tiny byte-level
BPE vocabulary (`tokenizer.ggml.model = gpt2`) so `load_model` can build a tokenizer from the file.

`raw=` replaces tensors by hand-made bytes of any GGML type (K-quants built block by block, types the
loader rejects), and `arch=` renames the architecture (an unsupported one for error tests).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGUFWriter
from gguf import GGMLQuantizationType as Q
from gguf.quants import quantize
from tiny_vocab import (  # noqa: F401  (re-exported: the tests name them as gguf_util's)
    CONTROL,
    EOS_ID,
    MERGES,
    NORMAL,
    SPECIALS,
    VOCAB_SIZE,
    _byte_chars,
    tiny_vocab,
)

# ------------------------------------------------------------------------------------------- tiny models


def _transformers():
    import transformers  # a test dependency; imported here so the module imports without it

    return transformers


def _finish(model, seed: int):
    """Eval mode, fp32, and small random biases (transformers zero-initialises them)."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval().float()


def tiny_llama(seed: int = 0, **overrides):
    """A random Llama with GQA (4 query heads, 2 KV heads) and the tiny vocabulary."""
    tf = _transformers()
    kw = {
        "vocab_size": VOCAB_SIZE,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128,
        "rope_theta": 10000.0,
        "initializer_range": 0.08,
        "bos_token_id": EOS_ID,
        "eos_token_id": EOS_ID,
        "tie_word_embeddings": False,
    }
    torch.manual_seed(seed)
    return _finish(tf.AutoModelForCausalLM.from_config(tf.LlamaConfig(**{**kw, **overrides})), seed)


def tiny_neox(seed: int = 0, **overrides):
    """A random GPT-NeoX (Pythia layout: partial rotary, parallel residual, biases everywhere)."""
    tf = _transformers()
    kw = {
        "vocab_size": VOCAB_SIZE,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "rotary_pct": 0.25,
        "use_parallel_residual": True,
        "max_position_embeddings": 128,
        "initializer_range": 0.08,
        "bos_token_id": EOS_ID,
        "eos_token_id": EOS_ID,
        "tie_word_embeddings": False,
    }
    torch.manual_seed(seed)
    return _finish(tf.AutoModelForCausalLM.from_config(tf.GPTNeoXConfig(**{**kw, **overrides})), seed)


class RandomLlama:
    """A transformers-free stand-in for `tiny_llama` (its config fields and `state_dict`), for tests that
    only need a valid file and should not pay for importing transformers."""

    def __init__(self, seed: int = 0, **overrides):
        c = {
            "model_type": "llama",
            "vocab_size": VOCAB_SIZE,
            "hidden_size": 64,
            "intermediate_size": 96,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 128,
            "rope_parameters": {"rope_theta": 10000.0},
            "rms_norm_eps": 1e-6,
            "tie_word_embeddings": False,
        }
        self.config = SimpleNamespace(**{**c, **overrides})
        self.seed = seed

    def state_dict(self) -> dict[str, torch.Tensor]:
        c, g = self.config, torch.Generator().manual_seed(self.seed)
        D, F, hd = c.hidden_size, c.intermediate_size, c.hidden_size // c.num_attention_heads
        shapes = {
            "model.embed_tokens.weight": (c.vocab_size, D),
            "model.norm.weight": (D,),
            "lm_head.weight": (c.vocab_size, D),
        }
        for i in range(c.num_hidden_layers):
            p = f"model.layers.{i}."
            shapes.update(
                {
                    p + "input_layernorm.weight": (D,),
                    p + "post_attention_layernorm.weight": (D,),
                    p + "self_attn.q_proj.weight": (c.num_attention_heads * hd, D),
                    p + "self_attn.k_proj.weight": (c.num_key_value_heads * hd, D),
                    p + "self_attn.v_proj.weight": (c.num_key_value_heads * hd, D),
                    p + "self_attn.o_proj.weight": (D, c.num_attention_heads * hd),
                    p + "mlp.gate_proj.weight": (F, D),
                    p + "mlp.up_proj.weight": (F, D),
                    p + "mlp.down_proj.weight": (D, F),
                }
            )
        return {n: torch.ones(s) if len(s) == 1 else torch.randn(s, generator=g) * 0.08 for n, s in shapes.items()}


# ------------------------------------------------------------------------------- HF -> GGUF tensor layout


def interleave_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's converter permutation of Q/K rows: per head, the HF half-split order (2, hd/2)
    becomes the interleaved pair order (hd/2, 2)."""
    hd = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, hd // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama_tensors(sd: dict[str, np.ndarray], c) -> dict[str, np.ndarray]:
    out = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"]}
    if not c.tie_word_embeddings:
        out["output.weight"] = sd["lm_head.weight"]
    for i in range(c.num_hidden_layers):
        hf, b = f"model.layers.{i}.", f"blk.{i}."
        out[b + "attn_norm.weight"] = sd[hf + "input_layernorm.weight"]
        out[b + "attn_q.weight"] = interleave_rope_rows(sd[hf + "self_attn.q_proj.weight"], c.num_attention_heads)
        out[b + "attn_k.weight"] = interleave_rope_rows(sd[hf + "self_attn.k_proj.weight"], c.num_key_value_heads)
        out[b + "attn_v.weight"] = sd[hf + "self_attn.v_proj.weight"]
        out[b + "attn_output.weight"] = sd[hf + "self_attn.o_proj.weight"]
        out[b + "ffn_norm.weight"] = sd[hf + "post_attention_layernorm.weight"]
        out[b + "ffn_gate.weight"] = sd[hf + "mlp.gate_proj.weight"]
        out[b + "ffn_up.weight"] = sd[hf + "mlp.up_proj.weight"]
        out[b + "ffn_down.weight"] = sd[hf + "mlp.down_proj.weight"]
    return out


def neox_qkv_blocks(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF GPT-NeoX query_key_value rows are per head [q, k, v]; GGUF stores [all q | all k | all v]."""
    return w.reshape(n_heads, 3, -1, *w.shape[1:]).swapaxes(0, 1).reshape(w.shape)


def _neox_tensors(sd: dict[str, np.ndarray], c) -> dict[str, np.ndarray]:
    out = {
        "token_embd.weight": sd["gpt_neox.embed_in.weight"],
        "output_norm.weight": sd["gpt_neox.final_layer_norm.weight"],
        "output_norm.bias": sd["gpt_neox.final_layer_norm.bias"],
    }
    if not c.tie_word_embeddings:
        out["output.weight"] = sd["embed_out.weight"] if "embed_out.weight" in sd else sd["lm_head.weight"]
    pairs = {
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
        "attention.dense": "attn_output",
        "mlp.dense_h_to_4h": "ffn_up",
        "mlp.dense_4h_to_h": "ffn_down",
    }
    for i in range(c.num_hidden_layers):
        hf, b = f"gpt_neox.layers.{i}.", f"blk.{i}."
        for kind in ("weight", "bias"):
            for src, dst in pairs.items():
                out[f"{b}{dst}.{kind}"] = sd[f"{hf}{src}.{kind}"]
            qkv = sd[f"{hf}attention.query_key_value.{kind}"]
            out[f"{b}attn_qkv.{kind}"] = neox_qkv_blocks(qkv, c.num_attention_heads)
    return out


def gguf_tensors(model) -> tuple[str, dict[str, np.ndarray]]:
    """(GGUF architecture, GGUF tensor name -> float32 array in the converter's layout)."""
    sd = {k: v.detach().float().numpy().copy() for k, v in model.state_dict().items()}
    c = model.config
    if c.model_type == "llama":
        return "llama", _llama_tensors(sd, c)
    if c.model_type == "gpt_neox":
        return "gptneox", _neox_tensors(sd, c)
    raise ValueError(f"gguf_util: no GGUF layout for model_type {c.model_type!r}; has: llama, gpt_neox")


def _metadata(w: GGUFWriter, arch: str, c) -> None:
    """The architecture keys llama.cpp's converter writes."""
    w.add_string("general.name", f"tiny-{arch}")
    w.add_uint32(f"{arch}.block_count", c.num_hidden_layers)
    w.add_uint32(f"{arch}.context_length", c.max_position_embeddings)
    w.add_uint32(f"{arch}.embedding_length", c.hidden_size)
    w.add_uint32(f"{arch}.feed_forward_length", c.intermediate_size)
    w.add_uint32(f"{arch}.attention.head_count", c.num_attention_heads)
    head_dim = c.hidden_size // c.num_attention_heads
    rope = c.rope_parameters or {}
    w.add_float32(f"{arch}.rope.freq_base", float(rope.get("rope_theta", 10000.0)))
    if c.model_type == "gpt_neox":
        w.add_uint32(f"{arch}.attention.head_count_kv", c.num_attention_heads)
        w.add_float32(f"{arch}.attention.layer_norm_epsilon", c.layer_norm_eps)
        w.add_uint32(f"{arch}.rope.dimension_count", int(head_dim * rope.get("partial_rotary_factor", 1.0)))
        w.add_bool(f"{arch}.use_parallel_residual", c.use_parallel_residual)
    else:
        w.add_uint32(f"{arch}.attention.head_count_kv", c.num_key_value_heads)
        w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", c.rms_norm_eps)
        w.add_uint32(f"{arch}.rope.dimension_count", head_dim)
        w.add_uint32(f"{arch}.vocab_size", c.vocab_size)


def _vocab_metadata(w: GGUFWriter, pre: str = "gpt2") -> None:
    tokens, types, merges = tiny_vocab()
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_string("tokenizer.ggml.pre", pre)
    w.add_array("tokenizer.ggml.tokens", tokens)
    w.add_array("tokenizer.ggml.token_type", types)
    w.add_array("tokenizer.ggml.merges", merges)
    w.add_uint32("tokenizer.ggml.bos_token_id", EOS_ID)
    w.add_uint32("tokenizer.ggml.eos_token_id", EOS_ID)


QType = Q | Mapping[str, Q] | Callable[[str], Q]


def _type_for(name: str, qtype: QType) -> Q:
    if isinstance(qtype, Q):
        return qtype
    if callable(qtype):
        return qtype(name)
    return qtype.get(name, Q.F32)


def encode(arr: np.ndarray, qtype: Q) -> tuple[np.ndarray, Q]:
    """(array to hand to `GGUFWriter.add_tensor`, its GGML type): quantized with `gguf.quants` when it can,
    else float32 (1-D tensors, rows not a multiple of the block size, types without a quantizer)."""
    block = GGML_QUANT_SIZES[qtype][0]
    if qtype == Q.F32 or arr.ndim < 2 or arr.shape[-1] % block:
        return arr.astype(np.float32), Q.F32
    try:
        return quantize(arr.astype(np.float32), qtype), qtype
    except NotImplementedError:  # Q4_K, Q5_K, Q6_K, ... have no quantizer in the gguf package
        return arr.astype(np.float32), Q.F32


def write_gguf(
    path: Path | str,
    model,
    qtype: QType = Q.F32,
    *,
    arch: str | None = None,
    raw: Mapping[str, tuple[np.ndarray, Q]] | None = None,
    vocab: bool = True,
    drop: tuple[str, ...] = (),
    extra: Mapping[str, np.ndarray] | None = None,
) -> dict[str, Q]:
    """Write `model` as a GGUF file; returns each tensor's GGML type as written.

    qtype: one type for every 2-D tensor, or a {name: type} map / a function of the GGUF name (others F32).
    raw: GGUF name -> (uint8 bytes of shape (rows, bytes per row), type), written as they are.
    arch: the `general.architecture` (and key prefix) to write instead of the model's own.
    vocab: store the tiny vocabulary (tokenizer.ggml.*) in the metadata.
    drop: GGUF names of tensors to leave out.
    extra: GGUF name -> float array of tensors to add (F32), e.g. ones the loader does not know.
    """
    real_arch, tensors = gguf_tensors(model)
    arch = arch or real_arch
    w = GGUFWriter(str(path), arch)
    _metadata(w, arch, model.config)
    if vocab:
        _vocab_metadata(w)
    written: dict[str, Q] = {}
    for name, arr in tensors.items():
        if name in drop:
            continue
        if raw and name in raw:
            data, t = raw[name]
            w.add_tensor(name, np.ascontiguousarray(data, dtype=np.uint8), raw_shape=data.shape, raw_dtype=t)
            written[name] = t
            continue
        data, t = encode(arr, _type_for(name, qtype))
        w.add_tensor(name, data, raw_dtype=t if t != Q.F32 else None)
        written[name] = t
    for name, arr in (extra or {}).items():
        w.add_tensor(name, np.ascontiguousarray(arr, dtype=np.float32))
        written[name] = Q.F32
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return written
