"""Weight-only quantization: int8 and int4 per group of 32 inputs, on the CPU and on CUDA.

Decode reads every weight once per token, so it runs at the memory bandwidth: fewer bytes per weight is more
tokens per second. On the CPU, one-token steps run in the native decode step (native/decode.c); other calls of
fewer than cpu_native.QUANT_DENSE_MIN_T tokens run in the native multi-token product (grouped int8) or in
PyTorch's own CPU kernels (`aten._weight_int4pack_mm_for_cpu`, `torch._weight_int8pack_mm`), with bfloat16
activations. On CUDA the same objects run int4 through PyTorch's CUDA kernel (`aten._convert_weight_to_int4pack`
+ `aten._weight_int4pack_mm`, torch >= 2.9) and int8 as a bf16 GEMM over the widened weights (`Int8Linear`):
which kernel is chosen once, when the object is built on its device, never per call.

    int8 (grouped):  w = q * s + z        q int8 in [-128, 127], s and z per row and group of GROUP inputs
                                          (the group's min/max on 256 levels; 9 bits per weight)
    int8 (per row):  w = q * s            q int8 in [-127, 127], s per output row (symmetric)
    int4:            w = (q - 8) * s + z  q in [0, 15], s and z per row and group of GROUP inputs (asymmetric
                                          min/max, as GGUF Q4_1 does; from a Q4_1 file the grid is recovered exactly)

`--quant int8` stores the layers' weights grouped where the native library runs (the grid holds a Q4_1 file's
16 levels as every 17th of its 256, so the default model's weights are kept up to the bf16 rounding of s and z:
98.9% top-1 agreement with bf16 where per-row int8 had 97.2%, benchmarks/NOTES.md), and per row elsewhere
(PyTorch's int8 kernel takes one scale per row; `int8_layout()`).

`quantize(weights, mode)` turns the canonical dense weights (weights.py) into a flat dict of tensors (so a
quantized model caches to one safetensors file); `QuantLinear.from_tensors` builds the matmul objects
from it. The output head is int8 in both modes (llama.cpp keeps it at 8 bits in Q4 files too), and its
dense bf16 table is kept as well, read only where it is cheap: the embedding lookup, and the exact
re-scoring of the head's top candidates (transformer.py), which the next token's choice depends on.
Weights the kernels cannot take (int4: output rows not a multiple of 16, inputs not a multiple of the
group) fall back to int8.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F

from infinichat.errors import InfinichatError

if TYPE_CHECKING:
    from infinichat.native import Matmul

log = logging.getLogger(__name__)

QUANT_MODES = ("none", "int8", "int4")
QUANT_FORMAT = 1  # in the cached file names (with `cache_tag`): bump when what `quantize` produces changes
GROUP = 32  # int4 group size: the GGUF Q4_0/Q4_1 block size; also what K=576 (SmolLM2) divides into
ACT_DTYPE = torch.bfloat16  # the kernels' activation (and scale) dtype
QUANT_SUFFIXES = (".q8", ".scale", ".q8g", ".q4", ".scale_zero")  # the tensors `quantize` makes


def check_mode(quant: str | None) -> str:
    quant = quant or "none"
    if quant not in QUANT_MODES:
        raise InfinichatError(f"unknown --quant {quant!r}; accepted: {', '.join(QUANT_MODES)}")
    return quant


# ---------------------------------------------------------------------------------------------- quantizing
def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float -> q (N, K) int8, scale (N,) bf16, symmetric per row: w ~ q * scale."""
    w = w.float()
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12).to(ACT_DTYPE)  # (N,) rounded first: q uses it
    q = torch.round(w / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)  # (N, K)
    return q, scale


