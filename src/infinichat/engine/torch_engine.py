"""The PyTorch engine: token ids in, logits / sampled tokens out. No chat templates, no JSON.

gpt-fast style: `prefill` and `decode_one` are small methods over an explicit cache; `generate` is the
loop that samples, checks stop conditions and yields one `Step` per token.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from infinichat.engine.sampling import Sampler, SamplingParams
from infinichat.errors import InfinichatError
from infinichat.kv.cache import KVCache
from infinichat.model.config import ModelConfig
from infinichat.model.transformer import Transformer

log = logging.getLogger(__name__)

PREFILL_CHUNK = 1024  # tokens per forward call while prefilling (bounds the attention-mask memory)


def physical_cores() -> int:
    """Physical cores available to this process (hyper-threads share one core's matmul units)."""
    try:
        n_avail = len(os.sched_getaffinity(0))
    except AttributeError:
        n_avail = os.cpu_count() or 1
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        siblings = [int(line.split(":")[1]) for line in text.splitlines() if line.startswith("siblings")]
        cores = [int(line.split(":")[1]) for line in text.splitlines() if line.startswith("cpu cores")]
        if siblings and cores and siblings[0] > cores[0]:
            return max(1, n_avail * cores[0] // siblings[0])
    except (OSError, ValueError, IndexError):
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

    def new_cache(self, capacity: int | None = None) -> KVCache:
        return KVCache(self.cfg, capacity or self.cfg.max_position, self.model.dtype)

    # ------------------------------------------------------------------ forward wrappers
    def prefill(self, cache: KVCache, tokens: Sequence[int], all_logits: bool = False) -> torch.Tensor:
        """Append `tokens` to the cache; logits of the last token (V,), or of every token (T, V)."""
        if not tokens:
            raise InfinichatError("cannot evaluate an empty token list")
        if cache.length + len(tokens) > cache.capacity:
            raise InfinichatError(
                f"the context is full: {cache.length} cached + {len(tokens)} new tokens > capacity {cache.capacity}"
            )
        ids = torch.tensor(tokens, dtype=torch.long)
        outs = []
        for a in range(0, len(tokens), PREFILL_CHUNK):
            chunk = ids[a : a + PREFILL_CHUNK]
            start = cache.length
            positions = torch.arange(start, start + len(chunk))
            last = a + PREFILL_CHUNK >= len(tokens)
            out = self.model(chunk, positions, cache, start, all_logits=all_logits)
            cache.length += len(chunk)
            if all_logits or last:
                outs.append(out)
        return torch.cat(outs) if all_logits else outs[-1]

    def decode_one(self, cache: KVCache, token: int) -> torch.Tensor:
        if cache.length + 1 > cache.capacity:
            raise InfinichatError(f"the context is full: {cache.length} tokens, capacity {cache.capacity}")
        start = cache.length
        logits = self.model(torch.tensor([token]), torch.tensor([start]), cache, start)
        cache.length += 1
        return logits

    # ------------------------------------------------------------------ the loop
    def generate(
        self,
        cache: KVCache,
        prompt: Sequence[int],
        params: SamplingParams,
        history: Sequence[int] = (),
        should_stop: Callable[[], bool] | None = None,
        logits: torch.Tensor | None = None,
    ) -> Iterator[Step]:
        """Evaluate `prompt` (may be empty when `logits` of the last cached token are given), then sample up
        to `params.max_tokens` tokens, yielding each. Stops at an EOS token (not yielded) or when
        `should_stop()` says so. `history` = the tokens already in the cache, for repetition penalties.
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
            if cache.length >= cache.capacity:
                return
            logits = self.decode_one(cache, step.token)
