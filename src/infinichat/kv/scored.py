"""The base of the attention-scored eviction policies (H2O, TOVA, SnapKV): selection written once.

A scored policy keeps one number per cache slot in `seq.scores` (the sequence compacts it along with the
slots). Before every forward call the engine asks the policy for an `AttentionRequest`: the policy resets
the new slots' scores and names the layers (default: all) and query rows whose attention probabilities it
needs; the forward hands them to `observe`, which folds them into the scores. When tokens must go, the
lowest-scored evictable ones go (ties: the oldest first), at least `n_discard` at a time.

Never evicted: pinned segments (the sequence enforces it too); with nothing pinned, the first `n_sink`
tokens (attention sinks, as in StreamingLLM: an addition to H2O/TOVA/SnapKV; `n_sink=0` gives the papers'
rules); and the last `n_recent` evictable tokens, a soft protection that shrinks when the budget leaves
no other choice.

The scores are token-level: one cache, shared by all layers and heads, so every policy aggregates its
per-layer, per-head attention into one score per token (each says how).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from infinichat.errors import InfinichatError
from infinichat.kv.policy import EvictionPolicy, slots_to_spans
from infinichat.model.attention import AttentionRequest

if TYPE_CHECKING:
    from infinichat.kv.sequence import KVSequence


@dataclass
class ScoredPolicy(EvictionPolicy):
    needs_attention_weights: ClassVar[bool] = True
    new_slot_score: ClassVar[float] = 0.0  # the score of a freshly appended slot before any observation

    n_sink: int = 4
    n_recent: int | None = 0
    n_discard: int = 1
    layers: tuple[int, ...] | None = None  # layers whose attention counts (None: every layer)
    chunk: int = 256  # prompt tokens per forward call, at most

    def __post_init__(self) -> None:
        if self.n_sink < 0 or (self.n_recent or 0) < 0 or self.n_discard < 1 or self.chunk < 1:
            raise InfinichatError(
                f"{self.name}: n_sink and n_recent must be >= 0, n_discard and chunk >= 1; got n_sink="
                f"{self.n_sink}, n_recent={self.n_recent}, n_discard={self.n_discard}, chunk={self.chunk}"
            )
        if self.layers is not None:
            self.layers = tuple(int(i) for i in self.layers)
            if not self.layers:
                raise InfinichatError(f"{self.name}: layers must name at least one layer (or be None: all)")

    # ------------------------------------------------------------------ what to keep
    def protected(self, seq: KVSequence) -> torch.Tensor:
        """(length,) bool: pinned segments; with nothing pinned, the first n_sink tokens."""
        mask = seq.pinned_mask()
        if self.n_sink and not mask.any():
            mask[: self.n_sink] = True
        return mask

    def recent(self, seq: KVSequence) -> int:
        """How many of the newest evictable tokens are (softly) protected."""
        return self.n_recent or 0

    def prefill_chunk(self, seq: KVSequence) -> int:
        """At most `chunk` tokens, and half the room left by the protected and recent tokens."""
        n_protected = max(int(self.protected(seq).sum()), min(self.n_sink, seq.budget))
        return max(1, min(self.chunk, (seq.budget - n_protected - self.recent(seq)) // 2))

    def select(self, seq: KVSequence, n_needed: int) -> list[tuple[int, int]]:
        free = (~self.protected(seq)).nonzero().flatten()  # evictable slots, oldest first
        if free.shape[0] < n_needed:
            raise InfinichatError(
                f"{self.name}: cannot free {n_needed} slots: only {free.shape[0]} of {seq.length} cached tokens "
                f"are evictable (the rest are pinned or sinks) within the budget of {seq.budget}"
            )
        n_recent = min(self.recent(seq), free.shape[0] - n_needed)
        cand = free[: free.shape[0] - n_recent]
        count = max(n_needed, min(self.n_discard, cand.shape[0] // 2))
        scores = seq.scores[: seq.length].cpu()[cand]  # (n_cand,): the choice is made on the host
        lowest = torch.argsort(scores, stable=True)[:count]  # ties: the oldest first
        return slots_to_spans(cand[lowest].sort().values)

    # ------------------------------------------------------------------ scoring
    def layer_set(self, seq: KVSequence) -> frozenset[int]:
        n_layers = seq.store.cfg.n_layers
        if self.layers is None:
            return frozenset(range(n_layers))
        bad = [i for i in self.layers if not 0 <= i < n_layers]
        if bad:
            raise InfinichatError(f"{self.name}: layers {bad} do not exist; this model has layers 0..{n_layers - 1}")
        return frozenset(self.layers)

    def query_rows(self, n: int, stage: str) -> int:
        """How many of the call's last queries are scored (0: no request for this call)."""
        raise NotImplementedError

    def reset(self, scores: torch.Tensor, start: int, end: int, rows: int) -> None:
        """Prepare `scores` before a forward call over slots [start, end) (default: new slots start fresh)."""
        scores[start:end] = self.new_slot_score

    def observe(self, seq: KVSequence, layer: int, probs: torch.Tensor, row0: int, rows: int) -> None:
        """Fold one layer's probabilities (H, r, S) of scored rows row0.. (of `rows`) into `seq.scores`."""
        raise NotImplementedError

    def attention_request(self, seq: KVSequence, start: int, n: int, stage: str) -> AttentionRequest | None:
        rows = self.query_rows(n, stage)
        self.reset(seq.scores, start, start + n, rows)
        if rows == 0:
            return None

        def observe(layer: int, probs: torch.Tensor, row0: int) -> None:
            self.observe(seq, layer, probs, row0, rows)

        return AttentionRequest(layers=self.layer_set(seq), rows=rows, observe=observe)
