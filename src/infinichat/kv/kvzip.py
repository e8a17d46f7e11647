"""KVzip: keep the tokens the model needs to reconstruct its context from the cache. Query-agnostic.

Kim et al. 2025, "KVzip: Query-Agnostic KV Cache Compression with Context Reconstruction",
https://arxiv.org/abs/2505.23416

After a prompt, the model is made to repeat it: the prompt's tokens (after an optional `prefix`, e.g. the
ids of "Repeat the previous context:") are evaluated after the cache, in chunks of `repeat_chunk` tokens, as
scratch calls whose tokens are never appended. A cached token's score is the most attention any of the
repeating queries gives it (max over query rows and heads), per layer, summed over layers (all by default).
A token the reconstruction needs is one an answer about the context may need, whatever the question; so
the cache can be compressed once and serve every later question (the paper's point against SnapKV).

The cost is the extra pass: about one more forward over the scored tokens, with explicit attention
weights over the whole cache (README: measured). It runs only when a prompt leaves the cache over budget
and covers only the tokens not scored yet (those since the last compression), so a later turn pays for its
own tokens only; an already scored token keeps the larger of its old and new score.

Phase "prefill", as SnapKV: a prompt streams into the cache past the budget, then the reconstruction pass
scores it and the lowest-scored tokens go down to the budget; the last `n_recent` tokens (the end of the
prompt) are softly kept. While decoding, over budget, the lowest-scored token goes, then the oldest
unscored one. Scratch room: the engine gives the store `scratch_slots()` slots past the budget.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch

from infinichat.errors import InfinichatError
from infinichat.kv.scored import ScoredPolicy
from infinichat.model.attention import AttentionRequest

if TYPE_CHECKING:
    from infinichat.kv.sequence import KVSequence


@dataclass
class KVzipPolicy(ScoredPolicy):
    name: ClassVar[str] = "kvzip"
    phase: ClassVar[str] = "prefill"
    scoring_pass: ClassVar[bool] = True
    new_slot_score: ClassVar[float] = float("inf")  # not scored yet

    n_recent: int | None = 32
    chunk: int = 1024  # prompt tokens per forward call
    repeat_chunk: int = 512  # reconstructed tokens per scratch call
    prefix: tuple[int, ...] = ()  # ids put before each reconstructed chunk (e.g. a "repeat" instruction)
    _best: dict[int, torch.Tensor] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.repeat_chunk < 1:
            raise InfinichatError(f"kvzip: repeat_chunk must be >= 1, got {self.repeat_chunk}")
        if isinstance(self.prefix, int):  # one id from the command line ("prefix=42")
            self.prefix = (self.prefix,)
        try:
            self.prefix = tuple(int(i) for i in self.prefix)
        except (TypeError, ValueError):
            raise InfinichatError(f"kvzip: prefix must be token ids, got {self.prefix!r}") from None

    def scratch_slots(self) -> int:
        return self.repeat_chunk + len(self.prefix)

    def prefill_chunk(self, seq: KVSequence) -> int:
        return self.chunk  # the prompt may grow past the budget; the engine compresses after it

    def query_rows(self, n: int, stage: str) -> int:
        return 0  # no attention while the prompt streams in: the reconstruction pass scores it

    def probe_calls(self, seq: KVSequence) -> Iterator[tuple[torch.Tensor, AttentionRequest]]:
        """The reconstruction pass: (ids, request) per scratch forward call after the cache's last slot; the
        engine runs each and appends nothing. Scores are updated after the last call."""
        n = seq.length
        unscored = torch.isinf(seq.scores[:n])  # (n,)
        if not unscored.any():
            return
        tokens = seq.store.tokens[:n][unscored]  # (m,) in cache order
        room = seq.capacity - n - len(self.prefix)
        step = min(self.repeat_chunk, room)
        if step < 1:
            raise InfinichatError(
                f"kvzip: no scratch room for the reconstruction pass ({n} cached tokens, capacity {seq.capacity}); "
                f"give the sequence a capacity of at least budget + {self.scratch_slots()}"
            )
        layers = self.layer_set(seq)
        self._best = {}

        def observe(layer: int, probs: torch.Tensor, row0: int) -> None:
            got = probs[:, :, :n].amax(dim=(0, 1)).to(seq.scores.device)  # (n,): over heads and queries
            have = self._best.get(layer)
            self._best[layer] = got if have is None else torch.maximum(have, got)

        prefix = torch.tensor(self.prefix, dtype=torch.long)
        for a in range(0, tokens.shape[0], step):
            ids = torch.cat((prefix, tokens[a : a + step]))  # (p + c,)
            yield ids, AttentionRequest(layers=layers, rows=ids.shape[0], observe=observe)
        total = torch.stack(list(self._best.values())).sum(dim=0)  # (n,): summed over layers
        old = seq.scores[:n]
        seq.scores[:n] = torch.where(unscored, total, torch.maximum(old, total))
        self._best = {}
