"""The native decode step for quantized models (decode.c), built with the system's C compiler at first use.

`--quant int8|int4` decode on CPU runs one token through the whole model in one C call (one OpenMP parallel
region, integer products over the quantized weights, attention over the KV store's bf16 buffers, its int8
codes and scales (--kv-dtype int8), or its int4 KIVI groups and bf16 residual (--kv-dtype int4), keys optionally
Hadamard-rotated (int8h, int4h): `DECODE_KV_FORMATS`), instead of
~25 PyTorch ops per layer. The library is compiled once per source version into the cache directory
(`$INFINICHAT_CACHE/native`, by default `~/.cache/infinichat/native`), in about a second, and loaded with
ctypes; it shares PyTorch's OpenMP runtime (same `libgomp.so.1`, loaded by torch first).

Where it cannot run, the PyTorch path runs instead, with the same results up to rounding: a CPU without
AVX2/FMA, no C compiler (`$CC`, else `cc`/`gcc`), a model outside the Llama family layout, or
`INFINICHAT_NATIVE=0` in the environment. `status()` says which (`python3 -c "import infinichat.native as n;
print(n.status())"`); a failed build is also logged as a warning.

The same library multiplies quantized weights for the PyTorch path's calls of several tokens (`matmul_for`:
grouped int8 has no PyTorch kernel; AVX-512 VNNI CPUs get a kernel with the tokens in the vector lanes), and
carries two paths for prompts computed in float32: fused row ops (RMSNorm, RoPE,
SiLU-multiply: `prompt_ops`; bf16 and quantized models) and, on CPUs with AVX-512, causal attention for
head_dim 64/128 (`prompt_attention`; every model); elsewhere PyTorch's ops and SDPA run instead.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import weakref
from collections.abc import Callable
from pathlib import Path

import torch

from infinichat.errors import InfinichatError

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("decode.c")
CFLAGS = ("-O3", "-std=gnu11", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC")
BLOCK = 32  # decode.c's QB: int4 group and activation block
AVX512 = {"avx512f", "avx512bw", "avx512dq", "avx512vl"}  # the prompt attention's (and decode.c's int4, int8 KV)
VNNI = AVX512 | {"avx512_vnni"}  # the int8 multi-token product's tokens-in-lanes kernel

_state: dict[str, object] = {}


@functools.lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def _compiler() -> str | None:
    for cc in (os.environ.get("CC"), "cc", "gcc"):
        if cc and shutil.which(cc):
            return cc
    return None


def _build(cc: str) -> Path:
    src = SOURCE.read_bytes()
    key = hashlib.sha256(src + " ".join((cc, *CFLAGS)).encode()).hexdigest()[:16]
    from infinichat.model.loader import default_cache_dir  # here: loader imports the model, which imports us

    out_dir = default_cache_dir() / "native"
    out = out_dir / f"decode-{key}.so"
    if out.exists():
        return out
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".so.tmp")
    os.close(fd)
    try:
        proc = subprocess.run([cc, *CFLAGS, "-o", tmp, str(SOURCE), "-lm"], capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} failed: {proc.stderr.strip()[-2000:]}")
        os.replace(tmp, out)  # atomic: concurrent first uses each build, one file wins
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def library() -> ctypes.CDLL | None:
    """The loaded library, or None (the reason is in `status()`); built and loaded once per process."""
    if "lib" in _state:
        return _state["lib"]  # type: ignore[return-value]
    lib, why = None, "available"
    if os.environ.get("INFINICHAT_NATIVE", "1") == "0":
        why = "disabled by INFINICHAT_NATIVE=0"
    elif platform.machine().lower() not in ("x86_64", "amd64") or not {"avx2", "fma"} <= _cpu_flags():
        why = "needs an x86-64 CPU with AVX2 and FMA"
    elif (cc := _compiler()) is None:
        why = "no C compiler found (set CC, or install gcc)"
    else:
        try:
            lib = ctypes.CDLL(str(_build(cc)))
            _declare(lib)
            check_abi(lib)
        except (OSError, RuntimeError, AttributeError, subprocess.SubprocessError) as e:
            lib, why = None, f"build failed: {e}"
            log.warning("native decode unavailable, using the PyTorch path: %s", e)
    _state["lib"], _state["why"] = lib, why
    return lib


def status() -> str:
    library()
    return str(_state["why"])


# ---------------------------------------------------------------------------------------------- ABI
class _Mat(ctypes.Structure):
    _fields_ = [
        ("kind", ctypes.c_int32),
        ("n", ctypes.c_int32),
        ("k", ctypes.c_int32),
        ("q", ctypes.c_void_p),
        ("s", ctypes.c_void_p),
        ("bias", ctypes.c_void_p),
    ]


class _Layer(ctypes.Structure):
    _fields_ = [
        ("attn_norm", ctypes.c_void_p),
        ("ffn_norm", ctypes.c_void_p),
        ("wqkv", _Mat),
        ("wo", _Mat),
        ("win", _Mat),
        ("wout", _Mat),
    ]


class _Model(ctypes.Structure):
    _fields_ = [
        ("n_layers", ctypes.c_int32),
        ("dim", ctypes.c_int32),
        ("n_heads", ctypes.c_int32),
        ("n_kv", ctypes.c_int32),
        ("head_dim", ctypes.c_int32),
        ("ffn", ctypes.c_int32),
        ("vocab", ctypes.c_int32),
        ("eps", ctypes.c_float),
        ("attn_scale", ctypes.c_float),
        ("embed", ctypes.c_void_p),
        ("final_norm", ctypes.c_void_p),
        ("head", _Mat),
        ("layers", ctypes.POINTER(_Layer)),
    ]


class _KVView(ctypes.Structure):
    _fields_ = [
        ("format", ctypes.c_int32),
        ("flags", ctypes.c_int32),  # KV_HADAMARD: the quantized keys are stored times H
        ("cap", ctypes.c_int64),
        ("k", ctypes.c_void_p),  # void *const * (per layer)
        ("v", ctypes.c_void_p),
        ("ks", ctypes.c_void_p),  # void *const * scales (int8 float32, int4 float16: per layer), else NULL
        ("vs", ctypes.c_void_p),
        ("kz", ctypes.c_void_p),  # int4: float16 zeros per layer, else NULL
        ("vz", ctypes.c_void_p),
        ("rk", ctypes.c_void_p),  # int4: the bf16 residual per layer, else NULL
        ("rv", ctypes.c_void_p),
        ("rcap", ctypes.c_int64),
        ("qlen", ctypes.c_int64),  # int4: quantized slots, set before each call (the store moves it)
        ("vgroup", ctypes.c_int32),
    ]


# The KV store formats (`KVStore.kv_format`) the native step reads directly: decode.c's format code and flags
# for each; a cache of another format (float32, float16) takes the PyTorch path.
KV_HADAMARD = 1
DECODE_KV_FORMATS = {
    "bfloat16": (0, 0),
    "int8": (1, 0),
    "int8h": (1, KV_HADAMARD),
    "int4": (2, 0),
    "int4h": (2, KV_HADAMARD),
}


def _declare(lib: ctypes.CDLL) -> None:
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.ic_rmsnorm_rows.argtypes = [p, p, i64, i32, ctypes.c_float, p, i32]
    lib.ic_rope_rows.argtypes = [p, i64, i64, i32, i32, p, p, i32]
    lib.ic_silu_mul_rows.argtypes = [p, i64, i32, p, i32]
    lib.ic_prompt_attention.argtypes = [p, i64, i64, p, i64, p, i64, i64, i64, i32, i32, i32, ctypes.c_float, p, i32]
    lib.ic_work_size.restype = ctypes.c_size_t
    lib.ic_abi.argtypes = [p]
    lib.ic_abi.restype = i32
    lib.ic_check.argtypes = [ctypes.POINTER(_Model)]
    lib.ic_decode.argtypes = [ctypes.POINTER(_Model), i64, p, p, p, p, i64, i64, p, p, p, i32]
    lib.ic_decode_kv.argtypes = [ctypes.POINTER(_Model), i64, p, p, ctypes.POINTER(_KVView), i64, p, p, p, i32]
    lib.ic_matmul.argtypes = [ctypes.POINTER(_Mat), p, i64, p, i32, i32]
    lib.ic_batch_work_size.argtypes = [ctypes.POINTER(_Model), i32, i32]
    lib.ic_batch_work_size.restype = ctypes.c_size_t
    lib.ic_decode_batch.argtypes = [ctypes.POINTER(_Model), i32, p, p, p, p, p, p, p, p, i32]
    lib.ic_batch_vnni.argtypes = [i32]
    lib.ic_batch_vnni.restype = i32
    lib.ic_kv_avx512.argtypes = [i32]
    lib.ic_kv_avx512.restype = i32


KIND_INT4, KIND_INT8, KIND_INT8_GROUP = 4, 8, 9  # decode.c's Mat kinds
ABI_VERSION = 6  # decode.c's IC_ABI_VERSION: the structures above and the signatures in _declare


def check_abi(lib: ctypes.CDLL) -> None:
    """Refuse (RuntimeError) a library whose ABI version or structure sizes differ from the ctypes side's."""
    sizes = (ctypes.c_int64 * 4)()
    version = lib.ic_abi(sizes)
    want = (ctypes.sizeof(_Mat), ctypes.sizeof(_Layer), ctypes.sizeof(_Model), ctypes.sizeof(_KVView))
    if version != ABI_VERSION or tuple(sizes) != want:
        raise RuntimeError(
            f"ABI mismatch: the library is version {version} with struct sizes {tuple(sizes)} (Mat, Layer, Model, "
            "KVView); "
            f"the Python side expects version {ABI_VERSION} with {want}"
        )


