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

from infinichat.model.config import ModelConfig
from infinichat.model.rope import Rope, apply_rope


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
        w = {n: t.to(dtype).contiguous() for n, t in weights.items() if n != "rope_freqs"}
        self.rope = Rope(cfg, weights.get("rope_freqs"))
        self.embed = w["embed.weight"]  # (V, D)
        self.lm_head = w["embed.weight"] if cfg.tie_embeddings else w["lm_head.weight"]  # (V, D)
        self.norm = (w["norm.weight"], w.get("norm.bias"))
        self.layers = [
            {k[len(f"layers.{i}.") :]: t for k, t in w.items() if k.startswith(f"layers.{i}.")}
            for i in range(cfg.n_layers)
        ]
        self.q_size = cfg.n_heads * cfg.head_dim
        self.kv_size = cfg.n_kv_heads * cfg.head_dim
        self.scale = cfg.head_dim**-0.5

    # ------------------------------------------------------------------ pieces
    def _norm(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.cfg.norm == "layer":
            return F.layer_norm(x, (x.shape[-1],), weight, bias, self.cfg.norm_eps)
        # RMSNorm in float32, then back to the model dtype before the weight (as the reference does)
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.cfg.norm_eps).to(x.dtype) * weight

    def _mlp(self, L: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        h = F.linear(x, L["w_in.weight"], L.get("w_in.bias"))  # (T, 2F) or (T, F)
        if self.cfg.gated_mlp:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up  # (T, F)
        else:
            h = F.gelu(h)
        return F.linear(h, L["w_out.weight"], L.get("w_out.bias"))  # (T, D)

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
    ) -> torch.Tensor:
        cfg = self.cfg
        T = x.shape[0]
        qkv = F.linear(x, L["wqkv.weight"], L.get("wqkv.bias"))  # (T, q + 2kv)
        q, k, v = qkv.split((self.q_size, self.kv_size, self.kv_size), dim=-1)
        q = q.view(T, cfg.n_heads, cfg.head_dim).transpose(0, 1)  # (H, T, hd)
        k = k.view(T, cfg.n_kv_heads, cfg.head_dim).transpose(0, 1)  # (Hkv, T, hd)
        v = v.view(T, cfg.n_kv_heads, cfg.head_dim).transpose(0, 1)  # (Hkv, T, hd)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        end = start + T
        k_buf[:, start:end] = k
        v_buf[:, start:end] = v
        keys, values = k_buf[:, :end], v_buf[:, :end]  # (Hkv, L, hd)
        out = F.scaled_dot_product_attention(
            q.unsqueeze(0), keys.unsqueeze(0), values.unsqueeze(0),
            attn_mask=mask, scale=self.scale, enable_gqa=cfg.n_heads != cfg.n_kv_heads,
        )  # (1, H, T, hd)
        out = out[0].transpose(0, 1).reshape(T, self.q_size)  # (T, H*hd)
        return F.linear(out, L["wo.weight"], L.get("wo.bias"))  # (T, D)

    # ------------------------------------------------------------------ forward
    @torch.inference_mode()
    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        cache: LayerCache,
        start: int,
        all_logits: bool = False,
    ) -> torch.Tensor:
        """tokens (T,) int64, positions (T,) int64 -> logits (T, V) if all_logits else (V,), float32.

        Writes K/V of the new tokens into cache slots [start, start+T); attends over [0, start+T).
        """
        T = tokens.shape[0]
        x = self.embed[tokens]  # (T, D)
        cos, sin = self.rope.cos_sin(positions, self.dtype)  # (T, rot)
        mask = None
        if T > 1:
            i = torch.arange(T).unsqueeze(1)
            j = torch.arange(start + T).unsqueeze(0)
            mask = j <= i + start  # (T, start+T) bool
        for li, L in enumerate(self.layers):
            h = self._norm(x, L["attn_norm.weight"], L.get("attn_norm.bias"))
            a = self._attention(L, h, cos, sin, cache.k[li], cache.v[li], start, mask)
            if self.cfg.parallel_residual:
                x = x + a + self._mlp(L, self._norm(x, L["ffn_norm.weight"], L.get("ffn_norm.bias")))
            else:
                x = x + a
                x = x + self._mlp(L, self._norm(x, L["ffn_norm.weight"], L.get("ffn_norm.bias")))
        if not all_logits:
            x = x[-1:]
        x = self._norm(x, *self.norm)
        logits = F.linear(x, self.lm_head).float()  # (T, V)
        return logits if all_logits else logits[0]

    __call__ = forward
