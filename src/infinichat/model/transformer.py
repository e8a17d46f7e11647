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

from infinichat.errors import InfinichatError
from infinichat.model.attention import AttentionRequest, requested_attention
from infinichat.model.config import ModelConfig
from infinichat.model.quant import QUANT_SUFFIXES, Int8GroupLinear, QuantLinear, check_mode, quantize
from infinichat.model.rope import Rope, apply_rope, rotate, signed_sin
from infinichat.native import decoder_for, prompt_attention, prompt_ops

# Measured on the reference CPU (benchmarks/NOTES.md): bf16 matrix-vector products are twice as fast with
# weights pre-packed for oneDNN; bf16 matrix-matrix products are slower than fp32 ones, so prompts of at least
# FP32_PREFILL_MIN tokens are computed in float32 (weights upcast exactly, layer by layer).
PACKED_MAX_T = 16
FP32_PREFILL_MIN = 32
# Quantized weights: calls of fewer tokens run in the int8/int4 kernels; from QUANT_DENSE_MIN_T[layout] tokens
# on, each weight is dequantized to float32 and the float32 GEMM runs: the kernels fall behind as rows grow.
# Crossovers measured with benchmarks/quant_chunks.py (NOTES.md; they move with the host's load): grouped int8
# (native product, AVX-512 VNNI, float32 activations) ~220 tokens, per-row int8 (PyTorch's kernel) 50-140,
# int4 (PyTorch's kernel) 220-350. Keyed by `quant_layout`.
QUANT_DENSE_MIN_T = {"int8g": 224, "int8": 96, "int4": 288}
LINEARS = ("wqkv", "wo", "w_in", "w_out")
# A quantized head's RESCORE_TOP best tokens per row get their logits again from the dense bf16 table
# (benchmarks/NOTES.md: the int8 head alone moved 0.8% of the greedy choices; this costs ~k*D reads).
RESCORE_TOP = 8


def _packing_works() -> bool:
    """Whether this torch has the oneDNN packed linear ops (probed once, on a tiny weight)."""
    try:
        w = torch.zeros(8, 8, dtype=torch.bfloat16)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, None)
        torch.ops.mkldnn._linear_pointwise(torch.zeros(1, 8, dtype=torch.bfloat16), packed, None, "none", [], "")
        return torch.backends.mkldnn.is_available()
    except (AttributeError, RuntimeError):
        return False


def _flash_decode_works() -> bool:
    """Whether F.scaled_dot_product_attention's CPU flash kernel can be called directly (probed once): one
    query, GQA heads, bf16, the same result as through the dispatcher."""
    try:
        q, k = torch.ones(1, 4, 1, 8, dtype=torch.bfloat16), torch.ones(1, 2, 3, 8, dtype=torch.bfloat16)
        out = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, k, 0.0, False, scale=0.5)[0]
        return torch.equal(out, F.scaled_dot_product_attention(q, k, k, scale=0.5, enable_gqa=True))
    except (AttributeError, RuntimeError):
        return False