def _kind(w) -> int | None:
    """decode.c's kind for a QuantLinear, or None for anything it does not take (dense tensors included)."""
    from infinichat.model.quant import Int4Linear, Int8GroupLinear, Int8Linear, QuantLinear

    if not isinstance(w, QuantLinear) or w.K % BLOCK:
        return None
    if isinstance(w, Int8Linear):
        return KIND_INT8
    if isinstance(w, Int8GroupLinear) and w.group == BLOCK:
        return KIND_INT8_GROUP
    if isinstance(w, Int4Linear) and w.group == BLOCK:
        return KIND_INT4
    return None


def _mat(w, bias_ptr: int | None = None) -> _Mat:
    """The C view of a QuantLinear `w` (pointers into its own tensors: keep `w` alive while it is used)."""
    kind = _kind(w)
    if kind is None:
        raise ValueError(f"a {type(w).__name__} ({w.N}x{w.K}) is outside the native formats")
    q = w.nibbles if kind == KIND_INT4 else w.q
    s = w.scale if kind == KIND_INT8 else w.scale_zero  # per row, or per group (int4, grouped int8)
    assert s.dtype == torch.bfloat16 and q.is_contiguous() and s.is_contiguous()
    return _Mat(kind=kind, n=w.N, k=w.K, q=q.data_ptr(), s=s.data_ptr(), bias=bias_ptr)


