"""The forward pass, written once for the Llama family and GPT-NeoX.

Positions and the KV cache are explicit arguments: `forward(tokens, positions, cache, start)` writes the
new keys/values into cache slots [start, start+T) and attends over slots [0, start+T). Slot order is the
logical order of the sequence (the KV store keeps it compact), so the causal mask is by slot index while
RoPE uses `positions`, which the store keeps contiguous after removals.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from infinichat.model.attention import AttentionRequest, requested_attention
from infinichat.model.config import ModelConfig
from infinichat.model.rope import Rope, apply_rope

# Measured on the reference CPU (benchmarks/NOTES.md): bf16 matrix-vector products are twice as fast with
# weights pre-packed for oneDNN; bf16 matrix-matrix products are slower than fp32 ones, so prompts of at least
# FP32_PREFILL_MIN tokens are computed in float32 (weights upcast exactly, layer by layer).
PACKED_MAX_T = 16
FP32_PREFILL_MIN = 32


def _packing_works() -> bool:
    """Whether this torch has the oneDNN packed linear ops (probed once, on a tiny weight)."""
    try:
        w = torch.zeros(8, 8, dtype=torch.bfloat16)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, None)
        torch.ops.mkldnn._linear_pointwise(torch.zeros(1, 8, dtype=torch.bfloat16), packed, None, "none", [], "")
        return torch.backends.mkldnn.is_available()
    except (AttributeError, RuntimeError):
        return False


class LayerCache(Protocol):
    """What the forward needs from a KV cache: per-layer buffers (Hkv, capacity, hd)."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]


