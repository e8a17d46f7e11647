"""Quantized KV stores: int8 (per token and head) and int4 (KIVI's recipe), behind `KVStore`'s interface.

- `int8`: each key and value row (one token, one KV head: hd values) is stored as int8 codes with one float32
  scale, x ~ q * s, s = max|x| / 127 (symmetric). 1.06 bytes per value at hd 64 against bf16's 2.
- `int4` (KIVI, Liu et al. 2024, https://arxiv.org/abs/2402.02750): keys are quantized per channel over groups
  of K_GROUP consecutive tokens (key outliers sit in fixed channels), values per token over groups of
  V_GROUP channels; both asymmetric (x ~ q * s + z, q in 0..15, s and z float16). The most recent tokens stay
  in full precision (the residual: between RESIDUAL and RESIDUAL + K_GROUP - 1 of them) until a whole group
  of keys can be quantized together. 0.63 bytes per value at hd 64.
- `int8h` / `int4h`: the same, with the keys multiplied by the orthonormal Hadamard matrix H over head_dim
  before they are quantized (as llama.cpp does for quantized KV since 2025, QuaRot's idea): an outlier channel
  is spread over all channels, so a row's range (int8's scale) shrinks. H is symmetric and its own inverse, so
  the store multiplies dequantized keys by H again (`layer_kv`, edits), and the native step multiplies the query
  by H instead (q H . k H = q . k). int4's residual holds plain keys; only what is quantized is rotated.

The forward asks `layer_kv(li, start, k, v)` for a layer's K/V (model/transformer.py): the store writes the new
rows (quantizing them, or into the residual) and hands back the layer's slots [0, start+T) dequantized to the
rows' dtype, so attention has one path. The native decode step reads the int8 codes directly (native/).

Edits keep the slot semantics of `KVStore` (kv/store.py): a removal gathers the kept slots, re-rotates their
keys in float32 and quantizes them again (for int4, from the key group holding the first changed slot on: its
group boundaries move with the slots); a truncation into quantized int4 groups returns them to the residual.
Requantizing rotated keys adds a rounding error per re-rotation (tests/test_kv_quantized.py bounds it).
Snapshots hold the codes and scales as they are (format "int8", "int4", "int8h" or "int4h": the format names
whether the keys are rotated, and a snapshot restores only into a store of its own format); forks copy them.
With Hadamard keys, a removal dequantizes and rotates the keys back (H H = I), re-rotates RoPE in float32, and
multiplies by H again before quantizing: the same steps as without, one more exact orthonormal product each way.
"""

from __future__ import annotations

import math

import torch

from infinichat.errors import InfinichatError
from infinichat.kv.store import KVStore, grown_size

KV_DTYPES = ("auto", "bf16", "f16", "f32", "int8", "int4", "int8h", "int4h")  # --kv-dtype: auto = the model's dtype
QUANT_KV_DTYPES = ("int8", "int4", "int8h", "int4h")  # h: Hadamard-rotated keys
DENSE_KV_DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}
K_GROUP = 32  # int4 keys: tokens per quantization group (per channel)
V_GROUP = 32  # int4 values: channels per quantization group (per token)
RESIDUAL = 64  # int4: the most recent tokens kept in full precision (at least this many, fewer than +K_GROUP)


def check_kv_dtype(name: str) -> str:
    if name not in KV_DTYPES:
        raise InfinichatError(f"unknown KV dtype {name!r}; accepted: {', '.join(KV_DTYPES)}")
    return name


def make_store(kv_dtype: str, cfg, capacity: int, dtype: torch.dtype, rope=None, device=None) -> KVStore:
    """A store for --kv-dtype `kv_dtype` (auto: dense in `dtype`, the model's). Quantized stores keep their
    full-precision rows (int4's residual) in `dtype`."""
    check_kv_dtype(kv_dtype)
    kinds = {"int8": Int8KVStore, "int4": Int4KVStore, "int8h": Int8HKVStore, "int4h": Int4HKVStore}
    if kv_dtype in kinds:
        return kinds[kv_dtype](cfg, capacity, dtype, rope, device)
    return KVStore(cfg, capacity, DENSE_KV_DTYPES.get(kv_dtype, dtype), rope=rope, device=device)


