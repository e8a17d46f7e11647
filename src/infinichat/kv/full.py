"""No eviction: the cache grows up to the budget, then appending fails with a clear error."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from infinichat.errors import InfinichatError
from infinichat.kv.policy import EvictionPolicy

if TYPE_CHECKING:
    from infinichat.kv.sequence import KVSequence


@dataclass
class FullPolicy(EvictionPolicy):
    name: ClassVar[str] = "full"
    drops_tokens: ClassVar[bool] = False

    def select(self, seq: KVSequence, n_needed: int) -> list[tuple[int, int]]:
        raise InfinichatError(
            f"the context is full: {seq.length} cached + {n_needed - seq.length + seq.budget} new tokens > "
            f"budget {seq.budget}; the 'full' policy never evicts: raise the budget, or use one of the "
            "policies streaming, window, recompute"
        )
