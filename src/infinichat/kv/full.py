"""No eviction: the cache grows up to the budget, then appending fails with a clear error."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from infinichat.kv.policy import EvictionPolicy, context_full

if TYPE_CHECKING:
    from infinichat.kv.sequence import KVSequence


@dataclass
class FullPolicy(EvictionPolicy):
    name: ClassVar[str] = "full"
    drops_tokens: ClassVar[bool] = False

    def select(self, seq: KVSequence, n_needed: int) -> list[tuple[int, int]]:
        raise context_full(
            seq,
            n_needed,
            "the 'full' policy never evicts: raise the budget, or use one of the policies streaming, window, recompute",
        )
