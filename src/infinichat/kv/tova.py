"""TOVA: Token Omission Via Attention: evict the tokens the current query attends to least.

Oren et al. 2024, "Transformers are Multi-State RNNs", https://arxiv.org/abs/2401.06104

After every forward call each cached token's score is the attention the call's last query (the current
token) gives it, averaged over heads and layers (all layers by default; `layers` picks some): the paper
averages over heads per layer; the cache here is shared by all layers, so the layers are averaged too.
Scores are not accumulated: each call replaces them. When the cache is over budget, the lowest-scored
tokens outside the sinks and pinned segments go, one per step as in the paper (`n_discard`), with no
recent window (`n_recent=0`) by default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from infinichat.kv.scored import ScoredPolicy

if TYPE_CHECKING:
    from infinichat.kv.sequence import KVSequence


@dataclass
class TOVAPolicy(ScoredPolicy):
    name: ClassVar[str] = "tova"

    def query_rows(self, n: int, stage: str) -> int:
        return 1  # the current (last) query only

    def reset(self, scores: torch.Tensor, start: int, end: int, rows: int) -> None:
        scores[:end] = 0.0  # this call's last query scores every slot afresh

    def observe(self, seq: KVSequence, layer: int, probs: torch.Tensor, row0: int, rows: int) -> None:
        S = probs.shape[-1]
        n_layers = len(self.layers) if self.layers else seq.store.cfg.n_layers
        seq.scores[:S] += probs[:, -1].mean(dim=0) / n_layers  # (S,): mean over heads and layers