class Transformer:
    """Weights in the canonical layout (see weights.py) plus the forward pass. Not an nn.Module: it has
    no training concerns, and plain tensors keep the per-token path free of module dispatch."""

    def __init__(self, cfg: ModelConfig, weights: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32):
        self.cfg = cfg
        self.dtype = dtype
        w = {n: t.to(dtype).contiguous() for n, t in weights.items() if n != "rope_freqs"}  # no copy when equal
        self.rope = Rope(cfg, weights.get("rope_freqs"))
        self.embed = w["embed.weight"]  # (V, D)
        self.lm_head = w["embed.weight"] if cfg.tie_embeddings else w["lm_head.weight"]  # (V, D)
        self.norm = (w["norm.weight"], w.get("norm.bias"))
        self.layers = [
            {k[len(f"layers.{i}.") :]: t for k, t in w.items() if k.startswith(f"layers.{i}.")}
            for i in range(cfg.n_layers)
        ]
        self.packed: dict[int, torch.Tensor] = {}  # id(weight) -> oneDNN-packed bf16 copy
        if dtype == torch.bfloat16 and _packing_works():
            for t in [self.lm_head] + [t for L in self.layers for n, t in L.items() if n.endswith("weight") and t.dim() == 2]:
                self.packed[id(t)] = torch.ops.mkldnn._reorder_linear_weight(t, None)
        self.q_size = cfg.n_heads * cfg.head_dim
        self.kv_size = cfg.n_kv_heads * cfg.head_dim
        self.scale = cfg.head_dim**-0.5

    # ------------------------------------------------------------------ pieces
    def _linear(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        if x.dtype != w.dtype:  # float32 prefill over bf16 weights: the upcast is exact
            return F.linear(x, w.to(x.dtype), None if b is None else b.to(x.dtype))
        packed = self.packed.get(id(w)) if x.shape[0] <= PACKED_MAX_T else None
        if packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], "")
        return F.linear(x, w, b)

    def _norm(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.cfg.norm == "layer":
            if weight.dtype != x.dtype:  # float32 prefill over bf16 weights
                weight, bias = weight.to(x.dtype), None if bias is None else bias.to(x.dtype)
            return F.layer_norm(x, (x.shape[-1],), weight, bias, self.cfg.norm_eps)
        # RMSNorm in float32, then back to the model dtype before the weight (as the reference does)
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.cfg.norm_eps).to(x.dtype) * weight

    def _mlp(self, L: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        h = self._linear(x, L["w_in.weight"], L.get("w_in.bias"))  # (T, 2F) or (T, F)
        if self.cfg.gated_mlp:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up  # (T, F)
        else:
            h = F.gelu(h)
        return self._linear(h, L["w_out.weight"], L.get("w_out.bias"))  # (T, D)

    def _attention(
        self,
        L: dict[str, torch.Tensor],
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        k_buf: torch.Tensor,
        v_buf: torch.Tensor,
        start: int,
        mask: torch.Tensor | None,
        li: int = 0,
        attn: AttentionRequest | None = None,
    ) -> torch.Tensor:
        cfg = self.cfg
        T = x.shape[0]
        qkv = self._linear(x, L["wqkv.weight"], L.get("wqkv.bias"))  # (T, q + 2kv)
        q, k, v = qkv.split((self.q_size, self.kv_size, self.kv_size), dim=-1)
        q = q.view(T, cfg.n_heads, cfg.head_dim).transpose(0, 1)  # (H, T, hd)
        k = k.view(T, cfg.n_kv_heads, cfg.head_dim).transpose(0, 1)  # (Hkv, T, hd)
        v = v.view(T, cfg.n_kv_heads, cfg.head_dim).transpose(0, 1)  # (Hkv, T, hd)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        end = start + T
        k_buf[:, start:end] = k
        v_buf[:, start:end] = v
        if attn is not None:  # a policy asked for weights, a token subset or offloading (model/attention.py)
            out = requested_attention(attn, li, q, k_buf, v_buf, start, self.scale)  # (H, T, hd)
            return self._linear(out.transpose(0, 1).reshape(T, self.q_size), L["wo.weight"], L.get("wo.bias"))
        keys, values = k_buf[:, :end], v_buf[:, :end]  # (Hkv, L, hd)
        if keys.dtype != q.dtype:
            keys, values = keys.to(q.dtype), values.to(q.dtype)
        out = F.scaled_dot_product_attention(
            q.unsqueeze(0), keys.unsqueeze(0), values.unsqueeze(0),
            attn_mask=mask, is_causal=T > 1 and mask is None, scale=self.scale,
            enable_gqa=cfg.n_heads != cfg.n_kv_heads,
        )  # (1, H, T, hd)
        out = out[0].transpose(0, 1).reshape(T, self.q_size)  # (T, H*hd)
        return self._linear(out, L["wo.weight"], L.get("wo.bias"))  # (T, D)

    # ------------------------------------------------------------------ forward
    @torch.inference_mode()
    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        cache: LayerCache,
        start: int,
        all_logits: bool = False,
        attn: AttentionRequest | None = None,
    ) -> torch.Tensor:
        """tokens (T,) int64, positions (T,) int64 -> logits (T, V) if all_logits else (V,), float32.

        Writes K/V of the new tokens into cache slots [start, start+T); attends over [0, start+T), or as
        `attn` asks (attention weights for some layers, per-layer token subsets: model/attention.py).
        """
        T = tokens.shape[0]
        compute = torch.float32 if self.dtype == torch.bfloat16 and T >= FP32_PREFILL_MIN else self.dtype
        x = self.embed[tokens].to(compute)  # (T, D)
        cos, sin = self.rope.cos_sin(positions, compute)  # (T, rot)
        mask = None  # a prefill from slot 0 uses SDPA's own causal mask
        if T > 1 and start > 0:
            i = torch.arange(T).unsqueeze(1)
            j = torch.arange(start + T).unsqueeze(0)
            mask = j <= i + start  # (T, start+T) bool
        for li, L in enumerate(self.layers):
            h = self._norm(x, L["attn_norm.weight"], L.get("attn_norm.bias"))
            a = self._attention(L, h, cos, sin, cache.k[li], cache.v[li], start, mask, li, attn)
            if self.cfg.parallel_residual:
                x = x + a + self._mlp(L, self._norm(x, L["ffn_norm.weight"], L.get("ffn_norm.bias")))
            else:
                x = x + a
                x = x + self._mlp(L, self._norm(x, L["ffn_norm.weight"], L.get("ffn_norm.bias")))
        if not all_logits:
            x = x[-1:].to(self.dtype)  # one row: the model dtype's (packed) product beats upcasting the head
        x = self._norm(x, *self.norm)
        logits = self._linear(x, self.lm_head).float()  # (T, V)
        return logits if all_logits else logits[0]

    __call__ = forward
