"""SnapKV: after a prompt, keep the tokens its last queries (an observation window) attend to most.

Li et al. 2024, "SnapKV: LLM Knows What You are Looking for Before Generation", https://arxiv.org/abs/2404.14469

Phase "prefill": a prompt streams into the cache past the budget (up to the capacity); in every prompt
forward call the last `window` queries (W=32) score the slots before them: per layer and head, the
attention summed over the window's queries, max-pooled along the slots (kernel 7, stride 1, so a kept
token brings its neighbours), then summed over heads and layers (all by default) into one score per
token (the paper selects per head; the cache here is one token-level cache). After the prompt's last
call, the lowest-scored tokens are evicted down to the budget; the window itself, the sinks and the
pinned segments are kept. With the question at the end of the prompt the selection is question-aware.
The engine makes a prompt's last call hold at least `window` tokens. If a prompt outgrows the capacity,
the cache is compressed early with the window of the latest call.

Decoding (not in the paper, which compresses once): when a decode step is over budget, the lowest-scored
token of the last compression goes; tokens appended since then score +inf, so once the scored ones are
gone the oldest of those go first. No attention is computed while decoding.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F

from infinichat.errors import InfinichatError
from infinichat.kv.scored import ScoredPolicy

if TYPE_CHECKING:
    from infinichat.kv.sequence import KVSequence


@dataclass
class SnapKVPolicy(ScoredPolicy):
    name: ClassVar[str] = "snapkv"
    phase: ClassVar[str] = "prefill"
    new_slot_score: ClassVar[float] = float("inf")

    window: int = 32
    kernel: int = 7
    chunk: int = 1024
    _sums: dict[int, torch.Tensor] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.window < 1 or self.kernel < 1 or self.kernel % 2 == 0:
            raise InfinichatError(
                f"snapkv: window must be >= 1 and kernel an odd number >= 1, got {self.window} and {self.kernel}"
            )

    @property
    def prompt_tail(self) -> int:
        return self.window

    def prefill_chunk(self, seq: KVSequence) -> int:
        return self.chunk  # the prompt may grow past the budget; the engine compresses after it

    def query_rows(self, n: int, stage: str) -> int:
        return 0 if stage == "decode" else min(self.window, n)

    def reset(self, scores: torch.Tensor, start: int, end: int, rows: int) -> None:
        scores[start:end] = self.new_slot_score
        if rows:
            scores[: end - rows] = 0.0  # re-scored by this call's window
            scores[end - rows : end] = self.new_slot_score  # the window itself is always kept
        self._sums.clear()

    def observe(self, seq: KVSequence, layer: int, probs: torch.Tensor, row0: int, rows: int) -> None:
        _H, r, S = probs.shape
        acc = probs.sum(dim=1) if row0 == 0 else self._sums[layer] + probs.sum(dim=1)  # (H, S)
        if row0 + r < rows:  # more row blocks of this layer to come
            self._sums[layer] = acc
            return
        self._sums.pop(layer, None)
        seq.scores[: S - rows] += pooled_window_scores(acc[:, : S - rows], self.kernel)


def pooled_window_scores(window_sums: torch.Tensor, kernel: int) -> torch.Tensor:
    """(H, n) window-summed attention over the slots before the window -> (n,): max-pooled along the slots
    per head (kernel, stride 1, same length), summed over heads."""
    if window_sums.shape[-1] == 0:
        return window_sums.sum(dim=0)
    pooled = F.max_pool1d(window_sums[None], kernel_size=kernel, stride=1, padding=kernel // 2)[0]  # (H, n)
    return pooled.sum(dim=0)
