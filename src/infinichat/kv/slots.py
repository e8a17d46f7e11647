"""The bookkeeping every KV store shares: per slot, the token id and the position, plus the checks.

Slots [0, length) are in use, compact and in logical order; positions are strictly increasing. A store
(the torch tensors of `store.KVStore`, the llama.cpp cells of `engine.llamacpp.LlamaCppStore`) keeps its
K/V its own way and calls these helpers so that both agree on what a cut, a shift or a truncation means.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Self

import torch

from infinichat.errors import InfinichatError
from infinichat.model.config import ModelShape


def read_snapshot_file(path: str | Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise InfinichatError(f"cannot read the KV snapshot {path}: {e.strerror or e}") from None


class SlotTable:
    """Token ids (C,) and positions (C,) of the slots, the length and the next position. A store subclasses
    it and supplies its K/V side: `cfg`, `nbytes`, `truncate`, `remove_spans`, `shift`, `fork` and the
    snapshot methods (what `KVSequence` and the policies call, whichever backend holds the K/V)."""

    cfg: ModelShape  # the model whose K/V the store holds
    # where the model computes attention over these slots (a torch store: its rope's device, also for a store held
    # in host memory for a GPU): the policies' per-slot statistics live there, next to the probabilities
    compute_device: torch.device = torch.device("cpu")

    def __init__(self, capacity: int):
        if capacity < 1:
            raise InfinichatError(f"KV capacity must be at least 1 token, got {capacity}")
        self.capacity = capacity
        self.tokens = torch.zeros(capacity, dtype=torch.long)  # (C,)
        self.positions = torch.zeros(capacity, dtype=torch.long)  # (C,)
        self._tokens_np = self.tokens.numpy()  # the same memory: numpy writes cost ~1 us, torch's ~20 us
        self._positions_np = self.positions.numpy()
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

    def token_ids(self) -> list[int]:
        return self.tokens[: self._length].tolist()

    def position_list(self) -> list[int]:
        return self.positions[: self._length].tolist()

    @property
    def nbytes(self) -> int:
        """Bytes of K/V memory the store holds."""
        raise NotImplementedError

    def truncate(self, n: int) -> None:
        raise NotImplementedError

    def truncate_is_exact(self, n: int) -> bool:
        """Whether `truncate(n)` leaves slots [0, n) exactly as they are (a store that re-quantizes or re-packs
        slots below n when it truncates says no)."""
        return True

    def remove_spans(self, spans: Sequence[tuple[int, int]], shift: bool = True, rotate: bool = True) -> None:
        """Cut out sorted, disjoint slot spans (with `shift`, later positions close the gap; with `rotate`, their
        keys are re-rotated to the new positions)."""
        raise NotImplementedError

    def shift(self, start: int, delta: int) -> None:
        """Move the positions of slots [start, length) by `delta` (keys re-rotated)."""
        raise NotImplementedError

    def fork(self) -> Self:
        """An independent copy."""
        raise NotImplementedError

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
        self._tokens_np[start : start + n] = tokens.numpy()  # once per decoded token: the fast path
        self._positions_np[start : start + n] = positions.numpy()
        self._length = start + n
        self._next_pos = int(self._positions_np[start + n - 1]) + 1
        return start

    def _check_truncate(self, n: int) -> None:
        if not 0 <= n <= self._length:
            raise InfinichatError(f"cannot truncate to {n} tokens: the cache holds {self._length}")

    def _set_length(self, n: int) -> None:
        self.edits += 1
        self._length = n
        self._next_pos = int(self.positions[n - 1]) + 1 if n else 0

    def _load_slots(self, tokens: torch.Tensor, positions: torch.Tensor) -> None:
        n = tokens.shape[0]
        self.tokens[:n] = tokens
        self.positions[:n] = positions
        self._set_length(n)

    # ------------------------------------------------------------------ remove / shift
    def _cut(self, spans: list[tuple[int, int]], shift: bool) -> tuple[int, torch.Tensor, torch.Tensor]:
        """The slot side of cutting out sorted, disjoint, non-empty spans: compacts token ids and positions.
        With `shift`, each kept slot after a span moves down by that span's positional length (the next
        kept position takes the first removed one's place). Returns (first, src, delta): the m slots kept
        from `first` on came from slots `src` (m,) and their positions moved by `delta` (m,)."""
        L = self._length
        first = spans[0][0]
        keep = torch.ones(L - first, dtype=torch.bool)  # (L - first,)
        delta = torch.zeros(L - first, dtype=torch.long)
        for s, e in spans:
            keep[s - first : e - first] = False
            if shift and e < L:
                delta[e - first :] -= int(self.positions[e] - self.positions[s])
        idx = keep.nonzero().flatten()  # kept slots, relative to `first`
        src = idx + first
        m = idx.shape[0]
        self.tokens[first : first + m] = self.tokens[src].clone()
        self.positions[first : first + m] = self.positions[src] + delta[idx]
        self._set_length(first + m)
        return first, src, delta[idx]

    def _check_shift(self, start: int, delta: int) -> bool:
        """Validate a shift of slots [start, length) by `delta`; False when there is nothing to do."""
        L = self._length
        if not 0 <= start <= L:
            raise InfinichatError(f"cannot shift from slot {start}: the cache holds {L} tokens")
        if start == L or delta == 0:
            return False
        lo = int(self.positions[start]) + delta
        hi = int(self.positions[L - 1]) + delta
        floor = int(self.positions[start - 1]) + 1 if start else 0
        if lo < floor or hi >= self.capacity:
            raise InfinichatError(
                f"cannot shift slots {start}..{L - 1} by {delta}: positions would span {lo}..{hi}, "
                f"but they must stay in [{floor}, {self.capacity - 1}] (increasing, below the capacity)"
            )
        return True

    def _shift_positions(self, start: int, delta: int) -> None:
        self.edits += 1
        self.positions[start : self._length] += delta
        self._next_pos = int(self.positions[self._length - 1]) + 1

    # ------------------------------------------------------------------ snapshots (files)
    def _snapshot_parts(self, extra: dict | None) -> Iterator[bytes]:
        raise NotImplementedError

    def decode_snapshot(self, data: bytes):
        raise NotImplementedError

    def load_snapshot(self, snap) -> None:
        raise NotImplementedError

    def snapshot(self, extra: dict | None = None) -> bytes:
        return b"".join(self._snapshot_parts(extra))

    def save(self, path: str | Path, extra: dict | None = None) -> None:
        """Write a snapshot to a file (atomically: a temporary file renamed into place)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            for part in self._snapshot_parts(extra):
                f.write(part)
        tmp.replace(path)

    def restore(self, data: bytes) -> dict:
        """Load a snapshot (from `snapshot`) into this store; returns the extras saved with it."""
        snap = self.decode_snapshot(data)
        self.load_snapshot(snap)
        return snap.extra

    def load(self, path: str | Path) -> dict:
        return self.restore(read_snapshot_file(path))
