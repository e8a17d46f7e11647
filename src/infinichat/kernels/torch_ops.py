"""The `torch` kernel set: plain PyTorch ops that run on any device. This is the code a CUDA device runs, and
CI runs it on the CPU (`Transformer(..., kernels="torch")`), so the GPU path is exercised without a GPU.

Each op takes the tensors in the forward's layout (shape comments) and nothing CPU-specific: no packed
weights, no CPU-only aten ops, no native library.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from infinichat.kernels.attn_variants import PLAIN, AttnVariant, buffer_attention
from infinichat.kernels.static_step import StaticDecode
from infinichat.model.arch import ALL_FEATURES
from infinichat.model.quant import QuantLinear
from infinichat.model.rope import apply_rope, rotate, signed_sin

if TYPE_CHECKING:
    from infinichat.model.transformer import BatchItem, Transformer

# how one-token steps run: the layer-by-layer forward, the static-shape step, or that step under torch.compile
STEP_MODES = ("layers", "static", "compiled")


@dataclass
class RopeTables:
    """cos/sin for the rows of one forward call, in the form the kernel set's `rope_qkv` takes."""

    cos: torch.Tensor
    sin: torch.Tensor
    full: bool  # full-width rotary (head_dim == rot_dim)
    rows: bool = False  # (T, hd) contiguous rows for a fused kernel; else `rotate`'s (T, 1, hd) / apply_rope's (T, rot)


class TorchKernels:
    """Linear, norms, activations, RoPE, attention and the one-token step in plain PyTorch."""

    name = "torch"
    supports: frozenset[str] = ALL_FEATURES  # every architecture feature of the table
    device_types: tuple[str, ...] = ("cpu", "cuda")

    def bind(self, model: Transformer) -> None:
        """Called once at load, after the model's weights are in place on its device."""
        self.dtype = model.dtype
        self.H, self.Hkv, self.hd = model.cfg.n_heads, model.cfg.n_kv_heads, model.cfg.head_dim
        self.scale = model.scale
        # --compile: one-token steps through the static-shape step, captured (kernels/static_step.py)
        self.static_step: StaticDecode | None = None
        if model.step in STEP_MODES[1:]:
            self.static_step = StaticDecode(model, compile=model.step == "compiled")

    def describe(self) -> str:
        return self.name if self.static_step is None else f"{self.name} ({self.static_step.describe()})"

    # ------------------------------------------------------------------ per-call choices
    def compute_dtype(self, rows: int) -> torch.dtype:
        """The activations' dtype for a call of `rows` stacked token rows."""
        return self.dtype

    def decode_step(self, tokens: torch.Tensor, positions: torch.Tensor, cache, start: int):
        """A whole-model one-token step, (hidden (D,) float32, logits (V,) float32), or None: the layer-by-layer
        forward runs. The torch set's: the static-shape step where the model was loaded with one (--compile)."""
        if self.static_step is None:
            return None
        return self.static_step(tokens, positions, cache, start)

    def decode_batch(self, seqs: Sequence[BatchItem]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A whole-model step of several sequences, one token each, (hidden (B, D), logits (B, V)) float32, or
        None: the layer-by-layer forward runs them stacked. The torch set has none."""
        return None

    # ------------------------------------------------------------------ ops
    def linear(self, x: torch.Tensor, w: torch.Tensor | QuantLinear, b: torch.Tensor | None = None) -> torch.Tensor:
        """x (T, K) @ w (N, K)^T (+ b) -> (T, N) in x's dtype."""
        if isinstance(w, QuantLinear):
            return w(x, b).to(x.dtype)
        if x.dtype != w.dtype:  # e.g. float32 activations over bf16 weights: the upcast is exact
            return F.linear(x, w.to(x.dtype), None if b is None else b.to(x.dtype))
        return F.linear(x, w, b)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """(..., D): in float32, back to x's dtype before the weight, as the reference writes it (bit for bit
        what F.rms_norm gives, in fewer dispatched ops)."""
        h = x.float()
        return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight

    def layer_norm(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
        if weight.dtype != x.dtype:  # float32 activations over bf16 weights
            weight, bias = weight.to(x.dtype), None if bias is None else bias.to(x.dtype)
        return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)

    def silu_mul(self, h: torch.Tensor) -> torch.Tensor:
        """(T, 2F) rows [gate | up] -> silu(gate) * up (T, F)."""
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up

    def gelu_tanh_mul(self, h: torch.Tensor) -> torch.Tensor:
        """(T, 2F) rows [gate | up] -> gelu_tanh(gate) * up (T, F) (Gemma's GeGLU)."""
        gate, up = h.chunk(2, dim=-1)
        return F.gelu(gate, approximate="tanh") * up

    def gelu(self, h: torch.Tensor) -> torch.Tensor:
        return F.gelu(h)

    def rope_tables(self, cos: torch.Tensor, sin: torch.Tensor) -> RopeTables:
        """cos, sin (T, rot) from model.rope -> the form `rope_qkv` takes."""
        if cos.shape[-1] == self.hd:  # what `rotate` takes, broadcast over heads: (T, 1, hd)
            return RopeTables(cos[:, None], signed_sin(sin)[:, None], full=True)
        return RopeTables(cos, sin, full=False)

    def rope_qkv(self, qkv: torch.Tensor, rope: RopeTables) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """qkv (T, (H + 2 Hkv) hd) -> q (H, T, hd), k (Hkv, T, hd) rotated, v (Hkv, T, hd)."""
        H, Hkv, hd = self.H, self.Hkv, self.hd
        T = qkv.shape[0]
        heads = qkv.view(T, H + 2 * Hkv, hd)  # (T, H+2Hkv, hd)
        if rope.full:  # q and k heads rotated in one go
            qk = rotate(heads[:, : H + Hkv], rope.cos, rope.sin)  # (T, H+Hkv, hd)
            q, k = qk[:, :H].transpose(0, 1), qk[:, H:].transpose(0, 1)
        else:  # partial rotary (GPT-NeoX)
            q = apply_rope(heads[:, :H].transpose(0, 1), rope.cos, rope.sin)  # (H, T, hd)
            k = apply_rope(heads[:, H : H + Hkv].transpose(0, 1), rope.cos, rope.sin)  # (Hkv, T, hd)
        return q, k, heads[:, H + Hkv :].transpose(0, 1)

    def attention(
        self,
        q: torch.Tensor,
        k_buf: torch.Tensor,
        v_buf: torch.Tensor,
        start: int,
        mask: torch.Tensor | None,
        var: AttnVariant = PLAIN,
    ) -> torch.Tensor:
        """q (H, T, hd) for slots [start, start+T), whose K/V are already in the buffers (Hkv, C, hd); causal
        over slots [0, start+T) (`mask` (T, start+T) bool where start > 0 and T > 1). -> (T, H*hd).
        A layer's window, soft-cap or sinks (`var`) go to kernels/attn_variants.py."""
        if not var.plain:
            return buffer_attention(q, k_buf, v_buf, start, self.scale, var)
        H, T, hd = q.shape
        end = start + T
        keys, values = k_buf[:, :end], v_buf[:, :end]  # (Hkv, S, hd)
        if keys.dtype != q.dtype:
            keys, values = keys.to(q.dtype), values.to(q.dtype)
        out = F.scaled_dot_product_attention(
            q.unsqueeze(0),
            keys.unsqueeze(0),
            values.unsqueeze(0),
            attn_mask=mask,
            is_causal=T > 1 and mask is None,
            scale=self.scale,
            enable_gqa=keys.shape[0] != H,
        )  # (1, H, T, hd)
        return out[0].transpose(0, 1).reshape(T, H * hd)
