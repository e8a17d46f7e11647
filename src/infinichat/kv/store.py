"""The tensor side of a sequence's KV cache: preallocated K/V buffers plus, per slot, token id and position.

Slots [0, length) are in use, compact and in logical order (the forward's causal mask is by slot index);
positions are explicit and strictly increasing. Removing a span compacts the slots after it and, like
llama.cpp's `seq_rm` + `seq_add`, shifts their positions down so they stay contiguous, re-rotating the
cached keys: a key rotated at position p is moved to p - d by the rotation for -d (R(p - d) = R(-d) R(p)).
That identity holds for plain, linear and llama3 RoPE, whose frequencies are fixed. Dynamic-NTK and
LongRoPE frequencies depend on the length, so shifting is refused there unless every position stays below
the (original) trained context, where their frequencies are fixed. Each layer re-rotates with its own
frequencies (Gemma 3's windowed layers use a local base: `Rope.layer_rope`).

No segments here: `segments.SegmentMap` is the bookkeeping, `sequence.KVSequence` ties the two together.
Token ids, positions and their checks live in `slots.SlotTable`, shared with the llama.cpp backend's store.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from infinichat.errors import InfinichatError
from infinichat.kv.slots import SlotTable
from infinichat.model.config import ModelConfig
from infinichat.model.rope import Rope, rotate_half
from infinichat.model.transfer import to_device

MAGIC = b"IKVS"
VERSION = 3  # 2: the header holds the payload's CRC-32; 3: the K/V format and its named parts (quantized KV)
ACCEPTED_VERSIONS = (2, 3)  # version 2 files (dense K/V) still load
INITIAL_SLOTS = 256  # buffers start this long and double as tokens arrive
_SCALING_NAMES = {"dynamic": "dynamic-NTK", "longrope": "LongRoPE"}
_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "int8": torch.int8,
    "uint8": torch.uint8,
}


def pinned_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Zeros in page-locked host memory. With `pin` and `is_pinned`, the only way the store touches pinned memory
    (a CPU-only torch raises for it: tests put stand-ins here)."""
    return torch.zeros(shape, dtype=dtype, pin_memory=True)


def pin(t: torch.Tensor) -> torch.Tensor:
    """A copy of host tensor t in page-locked memory."""
    return t.pin_memory()


def is_pinned(t: torch.Tensor) -> bool:
    return t.is_pinned()


def grown_size(have: int, n: int, capacity: int) -> int:
    """Slots to hold at least n (<= capacity) when `have` are held: double until enough, at most the capacity."""
    size = max(have, 1)
    while size < n:
        size *= 2
    return min(size, capacity)


@dataclass
class Snapshot:
    """A decoded snapshot: the store format's named K/V tensors over the used slots (a dense store's "k", "v"
    (L, Hkv, n, hd); a quantized store's codes and scales: kv/quantized.py), token ids, positions, caller
    extras. `meta`: the format's layout parameters."""

    fmt: str
    meta: dict
    parts: dict[str, torch.Tensor]
    tokens: torch.Tensor
    positions: torch.Tensor
    extra: dict
    n_layers: int = 0
    n_kv_heads: int = 0
    head_dim: int = 0

    @property
    def k(self) -> torch.Tensor:
        return self.parts["k"]

    @property
    def v(self) -> torch.Tensor:
        return self.parts["v"]


