"""GGUF weights -> canonical float32 tensors (dequantized with the `gguf` package)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader
from gguf.quants import dequantize

from infinichat.errors import ModelLoadError
from infinichat.model.arch import refuse_unused, spec, unused_tensors
from infinichat.model.config import ModelConfig, RopeScaling
from infinichat.model.weights import unpermute_rope_rows, validate

log = logging.getLogger(__name__)

SUPPORTED_TYPES = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q5_K, Q.Q6_K)
_SUPPORTED_NAMES = ", ".join(t.name for t in SUPPORTED_TYPES)


def open_reader(path: Path) -> GGUFReader:
    try:
        return GGUFReader(path)
    except Exception as e:  # the gguf package raises ValueError/IndexError/... on damaged files
        raise ModelLoadError(
            f"{path}: damaged or truncated GGUF file, its tensor data cannot be read ({type(e).__name__}: {e}); "
            "download or convert it again"
        ) from None


def _canonical_name(gguf_name: str, cfg: ModelConfig) -> tuple[str, str] | None:
    """GGUF tensor name -> (canonical name or fusion key, part). None for tensors we do not use."""
    simple = {
        "token_embd.weight": "embed.weight",
        "output_norm.weight": "norm.weight",
        "output_norm.bias": "norm.bias",
        "output.weight": "lm_head.weight",
        "rope_freqs.weight": "rope_freqs",
        "rope_factors_short.weight": "rope_factors_short",  # Phi-3 LongRoPE (gguf_rope_scaling)
        "rope_factors_long.weight": "rope_factors_long",
    }
    if gguf_name in simple:
        return simple[gguf_name], ""
    if not gguf_name.startswith("blk."):
        return None
    _, i, rest = gguf_name.split(".", 2)
    p = f"layers.{i}."
    part, _, kind = rest.rpartition(".")  # e.g. "attn_q", "weight"
    table = {
        "attn_norm": ("attn_norm", ""),
        "ffn_norm": ("ffn_norm", ""),
        "attn_output": ("wo", ""),
        "attn_qkv": ("wqkv", ""),
        "attn_q": ("wqkv", "q"),
        "attn_k": ("wqkv", "k"),
        "attn_v": ("wqkv", "v"),
        "ffn_gate": ("w_in", "gate"),
        # GPT-NeoX: no gate; Phi-3: gate and up fused: ffn_up is the whole w_in
        "ffn_up": ("w_in", "up" if cfg.gated_mlp and spec(cfg.arch).layout != "phi3" else ""),
        "ffn_down": ("w_out", ""),
    }
    if cfg.post_norms:  # Gemma: llama.cpp's ffn_norm is the MLP input's norm, as ours
        table |= {"post_attention_norm": ("post_attn_norm", ""), "post_ffw_norm": ("post_ffn_norm", "")}
    if cfg.attn_sinks:
        table["attn_sinks"] = ("sinks", "")
    if cfg.qk_norm:  # only where the entry reads them: elsewhere they are unused tensors, refused
        table |= {"attn_q_norm": ("q_norm", ""), "attn_k_norm": ("k_norm", "")}
    if part not in table:
        return None
    name, piece = table[part]
    if name == "sinks":  # a bare tensor in the canonical layout
        return f"{p}sinks", piece
    return f"{p}{name}.{kind}", piece


def load_gguf_weights(
    path: Path,
    reader: GGUFReader,
    cfg: ModelConfig,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Dequantize every used tensor to float32 and arrange it in the canonical layout.

    llama.cpp's converter interleaves the Q/K rows of `llama`/`mistral` files for its RoPE kernel
    (`gguf_permuted_qk` in the architecture table); we undo that. GPT-NeoX files already store `attn_qkv` as
    [q | k | v] blocks, our layout. A tensor the entry neither uses nor ignores is refused (ModelLoadError).
    """
    arch = spec(cfg.arch)
    permuted_rope = arch.gguf_permuted_qk
    parts: dict[str, dict[str, torch.Tensor]] = {}
    out: dict[str, torch.Tensor] = {}
    tensors = list(reader.tensors)
    targets = {t.name: _canonical_name(t.name, cfg) for t in tensors}
    used = {n for n, target in targets.items() if target is not None}
    refuse_unused(unused_tensors(targets, used, arch.gguf_ignore), arch, str(path))
    for n, t in enumerate(tensors):
        target = targets[t.name]
        if target is None:
            continue
        if t.tensor_type not in SUPPORTED_TYPES:
            raise ModelLoadError(
                f"{path}: tensor {t.name} has quantization type {t.tensor_type.name}, "
                f"which is not supported; supported: {_SUPPORTED_NAMES}"
            )
        shape = tuple(int(s) for s in reversed(t.shape))  # GGML lists dimensions fastest-first
        try:
            arr = dequantize(np.asarray(t.data), t.tensor_type).reshape(shape)
        except Exception as e:
            raise ModelLoadError(f"{path}: tensor {t.name} is damaged or truncated ({e})") from None
        tensor = torch.from_numpy(np.array(arr, dtype=np.float32))  # a writable copy
        name, piece = target
        if piece in ("q", "k") and permuted_rope:
            heads = cfg.n_heads if piece == "q" else cfg.n_kv_heads
            tensor = unpermute_rope_rows(tensor, heads)
        if piece:
            parts.setdefault(name, {})[piece] = tensor
        else:
            out[name] = tensor
        if progress:
            progress(n + 1, len(tensors))
    for name, pieces in parts.items():
        order = ("q", "k", "v") if "q" in pieces or "k" in pieces or "v" in pieces else ("gate", "up")
        missing = [p for p in order if p not in pieces]
        if missing:
            raise ModelLoadError(f"{path}: tensor for {name} part {missing[0]!r} is missing")
        out[name] = torch.cat([pieces[p] for p in order], dim=0)
    validate(cfg, out, str(path), offset_folded=True)  # llama.cpp's converter adds Gemma's norm offset
    return out


def gguf_rope_scaling(
    cfg: ModelConfig, fields: dict, weights: dict[str, torch.Tensor], source: str = "model.gguf"
) -> ModelConfig:
    """Phi-3's LongRoPE lives in tensors in a GGUF file (`rope_factors_short/long`) plus metadata
    (`rope.scaling.attn_factor`, `rope.scaling.original_context_length`): move it into the config (the
    tensors leave `weights`). llama.cpp picks the long factors for contexts past the original one; we pick
    them per call as transformers does (model/rope.py)."""
    short, long = weights.pop("rope_factors_short", None), weights.pop("rope_factors_long", None)
    if short is None and long is None:
        return cfg
    if short is None or long is None:
        raise ModelLoadError(f"{source}: LongRoPE needs both rope_factors_short and rope_factors_long")
    arch = fields.get("general.architecture")
    orig = int(fields.get(f"{arch}.rope.scaling.original_context_length", cfg.max_position))
    factor = cfg.max_position / orig
    default = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
    return cfg.with_(
        rope_scaling=RopeScaling(
            kind="longrope",
            factor=factor,
            original_max_position=orig,
            short_factor=tuple(short.tolist()),
            long_factor=tuple(long.tolist()),
            attention_factor=float(fields.get(f"{arch}.rope.scaling.attn_factor", default)),
        )
    )
