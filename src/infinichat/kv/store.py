"""The tensor side of a sequence's KV cache: preallocated K/V buffers plus, per slot, token id and position.

Slots [0, length) are in use, compact and in logical order (the forward's causal mask is by slot index);
positions are explicit and strictly increasing. Removing a span compacts the slots after it and, like
llama.cpp's `seq_rm` + `seq_add`, shifts their positions down so they stay contiguous, re-rotating the
cached keys: a key rotated at position p is moved to p - d by the rotation for -d (R(p - d) = R(-d) R(p)).
That identity holds for plain, linear and llama3 RoPE, whose frequencies are fixed. Dynamic-NTK
frequencies depend on the length, so shifting is refused there unless every position stays below the
trained context (where dynamic NTK is plain RoPE).

No segments here: `segments.SegmentMap` is the bookkeeping, `sequence.KVSequence` ties the two together.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from infinichat.errors import InfinichatError
from infinichat.model.config import ModelConfig
from infinichat.model.rope import Rope, rotate_half

MAGIC = b"IKVS"
VERSION = 1
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Snapshot:
    """A decoded snapshot: the used slots' K/V (L, Hkv, n, hd), token ids, positions, and caller extras."""

    k: torch.Tensor
    v: torch.Tensor
    tokens: torch.Tensor
    positions: torch.Tensor
    extra: dict