# ---------------------------------------------------------------------------------------------- multi-token products
class Matmul:
    """x (T, K) -> x W^T (T, N) float32 for one quantized weight (decode.c's ic_matmul: int8 weights against
    int16 activations per block of 32, int4 weights with the decode step's row products)."""

    def __init__(self, lib: ctypes.CDLL, w, vnni: bool | None = None):
        """`vnni`: use the AVX-512 VNNI kernel for int8 (default: where the CPU has it)."""
        self.lib, self.n, self.k = lib, w.N, w.K
        self.vnni = int(_cpu_flags() >= VNNI if vnni is None else vnni)
        self.mat = _mat(w)  # points into w's tensors: w owns this object
        self.mref = ctypes.byref(self.mat)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        T, K = x.shape
        if self.k != K:
            raise ValueError(f"input of {K} features for a {self.n}x{self.k} weight")
        x = x.to(torch.float32).contiguous()
        y = torch.empty(T, self.n, dtype=torch.float32)
        rc = self.lib.ic_matmul(self.mref, x.data_ptr(), T, y.data_ptr(), torch.get_num_threads(), self.vnni)
        if rc == 2:
            raise MemoryError(f"native product of {T} rows: out of memory")
        if rc:
            raise ValueError("native product refused")
        return y


def matmul_for(w) -> Matmul | None:
    """A native product for QuantLinear `w`, or None (no library, or a format it does not take)."""
    lib = library()
    if lib is None or _kind(w) is None:
        return None
    return Matmul(lib, w)