class KVStore(SlotTable):
    """K/V buffers (n_layers, Hkv, allocated, hd) with a per-layer view list (`k`, `v`) for the forward. The
    buffers live on `device` (the model's: default the rope's device, else the CPU); token ids and positions
    stay on the CPU.

    `capacity` is how many slots the store may hold; the buffers hold `allocated` of them and grow as tokens
    arrive (doubling, up to the capacity, keeping their dtype and device), so a large budget costs memory
    only once it is used. A growth replaces the buffers: whoever keeps pointers into them (the native
    decode step) must check `k[0].data_ptr()` and the buffer length again."""

    cfg: ModelConfig  # the torch side's full description (RoPE for re-rotation)

    def __init__(
        self,
        cfg: ModelConfig,
        capacity: int,
        dtype: torch.dtype = torch.float32,
        rope: Rope | None = None,
        device: torch.device | str | None = None,
        initial: int = INITIAL_SLOTS,
    ):
        super().__init__(capacity)
        self._pending: list[tuple[int, int, torch.Tensor]] = []  # pinned store: (layer, start, rows) to place
        self.cfg = cfg
        self.dtype = dtype
        self.device = (
            torch.device(device) if device is not None else rope.device if rope is not None else torch.device("cpu")
        )
        self.rope = rope if rope is not None else Rope(cfg, device=self.device)
        self.compute_device = self.rope.device
        self._allocate(min(capacity, max(1, initial)))

    def _allocate(self, n: int) -> None:
        """The empty buffers for `n` slots, at construction."""
        shape = (self.cfg.n_layers, self.cfg.n_kv_heads, n, self.cfg.head_dim)
        self._set_buffers(
            torch.zeros(shape, dtype=self.dtype, device=self.device),
            torch.zeros(shape, dtype=self.dtype, device=self.device),
        )

    @property
    def kv_format(self) -> str:
        """How the K/V are held: the buffers' dtype name (bfloat16, float16, float32), or int8 / int4
        (kv/quantized.py)."""
        return str(self.dtype).removeprefix("torch.")

    pinned = False  # buffers in page-locked host memory (`pin_host_memory`)

    def layer_kv(self, li: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The forward's access to layer `li`: write the new rows k, v (Hkv, T, hd) at slots [start, start+T) and
        return buffers (Hkv, >= start+T, hd) whose slots [0, start+T) hold the layer's keys and values.

        A pinned store fed from a CUDA device is the exception: the rows go into a pinned staging tensor with an
        asynchronous copy (a copy into the buffers' strided rows would wait for the GPU at every layer) and land
        in the buffers at `flush()`, which the engine calls after each forward call. Until then the returned
        buffers lack slots [start, start+T): the offloading paths read those rows from the forward's own K/V."""
        T = k.shape[1]
        kb, vb = self.k[li], self.v[li]  # (Hkv, A, hd)
        if self.pinned and k.device.type == "cuda":
            stage = torch.empty((2, *k.shape), dtype=self.dtype, pin_memory=True)  # (2, Hkv, T, hd), cached by torch
            stage[0].copy_(k, non_blocking=True)
            stage[1].copy_(v, non_blocking=True)
            self._pending.append((li, start, stage))
            return kb, vb
        kb[:, start : start + T] = k
        vb[:, start : start + T] = v
        return kb, vb

    def flush(self) -> None:
        """Land the rows `layer_kv` staged (pinned store, CUDA forward): wait for the copies, place them."""
        if not self._pending:
            return
        torch.cuda.synchronize()
        for li, start, stage in self._pending:
            T = stage.shape[2]
            self.k[li][:, start : start + T].copy_(stage[0])
            self.v[li][:, start : start + T].copy_(stage[1])
        self._pending.clear()

    def pin_host_memory(self) -> None:
        """Hold the buffers at their whole capacity in page-locked host memory, for a model on a CUDA device that
        offloads to this store (kv/offload.py): copies to and from it can then run asynchronously. Growth,
        restores, removals and forks keep them pinned."""
        if self.k_all.device.type != "cpu":
            raise InfinichatError(f"only a host-memory KV store can be pinned; this one is on {self.k_all.device}")
        self.pinned = True
        self.reserve(self.capacity)
        self._set_buffers(self.k_all, self.v_all)

    def _set_buffers(self, k_all: torch.Tensor, v_all: torch.Tensor) -> None:
        if self.pinned and not is_pinned(k_all):
            k_all, v_all = pin(k_all), pin(v_all)
        self.k_all = k_all  # (L, Hkv, A, hd)
        self.v_all = v_all  # (L, Hkv, A, hd)
        self.k = list(self.k_all.unbind(0))  # L x (Hkv, A, hd) views
        self.v = list(self.v_all.unbind(0))

    @property
    def allocated(self) -> int:
        """Slots the buffers hold now (<= capacity)."""
        return self.k_all.shape[2]

    def reserve(self, n: int) -> None:
        """Make the buffers hold at least n slots (n <= capacity): double until they do, copying the old ones."""
        have = self.allocated
        if n <= have:
            return
        size = grown_size(have, n, self.capacity)
        L, H, _, hd = self.k_all.shape
        if self.pinned:  # straight into page-locked memory: no second copy of the buffers on the way
            k, v = pinned_zeros((L, H, size, hd), self.k_all.dtype), pinned_zeros((L, H, size, hd), self.v_all.dtype)
        else:
            k, v = self.k_all.new_zeros((L, H, size, hd)), self.v_all.new_zeros((L, H, size, hd))
        k[:, :, :have] = self.k_all  # every old slot: a forward may have written past `length` (not yet appended)
        v[:, :, :have] = self.v_all
        self._set_buffers(k, v)

    def next_positions(self, n: int) -> torch.Tensor:
        positions = super().next_positions(n)  # checks the capacity
        self.reserve(self._length + n)
        return positions

    @property
    def nbytes(self) -> int:
        return self.k_all.nbytes + self.v_all.nbytes

    def truncate(self, n: int) -> None:
        """Drop every slot from n on."""
        self._check_truncate(n)
        self._set_length(n)

    # ------------------------------------------------------------------ remove / shift
    def remove(self, start: int, end: int, shift: bool = True) -> None:
        """Cut slots [start, end) out and compact; with `shift`, later positions move down to stay contiguous."""
        self.remove_spans([(start, end)], shift=shift)

    def remove_spans(self, spans: Sequence[tuple[int, int]], shift: bool = True, rotate: bool = True) -> None:
        """Cut out sorted, disjoint slot spans at once (one compaction). With `shift`, each kept slot after a
        span moves down by that span's positional length (the next kept position takes the first removed
        one's place) and its keys are re-rotated, unless `rotate` is False (their K/V are about to be
        recomputed anyway)."""
        spans = [(int(s), int(e)) for s, e in spans if e > s]
        check_spans(spans, self._length)
        if not spans:
            return
        first, src, delta = self._cut(spans, shift)
        m = src.shape[0]
        src = to_device(src, self.device)
        self.k_all[:, :, first : first + m] = self.k_all[:, :, src]  # (L, Hkv, m, hd); the gather copies first
        self.v_all[:, :, first : first + m] = self.v_all[:, :, src]
        if shift and rotate and m:
            self._rerotate(first, first + m, delta)

    def shift(self, start: int, delta: int) -> None:
        """Move the positions of slots [start, length) by `delta` (llama.cpp's `seq_add`), re-rotating keys.
        Positions must stay strictly increasing, >= 0 and below the capacity."""
        if not self._check_shift(start, delta):
            return
        self._shift_positions(start, delta)
        L = self._length
        self._rerotate(start, L, torch.full((L - start,), delta, dtype=torch.long))

    def _dense_from(self, a: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Slots [a, length) as float32 (L, Hkv, n, hd) keys and values."""
        n = self._length
        return self.k_all[:, :, a:n].float(), self.v_all[:, :, a:n].float()

    def _rewrite(self, a: int, k: torch.Tensor, v: torch.Tensor, settle: bool = True) -> None:
        """Store k, v (L, Hkv, m, hd) as slots [a, a+m) (the slot table already says so)."""
        self.reserve(a + k.shape[2])
        self.k_all[:, :, a : a + k.shape[2]] = k
        self.v_all[:, :, a : a + v.shape[2]] = v

    def _rerotate(self, start: int, end: int, delta: torch.Tensor) -> None:
        """Rotate the cached keys of slots [start, end) by per-slot position deltas (n,)."""
        k = self.k_all[:, :, start:end]  # (L, Hkv, n, hd) view
        k.copy_(self._rotated(k.float(), delta))

    def _rotated(self, k: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """Keys k (L, Hkv, n, hd) float32 rotated by per-slot position deltas (n,) (their rotary part), each layer
        with its own frequencies (Gemma 3's windowed layers rotate with a local base)."""
        cfg = self.cfg
        rs = cfg.rope_scaling
        limit = {"dynamic": cfg.max_position, "longrope": rs.original_max_position}.get(rs.kind)
        if limit is not None and self.capacity > limit:
            raise InfinichatError(
                f"cannot shift positions with {_SCALING_NAMES[rs.kind]} RoPE scaling beyond the trained context: its "
                f"frequencies depend on the length; use a capacity <= {limit} or the full policy"
            )
        groups: dict[int, list[int]] = {}  # id(rope) -> its layers
        ropes = {}
        for i in range(cfg.n_layers):
            r = self.rope.layer_rope(i)
            groups.setdefault(id(r), []).append(i)
            ropes[id(r)] = r
        out = k.clone()
        for key, layers in groups.items():
            angles = delta.double()[:, None] * ropes[key].inv_freq.double()[None, :]  # (n, rot/2), exact enough
            emb = torch.cat((angles, angles), dim=-1)  # (n, rot) half-split layout, as in rope.cos_sin
            cos, sin = to_device(emb.cos().float(), k.device), to_device(emb.sin().float(), k.device)
            rot = cos.shape[-1]
            sel = layers if len(layers) < cfg.n_layers else slice(None)
            kr = k[sel, :, :, :rot]  # (L', Hkv, n, rot)
            out[sel, :, :, :rot] = kr * cos + rotate_half(kr) * sin
        return out

    # ------------------------------------------------------------------ snapshot / restore / fork
    def _kv_parts(self, n: int) -> dict[str, torch.Tensor]:
        """The K/V state of slots [0, n) as named tensors (what a snapshot holds; `_load_kv_parts` reads them)."""
        return {"k": self.k_all[:, :, :n], "v": self.v_all[:, :, :n]}

    def _kv_meta(self) -> dict:
        """Extra header fields of this store's format (a quantized store's layout parameters)."""
        return {}

    def _check_parts(self, snap: Snapshot) -> None:
        """Refuse a snapshot of another format or model (InfinichatError)."""
        cfg = self.cfg
        if (snap.n_layers, snap.n_kv_heads, snap.head_dim) != (cfg.n_layers, cfg.n_kv_heads, cfg.head_dim):
            raise InfinichatError(
                f"the KV snapshot is for another model: {snap.n_layers} layers x {snap.n_kv_heads} KV heads x "
                f"{snap.head_dim} dims, this one has {cfg.n_layers} x {cfg.n_kv_heads} x {cfg.head_dim}"
            )
        if snap.fmt != self.kv_format:
            raise InfinichatError(f"the KV snapshot holds {snap.fmt} K/V, this cache is {self.kv_format}")
        if snap.meta != self._kv_meta():
            raise InfinichatError(f"the KV snapshot's {snap.fmt} layout {snap.meta} differs from this cache's")
        want = self._kv_parts(0)
        if set(snap.parts) != set(want) or any(snap.parts[n].dtype != t.dtype for n, t in want.items()):
            raise InfinichatError(f"the KV snapshot's parts {sorted(snap.parts)} do not match a {self.kv_format} cache")

    def _snapshot_parts(self, extra: dict | None):
        n, cfg = self._length, self.cfg
        kv = self._kv_parts(n)
        header = {
            "version": VERSION,
            "n_layers": cfg.n_layers,
            "n_kv_heads": cfg.n_kv_heads,
            "head_dim": cfg.head_dim,
            "format": self.kv_format,
            "meta": self._kv_meta(),
            "parts": [[name, str(t.dtype).removeprefix("torch."), list(t.shape)] for name, t in kv.items()],
            "length": n,
            "extra": extra or {},
        }
        parts = [
            t.contiguous().cpu().view(torch.uint8).numpy().tobytes()
            for t in (*kv.values(), self.tokens[:n], self.positions[:n])
        ]
        crc = 0
        for p in parts:
            crc = zlib.crc32(p, crc)
        header["crc32"] = crc  # of the payload: a flipped byte is caught at load (then the cache is rebuilt)
        hb = json.dumps(header).encode()
        yield MAGIC + struct.pack("<I", len(hb)) + hb
        yield from parts

    def decode_snapshot(self, data: bytes) -> Snapshot:
        return decode_snapshot(data)

    def load_snapshot(self, snap: Snapshot) -> None:
        self._check_parts(snap)
        n = snap.tokens.shape[0]
        if n > self.capacity or (n and int(snap.positions[-1]) >= self.capacity):
            raise InfinichatError(f"the KV snapshot holds {n} tokens, more than this cache's capacity {self.capacity}")
        self._load_kv_parts(snap.parts, n)
        self._load_slots(snap.tokens, snap.positions)  # counts the edit

    def _load_kv_parts(self, parts: dict[str, torch.Tensor], n: int) -> None:
        self.reserve(n)
        self.k_all[:, :, :n] = parts["k"]
        self.v_all[:, :, :n] = parts["v"]

    def _empty_like(self) -> KVStore:
        """A new empty store of this one's kind, capacity, dtype and device, as large as this one now is (a pinned
        one: a slot, `fork` pins it at its whole capacity)."""
        initial = 1 if self.pinned else self.allocated
        return type(self)(self.cfg, self.capacity, self.dtype, self.rope, self.device, initial=initial)

    def fork(self) -> KVStore:
        """An independent copy (no shared storage), pinned where this one is."""
        other = self._empty_like()
        if self.pinned:
            other.pin_host_memory()
        n = self._length
        parts = self._kv_parts(n)
        snap = Snapshot(self.kv_format, self._kv_meta(), parts, self.tokens[:n], self.positions[:n], {})
        snap.n_layers, snap.n_kv_heads, snap.head_dim = self.cfg.n_layers, self.cfg.n_kv_heads, self.cfg.head_dim
        other.load_snapshot(snap)
        return other


def torch_store(store: SlotTable, who: str) -> KVStore:
    """`store` as the torch engine's `KVStore`, for what needs its K/V tensors (`who` says what); a clear error
    for a store of another backend (the llama.cpp one keeps its K/V inside llama.cpp)."""
    if not isinstance(store, KVStore):
        raise InfinichatError(
            f"{who} needs the torch engine's KV store (its K/V tensors), not a {type(store).__name__}"
        )
    return store


def check_spans(spans: Sequence[tuple[int, int]], length: int) -> None:
    prev = 0
    for s, e in spans:
        if not (prev <= s < e <= length):
            raise InfinichatError(
                f"bad slot spans {list(spans)}: they must be sorted, disjoint and inside [0, {length})"
            )
        prev = e


def decode_snapshot(data: bytes) -> Snapshot:
    """Parse and check `KVStore.snapshot` bytes (this version, or version 2: dense K/V without a part list)."""
    if len(data) < 8 or data[:4] != MAGIC:
        raise InfinichatError("not an infinichat KV snapshot (bad magic bytes)")
    (hlen,) = struct.unpack("<I", data[4:8])
    try:
        header = json.loads(data[8 : 8 + hlen])
        version = header["version"]
        L, Hkv, hd, n = (int(header[k]) for k in ("n_layers", "n_kv_heads", "head_dim", "length"))
        specs: list[tuple[str, torch.dtype, tuple[int, ...]]]
        if version == 2:  # dense K/V of one dtype
            fmt, meta = header["dtype"], {}
            specs = [(name, _DTYPES[fmt], (L, Hkv, n, hd)) for name in ("k", "v")]
        else:
            fmt, meta = str(header["format"]), dict(header["meta"])
            specs = [(str(name), _DTYPES[dt], tuple(int(x) for x in shape)) for name, dt, shape in header["parts"]]
        crc = int(header.get("crc32", -1))
    except (ValueError, KeyError, TypeError) as e:
        raise InfinichatError(f"the KV snapshot header is damaged ({e})") from None
    if version not in ACCEPTED_VERSIONS:
        raise InfinichatError(
            f"KV snapshot version {version} is not supported; accepted: {', '.join(map(str, ACCEPTED_VERSIONS))}"
        )
    sizes = [math.prod(shape) * torch.empty((), dtype=dt).element_size() for _, dt, shape in specs] + [8 * n, 8 * n]
    off = 8 + hlen
    if len(data) != off + sum(sizes):
        raise InfinichatError(
            f"the KV snapshot is truncated or damaged: {len(data)} bytes, expected {off + sum(sizes)}"
        )
    if zlib.crc32(memoryview(data)[8 + hlen :]) != crc:
        raise InfinichatError("the KV snapshot is damaged: its checksum does not match its contents")
    raw = []
    for size in sizes:
        buf = bytearray(data[off : off + size])
        raw.append(torch.frombuffer(buf, dtype=torch.uint8) if size else torch.empty(0, dtype=torch.uint8))
        off += size
    parts = {name: raw[i].view(dt).reshape(shape) for i, (name, dt, shape) in enumerate(specs)}
    tokens, positions = raw[-2].view(torch.long), raw[-1].view(torch.long)
    return Snapshot(fmt, meta, parts, tokens, positions, header.get("extra") or {}, L, Hkv, hd)