class LayerCache(Protocol):
    """What the forward needs from a KV cache: per-layer buffers (Hkv, capacity, hd)."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]


class Transformer:
    """Weights in the canonical layout (see weights.py) plus the forward pass. Not an nn.Module: it has
    no training concerns, and plain tensors keep the per-token path free of module dispatch."""

    def __init__(
        self,
        cfg: ModelConfig,
        weights: dict[str, torch.Tensor],
        dtype: torch.dtype = torch.float32,
        quant: str = "none",
    ):
        """`weights`: the canonical dense layout (weights.py), or its quantized form (quant.quantize)."""
        self.cfg = cfg
        self.dtype = dtype
        self.quant = check_mode(quant)
        if self.quant != "none":
            if dtype != torch.bfloat16:
                raise InfinichatError(
                    f"--quant {self.quant} runs with --dtype bfloat16 (the CPU int8/int4 kernels take bfloat16 "
                    f"activations), not {str(dtype).removeprefix('torch.')}"
                )
            if not any(n.endswith((".q8", ".q8g", ".q4")) for n in weights):
                weights = quantize(weights, self.quant, cfg.tie_embeddings)
        w = {  # no copy when the dtype is already right; quantized tensors stay as they are
            n: t if n.endswith(QUANT_SUFFIXES) else t.to(dtype).contiguous()
            for n, t in weights.items()
            if n != "rope_freqs"
        }
        self.rope = Rope(cfg, weights.get("rope_freqs"))
        head = "embed" if cfg.tie_embeddings else "lm_head"
        qhead = QuantLinear.from_tensors(w, head)
        self.lm_head: torch.Tensor | QuantLinear = qhead or w[head + ".weight"]  # (V, D)
        self.head_exact = w[head + ".weight"] if qhead else None  # (V, D) dense rows for re-scoring
        self.embed = w["embed.weight"]  # (V, D)
        self.norm = (w["norm.weight"], w.get("norm.bias"))
        self.layers: list[dict[str, torch.Tensor | QuantLinear]] = []
        for i in range(cfg.n_layers):
            p = f"layers.{i}."
            L: dict = {k[len(p) :]: t for k, t in w.items() if k.startswith(p)}
            for name in LINEARS:
                ql = QuantLinear.from_tensors(w, p + name)
                if ql is not None:
                    L = {k: t for k, t in L.items() if not k.startswith(name + ".") or k == name + ".bias"}
                    L[name + ".weight"] = ql
            self.layers.append(L)
        # the quantized layers' layout (QUANT_DENSE_MIN_T's key): int8g (grouped int8), int8 (per row), int4
        grouped = any(isinstance(L.get("wqkv.weight"), Int8GroupLinear) for L in self.layers)
        self.quant_layout = "int8g" if grouped else self.quant
        # prompts of fp32_min tokens or more are computed in float32 (bf16 models: faster from there; grouped
        # int8: its native product takes float32 inputs, so its chunks keep float32 activations, as bf16
        # models' do); below dense_min_t tokens quantized products run in their kernels, from there over the
        # dequantized weights
        self.dense_min_t = QUANT_DENSE_MIN_T.get(self.quant_layout, 0)
        self.fp32_min = self.dense_min_t if self.quant_layout in ("int8", "int4") else FP32_PREFILL_MIN
        self.packed: dict[int, torch.Tensor] = {}  # id(weight) -> oneDNN-packed bf16 copy
        if dtype == torch.bfloat16 and _packing_works():
            dense = [self.lm_head] + [t for L in self.layers for n, t in L.items() if n.endswith("weight")]
            for t in dense:
                if isinstance(t, torch.Tensor) and t.dim() == 2:
                    self.packed[id(t)] = torch.ops.mkldnn._reorder_linear_weight(t, None)
        self.q_size = cfg.n_heads * cfg.head_dim
        self.kv_size = cfg.n_kv_heads * cfg.head_dim
        self.scale = cfg.head_dim**-0.5
        self.flash_decode = _flash_decode_works()
        self._f32: dict[int, torch.Tensor] = {}  # id(weight) -> its float32 copy (f32_weight)
        # quantized models: one-token steps run natively (native/decode.c) where it builds and fits
        self.native = decoder_for(self) if self.quant != "none" else None
        # float32 prompt chunks: causal attention natively (AVX-512), ~1.3x the CPU flash kernel (NOTES.md)
        self.prompt_attn = prompt_attention()
        # float32 prompts of bf16/quantized models: RMSNorm, RoPE and SiLU-multiply fused, one pass each
        # (native/decode.c). float32 models keep PyTorch's formulas: the reference's own, op for op, so that
        # their logits and attention weights follow transformers' float32 ones to the last bits tested.
        self.prompt_ops = prompt_ops() if dtype != torch.float32 else None

    # ------------------------------------------------------------------ pieces
    def f32_weight(self, t: torch.Tensor) -> torch.Tensor:
        """A float32 contiguous copy of one of the model's (norm) weights, made once: the native row ops and
        the native decode step read norms in float32."""
        w32 = self._f32.get(id(t))
        if w32 is None:
            w32 = self._f32[id(t)] = t.float().contiguous()
        return w32

    def _row_ops(self, x: torch.Tensor):
        """The native row ops for this float32 prompt tensor (T, ...), or None: PyTorch's formulas."""
        if self.prompt_ops is not None and x.dtype == torch.float32 and x.shape[0] >= FP32_PREFILL_MIN:
            return self.prompt_ops
        return None

    def _linear(self, x: torch.Tensor, w: torch.Tensor | QuantLinear, b: torch.Tensor | None = None) -> torch.Tensor:
        if isinstance(w, QuantLinear):  # the kernel for short inputs, else over the dequantized weight
            if x.dtype == torch.bfloat16 or x.shape[0] < self.dense_min_t:
                return w(x, b).to(x.dtype)
            return F.linear(x, w.dense(x.dtype), None if b is None else b.to(x.dtype))
        if x.dtype != w.dtype:  # float32 prefill over bf16 weights: the upcast is exact
            return F.linear(x, w.to(x.dtype), None if b is None else b.to(x.dtype))
        packed = self.packed.get(id(w)) if x.shape[0] <= PACKED_MAX_T else None
        if packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], "")
        return F.linear(x, w, b)

    def _embed(self, tokens: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.embed[tokens].to(dtype)  # (T, D)

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        """x (T, D) -> logits (T, V) float32. A quantized head's top candidates are re-scored exactly: the
        dense rows in float32, rounded as the dense model's product would be (bf16 for bf16 inputs)."""
        return self._rescore(x, self._linear(x, self.lm_head).float())  # (T, V)

    def _rescore(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if self.head_exact is None:
            return logits
        top = logits.topk(RESCORE_TOP, dim=-1).indices  # (T, k)
        rows = self.head_exact[top].float()  # (T, k, D)
        exact = torch.bmm(rows, x.float().unsqueeze(-1)).squeeze(-1)  # (T, k)
        return logits.scatter_(-1, top, exact.to(x.dtype).float())

    def _norm(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.cfg.norm == "layer":
            if weight.dtype != x.dtype:  # float32 prefill over bf16 weights
                weight, bias = weight.to(x.dtype), None if bias is None else bias.to(x.dtype)
            return F.layer_norm(x, (x.shape[-1],), weight, bias, self.cfg.norm_eps)
        if (ops := self._row_ops(x)) is not None:
            return ops.rmsnorm(x.contiguous(), self.f32_weight(weight), self.cfg.norm_eps)
        # RMSNorm in float32, then back to the model dtype before the weight, written as the reference writes it
        # (bit for bit what F.rms_norm gives, in fewer dispatched ops: benchmarks/NOTES.md)
        h = x.float()
        return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.cfg.norm_eps)).to(x.dtype) * weight

    def _mlp(self, L: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        h = self._linear(x, L["w_in.weight"], L.get("w_in.bias"))  # (T, 2F) or (T, F)
        if self.cfg.gated_mlp and (ops := self._row_ops(h)) is not None:
            h = ops.silu_mul(h.contiguous())  # (T, F)
        elif self.cfg.gated_mlp:
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
        H, Hkv, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        qkv = self._linear(x, L["wqkv.weight"], L.get("wqkv.bias"))  # (T, q + 2kv)
        if cos.shape[-1] == hd and (ops := self._row_ops(qkv)) is not None:  # fused, in place on the q and k heads
            qkv = qkv.contiguous()
            ops.rope_(qkv, H + Hkv, hd, cos, sin)  # cos, sin (T, hd): see forward
            q = qkv[:, : self.q_size].view(T, H, hd).transpose(0, 1)  # (H, T, hd)
            k = qkv[:, self.q_size : self.q_size + self.kv_size].view(T, Hkv, hd).transpose(0, 1)  # (Hkv, T, hd)
        elif cos.shape[-1] == hd:  # full-width RoPE: q and k heads rotated in one go
            qk = qkv[:, : self.q_size + self.kv_size].view(T, H + Hkv, hd)  # (T, H+Hkv, hd)
            qk = rotate(qk, cos, sin)  # cos, sin (T, 1, hd)
            q = qk[:, :H].transpose(0, 1)  # (H, T, hd)
            k = qk[:, H:].transpose(0, 1)  # (Hkv, T, hd)
        else:  # partial rotary (GPT-NeoX)
            q, k = qkv[:, : self.q_size], qkv[:, self.q_size : self.q_size + self.kv_size]
            q = apply_rope(q.view(T, H, hd).transpose(0, 1), cos, sin)  # (H, T, hd)
            k = apply_rope(k.view(T, Hkv, hd).transpose(0, 1), cos, sin)  # (Hkv, T, hd)
        v = qkv[:, self.q_size + self.kv_size :].view(T, Hkv, hd).transpose(0, 1)  # (Hkv, T, hd)
        end = start + T
        k_buf[:, start:end] = k
        v_buf[:, start:end] = v
        if attn is not None:  # a policy asked for weights, a token subset or offloading (model/attention.py)
            out = requested_attention(attn, li, q, k_buf, v_buf, start, self.scale)  # (H, T, hd)
            return self._linear(out.transpose(0, 1).reshape(T, self.q_size), L["wo.weight"], L.get("wo.bias"))
        if T > 1 and self.prompt_attn is not None and self.prompt_attn.takes(q, Hkv):
            out = self.prompt_attn(q, k_buf, v_buf, start, self.scale)  # (T, H, hd)
            return self._linear(out.view(T, self.q_size), L["wo.weight"], L.get("wo.bias"))
        keys, values = k_buf[:, :end], v_buf[:, :end]  # (Hkv, L, hd)
        if keys.dtype != q.dtype:
            keys, values = keys.to(q.dtype), values.to(q.dtype)
        if T == 1 and self.flash_decode:  # the kernel F.scaled_dot_product_attention picks, minus its dispatch
            # Quantized models: the G query heads sharing a KV head go in as G query rows of that head, so
            # each KV head is read once, by one thread (~30% faster at short context, ~7% at 4k: NOTES.md).
            # Not bit for bit the per-head result at long context, so bf16/fp32 models keep the per-head call.
            qq = q.view(1, Hkv, H // Hkv, hd) if self.quant != "none" else q.unsqueeze(0)  # (1, Hkv, G, hd)
            out = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                qq, keys.unsqueeze(0), values.unsqueeze(0), 0.0, False, scale=self.scale
            )[0].reshape(1, H, 1, hd)  # GQA handled by the kernel
        else:
            out = F.scaled_dot_product_attention(
                q.unsqueeze(0),
                keys.unsqueeze(0),
                values.unsqueeze(0),
                attn_mask=mask,
                is_causal=T > 1 and mask is None,
                scale=self.scale,
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
        reserve = getattr(cache, "reserve", None)
        if reserve is not None:  # a growing store (kv/store.py): its buffers hold the new slots before they are bound
            reserve(start + T)
        if T == 1 and attn is None and self.native is not None and self.native.bind(cache) is not None:
            x, logits = self.native.decode(int(tokens[0]), positions, cache, start)
            logits = self._rescore(x.to(self.dtype)[None], logits[None])  # (1, V)
            return logits if all_logits else logits[0]
        compute = torch.float32 if self.dtype == torch.bfloat16 and self.fp32_min <= T else self.dtype
        x = self._embed(tokens, compute)  # (T, D)
        cos, sin = self.rope.cos_sin(positions, compute)  # (T, rot)
        if cos.shape[-1] == self.cfg.head_dim and self._row_ops(x) is not None:  # (T, hd) rows for rope_
            cos, sin = cos.contiguous(), sin.contiguous()
        elif cos.shape[-1] == self.cfg.head_dim:  # what `rotate` takes, broadcast over heads: (T, 1, hd)
            cos, sin = cos[:, None], signed_sin(sin)[:, None]
        mask = None  # a prefill from slot 0 uses SDPA's own causal mask
        if T > 1 and start > 0:
            i = torch.arange(T).unsqueeze(1)
            j = torch.arange(start + T).unsqueeze(0)
            mask = j <= i + start  # (T, start+T) bool
        for li, L in enumerate(self.layers):
            h = self._norm(x, L["attn_norm.weight"], L.get("attn_norm.bias"))
            a = self._attention(L, h, cos, sin, cache.k[li], cache.v[li], start, mask, li, attn)
            # residual adds in place: x is this call's own tensor (the embedding lookup made it)
            if self.cfg.parallel_residual:
                m = self._mlp(L, self._norm(x, L["ffn_norm.weight"], L.get("ffn_norm.bias")))
                x += a
                x += m
            else:
                x += a
                x += self._mlp(L, self._norm(x, L["ffn_norm.weight"], L.get("ffn_norm.bias")))
        if not all_logits:
            x = x[-1:].to(self.dtype)  # one row: the model dtype's (packed) product beats upcasting the head
        x = self._norm(x, *self.norm)
        logits = self._head(x)  # (T, V)
        return logits if all_logits else logits[0]

    __call__ = forward
