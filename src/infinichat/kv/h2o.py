"""H2O: heavy hitters (the tokens with the most accumulated attention) plus a recent window.

Zhang et al. 2023, "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language Models",
https://arxiv.org/abs/2306.14048

A token's score is the attention it has received so far, summed over every query since it entered the
cache (the prompt's queries in its forward calls, then one query per decode step), over heads and over
layers (all layers by default; `layers` picks some). The paper keeps heavy hitters per head; the cache
here is one token-level cache for all heads and layers, so the per-head, per-layer scores are summed into
one. When the cache is over budget, the lowest-scored tokens outside the recent window, the sinks and the
pinned segments are evicted (`n_discard` at a time; 1, as in the paper, by default). `n_recent=None` gives
the paper's split: half of the budget left after the sinks is the recent window, half the heavy hitters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from infinichat.kv.scored import ScoredPolicy

if TYPE_CHECKING:
    from infinichat.kv.sequence import KVSequence


@dataclass
class H2OPolicy(ScoredPolicy):
    name: ClassVar[str] = "h2o"
    n_recent: int | None = None  # None: half of the budget after the sinks

    def recent(self, seq: KVSequence) -> int:
        if self.n_recent is None:
            return max(0, seq.budget - self.n_sink) // 2
        return self.n_recent

    def query_rows(self, n: int, stage: str) -> int:
        return n  # every query of the call adds to the scores

    def observe(self, seq: KVSequence, layer: int, probs: torch.Tensor, row0: int, rows: int) -> None:
        S = probs.shape[-1]
        seq.scores[:S] += probs.sum(dim=(0, 1))  # (S,): over heads and query rows
