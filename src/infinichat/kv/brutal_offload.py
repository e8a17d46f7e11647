"""Brutal offload: the OmniKV paper's offloading baseline: the K/V of the later layers live in CPU memory
and, at every decode step, each of those layers' whole K/V is moved to the compute device.

Hao et al., "OmniKV: Dynamic Context Selection for Efficient Long-Context LLMs", ICLR 2025,
https://openreview.net/forum?id=ulCAPXYXfa (the "brutal offload" baseline of its speed comparison)

Attention is full everywhere (the logits equal `full`); what differs is where the K/V live: the layers
OmniKV with the same `filter_layers` would serve with picked tokens are offloaded, the others get
device-resident mirrors (kv/offload.py). On a CPU-only machine nothing moves; `moved_bytes` counts it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch

from infinichat.errors import InfinichatError
from infinichat.kv.offload import LayerMirrors
from infinichat.kv.omnikv import check_filter_layers
from infinichat.kv.omnikv_defaults import default_filter_layers
from infinichat.kv.policy import EvictionPolicy
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

    def select(self, seq: KVSequence, n_needed: int) -> list[tuple[int, int]]:
        raise InfinichatError(
            f"the context is full: {seq.length} cached + {n_needed - seq.length + seq.budget} new tokens > "
            f"budget {seq.budget}; {self.name} never evicts: raise the budget"
        )

    def attention_request(self, seq: KVSequence, start: int, n: int, stage: str) -> AttentionRequest | None:
        if stage != "decode":
            return None
        cfg = seq.store.cfg
        filters = self.filter_layers if self.filter_layers is not None else default_filter_layers(cfg)
        if filters[-1] >= cfg.n_layers:
            raise InfinichatError(f"{self.name}: filter layers {filters} do not all exist in a {cfg.n_layers}-layer model")
        resident = tuple(li for li in range(cfg.n_layers) if li <= filters[0] or li in filters)
        if self._mirrors is None or self._mirrors.layers != resident:
            device = torch.device(self.device) if self.device else seq.store.k_all.device
            self._mirrors = LayerMirrors(resident, device)
        self.last_request = AttentionRequest(resident=self._mirrors.sync(seq.store, start, start + n), transfer=True)
        return self.last_request
