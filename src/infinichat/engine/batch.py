"""Continuous batching of decode steps across sequences: B generations advanced by one token in one forward.

A generation (`Engine.generate`) that has just sampled a token *offers* its next decode step (the sequence
and the token) before yielding it. Whoever drives several generations (the server's worker) takes each
generation's offer after stepping it, then, before the next round, runs all offers in one batched forward
(`run`, at most `max_batch` rows per call). The forward writes each sequence's K/V into its own next slot
but commits nothing: when the generation resumes, its `decode_one` claims the logits and records the token
(`KVSequence.append`). A generation that does not resume (a stop string, a cancel, a disconnect) leaves its
sequence exactly as it was: the slot past its length is unused space.

Only a step that needs no eviction, no recomputation and no attention weights is offered
(`Engine.can_batch`); the others run alone in the generation's own `decode_one`, between batched calls.
A driver that never calls `run` changes nothing: every claim misses and each step runs alone.

Chunked prefill (`PrefillPacer`): a driver that also sets `Engine.pacer` has a long prompt evaluated in calls of
at most `chunk` tokens while other generations are waiting, and advances them between the calls, so a long
prompt does not freeze the other streams. A driver that can suspend a prefill (the server's worker) also takes
the prompt chunks themselves (`submit`) and evaluates the chunks of several sequences in one forward call
(`Engine.prefill_rows`): batched prefill.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from infinichat.kv.sequence import KVSequence

if TYPE_CHECKING:
    from infinichat.engine.base import Engine


@dataclass
class Offer:
    seq: KVSequence
    token: int
    length: int  # the sequence's length when offered: a claim checks nothing moved since


@dataclass
class _Ready:
    offer: Offer
    positions: torch.Tensor  # (1,)
    logits: torch.Tensor  # (V,) float32


class DecodeBatcher:
    def __init__(self, engine: Engine, max_batch: int = 8):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.engine = engine
        self.max_batch = max_batch
        self._offers: dict[int, Offer] = {}  # id(seq) -> its latest offer since the last `take`
        self._ready: dict[int, _Ready] = {}  # id(seq) -> the logits of its offered step
        self.sizes: Counter[int] = Counter()  # batch size -> decode forward calls run with it (alone: 1)
        self.tokens = 0  # decode steps run through `run`

    # ------------------------------------------------------------------ generation side
    def offer(self, seq: KVSequence, token: int) -> None:
        if self.engine.can_batch(seq):
            self._offers[id(seq)] = Offer(seq, token, seq.length)

    def claim(self, seq: KVSequence, token: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(positions (1,), logits (V,)) of this sequence's precomputed step, if `run` computed it for
        exactly this token at this length; None otherwise (the caller runs the step itself: counted as a
        forward call of one sequence)."""
        r = self._ready.pop(id(seq), None)
        if r is None or r.offer.seq is not seq or r.offer.token != token or r.offer.length != seq.length:
            self.sizes[1] += 1
            return None
        return r.positions, r.logits

    # ------------------------------------------------------------------ driver side
    def take(self) -> list[Offer]:
        """The offers made since the last take (at most one per sequence: the latest)."""
        out = list(self._offers.values())
        self._offers.clear()
        return out

    def run(self, offers: Iterable[Offer]) -> int:
        """Compute the offered steps that still hold (same length, still batchable), in forward calls of at
        most `max_batch` sequences; returns how many were computed. Results wait for their claims."""
        live = [
            o for o in offers if o.seq.length == o.length and self.engine.can_batch(o.seq) and not self.pending(o)
        ]  # an offer whose result still waits for its claim (kept from an earlier round) is not run again
        size = min(self.max_batch, getattr(self.engine, "max_rows", self.max_batch))  # llama.cpp: its n_seq_max
        for a in range(0, len(live), size):
            group = live[a : a + size]
            outs = self.engine.decode_rows([(o.seq, o.token) for o in group])
            for o, (positions, logits) in zip(group, outs, strict=True):
                self._ready[id(o.seq)] = _Ready(o, positions, logits)
            self.sizes[len(group)] += 1
            self.tokens += len(group)
        return len(live)

    def pending(self, o: Offer) -> bool:
        """Whether this offer's result is computed and still waits for its claim."""
        r = self._ready.get(id(o.seq))
        return r is not None and r.offer is o and o.seq.length == o.length

    def clear(self, keep: Iterable[Offer] = ()) -> None:
        """Drop unclaimed results (call after every generation had its turn), except those of `keep` (offers of
        generations whose turn did not reach the engine, e.g. it delivered a cache-map event: claimed later).
        An engine whose cache keeps a written step outside the sequence's length (llama.cpp's cells) removes
        it (`discard_row`)."""
        kept = {id(o.seq) for o in keep if self.pending(o)}
        drop = [k for k in self._ready if k not in kept]
        discard = getattr(self.engine, "discard_row", None)
        for k in drop:
            r = self._ready.pop(k)
            if discard is not None:
                discard(r.offer.seq, r.positions)


@dataclass
class PrefillPacer:
    """Set on an engine (`Engine.pacer`) by a driver that interleaves prompts with other generations' steps.
    While `waiting()` says others are waiting, `Engine.prefill` evaluates a prompt in forward calls of at most
    `chunk` tokens and calls `pause()` between two calls: the driver advances the others there, or raises to
    cancel this prefill (the tokens evaluated so far stay in the cache, consistent; the caller's all-or-nothing
    rule decides what to keep). With nobody waiting, a prompt is evaluated as without a pacer.
    With `submit`, a chunk the engine can batch (`Engine.can_batch_prompt`) goes to the driver instead."""

    chunk: int
    waiting: Callable[[], bool]
    pause: Callable[[], None]
    # hands a prompt chunk (seq, ids (T,)) to the driver, which evaluates a prefix of it, batched with other
    # sequences' chunks (`Engine.prefill_rows`), and returns (tokens evaluated, logits (V,) of the last); None
    # where the caller cannot wait for it (the engine evaluates the chunk itself)
    submit: Callable[[KVSequence, torch.Tensor], tuple[int, torch.Tensor] | None] | None = None
    seconds: float = 0.0  # time spent in prompt forward calls (the driver's metrics: server/first_item.py)

    def __post_init__(self) -> None:
        if self.chunk < 1:
            raise ValueError(f"the prefill chunk must be at least 1 token, got {self.chunk}")