def bytes_per_token(cfg, kv_format: str) -> float:
    """Bytes one cached token takes in a store of `kv_format` (a dtype name, int8 or int4, int8h or int4h; int4
    without its full-precision residual rows)."""
    kv = cfg.n_layers * cfg.n_kv_heads  # (layer, KV head) rows of keys and of values
    kv_format = {"int8h": "int8", "int4h": "int4"}.get(kv_format, kv_format)  # the rotation costs no bytes
    hd = cfg.head_dim
    if kv_format == "int8":
        return 2 * kv * (hd + 4)  # codes + a float32 scale, keys and values
    if kv_format == "int4":
        v_group = V_GROUP if hd % V_GROUP == 0 else hd
        return kv * (hd / 2 + 4 * hd / K_GROUP) + kv * (hd / 2 + 4 * hd / v_group)
    size = torch.empty((), dtype=getattr(torch, kv_format.removeprefix("torch."))).element_size()
    return 2 * kv * hd * size


def convert_store(store: KVStore, kv_dtype: str) -> KVStore:
    """A copy of `store` (same capacity, slots, tokens and positions) holding its K/V in `kv_dtype`: dequantized
    to float32, then stored in the new format (quantized again for int8 / int4)."""
    other = make_store(kv_dtype, store.cfg, store.capacity, store.dtype, store.rope, store.device)
    if store.pinned and type(other) is KVStore:  # a dense copy of an offloading store stays page-locked
        other.pin_host_memory()
    n = store.length
    k, v = store._dense_from(0)  # (L, Hkv, n, hd) float32
    other.reserve(n)
    other._load_slots(store.tokens[:n], store.positions[:n])
    other._rewrite(0, k, v)
    return other


# ---------------------------------------------------------------------------------------------- Hadamard
def hadamard(x: torch.Tensor) -> torch.Tensor:
    """x (..., n) float32, n a power of 2 -> x H (..., n), H the orthonormal Hadamard matrix of Sylvester's order
    (symmetric, H H = I): butterflies of stride 1, 2, 4, ... then 1/sqrt(n), the operations native/decode.c's
    `hadamard` does, in the same order."""
    *lead, n = x.shape
    h = 1
    while h < n:
        y = x.reshape(*lead, n // (2 * h), 2, h)  # pairs (j, j + h) in blocks of 2h
        x = torch.stack((y[..., 0, :] + y[..., 1, :], y[..., 0, :] - y[..., 1, :]), dim=-2)
        h *= 2
    return x.reshape(*lead, n) * (1.0 / math.sqrt(n))


def check_hadamard(head_dim: int) -> None:
    if head_dim < 1 or head_dim & (head_dim - 1):
        raise InfinichatError(
            f"--kv-dtype int8h/int4h rotate keys by a Hadamard matrix of size head_dim, a power of 2; this model's "
            f"head_dim is {head_dim} (use int8 or int4)"
        )


# ---------------------------------------------------------------------------------------------- int8 codes
def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., hd) -> codes (..., hd) int8 and scales (...) float32 with x ~ q * s, per row (the native step
    computes the same: 127 / max|x| as the multiplier, round half to even)."""
    xf = x.float()
    amax = xf.abs().amax(-1)  # (...)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    return torch.round(xf * inv.unsqueeze(-1)).to(torch.int8), amax / 127.0


def dequantize_int8(q: torch.Tensor, s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """codes (..., hd), scales (...) -> (..., hd) in `dtype`."""
    return (q.float() * s.unsqueeze(-1)).to(dtype)


# ---------------------------------------------------------------------------------------------- int4 codes
def _quantize_int4(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit codes of x (float32) over dimension `dim` -> codes (uint8 0..15, x's shape), scale and
    zero (float16, `dim` kept as size 1): x ~ q * s + z."""
    lo, hi = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    z = lo.half()
    s = ((hi - z.float()) / 15.0).half()
    sf = s.float()
    inv = torch.where(sf > 0, 1.0 / sf, torch.zeros_like(sf))
    q = torch.round((x - z.float()) * inv).clamp_(0, 15).to(torch.uint8)
    return q, s, z


