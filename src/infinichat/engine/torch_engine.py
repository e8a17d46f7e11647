"""The PyTorch engine: token ids in, logits / sampled tokens out. No chat templates, no JSON.

gpt-fast style: `prefill` and `decode_one` are small methods over an explicit cache (a `kv.KVSequence`);
`generate` is the loop that samples, checks stop conditions and yields one `Step` per token. Before each
forward call the sequence makes room within its budget through its eviction policy; a policy that asks
for recomputation leaves stale slots, which are re-evaluated here before the new tokens.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from infinichat.engine.sampling import Sampler, SamplingParams
from infinichat.errors import InfinichatError
from infinichat.kv.policy import EvictionPolicy
from infinichat.kv.registry import make_policy
from infinichat.kv.sequence import KVSequence
from infinichat.kv.store import KVStore
from infinichat.model.config import ModelConfig
from infinichat.model.transformer import Transformer

log = logging.getLogger(__name__)

# Max tokens per forward call while prefilling. A prompt from slot 0 in one call uses SDPA's causal kernel
# (no mask) and converts the layers' weights to float32 once: 2048 covers the common prompt in one call.
# Later chunks build a (T, start+T) bool mask; all-logits calls stop at LOGITS_CHUNK ((T, V) float32 each).
PREFILL_CHUNK = 2048
LOGITS_CHUNK = 1024


def physical_cores() -> int:
    """Physical cores available to this process (hyper-threads share one core's matmul units)."""
    try:
        n_avail = len(os.sched_getaffinity(0))
    except AttributeError:
        n_avail = os.cpu_count() or 1
    try:
        with open("/proc/cpuinfo") as f:
            info = {k.strip(): v for k, v in (ln.split(":", 1) for ln in f if ln.startswith(("siblings", "cpu cores")))}
        siblings, cores = int(info["siblings"]), int(info["cpu cores"])
        if siblings > cores:
            return max(1, n_avail * cores // siblings)
    except (OSError, ValueError, KeyError):
        pass
    return max(1, n_avail)


def set_threads(n: int | None) -> int:
    n = n or physical_cores()
    torch.set_num_threads(n)
    return n


@dataclass
class Step:
    """One generated token. `top` holds (token id, logprob) alternatives when asked for."""

    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


class TorchEngine:
    def __init__(self, model: Transformer, eos_ids: Sequence[int] = ()):
        self.model = model
        self.cfg: ModelConfig = model.cfg
        self.eos_ids = frozenset(eos_ids)

    def new_sequence(
        self,
        budget: int | None = None,
        policy: str | EvictionPolicy = "full",
        capacity: int | None = None,
        **policy_params,
    ) -> KVSequence:
        """A KV sequence holding at most `budget` tokens (default: the capacity), evicting with `policy`
        (a name from `kv.POLICIES` plus its parameters, or a policy object). The capacity defaults to the
        budget, else the model's trained context; positions never reach it."""
        capacity = capacity or budget or self.cfg.max_position
        store = KVStore(self.cfg, capacity, self.model.dtype, rope=self.model.rope)
        return KVSequence(store, budget, make_policy(policy, **policy_params))

    def new_cache(self, capacity: int | None = None) -> KVSequence:
        """A sequence that never evicts (the `full` policy) with room for `capacity` tokens."""
        return self.new_sequence(capacity=capacity)

    # ------------------------------------------------------------------ forward wrappers
    def prefill(
        self, seq: KVSequence, tokens: Sequence[int], all_logits: bool = False, chunk: int | None = None
    ) -> torch.Tensor:
        """Append `tokens` to the sequence; logits of the last token (V,), or of every token (T, V).
        Tokens are evaluated in forward calls of at most `chunk` tokens (and what the policy allows); the
        budget is enforced before each call, so a long text streams through a small cache."""
        if len(tokens) == 0:
            raise InfinichatError("cannot evaluate an empty token list")
        if not seq.policy.drops_tokens and seq.length + len(tokens) > seq.budget:
            seq.make_room(len(tokens))  # raises the policy's "context is full" error before any work
        ids = torch.as_tensor(tokens, dtype=torch.long)
        outs = []
        a = 0
        while a < len(tokens):
            cap = LOGITS_CHUNK if all_logits else PREFILL_CHUNK
            step = min(chunk or cap, cap, seq.policy.prefill_chunk(seq))
            out = self._append(seq, ids[a : a + step], all_logits)
            a += step
            if all_logits or a >= len(tokens):
                outs.append(out)
        return torch.cat(outs) if all_logits else outs[-1]

    def decode_one(self, seq: KVSequence, token: int) -> torch.Tensor:
        return self._append(seq, torch.tensor([token]), False)

    def _append(self, seq: KVSequence, ids: torch.Tensor, all_logits: bool) -> torch.Tensor:
        """One forward call: make room within the budget, recompute stale slots, evaluate `ids` (T,)."""
        seq.make_room(ids.shape[0])
        if seq.stale_from is not None:
            self._recompute(seq)
        start = seq.length
        positions = seq.next_positions(ids.shape[0])
        out = self.model(ids, positions, seq.store, start, all_logits=all_logits)
        seq.append(ids, positions)
        return out

    def _recompute(self, seq: KVSequence) -> None:
        """Re-evaluate the K/V of slots [stale_from, length) in place (a recomputing policy evicted)."""
        store, end = seq.store, seq.length
        for a in range(seq.stale_from, end, PREFILL_CHUNK):
            b = min(a + PREFILL_CHUNK, end)
            self.model(store.tokens[a:b], store.positions[a:b], store, a)
        seq.mark_fresh()

    # ------------------------------------------------------------------ the loop
    def generate(
        self,
        cache: KVSequence,
        prompt: Sequence[int],
        params: SamplingParams,
        history: Sequence[int] = (),
        should_stop: Callable[[], bool] | None = None,
        logits: torch.Tensor | None = None,
    ) -> Iterator[Step]:
        """Evaluate `prompt` (may be empty when `logits` of the last cached token are given), then sample up
        to `params.max_tokens` tokens, yielding each. Stops at an EOS token (not yielded), when
        `should_stop()` says so, or when the cache is full (a policy that never evicts, at its budget).
        `history` = the tokens already in the cache, for repetition penalties.
        Stop strings are text-level: the caller checks them and closes the generator."""
        params.validate()
        sampler = Sampler(params, self.cfg.vocab_size)
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
            yield Step(step.token, step.logprob, step.top)
            if cache.full:
                return
            logits = self.decode_one(cache, step.token)
