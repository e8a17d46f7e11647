"""The canonical weight layout of our forward pass, and its validation.

Every loader (GGUF, safetensors folder) produces a dict of these names. Projections are fused at load
time so the forward runs one matmul for Q/K/V and one for gate/up:

    embed.weight                 (V, D)
    layers.{i}.attn_norm.weight  (D,)          [+ .bias for LayerNorm]
    layers.{i}.wqkv.weight       (Hq*hd + 2*Hkv*hd, D)   rows: [q heads | k heads | v heads]  [+ .bias]
    layers.{i}.q_norm.weight     (hd,)         per-head q / k RMSNorm weights (qk_norm architectures)
    layers.{i}.k_norm.weight     (hd,)
    layers.{i}.sinks             (Hq,)         learned attention-sink logits (attn_sinks architectures)
    layers.{i}.post_attn_norm.weight (D,)      norms of the attention / MLP outputs (post_norms: Gemma 2/3)
    layers.{i}.post_ffn_norm.weight  (D,)
    layers.{i}.wo.weight         (D, Hq*hd)                                                  [+ .bias]
    layers.{i}.ffn_norm.weight   (D,)          [+ .bias]
    layers.{i}.w_in.weight       (2F, D) rows [gate | up] for gated MLPs, (F, D) otherwise   [+ .bias]
    layers.{i}.w_out.weight      (D, F)                                                      [+ .bias]
    norm.weight                  (D,)          [+ .bias]
    lm_head.weight               (V, D)        absent when the embeddings are tied
    rope_freqs                   (rot_dim/2,)  optional per-frequency divisors (GGUF Llama 3.1)
    rope_factors_short / _long   (rot_dim/2,)  GGUF LongRoPE divisors (Phi-3), moved into the config at load
"""

from __future__ import annotations

import torch

from infinichat.errors import ModelLoadError
from infinichat.model.arch import refuse_unused, spec
from infinichat.model.config import ModelConfig

OPTIONAL = ("rope_freqs", "rope_factors_short", "rope_factors_long")


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    D, hd, F = cfg.dim, cfg.head_dim, cfg.ffn_dim
    q, kv = cfg.n_heads * hd, cfg.n_kv_heads * hd
    layer_norm = cfg.norm == "layer"
    shapes: dict[str, tuple[int, ...]] = {"embed.weight": (cfg.vocab_size, D), "norm.weight": (D,)}
    if layer_norm:
        shapes["norm.bias"] = (D,)
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, D)
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        shapes[p + "attn_norm.weight"] = (D,)
        shapes[p + "ffn_norm.weight"] = (D,)
        shapes[p + "wqkv.weight"] = (q + 2 * kv, D)
        shapes[p + "wo.weight"] = (D, q)
        shapes[p + "w_in.weight"] = (2 * F if cfg.gated_mlp else F, D)
        shapes[p + "w_out.weight"] = (D, F)
        if layer_norm:
            shapes[p + "attn_norm.bias"] = (D,)
            shapes[p + "ffn_norm.bias"] = (D,)
        if cfg.qk_norm:
            shapes[p + "q_norm.weight"] = (hd,)
            shapes[p + "k_norm.weight"] = (hd,)
        if cfg.post_norms:
            shapes[p + "post_attn_norm.weight"] = (D,)
            shapes[p + "post_ffn_norm.weight"] = (D,)
        if cfg.attn_sinks:
            shapes[p + "sinks"] = (cfg.n_heads,)
        if cfg.qkv_bias:
            shapes[p + "wqkv.bias"] = (q + 2 * kv,)
        if cfg.out_bias:
            shapes[p + "wo.bias"] = (D,)
        if cfg.mlp_bias:
            shapes[p + "w_in.bias"] = (2 * F if cfg.gated_mlp else F,)
            shapes[p + "w_out.bias"] = (D,)
    return shapes


def validate(cfg: ModelConfig, weights: dict[str, torch.Tensor], source: str, offset_folded: bool = False) -> None:
    """Every expected tensor present with the right shape, nothing else; a clear error naming the first
    problems. Then the family's norm offset (arch.py) is folded into the norm weights, in place, unless the
    file has it folded already (`offset_folded`: llama.cpp's converter adds Gemma's 1 to its norms)."""
    expected = expected_shapes(cfg)
    extra = [n for n in weights if n not in expected and n not in OPTIONAL]
    if extra:  # a loader mapped a tensor this config does not read: the checkpoint does not fit its entry
        refuse_unused(sorted(extra), spec(cfg.arch), source)
    missing = [n for n in expected if n not in weights]
    wrong = [
        f"{n} has shape {tuple(weights[n].shape)}, expected {shape}"
        for n, shape in expected.items()
        if n in weights and tuple(weights[n].shape) != shape
    ]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise ModelLoadError(f"{source}: missing tensors {', '.join(missing[:3])}{more}")
    if wrong:
        raise ModelLoadError(f"{source}: {wrong[0]}" + (f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""))
    offset = spec(cfg.arch).norm_offset
    if offset and not offset_folded:
        for n in expected:
            if n.endswith("norm.weight"):
                weights[n] = weights[n].float() + offset


def unpermute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's GGUF Q/K row order (interleaved RoPE pairs) back to the half-split layout.

    GGUF stores, per head, rows as (pair, 2) where the HF layout is (2, pair); w is (n_heads*hd, ...) .
    """
    hd = w.shape[0] // n_heads
    rest = w.shape[1:]
    return w.reshape(n_heads, hd // 2, 2, *rest).transpose(1, 2).reshape(w.shape)


def permute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF half-split layout -> llama.cpp's GGUF interleaved layout (the inverse of `unpermute_rope_rows`)."""
    hd = w.shape[0] // n_heads
    rest = w.shape[1:]
    return w.reshape(n_heads, 2, hd // 2, *rest).transpose(1, 2).reshape(w.shape)