def _pack(q: torch.Tensor) -> torch.Tensor:
    """(..., hd) codes 0..15 -> (..., hd/2) bytes: channel 2j in the low nibble, 2j+1 in the high one."""
    return q[..., 0::2] | (q[..., 1::2] << 4)


def _unpack(p: torch.Tensor) -> torch.Tensor:
    """(..., hd/2) bytes -> (..., hd) float32 codes."""
    return torch.stack((p & 15, p >> 4), dim=-1).flatten(-2).float()


def quantize_keys_int4(k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """k (..., n, hd) float32, n a multiple of K_GROUP -> packed (..., n, hd/2), scale and zero
    (..., n/K_GROUP, hd) float16: per channel over each group of K_GROUP tokens."""
    *lead, n, hd = k.shape
    q, s, z = _quantize_int4(k.reshape(*lead, n // K_GROUP, K_GROUP, hd), dim=-2)
    return _pack(q.reshape(*lead, n, hd)), s.squeeze(-2), z.squeeze(-2)


def dequantize_keys_int4(p: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """The inverse of quantize_keys_int4 -> (..., n, hd) float32."""
    q = _unpack(p)  # (..., n, hd)
    *lead, n, hd = q.shape
    q = q.reshape(*lead, n // K_GROUP, K_GROUP, hd)
    return (q * s.float().unsqueeze(-2) + z.float().unsqueeze(-2)).reshape(*lead, n, hd)


def quantize_values_int4(v: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """v (..., n, hd) float32 -> packed (..., n, hd/2), scale and zero (..., n, hd/group) float16: per token over
    groups of `group` channels."""
    *lead, n, hd = v.shape
    q, s, z = _quantize_int4(v.reshape(*lead, n, hd // group, group), dim=-1)
    return _pack(q.reshape(*lead, n, hd)), s.squeeze(-1), z.squeeze(-1)


def dequantize_values_int4(p: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    q = _unpack(p)  # (..., n, hd)
    *lead, n, hd = q.shape
    g = hd // s.shape[-1]
    q = q.reshape(*lead, n, hd // g, g)
    return (q * s.float().unsqueeze(-1) + z.float().unsqueeze(-1)).reshape(*lead, n, hd)


# ---------------------------------------------------------------------------------------------- stores
class QuantKVStore(KVStore):
    """What the quantized stores share: edits through `_dense_from` (the slots from one on, dequantized to
    float32) and `_rewrite` (slots from one on, quantized again). No `k`/`v` buffer lists: what reads the
    K/V goes through `layer_kv`, the snapshot parts or the native binding (native/__init__.py `bind`).
    `hadamard`: keys are stored multiplied by H (the variants int8h / int4h); `_rot` applies H (its own inverse)
    on the way in and out."""

    hadamard = False

    def _allocate(self, n: int) -> None:
        if self.hadamard:
            check_hadamard(self.cfg.head_dim)

    def _rot(self, k: torch.Tensor) -> torch.Tensor:
        """float32 keys (..., hd) into (or back out of) the stored basis."""
        return hadamard(k) if self.hadamard else k

    def _set_buffers(self, k_all: torch.Tensor, v_all: torch.Tensor) -> None:  # pragma: no cover - not used
        raise InfinichatError(f"a {self.kv_format} KV store has no dense buffers")

    @property
    def k_all(self) -> torch.Tensor:  # type: ignore[override]
        raise InfinichatError(
            f"this feature reads dense K/V buffers; the cache holds {self.kv_format} K/V (use --kv-dtype bf16)"
        )

    v_all = k_all
    k = k_all  # type: ignore[assignment]
    v = k_all  # type: ignore[assignment]

    def _dense_from(self, a: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Slots [a, length) as float32 (L, Hkv, n, hd) keys and values."""
        raise NotImplementedError

    def _rewrite(self, a: int, k: torch.Tensor, v: torch.Tensor, settle: bool = True) -> None:
        """Store float32 k, v (L, Hkv, m, hd) as slots [a, a+m); the length is already a + m. `settle` False: the
        slots are stale (about to be recomputed by the forward), so nothing from `a` on may be quantized yet."""
        raise NotImplementedError

    def remove_spans(self, spans, shift: bool = True, rotate: bool = True) -> None:
        from infinichat.kv.store import check_spans

        spans = [(int(s), int(e)) for s, e in spans if e > s]
        check_spans(spans, self._length)
        if not spans:
            return
        k, v = self._dense_from(spans[0][0])  # (L, Hkv, length - first, hd) before the cut
        first, src, delta = self._cut(spans, shift)
        idx = (src - first).to(k.device)
        k, v = k[:, :, idx], v[:, :, idx]  # (L, Hkv, m, hd) kept slots
        if shift and rotate and idx.numel():
            k = self._rotated(k, delta)
        self._rewrite(first, k, v, settle=rotate or not shift)

    def shift(self, start: int, delta: int) -> None:
        if not self._check_shift(start, delta):
            return
        self._shift_positions(start, delta)
        k, v = self._dense_from(start)
        self._rewrite(start, self._rotated(k, torch.full((k.shape[2],), delta, dtype=torch.long)), v)

    def _empty_like(self) -> KVStore:
        return type(self)(self.cfg, self.capacity, self.dtype, self.rope, self.device)


class Int8KVStore(QuantKVStore):
    """int8 codes (L, Hkv, A, hd) and float32 scales (L, Hkv, A) for keys and values."""

    kv_format = "int8"

    def _allocate(self, n: int) -> None:
        super()._allocate(n)
        cfg = self.cfg
        shape = (cfg.n_layers, cfg.n_kv_heads, n, cfg.head_dim)
        dev = self.device
        self.kq = torch.zeros(shape, dtype=torch.int8, device=dev)  # (L, Hkv, A, hd)
        self.vq = torch.zeros(shape, dtype=torch.int8, device=dev)
        self.ks = torch.zeros(shape[:3], dtype=torch.float32, device=dev)  # (L, Hkv, A)
        self.vs = torch.zeros(shape[:3], dtype=torch.float32, device=dev)

    @property
    def allocated(self) -> int:
        return self.kq.shape[2]

    def reserve(self, n: int) -> None:
        have = self.allocated
        if n <= have:
            return
        size = grown_size(have, n, self.capacity)
        old = (self.kq, self.vq, self.ks, self.vs)
        self._allocate(size)
        for new, t in zip((self.kq, self.vq, self.ks, self.vs), old, strict=True):
            new[:, :, :have] = t  # every old slot: a forward may have written past `length`

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.kq, self.vq, self.ks, self.vs))

    def layer_kv(self, li: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        T = k.shape[1]
        end = start + T
        kin = self._rot(k.float()) if self.hadamard else k
        self.kq[li, :, start:end], self.ks[li, :, start:end] = quantize_int8(kin)  # (Hkv, T, hd), (Hkv, T)
        self.vq[li, :, start:end], self.vs[li, :, start:end] = quantize_int8(v)
        if self.hadamard:
            keys = self._rot(dequantize_int8(self.kq[li, :, :end], self.ks[li, :, :end], torch.float32)).to(k.dtype)
        else:
            keys = dequantize_int8(self.kq[li, :, :end], self.ks[li, :, :end], k.dtype)  # (Hkv, end, hd)
        values = dequantize_int8(self.vq[li, :, :end], self.vs[li, :, :end], v.dtype)
        return keys, values

    def truncate(self, n: int) -> None:
        self._check_truncate(n)
        self._set_length(n)

    def _dense_from(self, a: int) -> tuple[torch.Tensor, torch.Tensor]:
        b = self._length
        k = self._rot(dequantize_int8(self.kq[:, :, a:b], self.ks[:, :, a:b], torch.float32))
        return k, dequantize_int8(self.vq[:, :, a:b], self.vs[:, :, a:b], torch.float32)

    def _rewrite(self, a: int, k: torch.Tensor, v: torch.Tensor, settle: bool = True) -> None:
        b = a + k.shape[2]
        self.kq[:, :, a:b], self.ks[:, :, a:b] = quantize_int8(self._rot(k))
        self.vq[:, :, a:b], self.vs[:, :, a:b] = quantize_int8(v)

    def _kv_parts(self, n: int) -> dict[str, torch.Tensor]:
        return {"kq": self.kq[:, :, :n], "ks": self.ks[:, :, :n], "vq": self.vq[:, :, :n], "vs": self.vs[:, :, :n]}

    def _load_kv_parts(self, parts: dict[str, torch.Tensor], n: int) -> None:
        self.reserve(n)
        for name, t in self._kv_parts(n).items():
            t.copy_(parts[name])


class Int4KVStore(QuantKVStore):
    """KIVI int4: slots [0, qlen) quantized (qlen a multiple of K_GROUP), slots [qlen, length) in the residual
    (L, Hkv, R, hd) in the store's dtype. Keys: packed (L, Hkv, A, hd/2) with scale/zero (L, Hkv, A/K_GROUP,
    hd); values: packed (L, Hkv, A, hd/2) with scale/zero (L, Hkv, A, hd/V_GROUP)."""

    kv_format = "int4"
    rk: torch.Tensor  # (L, Hkv, R, hd) residual keys, slots [qlen, length)
    rv: torch.Tensor

    def _allocate(self, n: int) -> None:
        super()._allocate(n)
        cfg = self.cfg
        if cfg.head_dim % 2:
            raise InfinichatError(f"--kv-dtype int4 needs an even head_dim, this model has {cfg.head_dim}")
        self.v_group = V_GROUP if cfg.head_dim % V_GROUP == 0 else cfg.head_dim
        self.qlen = 0
        self._alloc_quant(0)
        self._alloc_residual(max(1, min(n, RESIDUAL + K_GROUP)))

    def _alloc_quant(self, n: int) -> None:
        """Quantized buffers for n slots (a multiple of K_GROUP), keeping the first qlen."""
        cfg, dev = self.cfg, self.device
        L, H, hd = cfg.n_layers, cfg.n_kv_heads, cfg.head_dim
        new = {
            "kq": torch.zeros(L, H, n, hd // 2, dtype=torch.uint8, device=dev),
            "ks": torch.zeros(L, H, n // K_GROUP, hd, dtype=torch.float16, device=dev),
            "kz": torch.zeros(L, H, n // K_GROUP, hd, dtype=torch.float16, device=dev),
            "vq": torch.zeros(L, H, n, hd // 2, dtype=torch.uint8, device=dev),
            "vs": torch.zeros(L, H, n, hd // self.v_group, dtype=torch.float16, device=dev),
            "vz": torch.zeros(L, H, n, hd // self.v_group, dtype=torch.float16, device=dev),
        }
        if self.qlen:
            for name, t in self._quant_parts(self.qlen).items():
                new[name][:, :, : t.shape[2]] = t
        self.kq, self.ks, self.kz = new["kq"], new["ks"], new["kz"]
        self.vq, self.vs, self.vz = new["vq"], new["vs"], new["vz"]

    def _alloc_residual(self, n: int, keep: int = 0) -> None:
        """A residual for n slots, keeping its first `keep` rows."""
        cfg = self.cfg
        shape = (cfg.n_layers, cfg.n_kv_heads, n, cfg.head_dim)
        rk = torch.zeros(shape, dtype=self.dtype, device=self.device)
        rv = torch.zeros(shape, dtype=self.dtype, device=self.device)
        if keep:
            rk[:, :, :keep], rv[:, :, :keep] = self.rk[:, :, :keep], self.rv[:, :, :keep]
        self.rk, self.rv = rk, rv  # (L, Hkv, R, hd)

    def _quant_parts(self, n: int) -> dict[str, torch.Tensor]:
        g = n // K_GROUP
        return {
            "kq": self.kq[:, :, :n],
            "ks": self.ks[:, :, :g],
            "kz": self.kz[:, :, :g],
            "vq": self.vq[:, :, :n],
            "vs": self.vs[:, :, :n],
            "vz": self.vz[:, :, :n],
        }

    @property
    def allocated(self) -> int:
        return self.qlen + self.rk.shape[2]

    def reserve(self, n: int) -> None:
        need = n - self.qlen  # residual rows
        have = self.rk.shape[2]
        if need <= have:
            return
        self._alloc_residual(grown_size(have, need, self.capacity), keep=have)

    @property
    def nbytes(self) -> int:
        quant = sum(t.nbytes for t in (self.kq, self.ks, self.kz, self.vq, self.vs, self.vz))
        return quant + self.rk.nbytes + self.rv.nbytes

    def layer_kv(self, li: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        T = k.shape[1]
        end, q = start + T, self.qlen
        if start < q:
            raise InfinichatError(f"int4 KV: slot {start} is inside the quantized part [0, {q}); truncate first")
        self.rk[li, :, start - q : end - q] = k  # (Hkv, T, hd)
        self.rv[li, :, start - q : end - q] = v
        if not q:
            return self.rk[li], self.rv[li]  # (Hkv, R, hd): slots [0, end) at the front
        keys = dequantize_keys_int4(self.kq[li, :, :q], self.ks[li, :, : q // K_GROUP], self.kz[li, :, : q // K_GROUP])
        keys = self._rot(keys)  # (Hkv, q, hd) float32
        values = dequantize_values_int4(self.vq[li, :, :q], self.vs[li, :, :q], self.vz[li, :, :q])
        keys = torch.cat((keys.to(k.dtype), self.rk[li, :, : end - q].to(k.dtype)), dim=1)  # (Hkv, end, hd)
        values = torch.cat((values.to(v.dtype), self.rv[li, :, : end - q].to(v.dtype)), dim=1)
        return keys, values

    def append(self, tokens: torch.Tensor, positions: torch.Tensor) -> int:
        start = super().append(tokens, positions)
        self._compress()
        return start

    def _compress(self) -> None:
        """Quantize the residual's oldest whole key groups, keeping at least RESIDUAL rows in full precision."""
        n_res = self._length - self.qlen
        m = (n_res - RESIDUAL) // K_GROUP * K_GROUP
        if m <= 0:
            return
        q = self.qlen
        if self.kq.shape[2] < q + m:
            size = max(K_GROUP, self.kq.shape[2])
            while size < q + m:
                size *= 2
            self._alloc_quant(size)
        k, v = self.rk[:, :, :m].float(), self.rv[:, :, :m].float()  # (L, Hkv, m, hd)
        g0, g1 = q // K_GROUP, (q + m) // K_GROUP
        self.kq[:, :, q : q + m], self.ks[:, :, g0:g1], self.kz[:, :, g0:g1] = quantize_keys_int4(self._rot(k))
        self.vq[:, :, q : q + m], self.vs[:, :, q : q + m], self.vz[:, :, q : q + m] = quantize_values_int4(
            v, self.v_group
        )
        rest = n_res - m
        self.rk[:, :, :rest] = self.rk[:, :, m:n_res].clone()
        self.rv[:, :, :rest] = self.rv[:, :, m:n_res].clone()
        self.qlen = q + m
        if self.rk.shape[2] > RESIDUAL + K_GROUP:  # after a prompt: give the rows back (rest < RESIDUAL + K_GROUP)
            self._alloc_residual(RESIDUAL + K_GROUP, keep=rest)

    def _dense_quant(self, a: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantized slots [a, b) (b <= qlen) as float32 (L, Hkv, b - a, hd)."""
        g0, g1 = a // K_GROUP, -(-b // K_GROUP)
        s0, s1 = g0 * K_GROUP, g1 * K_GROUP
        k = dequantize_keys_int4(self.kq[:, :, s0:s1], self.ks[:, :, g0:g1], self.kz[:, :, g0:g1])
        v = dequantize_values_int4(self.vq[:, :, a:b], self.vs[:, :, a:b], self.vz[:, :, a:b])
        return self._rot(k[:, :, a - s0 : b - s0]), v

    def _dense_from(self, a: int) -> tuple[torch.Tensor, torch.Tensor]:
        q, n = self.qlen, self._length
        ks, vs = [], []
        if a < q:
            k, v = self._dense_quant(a, q)
            ks.append(k)
            vs.append(v)
        r0 = max(a, q) - q
        ks.append(self.rk[:, :, r0 : n - q].float())
        vs.append(self.rv[:, :, r0 : n - q].float())
        return torch.cat(ks, dim=2), torch.cat(vs, dim=2)

    def _unfreeze(self, a: int, tail: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Move the key groups from the one holding slot `a` on back into the residual; the residual then holds
        slots [qlen, a) and, if given, `tail` (float32 (L, Hkv, m, hd)) as slots [a, a+m)."""
        q = self.qlen
        g = min(q, a // K_GROUP * K_GROUP)
        heads_k, heads_v = [], []
        if g < min(a, q):
            k, v = self._dense_quant(g, min(a, q))
            heads_k.append(k.to(self.dtype))
            heads_v.append(v.to(self.dtype))
        if a > q:
            heads_k.append(self.rk[:, :, : a - q])
            heads_v.append(self.rv[:, :, : a - q])
        if tail is not None:
            heads_k.append(tail[0].to(self.dtype))
            heads_v.append(tail[1].to(self.dtype))
        rows = sum(t.shape[2] for t in heads_k)
        cfg = self.cfg
        shape = (cfg.n_layers, cfg.n_kv_heads, max(rows, RESIDUAL + K_GROUP, 1), cfg.head_dim)
        rk = torch.zeros(shape, dtype=self.dtype, device=self.device)
        rv = torch.zeros(shape, dtype=self.dtype, device=self.device)
        if rows:
            rk[:, :, :rows] = torch.cat(heads_k, dim=2)
            rv[:, :, :rows] = torch.cat(heads_v, dim=2)
        self.rk, self.rv, self.qlen = rk, rv, g

    def truncate_is_exact(self, n: int) -> bool:
        return n >= self.qlen  # below, a quantized group is unpacked back into the residual (dequantized)

    def truncate(self, n: int) -> None:
        self._check_truncate(n)
        if n < self.qlen:
            self._unfreeze(n)
        self._set_length(n)

    def _rewrite(self, a: int, k: torch.Tensor, v: torch.Tensor, settle: bool = True) -> None:
        self._unfreeze(a, (k, v))
        if settle:  # else the next append quantizes, once the forward has recomputed the stale slots
            self._compress()

    def _kv_meta(self) -> dict:
        return {"qlen": self.qlen, "k_group": K_GROUP, "v_group": self.v_group}

    def _kv_parts(self, n: int) -> dict[str, torch.Tensor]:
        q = min(self.qlen, n)  # n is the length (a snapshot, a fork): every quantized slot
        return {**self._quant_parts(q), "rk": self.rk[:, :, : n - q], "rv": self.rv[:, :, : n - q]}

    def _check_parts(self, snap) -> None:
        if snap.fmt != self.kv_format:
            raise InfinichatError(f"the KV snapshot holds {snap.fmt} K/V, this cache is {self.kv_format}")
        meta = dict(snap.meta)
        if meta.get("k_group") != K_GROUP or meta.get("v_group") != self.v_group:
            raise InfinichatError(f"the KV snapshot's int4 layout {meta} differs from this cache's")
        qlen = int(meta.get("qlen", -1))
        if qlen < 0 or qlen % K_GROUP or qlen > snap.tokens.shape[0]:
            raise InfinichatError(f"the KV snapshot's int4 layout is damaged (qlen {qlen})")
        snap.meta = self._kv_meta()  # the generic check compares layouts; qlen is the snapshot's own
        try:
            super()._check_parts(snap)
        finally:
            snap.meta = meta

    def _load_kv_parts(self, parts: dict[str, torch.Tensor], n: int) -> None:
        q = parts["kq"].shape[2]
        self.qlen = 0
        self._alloc_quant(-(-max(q, 1) // K_GROUP) * K_GROUP)
        self.qlen = q
        for name, t in self._quant_parts(q).items():
            t.copy_(parts[name])
        self._alloc_residual(max(n - q, RESIDUAL + K_GROUP, 1))
        self.rk[:, :, : n - q] = parts["rk"]
        self.rv[:, :, : n - q] = parts["rv"]


class Int8HKVStore(Int8KVStore):
    """int8 with Hadamard-rotated keys (the codes and scales are of k H)."""

    kv_format = "int8h"
    hadamard = True


class Int4HKVStore(Int4KVStore):
    """int4 KIVI with Hadamard-rotated keys (the quantized groups hold k H; the residual plain keys)."""

    kv_format = "int4h"
    hadamard = True