def _minmax_groups(w: torch.Tensor, group: int, levels: int, centre: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each group's [min, max] on `levels` evenly spaced levels, q - centre in [-centre, levels - 1 - centre]:
    -> q (N, K) float, centred, and scale_zero (N, K/group, 2) bf16, zero the value of the centre level, so
    w ~ q * s + z. The scale and zero are rounded to bf16 first, and q is rounded against them."""
    N, K = w.shape
    wg = w.float().view(N, K // group, group)  # (N, G, g)
    lo, hi = wg.amin(dim=-1), wg.amax(dim=-1)  # (N, G)
    scale = ((hi - lo) / (levels - 1)).clamp(min=1e-12).to(ACT_DTYPE)  # (N, G)
    zero = (lo + centre * scale.float()).to(ACT_DTYPE)  # (N, G)
    s, z = scale.float()[..., None], zero.float()[..., None]
    q = torch.round((wg - z) / s).clamp(-centre, levels - 1 - centre).view(N, K)  # (N, K)
    return q, torch.stack((scale, zero), dim=-1)


def quantize_int4(w: torch.Tensor, group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float -> nibbles (N, K/2) uint8 (values in [0, 15], see `pack_nibbles`), scale_zero
    (N, K/group, 2) bf16: w ~ (q - 8) * s + z."""
    q, scale_zero = _minmax_groups(w, group, 16, 8)
    return pack_nibbles(q + 8), scale_zero  # (N, K/2), (N, G, 2)


def quantize_int8_group(w: torch.Tensor, group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float -> q (N, K) int8 in [-128, 127], scale_zero (N, K/group, 2) bf16: w ~ q * s + z, the
    group's min/max mapped onto the 256 levels. A Q4_1 group (16 levels lo + i*d) lands on levels 17*i - 128:
    its values are kept up to the bf16 rounding of s and z."""
    q, scale_zero = _minmax_groups(w, group, 256, 128)
    return q.to(torch.int8), scale_zero  # (N, K), (N, G, 2)


def int4_fits(w: torch.Tensor, group: int = GROUP) -> bool:
    N, K = w.shape
    return N % 16 == 0 and K % group == 0


def int8_layout(device: torch.device | str = "cpu") -> str:
    """'group' on the CPU where the native library runs (its products take per-group scales), else 'row'
    (PyTorch's int8 kernels, CPU and CUDA, take per-row scales only)."""
    from infinichat import native

    return "group" if torch.device(device).type == "cpu" and native.library() is not None else "row"


def cache_tag(mode: str, device: torch.device | str = "cpu") -> str:
    """The name of what `quantize(.., mode)` makes for `device`, for cached files: int8g, int8, int4."""
    return "int8g" if mode == "int8" and int8_layout(device) == "group" else mode


def quantize(
    weights: dict[str, torch.Tensor], mode: str, tie_embeddings: bool, int8_groups: bool | None = None
) -> dict[str, torch.Tensor]:
    """Dense canonical weights -> a flat dict where each quantized layer matrix `X.weight` becomes
    `X.q8g` + `X.scale_zero` (int8 grouped), `X.q8` + `X.scale` (int8 per row: without `int8_groups`, which
    defaults to `int8_layout()`, or where K is not a multiple of GROUP) or `X.q4` + `X.scale_zero` (int4;
    per-row int8 where the kernel cannot take the shape). The head gets `.q8` + `.scale` next to its dense
    `.weight`; norms, biases and an untied embedding table stay as they are."""
    mode = check_mode(mode)
    if mode == "none":
        return dict(weights)
    if int8_groups is None:
        int8_groups = cache_tag(mode) == "int8g"
    out: dict[str, torch.Tensor] = {}
    head = "embed.weight" if tie_embeddings else "lm_head.weight"
    for name, t in weights.items():
        is_matrix = name.endswith(".weight") and t.dim() == 2 and name.startswith("layers.")
        base = name.removesuffix(".weight")
        if name == head:
            out[name] = t
        if is_matrix and mode == "int4" and int4_fits(t):
            out[base + ".q4"], out[base + ".scale_zero"] = quantize_int4(t)
        elif is_matrix and mode == "int8" and int8_groups and t.shape[1] % GROUP == 0:
            out[base + ".q8g"], out[base + ".scale_zero"] = quantize_int8_group(t)
        elif is_matrix or name == head:
            out[base + ".q8"], out[base + ".scale"] = quantize_int8(t)
        else:
            out[name] = t
    return out


# ---------------------------------------------------------------------------------------------- matmuls
class QuantLinear:
    """A quantized (N, K) weight: `self(x)` = x @ dequant(W)^T for bf16 x (T, K); `dense(dtype)` gives
    the dequantized matrix for large products (prefill runs in float32 over it)."""

    def __init__(self, N: int, K: int):
        self.N, self.K = N, K

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        y = self._mm(x if x.dtype == ACT_DTYPE else x.to(ACT_DTYPE))  # (T, N)
        return y if bias is None else y + bias.to(y.dtype)

    def _mm(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        raise NotImplementedError

    @staticmethod
    def from_tensors(flat: dict[str, torch.Tensor], base: str) -> QuantLinear | None:
        if base + ".q8" in flat:
            return Int8Linear(flat[base + ".q8"], flat[base + ".scale"])
        if base + ".q4" in flat:
            return Int4Linear(flat[base + ".q4"], flat[base + ".scale_zero"])
        if base + ".q8g" in flat:
            return Int8GroupLinear(flat[base + ".q8g"], flat[base + ".scale_zero"])
        return None


def aligned(t: torch.Tensor, to: int = 64) -> torch.Tensor:
    """t contiguous and starting on a `to`-byte boundary (copied if not). Tensors memory-mapped from a
    safetensors file start wherever the file's header leaves them (8-byte steps), and PyTorch's int8 kernel
    crashes (segfault) on weights that are not 64-byte aligned, for more than one input row."""
    t = t.contiguous()
    return t if t.data_ptr() % to == 0 else t.clone()


class Int8Linear(QuantLinear):
    """Per-row int8. On the CPU through PyTorch's int8 kernel; on a GPU as x @ q.T (q widened to bf16, exact)
    times the row scales: PyTorch's CUDA `_weight_int8pack_mm` is one thread per output walking K with
    uncoalesced loads (aten/src/ATen/native/cuda/int8mm.cu), while this form runs the GPU's bf16 GEMM (the
    widening costs a bf16 copy per call) and is what torch.compile (--compile) fuses into one int8-reading
    kernel, as gpt-fast's int8 weight-only layer is. Chosen once, by the weights' device."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor):
        super().__init__(*q.shape)
        self._cpu = q.device.type == "cpu"
        self.q = aligned(q) if self._cpu else q.contiguous()  # (N, K) int8
        self.scale = aligned(scale.to(ACT_DTYPE)) if self._cpu else scale.to(ACT_DTYPE).contiguous()  # (N,)

    def _mm(self, x: torch.Tensor) -> torch.Tensor:
        if self._cpu:
            return torch._weight_int8pack_mm(x, self.q, self.scale)  # (T, N) bf16
        return F.linear(x, self.q.to(x.dtype)) * self.scale  # (T, N) bf16

    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        return self.q.to(dtype) * self.scale.to(dtype)[:, None]  # (N, K)

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.scale.nbytes


class Int8GroupLinear(QuantLinear):
    """int8 with a scale and a zero per row and group of inputs. Its products run natively (decode.c); without
    the native library (where `quantize` does not choose this layout, but a flat dict may still hold it) over
    the dequantized weight, which is correct but re-dequantizes it at every call."""

    def __init__(self, q: torch.Tensor, scale_zero: torch.Tensor):
        super().__init__(*q.shape)
        self.q = q.contiguous()  # (N, K) int8
        self.group = self.K // scale_zero.shape[1]
        self.scale_zero = scale_zero.to(ACT_DTYPE).contiguous()  # (N, K/g, 2)
        self._native: Matmul | Literal[False] | None = False  # native.Matmul, None without one; made at first use

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x (T, K) bf16 or float32 -> (T, N) in x's dtype: float32 inputs stay float32 (the product is)."""
        if self._native is False:
            from infinichat import native

            self._native = native.matmul_for(self)
        y = F.linear(x.float(), self.dense(torch.float32)) if self._native is None else self._native(x)  # (T, N) f32
        if bias is not None:
            y += bias.float()
        return y if x.dtype == torch.float32 else y.to(x.dtype)

    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        q = self.q.view(self.N, -1, self.group).to(torch.float32)  # (N, K/g, g)
        s, z = self.scale_zero.float().unbind(-1)  # (N, K/g) each
        return (q * s[..., None] + z[..., None]).view(self.N, self.K).to(dtype)  # (N, K)

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.scale_zero.nbytes


class Int4Linear(QuantLinear):
    """Two copies of the 4-bit values: the kernel's packed layout (it depends on the device, and on a CPU on its
    vector width, so it is made at load, never cached) and our own nibbles (low nibble = even input), which
    `dense` dequantizes for large products. The kernel is chosen here, once, by the nibbles' device: PyTorch's
    CPU int4 kernel, or its CUDA one (tensor cores, sm80+), whose packing takes the even input in the high
    nibble and whose nibbles copy stays in host memory (only `dense` reads it). Both compute
    (q - 8) * s + z from scale_zero laid out (K/g, N, 2)."""

    def __init__(self, nibbles: torch.Tensor, scale_zero: torch.Tensor):
        N, K2 = nibbles.shape
        super().__init__(N, 2 * K2)
        self.group = self.K // scale_zero.shape[1]
        self.kernel_sz = scale_zero.to(ACT_DTYPE).transpose(0, 1).contiguous()  # (K/g, N, 2): the kernels' layout
        if nibbles.device.type == "cuda":
            self.packed = torch.ops.aten._convert_weight_to_int4pack(
                cuda_int4_bytes(nibbles.contiguous()), inner_k_tiles(self.K)
            )  # (N/8, K/(16 t), 32, t/2) int32
            self._kernel = torch.ops.aten._weight_int4pack_mm
            nibbles, scale_zero = nibbles.cpu(), scale_zero.cpu()
        else:
            q = unpack_nibbles(nibbles.contiguous()).to(torch.int32)  # (N, K)
            self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)  # (N, K/2) uint8
            self._kernel = torch.ops.aten._weight_int4pack_mm_for_cpu
        self.nibbles = nibbles.contiguous()  # (N, K/2) uint8
        self.scale_zero = scale_zero.to(ACT_DTYPE).contiguous()  # (N, K/g, 2)

    def _mm(self, x: torch.Tensor) -> torch.Tensor:
        return self._kernel(x.contiguous(), self.packed, self.group, self.kernel_sz)  # (T, N) bf16

    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        q = unpack_nibbles(self.nibbles).view(self.N, -1, self.group).to(torch.float32)  # (N, K/g, g)
        s, z = self.scale_zero.float().unbind(-1)  # (N, K/g) each
        w = ((q - 8) * s[..., None] + z[..., None]).view(self.N, self.K).to(dtype)  # (N, K)
        return w.to(self.packed.device)

    @property
    def nbytes(self) -> int:
        """Bytes held on the kernel's device."""
        dev = self.packed.device
        parts = (self.nibbles, self.packed, self.scale_zero, self.kernel_sz)
        return sum(t.nbytes for t in parts if t.device == dev)


def inner_k_tiles(K: int) -> int:
    """The CUDA int4 packing's k-tiles per load (2, 4 or 8 tiles of 16 inputs): the widest that divides K."""
    return next(t for t in (8, 4, 2) if K % (16 * t) == 0)


def cuda_int4_bytes(nibbles: torch.Tensor) -> torch.Tensor:
    """Our nibbles (N, K/2) uint8, even input in the low nibble -> the byte order PyTorch's CUDA int4 packing
    reads (`_convert_weight_to_int4pack`: even input in the high nibble)."""
    return (nibbles << 4) | (nibbles >> 4)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """(N, K) values in [0, 15] -> (N, K/2) uint8, even inputs in the low nibble."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_nibbles(b: torch.Tensor) -> torch.Tensor:
    """(N, K/2) uint8 -> (N, K) uint8 in [0, 15]."""
    return torch.stack((b & 15, b >> 4), dim=-1).view(b.shape[0], -1)
