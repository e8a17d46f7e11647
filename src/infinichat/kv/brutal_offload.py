"""Brutal offload: the OmniKV paper's offloading baseline: the K/V of the later layers live in CPU memory
and, at every decode step, each of those layers' whole K/V is moved to the compute device.

Hao et al., "OmniKV: Dynamic Context Selection for Efficient Long-Context LLMs", ICLR 2025,
https://openreview.net/forum?id=ulCAPXYXfa (the "brutal offload" baseline of its speed comparison)

Attention is full everywhere (the logits equal `full`); what differs is where the K/V live: the layers
OmniKV with the same `filter_layers` would serve with picked tokens are offloaded, the others get
device-resident mirrors (kv/offload.py). Prompts too: the offloaded layers' K/V are read from host memory for
every call. On a CPU-only machine nothing moves; `moved_bytes` counts it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, ClassVar, Self

from infinichat.kv.offload import LayerMirrors, mirrors_for
from infinichat.kv.omnikv import check_filter_layers, resolve_filter_layers
from infinichat.kv.policy import EvictionPolicy, context_full
from infinichat.kv.store import torch_store
from infinichat.model.attention import AttentionRequest

if TYPE_CHECKING:
    from infinichat.kv.sequence import KVSequence


@dataclass
class BrutalOffloadPolicy(EvictionPolicy):
    name: ClassVar[str] = "brutal-offload"
    offloads: ClassVar[bool] = True
    phase: ClassVar[str] = "decode"
    drops_tokens: ClassVar[bool] = False

    filter_layers: tuple[int, ...] | None = None  # None: the model's measured OmniKV default
    device: str | None = None
    _mirrors: LayerMirrors | None = field(default=None, init=False, repr=False, compare=False)
    last_request: AttentionRequest | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.filter_layers is not None:
            self.filter_layers = check_filter_layers(self.name, self.filter_layers)

    def fork(self) -> Self:
        """The settings alone: the mirrors belong to the source's store (the fork's first call builds its own)."""
        return replace(self)

    def select(self, seq: KVSequence, n_needed: int) -> list[tuple[int, int]]:
        raise context_full(seq, n_needed, f"{self.name} never evicts: raise the budget")

    def attention_request(self, seq: KVSequence, start: int, n: int, stage: str) -> AttentionRequest | None:
        store = torch_store(seq.store, self.name)
        filters = resolve_filter_layers(self.name, self.filter_layers, store.cfg)
        self._mirrors = mirrors_for(self._mirrors, filters, store, self.device)
        self.last_request = AttentionRequest(resident=self._mirrors.sync(store, start, start + n), transfer=True)
        return self.last_request
