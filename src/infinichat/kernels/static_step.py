"""The static-shape one-token decode step: a member of the `torch` kernel set (`--compile`), for CUDA graphs.

A normal decode call slices the KV buffers to the cache's length, so every step has new shapes and nothing can
be captured. This step has fixed shapes, gpt-fast style: the store is grown to its whole capacity once (the
preallocated KV store), the new K/V row goes in with `index_copy_` at a slot held in a device tensor, and
attention reads every slot of the buffers under a (1, C) mask of the slots written so far. The layers are the
model's own (`Transformer.layers_forward`, the forward written once); only the cache adapter and the mask
differ. Token, RoPE rows and mask are copied into fixed input buffers before each call, outside the step.

`compile=True` wraps the step in `torch.compile` (mode "reduce-overhead" on CUDA: CUDA graphs; the inductor
backend on the CPU), with the weights and KV buffers marked as static addresses so the graph reads them in
place. The step binds one store at a time: another store (a second session, a fork, a restore that replaced
the buffers) binds again, which under torch.compile means a recompilation. It suits one long generation
(`generate`, the benchmarks), not a server of many sessions. Attention over the whole capacity costs
compute proportional to the capacity, not the length: whether it pays is measured (benchmarks/gpu_check.py
compares with and without).

Declines (returns None: the layer-by-layer forward runs) for layers whose attention is not plain (windows,
soft-caps, sinks), for quantized KV stores and for a full store.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from infinichat.model.transfer import to_device

if TYPE_CHECKING:
    from infinichat.model.transformer import Transformer

log = logging.getLogger(__name__)
DENSE_KV = ("bfloat16", "float16", "float32")


class StaticCache:
    """The LayerCache the static step hands the layers: a store's full-capacity buffers, written at `slot`."""

    def __init__(self, store: Any, device: torch.device):
        store.reserve(store.capacity)  # the preallocated store: its buffers never move again
        self.store = store
        self.k: list[torch.Tensor] = store.k  # L x (Hkv, C, hd) views of the store's buffers
        self.v: list[torch.Tensor] = store.v
        self.ptr = store.k_all.data_ptr()
        self.capacity = int(store.capacity)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)  # (1,) the slot the step writes

    def reserve(self, n: int) -> None:
        pass  # full capacity already

    def layer_kv(self, li: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v (Hkv, 1, hd) -> written at `slot`; the whole buffers (Hkv, C, hd) come back."""
        kb, vb = self.k[li], self.v[li]
        kb.index_copy_(1, self.slot, k)
        vb.index_copy_(1, self.slot, v)
        return kb, vb

    def current(self, store: Any) -> bool:
        return store is self.store and store.k_all.data_ptr() == self.ptr


class StaticDecode:
    """`step(tokens (1,), positions (1,), cache, start)` -> (hidden (D,), logits (V,)) float32, or None."""

    def __init__(self, model: Transformer, compile: bool):
        from infinichat.kernels.attn_variants import PLAIN

        self.model = model
        self.compile = compile
        self.plain = all(v is PLAIN for v in model.layer_attn)
        self.static: StaticCache | None = None
        self.fn: Callable[..., tuple[torch.Tensor, torch.Tensor]] = self._step
        if compile:
            mode = "reduce-overhead" if model.device.type == "cuda" else None
            self.fn = torch.compile(self._step, mode=mode, dynamic=False)
            for t in _tensors(model):
                torch._dynamo.mark_static_address(t)
        D, dev = model.cfg.dim, model.device
        self.x = torch.zeros(1, D, dtype=model.dtype, device=dev)  # (1, D) input buffers, filled before each call
        self.tables: tuple[torch.Tensor, ...] = ()
        self.mask: torch.Tensor | None = None

    def describe(self) -> str:
        how = "torch.compile reduce-overhead" if self.model.device.type == "cuda" else "torch.compile"
        return f"static decode step ({how})" if self.compile else "static decode step"

    def _bind(self, cache: Any) -> StaticCache | None:
        if getattr(cache, "kv_format", None) not in DENSE_KV or not hasattr(cache, "k_all"):
            return None  # quantized K/V: no dense buffers to write in place
        if self.static is None or not self.static.current(cache):
            self.static = StaticCache(cache, self.model.device)
            if self.compile:  # the graph reads and writes them in place
                for t in (cache.k_all, cache.v_all, *cache.k, *cache.v, self.static.slot):
                    torch._dynamo.mark_static_address(t)
            self.mask = torch.zeros(1, self.static.capacity, dtype=torch.bool, device=self.model.device)
            log.debug("static decode step bound to a store of %d slots", self.static.capacity)
        return self.static

    def __call__(
        self, tokens: torch.Tensor, positions: torch.Tensor, cache: Any, start: int
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        if not self.plain or tokens.shape[0] != 1:
            return None
        static = self._bind(cache)
        if static is None or start >= static.capacity:
            return None
        m, dev = self.model, self.model.device
        static.slot.fill_(start)
        assert self.mask is not None
        self.mask[0, : start + 1] = True  # slots [0, start] are attended to
        self.mask[0, start + 1 :] = False
        x = m.embed[to_device(tokens, dev)].to(m.dtype)  # (1, D)
        if m.embed_scale != 1.0:
            x *= m.embed_scale
        self.x.copy_(x)
        cos, sin = m.rope.cos_sin(positions, m.dtype)  # (1, rot)
        local = m.rope.local
        cl, sl = local.cos_sin(positions, m.dtype) if local is not None else (cos, sin)
        if not self.tables:
            self.tables = tuple(t.clone() for t in (cos, sin, cl, sl))
        for buf, t in zip(self.tables, (cos, sin, cl, sl), strict=True):
            buf.copy_(t)
        hidden, logits = self.fn(self.x, *self.tables, self.mask)
        return hidden[0].float().clone(), logits[0].clone()  # the captured graph's outputs are reused next call

    def _step(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cos_l: torch.Tensor, sin_l: torch.Tensor, mask
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The captured part: every layer and the head over fixed shapes. x (1, D) -> (1, D), (1, V) float32."""
        from infinichat.model.transformer import BatchItem

        m, kern = self.model, self.model.kernels
        static = self.static
        assert static is not None
        rope = kern.rope_tables(cos, sin)
        rope_local = kern.rope_tables(cos_l, sin_l)
        last = static.capacity - 1  # attention reads slots [0, C): the mask says which hold this sequence
        item = BatchItem(torch.empty(1), torch.empty(1), static, last)
        h = m.layers_forward(x.clone(), rope, rope_local, [item], [1], [mask], None)  # (1, D)
        h = m._norm(h, *m.norm)
        return h, kern.linear(h, m.lm_head).float()  # (1, D), (1, V)


def _tensors(model: Transformer) -> list[torch.Tensor]:
    """Every weight tensor the step reads (QuantLinear members included)."""
    out: list[torch.Tensor] = [model.embed]
    seen: set[int] = set()

    def add(obj: object) -> None:
        if isinstance(obj, torch.Tensor):
            if id(obj) not in seen:
                seen.add(id(obj))
                out.append(obj)
        elif obj is not None and hasattr(obj, "__dict__"):
            for v in vars(obj).values():
                if isinstance(v, torch.Tensor):
                    add(v)

    add(model.lm_head)
    add(model.norm[0])
    add(model.norm[1])
    for L in model.layers:
        for t in L.values():
            add(t)
    for pair in model.layer_norms:
        for w, b in pair:
            add(w)
            add(b)
    for post in model.post_norms or []:
        for t in post:
            add(t)
    return out