# ---------------------------------------------------------------------------------------------- prompt row ops
class PromptOps:
    """Fused row-wise ops for float32 prompts (decode.c's prompt row ops). The caller passes float32 tensors
    with contiguous rows."""

    def __init__(self, lib: ctypes.CDLL):
        self.lib = lib

    def rmsnorm(self, x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
        """x (T, D), w (D,) float32 -> x / sqrt(mean(x^2) + eps) * w."""
        out = torch.empty_like(x)
        self.lib.ic_rmsnorm_rows(
            x.data_ptr(), w.data_ptr(), x.shape[0], x.shape[1], eps, out.data_ptr(), torch.get_num_threads()
        )
        return out

    def rope_(self, x: torch.Tensor, heads: int, hd: int, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """In place: the first `heads` heads of each row of x (T, ld), half-split RoPE, cos/sin (T, hd)."""
        self.lib.ic_rope_rows(
            x.data_ptr(), x.shape[0], x.stride(0), heads, hd, cos.data_ptr(), sin.data_ptr(), torch.get_num_threads()
        )

    def silu_mul(self, h: torch.Tensor) -> torch.Tensor:
        """h (T, 2F) -> silu(h[:, :F]) * h[:, F:], (T, F)."""
        T, F2 = h.shape
        out = torch.empty(T, F2 // 2, dtype=h.dtype)
        self.lib.ic_silu_mul_rows(h.data_ptr(), T, F2 // 2, out.data_ptr(), torch.get_num_threads())
        return out


def prompt_ops() -> PromptOps | None:
    lib = library()
    return None if lib is None else PromptOps(lib)


# ---------------------------------------------------------------------------------------------- prompt attention
PROMPT_HEAD_DIMS = (64, 128)


class PromptAttention:
    """Causal attention of a float32 prompt chunk over the cache (decode.c's ic_prompt_attention, AVX-512)."""

    def __init__(self, lib: ctypes.CDLL):
        self.lib = lib

    def takes(self, q: torch.Tensor, n_kv: int) -> bool:
        H, _T, hd = q.shape
        return q.dtype == torch.float32 and hd in PROMPT_HEAD_DIMS and H % n_kv == 0 and H // n_kv <= 16

    def __call__(
        self, q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, start: int, scale: float
    ) -> torch.Tensor:
        """q (H, T, hd) float32 for slots [start, start+T), whose K/V are already in k_buf/v_buf (Hkv, C, hd);
        row i attends slots [0, start+i]. -> (T, H, hd) float32."""
        H, T, hd = q.shape
        Hkv, S = k_buf.shape[0], start + T
        if q.stride(-1) != 1:
            q = q.contiguous()
        ldk = -(-S // 16) * 16
        kt = torch.empty(Hkv, hd, ldk, dtype=torch.float32)
        kt[:, :, :S] = k_buf[:, :S].transpose(1, 2)  # keys transposed and widened, once per call
        if v_buf.dtype == torch.float32 and v_buf.is_contiguous():
            vf, ldv = v_buf, v_buf.shape[1]
        else:
            vf, ldv = v_buf[:, :S].float().contiguous(), S
        out = torch.empty(T, H, hd, dtype=torch.float32)
        rc = self.lib.ic_prompt_attention(
            q.data_ptr(),
            q.stride(0),
            q.stride(1),
            kt.data_ptr(),
            ldk,
            vf.data_ptr(),
            ldv,
            start,
            T,
            H,
            Hkv,
            hd,
            scale,
            out.data_ptr(),
            torch.get_num_threads(),
        )
        if rc:
            raise ValueError(f"prompt attention refused shape q {tuple(q.shape)}, kv {tuple(k_buf.shape)}")
        return out


def prompt_attention() -> PromptAttention | None:
    """The native prompt attention where the library builds and the CPU has AVX-512, else None (SDPA)."""
    lib = library()
    if lib is None or not _cpu_flags() >= AVX512:
        return None
    return PromptAttention(lib)


# ---------------------------------------------------------------------------------------------- the decoder
# The architecture features (model/arch.py `features`) the C step implements: RMSNorm, gated SiLU MLP, full-width
# half-split RoPE (any frequency scaling: the caller passes cos/sin), biases on any projection, a tied head.
DECODE_FEATURES = frozenset(
    {"norm:rms", "act:silu", "rope:none", "rope:linear", "rope:dynamic", "rope:llama3"}
    | {"qkv_bias", "out_bias", "mlp_bias", "tied_head"}
)


def unsupported(model) -> str | None:
    """Why `model` (a Transformer) cannot take the native step, or None if it can: its architecture features
    against DECODE_FEATURES, then its weight formats."""
    from infinichat.model.arch import features
    from infinichat.model.quant import Int8Linear

    if model.quant == "none":
        return "dense weights (the native step is for --quant int8/int4)"
    missing = features(model.cfg) - DECODE_FEATURES
    if missing:
        return f"architecture features the native step does not implement: {', '.join(sorted(missing))}"
    if model.device.type != "cpu":
        return f"weights on {model.device}"
    if model.embed.dtype != torch.bfloat16 or not isinstance(model.lm_head, Int8Linear):
        return "the head is not int8 over a bfloat16 embedding"
    mats = [model.lm_head] + [L[n + ".weight"] for L in model.layers for n in ("wqkv", "wo", "w_in", "w_out")]
    for m in mats:
        if _kind(m) is None:
            return f"a {type(m).__name__} outside the native formats"
    return None


class NativeDecoder:
    """The native step for one Transformer: holds the C view of its weights (pointers into its tensors)."""

    def __init__(self, model, lib: ctypes.CDLL, f32_weight: Callable[[torch.Tensor], torch.Tensor]):
        """`f32_weight(t)`: the kernel set's float32 copy of a norm weight or bias (kept alive by it)."""
        self.lib = lib
        self.model = model
        cfg = model.cfg
        self._keep: list[torch.Tensor] = []  # tensors the C side points into (norms, biases: f32_weight's)
        layers = (_Layer * cfg.n_layers)()
        for i, L in enumerate(model.layers):
            layers[i].attn_norm = f32_weight(L["attn_norm.weight"]).data_ptr()
            layers[i].ffn_norm = f32_weight(L["ffn_norm.weight"]).data_ptr()
            for field, name in (("wqkv", "wqkv"), ("wo", "wo"), ("win", "w_in"), ("wout", "w_out")):
                bias = None if (b := L.get(name + ".bias")) is None else f32_weight(b).data_ptr()
                setattr(layers[i], field, _mat(L[name + ".weight"], bias))
        self.layers = layers
        self.m = _Model(
            n_layers=cfg.n_layers,
            dim=cfg.dim,
            n_heads=cfg.n_heads,
            n_kv=cfg.n_kv_heads,
            head_dim=cfg.head_dim,
            ffn=cfg.ffn_dim,
            vocab=model.embed.shape[0],
            eps=cfg.norm_eps,
            attn_scale=model.scale,
            embed=self._ptr(model.embed),
            final_norm=f32_weight(model.norm[0]).data_ptr(),
            head=_mat(model.lm_head),
            layers=ctypes.cast(layers, ctypes.POINTER(_Layer)),
        )
        self.mref = ctypes.byref(self.m)
        code = lib.ic_check(self.mref)
        if code:
            raise ValueError(f"model shape outside the native step's limits (code {code})")
        self.work = torch.empty(lib.ic_work_size(), dtype=torch.uint8)  # the step's scratch: one step at a time
        self._batch_work = torch.empty(0, dtype=torch.uint8)  # the batched step's, grown to the largest batch
        self._lock = threading.Lock()
        self._bindings: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # cache -> bind(cache)
        self.vocab = model.lm_head.N

    def _ptr(self, t: torch.Tensor) -> int:
        t = t.contiguous()
        self._keep.append(t)
        return t.data_ptr()

    def bind(self, cache) -> _KVView | None:
        """The C view of a cache (a KV store whose `kv_format` is in DECODE_KV_FORMATS: per layer bf16 (Hkv,
        capacity, hd) buffers; int8 codes with (Hkv, capacity) float32 scales; int4 packed groups with float16
        scales and zeros plus the bf16 residual), or None if the step cannot read it. Worked out once per cache
        object and buffers (a growing KV store replaces its buffers, an int4 one also when it quantizes a prompt:
        the binding is redone when they move); int4's quantized length is set per call (`decode`)."""
        fmt = getattr(cache, "kv_format", None)
        if fmt not in DECODE_KV_FORMATS:
            return None
        key = tuple((t.data_ptr(), tuple(t.shape)) for t in self._moving(cache, fmt))
        try:
            binding, old = self._bindings[cache]
            if old == key:  # not moved (a store that grew moves)
                return binding
        except (KeyError, TypeError):  # TypeError: a cache object that takes no weak reference
            pass
        binding = None
        bufs = self._buffers(cache, fmt)
        if self._fits(cache, bufs, fmt):
            n = self.model.cfg.n_layers
            arrays = [(ctypes.c_void_p * n)(*[t.data_ptr() for t in group]) for group in bufs]
            ptrs = [ctypes.cast(a, ctypes.c_void_p) if len(a) else None for a in arrays]
            code, flags = DECODE_KV_FORMATS[fmt]
            int4 = fmt.startswith("int4")
            binding = _KVView(
                format=code,
                flags=flags,
                cap=bufs[0][0].shape[1],
                k=ptrs[0],
                v=ptrs[1],
                ks=ptrs[2],
                vs=ptrs[3],
                kz=ptrs[4],
                vz=ptrs[5],
                rk=ptrs[6],
                rv=ptrs[7],
                rcap=bufs[6][0].shape[1] if int4 else 0,
                qlen=cache.qlen if int4 else 0,
                vgroup=cache.v_group if int4 else 0,
            )
            binding._arrays = arrays  # the pointer arrays live with the view
        with contextlib.suppress(TypeError):  # a cache object that takes no weak reference
            self._bindings[cache] = (binding, key)
        return binding

    @staticmethod
    def _moving(cache, fmt: str) -> list[torch.Tensor]:
        """The tensors whose moving (reallocation) invalidates a binding."""
        if fmt.startswith("int4"):
            return [getattr(cache, n) for n in ("kq", "vq", "ks", "vs", "kz", "vz", "rk", "rv")]
        return [cache.kq, cache.vq, cache.ks, cache.vs] if fmt.startswith("int8") else [cache.k[0]]

    @staticmethod
    def _buffers(cache, fmt: str) -> tuple[list[torch.Tensor], ...]:
        """Per layer (keys, values, key scales, value scales, key zeros, value zeros, residual keys, residual
        values) of a cache in format `fmt` (empty lists where the format has none)."""
        if fmt.startswith("int4"):
            names = ("kq", "vq", "ks", "vs", "kz", "vz", "rk", "rv")
            return tuple(list(getattr(cache, n).unbind(0)) for n in names)
        if fmt.startswith("int8"):
            k, v, ks, vs = (list(t.unbind(0)) for t in (cache.kq, cache.vq, cache.ks, cache.vs))
            return k, v, ks, vs, [], [], [], []
        return list(cache.k), list(cache.v), [], [], [], [], [], []

    def _fits(self, cache, bufs: tuple[list[torch.Tensor], ...], fmt: str) -> bool:
        """Whether the buffers have the shapes, dtypes and layout decode.c reads (see its KVView and Rows)."""
        cfg = self.model.cfg
        L, H, hd = cfg.n_layers, cfg.n_kv_heads, cfg.head_dim
        if any(len(group) not in (0, L) for group in bufs) or not bufs[0]:
            return False
        if not all(t.device.type == "cpu" and t.is_contiguous() for group in bufs for t in group):
            return False
        k = bufs[0][0]
        A = k.shape[1] if k.dim() == 3 else -1

        def shaped(i: int, dtype: torch.dtype, shape: tuple[int, ...]) -> bool:
            return len(bufs[i]) == L and all(t.dtype == dtype and tuple(t.shape) == shape for t in bufs[i])

        if fmt.startswith("int4"):
            R, vg = bufs[6][0].shape[1], cache.v_group
            return (
                A % 32 == 0
                and hd % vg == 0
                and vg % 16 == 0
                and all(shaped(i, torch.uint8, (H, A, hd // 2)) for i in (0, 1))
                and all(shaped(i, torch.float16, (H, A // 32, hd)) for i in (2, 4))
                and all(shaped(i, torch.float16, (H, A, hd // vg)) for i in (3, 5))
                and all(shaped(i, torch.bfloat16, (H, R, hd)) for i in (6, 7))
            )
        dtype = torch.int8 if fmt.startswith("int8") else torch.bfloat16
        if not all(shaped(i, dtype, (H, A, hd)) for i in (0, 1)):
            return False
        return not fmt.startswith("int8") or all(shaped(i, torch.float32, (H, A)) for i in (2, 3))

    def decode(
        self, token: int, position: torch.Tensor, cache, start: int, logits: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One token at slot `start` of `cache` (its K/V written there; `bind(cache)` must not be None) -> final
        hidden state (D,) float32 and, if asked, the head's logits (V,) float32 (not yet re-scored)."""
        binding = self.bind(cache)
        if binding is None:
            raise InfinichatError("the native decode step cannot read this cache (check bind(cache) first)")
        cap = binding.cap
        self._set_qlen(binding, cache)
        cos, sin = self.model.rope.cos_sin(position, torch.float32)  # (1, hd) each
        cos, sin = cos.contiguous(), sin.contiguous()
        x = torch.empty(self.model.cfg.dim, dtype=torch.float32)
        out = torch.empty(self.vocab, dtype=torch.float32) if logits else None
        with self._lock:  # threads sharing a model (several engines over one) take turns on the scratch
            rc = self.lib.ic_decode_kv(
                self.mref,
                token,
                cos.data_ptr(),
                sin.data_ptr(),
                ctypes.byref(binding),
                start,
                x.data_ptr(),
                None if out is None else out.data_ptr(),
                self.work.data_ptr(),
                torch.get_num_threads(),
            )
        if rc:
            raise ValueError(f"native decode refused token {token} at slot {start} (capacity {cap})")
        return x, out

    @staticmethod
    def _set_qlen(binding: _KVView, cache) -> None:
        if binding.format == DECODE_KV_FORMATS["int4"][0]:
            binding.qlen = cache.qlen  # moves as the store quantizes whole key groups

    def batchable(self, cache) -> bool:
        """Whether the batched step reads this cache (every format `bind` takes)."""
        return self.bind(cache) is not None

    def decode_batch(
        self, tokens: list[int], positions: list[torch.Tensor], caches: list, starts: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """B tokens, one per cache (all different caches; `bind(cache)` not None for each), token b at slot
        starts[b] of caches[b] and RoPE position positions[b] (1,), in one call that reads the weights once
        (decode.c's ic_decode_batch): -> final hidden states (B, D) and logits (B, V), float32, not yet
        re-scored. Row b equals `decode` of that token alone with the same thread count, bit for bit."""
        B = len(tokens)
        if not all(self.batchable(c) for c in caches):
            raise InfinichatError("the native batched step cannot read one of these caches (check batchable first)")
        views: list[_KVView] = []
        for c in caches:
            view = self.bind(c)
            assert view is not None  # batchable above
            self._set_qlen(view, c)
            views.append(view)
        # a copy of each view (its pointer arrays stay alive with the bindings in `views`)
        packed = (_KVView * B)(*views)
        cos, sin = self.model.rope.cos_sin(torch.cat(positions), torch.float32)  # (B, hd) each
        cos, sin = cos.contiguous(), sin.contiguous()
        toks = torch.tensor(tokens, dtype=torch.int64)
        st = torch.tensor(starts, dtype=torch.int64)
        x = torch.empty(B, self.model.cfg.dim, dtype=torch.float32)
        out = torch.empty(B, self.vocab, dtype=torch.float32)
        threads = torch.get_num_threads()
        with self._lock:
            size = self.lib.ic_batch_work_size(self.mref, B, threads)
            if self._batch_work.numel() < size:
                self._batch_work = torch.empty(size, dtype=torch.uint8)
            rc = self.lib.ic_decode_batch(
                self.mref,
                B,
                toks.data_ptr(),
                cos.data_ptr(),
                sin.data_ptr(),
                ctypes.cast(packed, ctypes.c_void_p),
                st.data_ptr(),
                x.data_ptr(),
                out.data_ptr(),
                self._batch_work.data_ptr(),
                threads,
            )
        if rc:
            raise ValueError(f"native batched decode refused tokens {tokens} at slots {starts} (code {rc})")
        return x, out


def decoder_for(model, f32_weight: Callable[[torch.Tensor], torch.Tensor]) -> NativeDecoder | None:
    """A NativeDecoder for `model`, or None (PyTorch path) with the reason logged at debug level."""
    why = unsupported(model)
    lib = None if why else library()
    if lib is None:
        log.debug("native decode not used: %s", why or status())
        return None
    try:
        return NativeDecoder(model, lib, f32_weight)
    except ValueError as e:
        log.debug("native decode not used: %s", e)
        return None
