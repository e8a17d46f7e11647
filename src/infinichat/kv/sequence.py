"""A sequence's cache: a store, its segment map, a token budget and an eviction policy.

Every edit goes through here so the store (K/V, token ids, positions: the torch `KVStore`, or the llama.cpp
backend's store with the same interface) and the segment map (plain Python: named slot spans) stay
consistent. The engine appends with `next_positions` -> forward ->
`append`, calling `make_room` first; sessions use the segment operations; the eviction policy picks the
slots and this class cuts them out.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch

from infinichat.errors import InfinichatError
from infinichat.kv.full import FullPolicy
from infinichat.kv.policy import EvictionPolicy
from infinichat.kv.segments import Segment, SegmentMap, new_index
from infinichat.kv.slots import SlotTable, read_snapshot_file
from infinichat.kv.store import check_spans

log = logging.getLogger(__name__)


class KVSequence:
    def __init__(self, store: SlotTable, budget: int | None = None, policy: EvictionPolicy | None = None):
        budget = store.capacity if budget is None else budget
        if not 1 <= budget <= store.capacity:
            raise InfinichatError(f"the token budget must be in [1, capacity {store.capacity}], got {budget}")
        self.store = store
        self.budget = budget
        self.policy = policy if policy is not None else FullPolicy()
        self.segments = SegmentMap()
        self.stale_from: int | None = None  # slots [stale_from, length) need their K/V recomputed
        self.n_evictions = 0
        self.n_evicted = 0
        self._scores: torch.Tensor | None = None  # (capacity,) per-slot attention scores, for scoring policies

    # ------------------------------------------------------------------ state
    @property
    def length(self) -> int:
        return self.store.length

    @length.setter
    def length(self, n: int) -> None:
        """Compatibility with `cache.length = keep` (shrinking only); prefer `truncate(n)`."""
        if n > self.store.length:
            raise InfinichatError(f"cannot grow the cache by setting length ({self.length} -> {n}): append tokens")
        self.truncate(n)

    @property
    def capacity(self) -> int:
        return self.store.capacity

    @property
    def full(self) -> bool:
        """True when nothing more can be appended (a policy that never evicts, at its budget)."""
        return not self.policy.drops_tokens and self.store.length >= self.budget

    def token_ids(self) -> list[int]:
        return self.store.token_ids()

    def positions(self) -> list[int]:
        return self.store.position_list()

    def segment_tags(self) -> list[int]:
        """The segment id of every slot (-1: untagged)."""
        return self.segments.tags(self.length)

    @property
    def scores(self) -> torch.Tensor:
        """Per-slot attention statistics (capacity,) float32 kept by a scoring policy (H2O, TOVA, SnapKV):
        compacted with the slots on every removal, reset to 0 by a restore. Allocated on first use, on the device
        where attention is computed (the policies fold each layer's probabilities in there: no copy per layer)."""
        if self._scores is None:
            self._scores = torch.zeros(self.capacity, dtype=torch.float32, device=self.store.compute_device)
        return self._scores

    def pinned_mask(self) -> torch.Tensor:
        mask = torch.zeros(self.length, dtype=torch.bool)  # (length,)
        for s, e in self.segments.pinned_spans():
            mask[s:e] = True
        return mask

    # ------------------------------------------------------------------ append (the engine's path)
    def next_positions(self, n: int) -> torch.Tensor:
        return self.store.next_positions(n)

    def append(self, tokens: torch.Tensor, positions: torch.Tensor) -> None:
        """Record tokens whose K/V the forward wrote at slot `length` on (see `SlotTable.append`)."""
        start = self.store.append(tokens, positions)
        self.segments.on_append(start, tokens.shape[0])

    def make_room(self, n: int, limit: int | None = None) -> list[tuple[int, int]]:
        """Evict (through the policy) so that `n` more tokens fit the budget (or `limit`, e.g. the capacity
        while a prompt streams in under a "prefill" policy); returns the evicted spans. With a
        recomputing policy, `stale_from` then marks the slots the engine must re-evaluate."""
        limit = self.budget if limit is None else limit
        over = self.length + n - limit
        if over <= 0:
            return []
        if n > limit and self.policy.drops_tokens:
            raise InfinichatError(f"{n} new tokens cannot fit a budget of {limit}: append them in chunks")
        spans = self.policy.select(self, over)
        check_spans(spans, self.length)
        mask = self.pinned_mask()
        freed = sum(e - s for s, e in spans)
        if freed < over or any(mask[s:e].any() for s, e in spans):
            raise InfinichatError(
                f"policy {self.policy.name} chose slots {spans}: they must free {over} slots and touch no pinned one"
            )
        recompute = self.policy.recompute
        self.remove_spans(spans, rotate=not recompute)
        if recompute and self.length > spans[0][0]:
            self.stale_from = min(spans[0][0], self.length if self.stale_from is None else self.stale_from)
        self.n_evictions += 1
        self.n_evicted += freed
        log.debug("evicted %d tokens in %d spans (%s); %d left", freed, len(spans), self.policy.name, self.length)
        return spans

    def mark_fresh(self) -> None:
        """The engine has recomputed the stale slots."""
        self.stale_from = None

    # ------------------------------------------------------------------ token-level edits
    def truncate(self, n: int) -> None:
        """Drop everything from slot n on."""
        self.store.truncate(n)
        self.segments.on_truncate(n)
        if self.stale_from is not None and self.stale_from >= n:
            self.stale_from = None

    def remove(self, start: int, end: int) -> None:
        """Cut slots [start, end) out of the middle; later positions shift down, keys re-rotated."""
        self.remove_spans([(start, end)])

    def remove_spans(self, spans: list[tuple[int, int]], rotate: bool = True) -> None:
        spans = [(s, e) for s, e in spans if e > s]
        if self._scores is not None and spans:
            keep = torch.ones(self.length, dtype=torch.bool, device=self._scores.device)  # (length,)
            for s, e in spans:
                keep[s:e] = False
            kept = self._scores[: self.length][keep]
            self._scores[: kept.shape[0]] = kept
        self.store.remove_spans(spans, shift=True, rotate=rotate)
        self.segments.on_remove(spans)
        if self.stale_from is not None:
            self.stale_from = new_index(self.stale_from, spans)
            if self.stale_from >= self.length:
                self.stale_from = None

    def shift(self, start: int, delta: int) -> None:
        """Move positions of slots [start, length) by `delta`, re-rotating their keys (llama.cpp `seq_add`)."""
        self.store.shift(start, delta)

    # ------------------------------------------------------------------ segments
    def create_segment(self, kind: str, name: str = "", pinned: bool | None = None) -> Segment:
        """Open a segment at the end; appended tokens go into it. `system` segments are pinned by default."""
        return self.segments.create(kind, name, self.length, pinned)

    def close_segment(self) -> None:
        self.segments.close()

    def reopen_segment(self, seg_id: int) -> Segment:
        """Reopen the last segment so appended tokens extend it (continue a reply)."""
        return self.segments.reopen(seg_id, self.length)

    def revert_to(self, seg_id: int) -> None:
        """Drop the segment and everything after it."""
        n = self.segments.drop_from(seg_id)
        self.truncate(n)

    def remove_segment(self, seg_id: int, recompute: bool = False) -> None:
        """Cut a segment out of the middle; the rest shifts down (keys re-rotated). With `recompute`, the slots
        after it are also marked stale: the engine re-evaluates them before its next forward, so the cache
        then equals a fresh evaluation of what remains (they no longer carry what they attended to)."""
        start, end = self.segments.cut(seg_id)
        self.remove_spans([(start, end)])
        if recompute and end > start and start < self.length:
            self.stale_from = start if self.stale_from is None else min(self.stale_from, start)

    def merge_segment(self, seg_id: int) -> Segment:
        """Fold a closed segment into the pinned base directly before it (it is never evicted then)."""
        return self.segments.merge(seg_id)

    # ------------------------------------------------------------------ snapshot / restore / fork
    def _extra(self, more: dict | None = None) -> dict:
        return {**(more or {}), "segments": self.segments.to_json(), "stale_from": self.stale_from}

    def snapshot(self, extra: dict | None = None) -> bytes:
        """Bit-exact bytes of the cache and its segments (budget and policy are configuration, not state),
        plus the caller's `extra` (JSON), which `restore` returns."""
        return self.store.snapshot(self._extra(extra))

    def save(self, path: str | Path, extra: dict | None = None) -> None:
        self.store.save(path, self._extra(extra))

    def restore(self, data: bytes) -> dict:
        snap = self.store.decode_snapshot(data)  # each store reads its own format
        n = snap.tokens.shape[0]
        if n > self.budget:
            raise InfinichatError(f"the KV snapshot holds {n} tokens, more than this sequence's budget {self.budget}")
        try:
            segments = SegmentMap.from_json(snap.extra["segments"])
        except (KeyError, TypeError, ValueError) as e:
            raise InfinichatError(f"the KV snapshot has no valid segment map ({e!r})") from None
        self.store.load_snapshot(snap)
        self.segments = segments
        self.stale_from = snap.extra.get("stale_from")
        self._scores = None  # attention statistics are not part of a snapshot
        return snap.extra

    def load(self, path: str | Path) -> dict:
        return self.restore(read_snapshot_file(path))

    def fork(self) -> KVSequence:
        """An independent copy: own buffers, own segment map, a copy of the policy."""
        other = KVSequence(self.store.fork(), self.budget, self.policy.fork())
        other.segments = copy.deepcopy(self.segments)
        other.stale_from = self.stale_from
        other._scores = None if self._scores is None else self._scores.clone()
        return other
