"""Turn-level eviction for chat: whole old messages go first, then StreamingLLM token eviction.

A chat session keeps every message in its own segment (system prompt / character card pinned). When the
history outgrows the budget, cutting whole old turns keeps every remaining message intact (the model never
sees half a sentence with its beginning missing), and the user can be told exactly which turns the model
no longer remembers. Only when whole turns cannot make enough room (one reply longer than the budget, or
a sequence without segments) does it fall back to token-level streaming eviction with sinks
(https://arxiv.org/abs/2309.17453).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from infinichat.errors import InfinichatError
from infinichat.kv.policy import SlidingPolicy

if TYPE_CHECKING:
    from infinichat.kv.sequence import KVSequence


@dataclass
class TurnsPolicy(SlidingPolicy):
    """Evict the oldest closed, unpinned segments (never the `keep_recent` newest closed ones, nor the open
    one), at least `n_discard` tokens at a time so the re-rotation is amortized; else stream tokens."""

    name: ClassVar[str] = "turns"
    n_sink: int = 4
    snap: bool = True
    keep_recent: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.keep_recent < 0:
            raise InfinichatError(f"turns: keep_recent must be >= 0, got {self.keep_recent}")

    def select(self, seq: KVSequence, n_needed: int) -> list[tuple[int, int]]:
        closed = [s for s in seq.segments.segments if s.closed and not s.pinned and len(s) > 0]
        if self.keep_recent:
            closed = closed[: -self.keep_recent]
        n_evictable = int((~self.protected(seq)).sum())
        target = max(n_needed, min(self.n_discard, n_evictable // 2))
        spans, freed = [], 0
        for s in closed:
            if freed >= target:
                break
            spans.append((s.start, s.end))
            freed += len(s)
        if freed >= n_needed:
            return spans
        return super().select(seq, n_needed)  # token level, oldest unprotected first
