"""StreamingLLM: attention sinks plus a recent window.

Xiao et al. 2023, "Efficient Streaming Language Models with Attention Sinks", https://arxiv.org/abs/2309.17453

The first tokens of a sequence soak up attention mass the model has to put somewhere ("attention sinks");
keeping them, plus the most recent tokens, keeps the model fluent for unlimited lengths. Here the sinks
are the pinned segments (a system prompt, a character card), or the first `n_sink` tokens when nothing is
pinned. The oldest other tokens are evicted in chunks of `n_discard`, the cut snapped to a segment or
message boundary when one is near; the kept keys are re-rotated so positions stay contiguous (positions
are assigned within the cache, as in the paper).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from infinichat.kv.policy import SlidingPolicy


@dataclass
class StreamingPolicy(SlidingPolicy):
    name: ClassVar[str] = "streaming"
    n_sink: int = 4
    snap: bool = True
