"""Sliding window with re-computation: after each eviction the kept text is re-evaluated from scratch.

The strong but slow baseline of Xiao et al. 2023 (https://arxiv.org/abs/2309.17453, Fig. 1c): the window's
first token becomes the start of the text, so the model behaves as on a fresh prompt. The paper recomputes
for every token (O(window^2) per token); here it happens once per evicted chunk of `n_discard` tokens.
Pinned segments are kept and not recomputed (their K/V never depend on what follows them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from infinichat.kv.policy import SlidingPolicy


@dataclass
class RecomputePolicy(SlidingPolicy):
    name: ClassVar[str] = "recompute"
    recompute: ClassVar[bool] = True
    n_sink: int = 0
