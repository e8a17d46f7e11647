"""Offloading support: device-resident copies ("mirrors") of some layers' K/V, kept in sync with the store.

With `offload`, the KV store (all layers, in CPU memory: the only place this codebase keeps it) is the
home of every layer's K/V. The layers that attend over the whole context at every step get a mirror on
the compute device; the others read from the home copy: OmniKV gathers just its picked rows and moves
those; the brutal-offload baseline moves a layer's whole K/V at every step. The mirror follows the
store: rows appended since the last sync are copied over, and any other edit of the store (truncate,
removal, shift, restore: `store.edits`) makes it copy everything again.

On a CPU-only machine the compute device is the CPU: a mirror is then only a copy and nothing moves
between devices; the data path is the same, and `AttentionRequest.moved_bytes` counts what would move.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from infinichat.kv.store import KVStore


@dataclass
class LayerMirrors:
    layers: tuple[int, ...]
    device: torch.device
    k: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (Hkv, C, hd) on `device`
    v: dict[int, torch.Tensor] = field(default_factory=dict)
    synced: int = 0  # slots [0, synced) are up to date
    edits: int = -1  # store.edits at the last sync
    store_id: int = -1

    def sync(self, store: KVStore, start: int, end: int) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Bring slots [0, start) up to date before a forward call that appends slots [start, end) (it writes
        those into the mirrors itself); returns the mirrors as `AttentionRequest.resident` wants them."""
        if self.store_id != id(store) or self.edits != store.edits:
            if self.store_id != id(store) or not self.k:
                shape = (store.cfg.n_kv_heads, store.capacity, store.cfg.head_dim)
                self.k = {li: torch.empty(shape, dtype=store.dtype, device=self.device) for li in self.layers}
                self.v = {li: torch.empty(shape, dtype=store.dtype, device=self.device) for li in self.layers}
            self.synced, self.edits, self.store_id = 0, store.edits, id(store)
        a = min(self.synced, start)
        if start > a:
            for li in self.layers:
                self.k[li][:, a:start].copy_(store.k[li][:, a:start], non_blocking=True)
                self.v[li][:, a:start].copy_(store.v[li][:, a:start], non_blocking=True)
        self.synced = start  # the call's own rows are copied again next time: safe if the call fails
        return {li: (self.k[li], self.v[li]) for li in self.layers}

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (*self.k.values(), *self.v.values()))


def mirrors_for(
    current: LayerMirrors | None, filters: tuple[int, ...], store: KVStore, device: str | None
) -> LayerMirrors:
    """The mirrors an offloading policy with these filter layers needs (the layers up to the first filter
    layer, and the filter layers: those that attend over the whole context); `current` if it fits."""
    resident = tuple(li for li in range(store.cfg.n_layers) if li <= filters[0] or li in filters)
    if current is not None and current.layers == resident:
        return current
    return LayerMirrors(resident, torch.device(device) if device else store.k_all.device)
