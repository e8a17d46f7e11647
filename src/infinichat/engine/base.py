"""What every engine shares: the `Step` it yields and the sampling loop over its `prefill` / `decode_one`.

An engine (the PyTorch one, the llama.cpp backend) provides `cfg`, `eos_ids`, a store for new sequences
(`_new_store`) and one forward call `_append`; `Engine.prefill` chunks a prompt into such calls within the
sequence's budget, and `Engine.generate` samples tokens with our own `Sampler`, so a seeded run samples the same way on
every backend (given the same logits).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from infinichat.engine.batch import DecodeBatcher, PrefillPacer
from infinichat.engine.sampling import Sampler, SamplingParams, TokenConstraint
from infinichat.errors import InfinichatError
from infinichat.kv.policy import EvictionPolicy
from infinichat.kv.registry import make_policy
from infinichat.kv.sequence import KVSequence
from infinichat.kv.slots import SlotTable
from infinichat.model.config import ModelShape


@dataclass
class Step:
    """One generated token. `top` holds (token id, logprob) alternatives when asked for."""

    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


class Engine:
    """Base of the engines: subclasses set `cfg`, `eos_ids` and `max_chunk` and implement `_new_store` and
    `_append` (one forward call: make room within the budget, evaluate the tokens, record them in the sequence)."""

    cfg: ModelShape
    eos_ids: frozenset[int]
    max_chunk: int = 1024  # max tokens per forward call while prefilling
    logits_chunk: int = 1024  # the same when every token's logits are returned ((T, V) float32 per call)
    batcher: DecodeBatcher | None = None  # set by a driver that batches decode steps (engine/batch.py)
    pacer: PrefillPacer | None = None  # set by a driver that interleaves prompts with other steps (engine/batch.py)

    @property
    def device(self) -> torch.device:
        """Where the model computes (llama.cpp here: the CPU; the torch engine: its model's device)."""
        return torch.device("cpu")

    def new_sequence(
        self,
        budget: int | None = None,
        policy: str | EvictionPolicy = "full",
        capacity: int | None = None,
        **policy_params,
    ) -> KVSequence:
        """A KV sequence holding at most `budget` tokens (default: the capacity), evicting with `policy` (a name
        from `kv.POLICIES` plus its parameters, or a policy object). The engine's `_new_store` picks the
        capacity (default: the budget, else the model's context) and may refuse the policy."""
        pol = make_policy(policy, **policy_params)
        return KVSequence(self._new_store(pol, budget, capacity), budget, pol)

    def _new_store(self, policy: EvictionPolicy, budget: int | None, capacity: int | None) -> SlotTable:
        raise NotImplementedError

    def new_cache(self, capacity: int | None = None) -> KVSequence:
        """A sequence that never evicts (the `full` policy) with room for `capacity` tokens."""
        return self.new_sequence(capacity=capacity)

    def _append(self, seq: KVSequence, ids: torch.Tensor, all_logits: bool, stage: str = "decode") -> torch.Tensor:
        """`stage`: "prompt", "prompt_end" (a prompt's last call) or "decode" (see kv/policy.py)."""
        raise NotImplementedError

    def prefill(
        self, seq: KVSequence, tokens: Sequence[int], all_logits: bool = False, chunk: int | None = None
    ) -> torch.Tensor:
        """Append `tokens` to the sequence; logits of the last token (V,), or of every token (T, V).
        Tokens are evaluated in forward calls of at most `chunk` tokens (and what the policy allows); the
        budget is enforced before each call, so a long text streams through a small cache. With a pacer
        (engine/batch.py) and other generations waiting, calls hold at most its chunk, and it is paused between
        them (where a driver may cancel this prefill by raising)."""
        if len(tokens) == 0:
            raise InfinichatError("cannot evaluate an empty token list")
        if not seq.policy.drops_tokens and seq.length + len(tokens) > seq.budget:
            seq.make_room(len(tokens))  # raises the policy's "context is full" error before any work
        ids = torch.as_tensor(tokens, dtype=torch.long)
        n, tail = len(tokens), seq.policy.prompt_tail
        outs = []
        a = 0
        pacer = self.pacer
        while a < n:
            if pacer is not None and pacer.submit is not None and not all_logits and chunk is None:
                want = min(self.max_chunk, seq.policy.prefill_chunk(seq), n - a)
                got = pacer.submit(seq, ids[a : a + want]) if self.can_batch_prompt(seq, want) else None
                if got is not None:  # the driver evaluated a prefix of it, batched with other sequences' chunks
                    done, out = got
                    a += done
                    if a >= n:
                        outs.append(out)
                    continue
            cap = self.logits_chunk if all_logits else self.max_chunk
            if pacer is not None and pacer.waiting():
                cap = min(cap, pacer.chunk)
            step = min(chunk or cap, cap, seq.policy.prefill_chunk(seq))
            if step < n - a < step + tail:  # the last call must hold the policy's tail (SnapKV's window)
                step = max(1, n - a - tail)
            last = a + step >= n
            t0 = time.perf_counter()
            out = self._append(seq, ids[a : a + step], all_logits, "prompt_end" if last else "prompt")
            if pacer is not None:
                pacer.seconds += time.perf_counter() - t0
            a += step
            if all_logits or last:
                outs.append(out)
            if pacer is not None and not last:
                pacer.pause()
        return torch.cat(outs) if all_logits else outs[-1]

    def decode_one(self, seq: KVSequence, token: int) -> torch.Tensor:
        if self.batcher is not None:
            done = self.batcher.claim(seq, token)
            if done is not None:  # computed in a batched call: record the token
                positions, logits = done
                seq.append(torch.tensor([token]), positions)
                return logits
        return self._append(seq, torch.tensor([token]), False, "decode")

    def can_batch_prompt(self, seq: KVSequence, n: int) -> bool:
        """Whether the next `n` prompt tokens of `seq` may be evaluated in a batched call (`prefill_rows`): a plain
        forward call (no eviction, recomputation, attention weights or prompt-end compression)."""
        return False

    def prefill_rows(self, items: Sequence[tuple[KVSequence, torch.Tensor]]) -> list[torch.Tensor]:
        """One forward call for several sequences' prompt chunks (ids (T_i,) each): appends each chunk to its
        sequence; per sequence the logits (V,) of its chunk's last token."""
        raise NotImplementedError(f"{type(self).__name__} does not batch prompts")

    def can_batch(self, seq: KVSequence) -> bool:
        """Whether the next decode step of `seq` may run in a batched call (`decode_rows`): an engine that
        batches says yes when the step is a plain forward (no eviction, recomputation or attention weights)."""
        return False

    def decode_rows(self, items: Sequence[tuple[KVSequence, int]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One forward call for several sequences, one token each: per sequence (positions (1,), logits (V,)).
        Writes each one's K/V at its next slot and commits nothing (`decode_one` records the token)."""
        raise NotImplementedError(f"{type(self).__name__} does not batch decode steps")

    def generate(
        self,
        cache: KVSequence,
        prompt: Sequence[int],
        params: SamplingParams,
        history: Sequence[int] = (),
        should_stop: Callable[[], bool] | None = None,
        logits: torch.Tensor | None = None,
        dry_breakers: np.ndarray | None = None,
        constraint: TokenConstraint | None = None,
    ) -> Iterator[Step]:
        """Evaluate `prompt` (may be empty when `logits` of the last cached token are given), then sample up
        to `params.max_tokens` tokens, yielding each. Stops at an EOS token (not yielded), when
        `should_stop()` says so, or when the cache is full (a policy that never evicts, at its budget).
        `history` = the tokens already in the cache, for the repetition penalties and DRY; `dry_breakers` =
        the (V,) bool mask of DRY's sequence breakers (`Tokenizer.tokens_containing`), needed when DRY is on;
        `constraint` = the grammar built from `params.grammar` (engine/grammar.py): the generation stops where it
        is complete.
        Stop strings are text-level: the caller checks them and closes the generator."""
        params.validate()
        sampler = Sampler(params, self.cfg.vocab_size, dry_breakers, constraint)
        seen = list(history) + list(prompt)
        if prompt:
            logits = self.prefill(cache, prompt)
        if logits is None:
            raise InfinichatError("nothing to generate from: give a prompt or the last logits")
        for _ in range(params.max_tokens):
            if should_stop is not None and should_stop():
                return
            step = sampler.sample(logits, seen)
            if step.token in self.eos_ids:
                return
            seen.append(step.token)
            last = cache.full or (constraint is not None and constraint.done)  # no next step to compute
            if self.batcher is not None and not last:
                self.batcher.offer(cache, step.token)  # the driver may compute the next step batched
            yield Step(step.token, step.logprob, step.top)
            if last:
                return
            logits = self.decode_one(cache, step.token)