class KVStore:
    """K/V buffers (n_layers, Hkv, capacity, hd) with a per-layer view list (`k`, `v`) for the forward."""

    def __init__(
        self, cfg: ModelConfig, capacity: int, dtype: torch.dtype = torch.float32, rope: Rope | None = None
    ):
        if capacity < 1:
            raise InfinichatError(f"KV capacity must be at least 1 token, got {capacity}")
        self.cfg = cfg
        self.capacity = capacity
        self.dtype = dtype
        self.rope = rope if rope is not None else Rope(cfg)
        shape = (cfg.n_layers, cfg.n_kv_heads, capacity, cfg.head_dim)
        self.k_all = torch.zeros(shape, dtype=dtype)  # (L, Hkv, C, hd)
        self.v_all = torch.zeros(shape, dtype=dtype)  # (L, Hkv, C, hd)
        self.k = list(self.k_all.unbind(0))  # L x (Hkv, C, hd) views
        self.v = list(self.v_all.unbind(0))
        self.tokens = torch.zeros(capacity, dtype=torch.long)  # (C,)
        self.positions = torch.zeros(capacity, dtype=torch.long)  # (C,)
        self._length = 0
        self._next_pos = 0  # position of the next appended token
        self.edits = 0  # bumped by every change other than an append (copies kept elsewhere resync on it)

    # ------------------------------------------------------------------ state
    @property
    def length(self) -> int:
        return self._length

    @length.setter
    def length(self, n: int) -> None:
        """Compatibility with `cache.length = keep`: only shrinking is allowed; prefer `truncate(n)`."""
        if n > self._length:
            raise InfinichatError(f"cannot grow the cache by setting length ({self._length} -> {n}): append tokens")
        self.truncate(n)

    @property
    def next_position(self) -> int:
        return self._next_pos

    @property
    def nbytes(self) -> int:
        return self.k_all.nbytes + self.v_all.nbytes

    def token_ids(self) -> list[int]:
        return self.tokens[: self._length].tolist()

    def position_list(self) -> list[int]:
        return self.positions[: self._length].tolist()

    # ------------------------------------------------------------------ append / truncate
    def next_positions(self, n: int) -> torch.Tensor:
        """Positions (n,) for n tokens appended next; checks that slots and positions fit the capacity."""
        if self._length + n > self.capacity or self._next_pos + n > self.capacity:
            raise InfinichatError(
                f"the KV store is full: {self._length} cached + {n} new tokens > capacity {self.capacity}"
            )
        return torch.arange(self._next_pos, self._next_pos + n)

    def append(self, tokens: torch.Tensor, positions: torch.Tensor) -> int:
        """Record n tokens whose K/V the forward has just written into slots [length, length + n).
        `positions` come from `next_positions`. Returns the first slot."""
        start, n = self._length, tokens.shape[0]
        self.tokens[start : start + n] = tokens
        self.positions[start : start + n] = positions
        self._length = start + n
        self._next_pos = int(positions[-1]) + 1
        return start

    def truncate(self, n: int) -> None:
        """Drop every slot from n on."""
        if not 0 <= n <= self._length:
            raise InfinichatError(f"cannot truncate to {n} tokens: the cache holds {self._length}")
        self.edits += 1
        self._length = n
        self._next_pos = int(self.positions[n - 1]) + 1 if n else 0

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
        self.edits += 1
        L = self._length
        first = spans[0][0]
        keep = torch.ones(L - first, dtype=torch.bool)  # (L - first,)
        delta = torch.zeros(L - first, dtype=torch.long)
        for s, e in spans:
            keep[s - first : e - first] = False
            if shift and e < L:
                delta[e - first :] -= int(self.positions[e] - self.positions[s])
        idx = keep.nonzero().flatten()  # kept slots, relative to `first`
        m = idx.shape[0]
        src = idx + first
        self.k_all[:, :, first : first + m] = self.k_all[:, :, src]  # (L, Hkv, m, hd); the gather copies first
        self.v_all[:, :, first : first + m] = self.v_all[:, :, src]
        self.tokens[first : first + m] = self.tokens[src].clone()
        new_pos = self.positions[src] + delta[idx]
        self.positions[first : first + m] = new_pos
        self._length = first + m
        self._next_pos = int(self.positions[self._length - 1]) + 1 if self._length else 0
        if shift and rotate and m:
            self._rerotate(first, first + m, delta[idx])

    def shift(self, start: int, delta: int) -> None:
        """Move the positions of slots [start, length) by `delta` (llama.cpp's `seq_add`), re-rotating keys.
        Positions must stay strictly increasing, >= 0 and below the capacity."""
        L = self._length
        if not 0 <= start <= L:
            raise InfinichatError(f"cannot shift from slot {start}: the cache holds {L} tokens")
        if start == L or delta == 0:
            return
        lo = int(self.positions[start]) + delta
        hi = int(self.positions[L - 1]) + delta
        floor = int(self.positions[start - 1]) + 1 if start else 0
        if lo < floor or hi >= self.capacity:
            raise InfinichatError(
                f"cannot shift slots {start}..{L - 1} by {delta}: positions would span {lo}..{hi}, "
                f"but they must stay in [{floor}, {self.capacity - 1}] (increasing, below the capacity)"
            )
        self.edits += 1
        self.positions[start:L] += delta
        self._next_pos = hi + 1
        self._rerotate(start, L, torch.full((L - start,), delta, dtype=torch.long))

    def _rerotate(self, start: int, end: int, delta: torch.Tensor) -> None:
        """Rotate the cached keys of slots [start, end) by per-slot position deltas (n,)."""
        cfg = self.cfg
        if cfg.rope_scaling.kind == "dynamic" and self.capacity > cfg.max_position:
            raise InfinichatError(
                "cannot shift positions with dynamic-NTK RoPE scaling beyond the trained context: its "
                f"frequencies depend on the length; use a capacity <= {cfg.max_position} or the full policy"
            )
        angles = delta.double()[:, None] * self.rope.inv_freq.double()[None, :]  # (n, rot/2), exact enough
        emb = torch.cat((angles, angles), dim=-1)  # (n, rot) half-split layout, as in rope.cos_sin
        cos, sin = emb.cos().float(), emb.sin().float()
        rot = cos.shape[-1]
        k = self.k_all[:, :, start:end, :rot]  # (L, Hkv, n, rot) view
        kf = k.float()
        k.copy_(kf * cos + rotate_half(kf) * sin)

    # ------------------------------------------------------------------ snapshot / restore / fork
    def snapshot(self, extra: dict | None = None) -> bytes:
        """The used slots, bit-exact, as bytes (a JSON header, then raw K, V, token ids, positions)."""
        return b"".join(self._snapshot_parts(extra))

    def save(self, path: str | Path, extra: dict | None = None) -> None:
        """Write a snapshot to a file (atomically: a temporary file renamed into place)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            for part in self._snapshot_parts(extra):
                f.write(part)
        tmp.replace(path)

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
        hb = json.dumps(header).encode()
        yield MAGIC + struct.pack("<I", len(hb)) + hb
        for t in (self.k_all[:, :, :n], self.v_all[:, :, :n], self.tokens[:n], self.positions[:n]):
            yield t.contiguous().view(torch.uint8).numpy().tobytes()

    def restore(self, data: bytes) -> dict:
        """Load a snapshot (from `snapshot`) into this store; returns the extras saved with it."""
        snap = decode_snapshot(data)
        self.load_snapshot(snap)
        return snap.extra

    def load(self, path: str | Path) -> dict:
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            raise InfinichatError(f"cannot read the KV snapshot {path}: {e.strerror or e}") from None
        return self.restore(data)

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
        self.edits += 1
        self.k_all[:, :, :n] = snap.k
        self.v_all[:, :, :n] = snap.v
        self.tokens[:n] = snap.tokens
        self.positions[:n] = snap.positions
        self._length = n
        self._next_pos = int(snap.positions[-1]) + 1 if n else 0

    def fork(self) -> KVStore:
        """An independent copy (no shared storage)."""
        other = KVStore(self.cfg, self.capacity, self.dtype, self.rope)
        other.load_snapshot(Snapshot(self.k_all[:, :, : self._length], self.v_all[:, :, : self._length],
                                     self.tokens[: self._length], self.positions[: self._length], {}))
        return other


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
    except (ValueError, KeyError, TypeError) as e:
        raise InfinichatError(f"the KV snapshot header is damaged ({e})") from None
    if version != VERSION:
        raise InfinichatError(f"KV snapshot version {version} is not supported; accepted: {VERSION}")
    kv_bytes = L * Hkv * n * hd * torch.empty((), dtype=dtype).element_size()
    sizes = [kv_bytes, kv_bytes, 8 * n, 8 * n]
    off = 8 + hlen
    if len(data) != off + sum(sizes):
        raise InfinichatError(f"the KV snapshot is truncated or damaged: {len(data)} bytes, expected {off + sum(sizes)}")
    parts = []
    for size in sizes:
        buf = bytearray(data[off : off + size])
        parts.append(torch.frombuffer(buf, dtype=torch.uint8) if size else torch.empty(0, dtype=torch.uint8))
        off += size
    k = parts[0].view(dtype).reshape(L, Hkv, n, hd)
    v = parts[1].view(dtype).reshape(L, Hkv, n, hd)
    tokens, positions = parts[2].view(torch.long), parts[3].view(torch.long)
    return Snapshot(k, v, tokens, positions, header.get("extra") or {})
