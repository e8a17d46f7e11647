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
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from infinichat.errors import InfinichatError
from infinichat.kv.slots import SlotTable
from infinichat.model.config import ModelConfig
from infinichat.model.rope import Rope, rotate_half

MAGIC = b"IKVS"
VERSION = 2  # 2: the header holds the payload's CRC-32
INITIAL_SLOTS = 256  # buffers start this long and double as tokens arrive
_SCALING_NAMES = {"dynamic": "dynamic-NTK", "longrope": "LongRoPE"}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Snapshot:
    """A decoded snapshot: the used slots' K/V (L, Hkv, n, hd), token ids, positions, and caller extras."""

    k: torch.Tensor
    v: torch.Tensor
    tokens: torch.Tensor
    positions: torch.Tensor
    extra: dict


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
        self.cfg = cfg
        self.dtype = dtype
        self.device = (
            torch.device(device) if device is not None else rope.device if rope is not None else torch.device("cpu")
        )
        self.rope = rope if rope is not None else Rope(cfg, device=self.device)
        shape = (cfg.n_layers, cfg.n_kv_heads, min(capacity, max(1, initial)), cfg.head_dim)
        self._set_buffers(
            torch.zeros(shape, dtype=dtype, device=self.device), torch.zeros(shape, dtype=dtype, device=self.device)
        )

    def _set_buffers(self, k_all: torch.Tensor, v_all: torch.Tensor) -> None:
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
        size = have
        while size < n:
            size *= 2
        size = min(size, self.capacity)
        L, H, _, hd = self.k_all.shape
        k = self.k_all.new_zeros((L, H, size, hd))
        v = self.v_all.new_zeros((L, H, size, hd))
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
        src = src.to(self.device)
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

    def _rerotate(self, start: int, end: int, delta: torch.Tensor) -> None:
        """Rotate the cached keys of slots [start, end) by per-slot position deltas (n,), each layer with its own
        frequencies (Gemma 3's windowed layers rotate with a local base)."""
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
        for key, layers in groups.items():
            angles = delta.double()[:, None] * ropes[key].inv_freq.double()[None, :]  # (n, rot/2), exact enough
            emb = torch.cat((angles, angles), dim=-1)  # (n, rot) half-split layout, as in rope.cos_sin
            cos, sin = emb.cos().float().to(self.device), emb.sin().float().to(self.device)
            rot = cos.shape[-1]
            sel = layers if len(layers) < cfg.n_layers else slice(None)
            k = self.k_all[sel, :, start:end, :rot]  # (L', Hkv, n, rot): a view, or a gathered copy
            kf = k.float()
            rotated = kf * cos + rotate_half(kf) * sin
            if isinstance(sel, slice):
                k.copy_(rotated)
            else:
                self.k_all[sel, :, start:end, :rot] = rotated.to(k.dtype)

    # ------------------------------------------------------------------ snapshot / restore / fork
    def _snapshot_parts(self, extra: dict | None):
        n, cfg = self._length, self.cfg
        header = {
            "version": VERSION,
            "n_layers": cfg.n_layers,
            "n_kv_heads": cfg.n_kv_heads,
            "head_dim": cfg.head_dim,
            "dtype": str(self.dtype).removeprefix("torch."),
            "length": n,
            "extra": extra or {},
        }
        parts = [
            t.contiguous().cpu().view(torch.uint8).numpy().tobytes()
            for t in (self.k_all[:, :, :n], self.v_all[:, :, :n], self.tokens[:n], self.positions[:n])
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
        L, Hkv, n, hd = snap.k.shape
        cfg = self.cfg
        if (L, Hkv, hd) != (cfg.n_layers, cfg.n_kv_heads, cfg.head_dim):
            raise InfinichatError(
                f"the KV snapshot is for another model: {L} layers x {Hkv} KV heads x {hd} dims, "
                f"this one has {cfg.n_layers} x {cfg.n_kv_heads} x {cfg.head_dim}"
            )
        if snap.k.dtype != self.dtype:
            raise InfinichatError(f"the KV snapshot holds {snap.k.dtype} keys, this cache is {self.dtype}")
        if n > self.capacity or (n and int(snap.positions[-1]) >= self.capacity):
            raise InfinichatError(f"the KV snapshot holds {n} tokens, more than this cache's capacity {self.capacity}")
        self.reserve(n)
        self.k_all[:, :, :n] = snap.k
        self.v_all[:, :, :n] = snap.v
        self._load_slots(snap.tokens, snap.positions)  # counts the edit

    def fork(self) -> KVStore:
        """An independent copy (no shared storage)."""
        other = KVStore(self.cfg, self.capacity, self.dtype, self.rope, self.device, initial=self.allocated)
        other.load_snapshot(
            Snapshot(
                self.k_all[:, :, : self._length],
                self.v_all[:, :, : self._length],
                self.tokens[: self._length],
                self.positions[: self._length],
                {},
            )
        )
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
    """Parse and check `KVStore.snapshot` bytes."""
    if len(data) < 8 or data[:4] != MAGIC:
        raise InfinichatError("not an infinichat KV snapshot (bad magic bytes)")
    (hlen,) = struct.unpack("<I", data[4:8])
    try:
        header = json.loads(data[8 : 8 + hlen])
        L, Hkv, hd, n = (int(header[k]) for k in ("n_layers", "n_kv_heads", "head_dim", "length"))
        dtype = _DTYPES[header["dtype"]]
        version = header["version"]
        crc = int(header.get("crc32", -1))
    except (ValueError, KeyError, TypeError) as e:
        raise InfinichatError(f"the KV snapshot header is damaged ({e})") from None
    if version != VERSION:
        raise InfinichatError(f"KV snapshot version {version} is not supported; accepted: {VERSION}")
    kv_bytes = L * Hkv * n * hd * torch.empty((), dtype=dtype).element_size()
    sizes = [kv_bytes, kv_bytes, 8 * n, 8 * n]
    off = 8 + hlen
    if len(data) != off + sum(sizes):
        raise InfinichatError(
            f"the KV snapshot is truncated or damaged: {len(data)} bytes, expected {off + sum(sizes)}"
        )
    if zlib.crc32(memoryview(data)[8 + hlen :]) != crc:
        raise InfinichatError("the KV snapshot is damaged: its checksum does not match its contents")
    parts = []
    for size in sizes:
        buf = bytearray(data[off : off + size])
        parts.append(torch.frombuffer(buf, dtype=torch.uint8) if size else torch.empty(0, dtype=torch.uint8))
        off += size
    k = parts[0].view(dtype).reshape(L, Hkv, n, hd)
    v = parts[1].view(dtype).reshape(L, Hkv, n, hd)
    tokens, positions = parts[2].view(torch.long), parts[3].view(torch.long)
    return Snapshot(k, v, tokens, positions, header.get("extra") or {})
