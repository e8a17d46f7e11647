"""OmniKV: Dynamic Context Selection: a few filter layers pick, at every decode step, the tokens the
layers after them attend to. Nothing is dropped.

Hao et al., "OmniKV: Dynamic Context Selection for Efficient Long-Context LLMs", ICLR 2025,
https://openreview.net/forum?id=ulCAPXYXfa

The paper's observation: the tokens that matter (get most attention) are largely the same across
consecutive layers, and change from step to step. So at every decode step:
- layers before the first filter layer attend over the whole context;
- each filter layer attends over the whole context too, and its attention (the current query's
  probabilities summed over heads) picks the top-k tokens;
- the layers after a filter layer, up to the next one, attend only to those picked tokens, plus every
  token generated since the prompt ended (the last prompt's forward call marks where decoding starts; for
  a policy attached to an already filled cache, the first decode step does), plus
  the first `n_sink` tokens (attention sinks: an addition to the paper, on by default: 4).
`k` is a number of tokens (an int >= 1) or a fraction (a float in (0, 1]) of the tokens a filter layer
picks from (the cache before decoding started, sinks excluded). Prompts are evaluated with full attention.
The cache keeps every token (`drops_tokens=False`): past the budget, appending fails like `full`.

`offload=True`: the K/V of the layers that attend only to picked tokens stay in the KV store's memory
(host memory, pinned when the model is on CUDA) and, at each step, only the picked rows are gathered and
moved to the compute device (`device`, default the store's), a layer ahead of the compute on a side stream
(kv/offload.py's RowFetcher); the full-attention layers read device-resident mirrors. Prompts read the
offloaded layers' whole K/V (moved per call, as brutal offload does). On a CPU-only machine the same code
runs with no streams: it changes no numbers and moves nothing; it exists for a model on a GPU.

Default filter layers: measured per model by `infinichat eval filter-layers` (kv/omnikv_defaults.py); for
other models, the same relative depths.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, ClassVar, Self

import torch

from infinichat.errors import InfinichatError
from infinichat.kv.offload import LayerMirrors, RowFetcher, mirrors_for
from infinichat.kv.omnikv_defaults import default_filter_layers
from infinichat.kv.policy import EvictionPolicy, context_full
from infinichat.kv.store import torch_store
from infinichat.model.attention import AttentionRequest
from infinichat.model.config import ModelConfig

if TYPE_CHECKING:
    from infinichat.kv.sequence import KVSequence

DEFAULT_K = 0.1


@dataclass
class OmniKVPolicy(EvictionPolicy):
    name: ClassVar[str] = "omnikv"
    needs_attention_weights: ClassVar[bool] = True
    phase: ClassVar[str] = "decode"
    drops_tokens: ClassVar[bool] = False

    filter_layers: tuple[int, ...] | None = None  # None: the model's measured default
    k: int | float = DEFAULT_K
    n_sink: int = 4
    offload: bool = False
    device: str | None = None  # the compute device of the offloaded path (None: the store's)
    _decode_start: int | None = field(default=None, init=False, repr=False, compare=False)
    _mirrors: LayerMirrors | None = field(default=None, init=False, repr=False, compare=False)
    _fetcher: RowFetcher | None = field(default=None, init=False, repr=False, compare=False)
    # the latest decode step, for inspection (eval, tests): its request, and each filter layer's picks
    last_request: AttentionRequest | None = field(default=None, init=False, repr=False, compare=False)
    picked: dict[int, torch.Tensor] = field(default_factory=dict, init=False, repr=False, compare=False)

    def home_in_host_memory(self) -> bool:
        return self.offload

    def __post_init__(self) -> None:
        check_k(self.name, self.k)
        if self.n_sink < 0:
            raise InfinichatError(f"{self.name}: n_sink must be >= 0, got {self.n_sink}")
        if self.filter_layers is not None:
            self.filter_layers = check_filter_layers(self.name, self.filter_layers)

    def fork(self) -> Self:
        """The settings and where decoding started; no mirrors, row fetcher (its CUDA stream and events cannot be
        copied) or last request: they belong to the source's store, and the fork's first step builds its own."""
        other = replace(self)
        other._decode_start = self._decode_start
        return other

    def select(self, seq: KVSequence, n_needed: int) -> list[tuple[int, int]]:
        raise context_full(
            seq,
            n_needed,
            f"{self.name} keeps every token (it selects what to attend to): raise "
            "the budget, or use an evicting policy (streaming, h2o, tova, snapkv)",
        )

    def filters(self, cfg: ModelConfig) -> tuple[int, ...]:
        return resolve_filter_layers(self.name, self.filter_layers, cfg)

    def n_pick(self, n_candidates: int) -> int:
        """How many of `n_candidates` tokens a filter layer picks."""
        want = self.k if isinstance(self.k, int) else round(self.k * n_candidates)
        return max(0, min(n_candidates, want))

    def attention_request(self, seq: KVSequence, start: int, n: int, stage: str) -> AttentionRequest | None:
        end = start + n
        if stage != "decode":
            self._decode_start = end  # prompts: full attention; decoding starts after them
            if not self.offload:
                return None
            store = torch_store(seq.store, f"{self.name} with offload")
            self._mirrors = mirrors_for(self._mirrors, self.filters(store.cfg), store, self.device)
            return AttentionRequest(resident=self._mirrors.sync(store, start, end), transfer=True)
        cfg = torch_store(seq.store, self.name).cfg
        filters = self.filters(cfg)
        if self._decode_start is None:  # attached to a filled cache: what it holds is the context
            self._decode_start = start
        decode_start = min(self._decode_start, start)
        bounds = (*filters, cfg.n_layers)
        served = {f: range(f + 1, nxt) for f, nxt in zip(filters, bounds[1:], strict=True)}  # layers fed by each filter
        req = AttentionRequest(layers=frozenset(filters), rows=1)

        fetcher = None
        if self.offload:
            store = torch_store(seq.store, f"{self.name} with offload")
            self._mirrors = mirrors_for(self._mirrors, filters, store, self.device)
            req.resident = self._mirrors.sync(store, start, end)
            req.transfer = True
            if self._fetcher is None or self._fetcher.device != self._mirrors.device:
                self._fetcher = RowFetcher(self._mirrors.device)
            fetcher = self._fetcher
            req.fetch = fetcher.take

        def observe(layer: int, probs: torch.Tensor, row0: int) -> None:
            idx = self.pick(probs[:, -1].sum(dim=0), decode_start, end)  # (S,) summed over heads
            self.picked[layer] = idx
            for li in served[layer]:
                req.subset[li] = idx
            if fetcher is not None:  # the served layers' older picked rows start moving now
                host = idx.cpu()
                fetcher.plan(store, list(served[layer]), host[host < start])

        req.observe = observe
        self.last_request = req
        return req

    def pick(self, score: torch.Tensor, decode_start: int, end: int) -> torch.Tensor:
        """Sorted slot indices: the sinks, the top-k of the slots [n_sink, decode_start) by `score` (S,),
        and every slot from decode_start to end (tokens generated since the prompt, the current one)."""
        dev = score.device
        sinks = min(self.n_sink, decode_start)
        kk = self.n_pick(decode_start - sinks)
        top = torch.topk(score[sinks:decode_start], kk, sorted=False).indices.sort().values + sinks
        return torch.cat((torch.arange(sinks, device=dev), top, torch.arange(decode_start, end, device=dev)))


def resolve_filter_layers(name: str, given: tuple[int, ...] | None, cfg: ModelConfig) -> tuple[int, ...]:
    """The given filter layers (checked against the model), else the model's default."""
    layers = given if given is not None else default_filter_layers(cfg)
    bad = [i for i in layers if i >= cfg.n_layers]
    if bad:
        raise InfinichatError(f"{name}: filter layers {bad} do not exist; this model has layers 0..{cfg.n_layers - 1}")
    return layers


def check_k(name: str, k: object) -> None:
    ok = (isinstance(k, int) and not isinstance(k, bool) and k >= 1) or (isinstance(k, float) and 0 < k <= 1)
    if not ok:
        raise InfinichatError(
            f"{name}: k must be a token count (an integer >= 1) or a fraction of the context (a float in "
            f"(0, 1]), got {k!r}"
        )


def check_filter_layers(name: str, layers: Any) -> tuple[int, ...]:
    """`layers` as given by a user (any JSON value or CLI text) -> sorted layer numbers, or a clear error."""
    try:
        out = tuple(sorted({int(i) for i in layers}))
    except (TypeError, ValueError):
        raise InfinichatError(f"{name}: filter_layers must be layer numbers, got {layers!r}") from None
    if not out or out[0] < 0:
        raise InfinichatError(f"{name}: filter_layers must be one or more layer numbers >= 0, got {layers!r}")
    return out
