"""Window attention: a plain sliding window over the most recent tokens, no attention sinks.

The baseline that fails in Xiao et al. 2023 (https://arxiv.org/abs/2309.17453, Fig. 1b): once the first
tokens are evicted, perplexity explodes. Pinned segments are still never evicted (that rule holds for
every policy), so for the true baseline use it without pinned segments.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from infinichat.kv.policy import SlidingPolicy


@dataclass
class WindowPolicy(SlidingPolicy):
    name: ClassVar[str] = "window"
    n_sink: int = 0
