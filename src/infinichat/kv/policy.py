"""Eviction policies: the interface, and the oldest-first selection shared by the sliding policies.

A policy is a small dataclass. The sequence asks it, when new tokens do not fit the budget, which slots
to evict (`select(seq, n_needed)` -> sorted, disjoint slot spans); the sequence checks the answer (pinned
slots are never evicted, enough room is made) and cuts the spans out with one compaction and re-rotation.
Engines branch on the declared capabilities, never on the policy's type:

- `needs_attention_weights`: before every forward call the engine asks `attention_request(seq, start, n,
  stage)` for a `model.attention.AttentionRequest` (None: plain attention for this call). The request
  names the layers whose attention probabilities the forward computes (only those) and the policy's
  callback that turns them into per-slot scores (`seq.scores`) or token selections.
- `phase`: when the policy acts: "overflow" (evict when appended tokens would exceed the budget: the
  sliding policies, H2O, TOVA), "prefill" (a prompt may grow the cache past the budget, up to the
  capacity; after its last forward call the cache is compressed to the budget: SnapKV; during decoding
  it evicts on overflow like the others) or "decode" (selects what each decode step attends to: OmniKV).
- `offloads`: some layers' K/V live off the compute device; the engine asks for a request at every forward
  call, as for `needs_attention_weights`, though no weights are computed (brutal-offload).
- `drops_tokens`: False for a policy that never evicts (`full`) or only selects what to attend to.
- `recompute`: kept slots after an eviction must have their K/V recomputed from scratch (the engine
  re-evaluates `seq.stale_from..length` before appending).
- `scoring_pass`: after a prompt that leaves the cache over budget, before compressing it, the engine runs
  the policy's `probe_calls(seq)`: scratch forward calls after the cache's last slot (in the store's
  `scratch_slots()` extra room) whose tokens are never appended, each with its attention request (KVzip).

A forward call's `stage` is "prompt" (a chunk of a prompt), "prompt_end" (its last chunk) or "decode"
(one generated token).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Self

import torch

from infinichat.errors import InfinichatError

if TYPE_CHECKING:
    from infinichat.kv.sequence import KVSequence
    from infinichat.model.attention import AttentionRequest

STAGES = ("prompt", "prompt_end", "decode")


@dataclass
class EvictionPolicy:
    name: ClassVar[str] = "?"
    needs_attention_weights: ClassVar[bool] = False
    offloads: ClassVar[bool] = False
    phase: ClassVar[str] = "overflow"
    drops_tokens: ClassVar[bool] = True
    recompute: ClassVar[bool] = False
    scoring_pass: ClassVar[bool] = False

    def home_in_host_memory(self) -> bool:
        """Whether this instance keeps the store's K/V in host memory, the compute device holding only mirrors and
        moved rows (kv/offload.py): where the model is on a GPU, the engine then allocates the store on the CPU."""
        return self.offloads

    def fork(self) -> Self:
        """This policy for a forked sequence (`KVSequence.fork`): a deep copy, its settings and what it learned of
        the sequence. A policy holding per-store device state (offload mirrors, CUDA streams: nothing a deep
        copy can or should copy) overrides it."""
        return copy.deepcopy(self)

    def select(self, seq: KVSequence, n_needed: int) -> list[tuple[int, int]]:
        """Slot spans to evict so that at least `n_needed` slots are freed."""
        raise NotImplementedError

    def prefill_chunk(self, seq: KVSequence) -> int:
        """How many tokens one forward call should append at most (the engine chunks prefills by it)."""
        return seq.budget

    @property
    def prompt_tail(self) -> int:
        """The last forward call of a prompt must hold at least this many tokens (SnapKV's window)."""
        return 0

    def attention_request(self, seq: KVSequence, start: int, n: int, stage: str) -> AttentionRequest | None:
        """What the forward call appending `n` tokens at slot `start` must compute for this policy (only
        asked when `needs_attention_weights`)."""
        return None

    def scratch_slots(self) -> int:
        """Slots past the budget the store needs for the scratch calls of a `scoring_pass`."""
        return 0

    def probe_calls(self, seq: KVSequence) -> Iterator[tuple[torch.Tensor, AttentionRequest]]:
        """The scratch forward calls of a `scoring_pass`: (ids (n,), request) each."""
        return iter(())


@dataclass
class SlidingPolicy(EvictionPolicy):
    """Evict the oldest unprotected tokens, at least `n_discard` at a time (at most half of the evictable
    tokens, so that a recent window always survives), to amortize the re-rotation. Protected: pinned
    segments; with nothing pinned, the first `n_sink` tokens. With `snap`, the cut moves to a segment
    start (or a slot holding one of `boundary_tokens`, e.g. a chat template's message start) when one
    lies within a quarter of the chunk."""

    n_sink: int = 0
    n_discard: int = 256
    snap: bool = False
    boundary_tokens: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.n_sink < 0 or self.n_discard < 1:
            raise InfinichatError(
                f"{self.name}: n_sink must be >= 0 and n_discard >= 1, got {self.n_sink} and {self.n_discard}"
            )

    def protected(self, seq: KVSequence) -> torch.Tensor:
        mask = seq.pinned_mask()  # (length,) bool
        if self.n_sink and not mask.any():
            mask[: self.n_sink] = True
        return mask

    def prefill_chunk(self, seq: KVSequence) -> int:
        """Half the evictable room, so that each chunk still sees a recent window."""
        n_protected = max(int(self.protected(seq).sum()), min(self.n_sink, seq.budget))
        return max(1, (seq.budget - n_protected) // 2)

    def select(self, seq: KVSequence, n_needed: int) -> list[tuple[int, int]]:
        cand = (~self.protected(seq)).nonzero().flatten()  # evictable slots, oldest first
        if cand.shape[0] < n_needed:
            raise InfinichatError(
                f"{self.name}: cannot free {n_needed} slots: only {cand.shape[0]} of {seq.length} cached tokens "
                f"are evictable (the rest are pinned or sinks) within the budget of {seq.budget}"
            )
        target = max(n_needed, min(self.n_discard, cand.shape[0] // 2))
        count = self._snap(seq, cand, n_needed, target) if self.snap else target
        return slots_to_spans(cand[:count])

    def _snap(self, seq: KVSequence, cand: torch.Tensor, lo: int, target: int) -> int:
        """The eviction count whose cut lands on a boundary nearest to `target` (within a quarter of it)."""
        bounds = set(seq.segments.boundaries())
        if self.boundary_tokens:
            hits = torch.isin(seq.store.tokens[: seq.length], torch.tensor(self.boundary_tokens))
            bounds.update(hits.nonzero().flatten().tolist())
        slack = max(1, target // 4)
        counts = torch.searchsorted(cand, torch.tensor(sorted(bounds), dtype=torch.long)).tolist()  # evicted before b
        near = [c for c in counts if lo <= c <= cand.shape[0] and abs(c - target) <= slack]
        return min(near, key=lambda c: (abs(c - target), c)) if near else target


def context_full(seq: KVSequence, n_needed: int, why: str) -> InfinichatError:
    """The error of a policy that never evicts, when `n_needed` slots would have to go."""
    return InfinichatError(
        f"the context is full: {seq.length} cached + {n_needed - seq.length + seq.budget} new tokens > "
        f"budget {seq.budget}; {why}"
    )


def slots_to_spans(slots: torch.Tensor) -> list[tuple[int, int]]:
    """Sorted slot indices (n,) -> maximal runs as (start, end) spans."""
    if slots.numel() == 0:
        return []
    breaks = ((slots[1:] - slots[:-1]) != 1).nonzero().flatten() + 1
    starts = [0, *breaks.tolist()]
    ends = [*breaks.tolist(), slots.shape[0]]
    s = slots.tolist()
    return [(s[a], s[b - 1] + 1) for a, b in zip(starts, ends, strict=True)]
