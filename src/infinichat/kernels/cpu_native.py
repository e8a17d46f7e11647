"""The `cpu-native` kernel set: the `torch` ops with the CPU's faster members where they apply.

Members (each measured in benchmarks/NOTES.md), chosen once at `bind`:
- bf16 matrix-vector products over weights pre-packed for oneDNN (calls of <= PACKED_MAX_T rows);
- float32 compute for bf16 prompts of >= FP32_PREFILL_MIN rows (bf16 GEMMs are slower than fp32 ones here);
  quantized weights: the int8/int4 kernels below QUANT_DENSE_MIN_T rows, the dequantized float32 GEMM above;
- PyTorch's CPU flash-attention kernel called directly for one-token steps;
- from the native library (native/decode.c), where it builds: fused RMSNorm / RoPE / SiLU-multiply rows for
  float32 prompts of bf16 and quantized models, causal prompt attention (AVX-512), and the whole-model
  one-token step of quantized models (and its batched form, several sequences' one-token steps in one call
  reading the weights once: continuous batching), used when its declared features (native.DECODE_FEATURES) cover the
  model's (model/arch.py `features`) and its weights are in the step's formats.
float32 models keep PyTorch's formulas for norms and RoPE: the reference's own, op for op, so their logits and
attention weights follow transformers' float32 ones to the last bits tested.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from infinichat import native
from infinichat.kernels.attn_variants import PLAIN, AttnVariant
from infinichat.kernels.torch_ops import RopeTables, TorchKernels
from infinichat.model.quant import Int8GroupLinear, QuantLinear

if TYPE_CHECKING:
    from infinichat.model.transformer import BatchItem, Transformer

PACKED_MAX_T = 16
NATIVE_BATCH_MAX = 16  # rows per native batched step (its scratch holds a softmax partial per row and thread)
FP32_PREFILL_MIN = 32
# Quantized weights: calls of fewer tokens run in the int8/int4 kernels; from QUANT_DENSE_MIN_T[layout] tokens
# on, each weight is dequantized to float32 and the float32 GEMM runs: the kernels fall behind as rows grow.
# Crossovers measured with benchmarks/quant_chunks.py (NOTES.md; they move with the host's load): grouped int8
# (native product, AVX-512 VNNI, float32 activations) ~220 tokens, per-row int8 (PyTorch's kernel) 50-140,
# int4 (PyTorch's kernel) 220-350. Keyed by `quant_layout`.
QUANT_DENSE_MIN_T = {"int8g": 224, "int8": 96, "int4": 288}


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


class CpuNativeKernels(TorchKernels):
    name = "cpu-native"
    device_types = ("cpu",)

    def bind(self, model: Transformer) -> None:
        super().bind(model)
        self.quant = model.quant
        # the quantized layers' layout (QUANT_DENSE_MIN_T's key): int8g (grouped int8), int8 (per row), int4
        grouped = any(isinstance(L.get("wqkv.weight"), Int8GroupLinear) for L in model.layers)
        self.quant_layout = "int8g" if grouped else self.quant
        # prompts of fp32_min tokens or more are computed in float32 (bf16 models: faster from there; grouped
        # int8: its native product takes float32 inputs, so its chunks keep float32 activations, as bf16
        # models' do); below dense_min_t tokens quantized products run in their kernels, from there over the
        # dequantized weights
        self.dense_min_t = QUANT_DENSE_MIN_T.get(self.quant_layout, 0)
        self.fp32_min = self.dense_min_t if self.quant_layout in ("int8", "int4") else FP32_PREFILL_MIN
        self.packed: dict[int, torch.Tensor] = {}  # id(weight) -> oneDNN-packed bf16 copy
        if model.dtype == torch.bfloat16 and _packing_works():
            dense = [model.lm_head] + [t for L in model.layers for n, t in L.items() if n.endswith("weight")]
            for t in dense:
                if isinstance(t, torch.Tensor) and t.dim() == 2:
                    self.packed[id(t)] = torch.ops.mkldnn._reorder_linear_weight(t, None)
        self.flash_decode = _flash_decode_works()
        self._f32: dict[int, torch.Tensor] = {}  # id(weight) -> its float32 copy (f32_weight)
        # quantized models: one-token steps run natively (native/decode.c) where its features cover the model's
        self.decoder = native.decoder_for(model, self.f32_weight) if self.quant != "none" else None
        # float32 prompt chunks: causal attention natively (AVX-512), ~1.3x the CPU flash kernel (NOTES.md)
        self.prompt_attn = native.prompt_attention()
        # float32 prompts of bf16/quantized models: RMSNorm, RoPE and SiLU-multiply fused, one pass each
        self.prompt_ops = native.prompt_ops() if model.dtype != torch.float32 else None

    def describe(self) -> str:
        members = [
            ("packed bf16", bool(self.packed)),
            ("native decode", self.decoder is not None),
            ("native prompt attention", self.prompt_attn is not None),
            ("native row ops", self.prompt_ops is not None),
        ]
        on = [n for n, ok in members if ok]
        return f"{self.name} ({', '.join(on) or 'PyTorch CPU ops only'}; native library: {native.status()})"

    def f32_weight(self, t: torch.Tensor) -> torch.Tensor:
        """A float32 contiguous copy of one of the model's (norm) weights, made once: the native row ops and
        the native decode step read norms in float32."""
        w32 = self._f32.get(id(t))
        if w32 is None:
            w32 = self._f32[id(t)] = t.float().contiguous()
        return w32

    def _row_ops(self, x: torch.Tensor) -> native.PromptOps | None:
        """The native row ops for this float32 prompt tensor (T, ...), or None: PyTorch's formulas."""
        if self.prompt_ops is not None and x.dtype == torch.float32 and x.shape[0] >= FP32_PREFILL_MIN:
            return self.prompt_ops
        return None

    # ------------------------------------------------------------------ per-call choices
    def compute_dtype(self, rows: int) -> torch.dtype:
        return torch.float32 if self.dtype == torch.bfloat16 and self.fp32_min <= rows else self.dtype

    def decode_step(self, tokens: torch.Tensor, positions: torch.Tensor, cache, start: int):
        if self.decoder is None or self.decoder.bind(cache) is None:
            return None
        return self.decoder.decode(int(tokens[0]), positions, cache, start)

    def decode_batch(self, seqs: Sequence[BatchItem]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The native batched step (decode.c's ic_decode_batch: the weights read once for all rows, each row
        bit for bit its one-token step; bf16, int8 and int4 KV, rows of different formats together) for distinct
        caches it can read, at most NATIVE_BATCH_MAX rows per call."""
        dec = self.decoder
        if dec is None or len({id(s.cache) for s in seqs}) != len(seqs):
            return None
        if any(s.tokens.shape[0] != 1 or not dec.batchable(s.cache) for s in seqs):  # any KV format bind reads
            return None
        xs, outs = [], []
        for a in range(0, len(seqs), NATIVE_BATCH_MAX):
            part = seqs[a : a + NATIVE_BATCH_MAX]
            x, logits = dec.decode_batch(
                [int(s.tokens[0]) for s in part],
                [s.positions for s in part],
                [s.cache for s in part],
                [s.start for s in part],
            )  # (b, D), (b, V)
            xs.append(x)
            outs.append(logits)
        return (xs[0], outs[0]) if len(xs) == 1 else (torch.cat(xs), torch.cat(outs))

    # ------------------------------------------------------------------ ops
    def linear(self, x: torch.Tensor, w: torch.Tensor | QuantLinear, b: torch.Tensor | None = None) -> torch.Tensor:
        if isinstance(w, QuantLinear):  # the kernel for short inputs, else over the dequantized weight
            if x.dtype == torch.bfloat16 or x.shape[0] < self.dense_min_t:
                return w(x, b).to(x.dtype)
            return F.linear(x, w.dense(x.dtype), None if b is None else b.to(x.dtype))
        packed = self.packed.get(id(w)) if x.shape[0] <= PACKED_MAX_T and x.dtype == w.dtype else None
        if packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], "")
        return super().linear(x, w, b)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        if x.dim() == 2 and (ops := self._row_ops(x)) is not None:
            return ops.rmsnorm(x.contiguous(), self.f32_weight(weight), eps)
        return super().rms_norm(x, weight, eps)

    def silu_mul(self, h: torch.Tensor) -> torch.Tensor:
        if (ops := self._row_ops(h)) is not None:
            return ops.silu_mul(h.contiguous())  # (T, F)
        return super().silu_mul(h)

    def rope_tables(self, cos: torch.Tensor, sin: torch.Tensor) -> RopeTables:
        if cos.shape[-1] == self.hd and self._row_ops(cos) is not None:  # (T, hd) rows for the fused rope_
            return RopeTables(cos.contiguous(), sin.contiguous(), full=True, rows=True)
        return super().rope_tables(cos, sin)

    def rope_qkv(self, qkv: torch.Tensor, rope: RopeTables) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if rope.rows and self.prompt_ops is not None and qkv.dtype == torch.float32:
            H, Hkv, hd = self.H, self.Hkv, self.hd
            T = qkv.shape[0]
            qkv = qkv.contiguous()
            self.prompt_ops.rope_(qkv, H + Hkv, hd, rope.cos, rope.sin)  # in place on the q and k heads
            heads = qkv.view(T, H + 2 * Hkv, hd)  # (T, H+2Hkv, hd)
            return (
                heads[:, :H].transpose(0, 1),
                heads[:, H : H + Hkv].transpose(0, 1),
                heads[:, H + Hkv :].transpose(0, 1),
            )
        if rope.rows:  # rows were made for a fused call that does not apply to this tensor
            rope = super().rope_tables(rope.cos, rope.sin)
        return super().rope_qkv(qkv, rope)

    def attention(
        self,
        q: torch.Tensor,
        k_buf: torch.Tensor,
        v_buf: torch.Tensor,
        start: int,
        mask: torch.Tensor | None,
        var: AttnVariant = PLAIN,
    ) -> torch.Tensor:
        if not var.plain:  # windows, soft-caps, sinks: the torch set's variant path (no native member for them)
            return super().attention(q, k_buf, v_buf, start, mask, var)
        H, T, hd = q.shape
        Hkv = k_buf.shape[0]
        if T > 1 and self.prompt_attn is not None and self.prompt_attn.takes(q, Hkv):
            return self.prompt_attn(q, k_buf, v_buf, start, self.scale).view(T, H * hd)  # (T, H*hd)
        if T == 1 and self.flash_decode:  # the kernel F.scaled_dot_product_attention picks, minus its dispatch
            end = start + 1
            keys, values = k_buf[:, :end], v_buf[:, :end]  # (Hkv, S, hd)
            if keys.dtype != q.dtype:
                keys, values = keys.to(q.dtype), values.to(q.dtype)
            # Quantized models: the G query heads sharing a KV head go in as G query rows of that head, so
            # each KV head is read once, by one thread (~30% faster at short context, ~7% at 4k: NOTES.md).
            # Not bit for bit the per-head result at long context, so bf16/fp32 models keep the per-head call.
            qq = q.view(1, Hkv, H // Hkv, hd) if self.quant != "none" else q.unsqueeze(0)  # (1, Hkv, G, hd)
            out = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                qq, keys.unsqueeze(0), values.unsqueeze(0), 0.0, False, scale=self.scale
            )[0]  # GQA handled by the kernel
            return out.reshape(1, H * hd)
        return super().attention(q, k_buf, v_buf, start, mask)
