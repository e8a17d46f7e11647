"""Offloading support: device-resident copies ("mirrors") of some layers' K/V, kept in sync with the store, and
the per-step transfer of an offloaded layer's picked rows (`RowFetcher`).

With `offload`, the KV store (all layers, in CPU memory: the only place this codebase keeps it) is the
home of every layer's K/V. The layers that attend over the whole context at every step get a mirror on
the compute device; the others read from the home copy: OmniKV gathers just its picked rows and moves
those; the brutal-offload baseline moves a layer's whole K/V at every step. The mirror follows the
store: rows appended since the last sync are copied over, and any other edit of the store (truncate,
removal, shift, restore: `store.edits`) makes it copy everything again.

On a CUDA device the store's buffers are pinned (page-locked: `KVStore.pin_host_memory`), so the picked rows
go over with non_blocking copies on a side stream, a layer ahead of the compute (`RowFetcher`). On a CPU-only
machine the compute device is the CPU: a mirror is then only a copy and nothing moves between devices; the
data path is the same (gather into a staging buffer, hand it over), without streams, and
`AttentionRequest.moved_bytes` counts what would move.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

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


class RowFetcher:
    """The picked rows of the offloaded layers, from the host store to the compute device, one layer ahead.

    A filter layer's pick (`plan`) names the layers it serves and the slots (before the call's own) they attend
    to. Each layer's rows are gathered on the CPU into a staging buffer (pinned on CUDA) and copied into a
    device buffer with a non_blocking copy on a side stream, which records an event; `take(li)` starts the next
    layer's transfer (so it overlaps layer li's compute), makes the compute stream wait on li's event and
    returns li's rows. The side stream first waits for the compute stream (the last step's reads of the device
    buffers are queued before the new copies), and a staging buffer is refilled only after its last copy is
    over. On the CPU the staging buffer is the result: no stream, no copy."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.stream: Any = torch.cuda.Stream(device) if self.cuda else None
        self.store: KVStore | None = None
        self.pending: dict[int, torch.Tensor] = {}  # layer -> picked slots (n,) on the CPU, transfer not started
        self.ready: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> (k, v) (Hkv, n, hd) on device
        self.events: dict[int, Any] = {}  # layer -> the event of its copy in flight (CUDA)
        self.staging: dict[int, torch.Tensor] = {}  # layer -> flat host buffer
        self.dest: dict[int, torch.Tensor] = {}  # layer -> flat device buffer (CUDA)
        self.moved = 0  # bytes gathered and handed to the compute device

    def plan(self, store: KVStore, layers: Sequence[int], slots: torch.Tensor) -> None:
        """`layers` attend to the store's `slots` (n,) (CPU, sorted): start the first one's transfer."""
        self.store = store
        for li in layers:
            self.pending[li] = slots
        if layers:
            self._start(layers[0])

    def take(self, li: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer li's rows (k, v (Hkv, n, hd) on the compute device), ready to read on the current stream."""
        if li in self.pending:
            self._start(li)
        later = [j for j in self.pending if j > li]
        if later:
            self._start(min(later))  # the next layer's gather and copy run while layer li computes
        ev = self.events.get(li)
        if ev is not None:
            torch.cuda.current_stream(self.device).wait_event(ev)
        return self.ready.pop(li)

    def _buffer(self, pool: dict[int, torch.Tensor], li: int, numel: int, dtype: torch.dtype, host: bool):
        buf = pool.get(li)
        if buf is None or buf.numel() < numel or buf.dtype != dtype:
            size = max(numel, 2 * buf.numel() if buf is not None else 0)
            if host:
                buf = torch.empty(size, dtype=dtype, pin_memory=self.cuda)
            else:
                buf = torch.empty(size, dtype=dtype, device=self.device)
            pool[li] = buf
        return buf[:numel]

    def _start(self, li: int) -> None:
        slots = self.pending.pop(li)
        store = self.store
        assert store is not None
        Hkv, hd, n = store.cfg.n_kv_heads, store.cfg.head_dim, int(slots.shape[0])
        prev = self.events.pop(li, None)
        if prev is not None:
            prev.synchronize()  # the staging buffer's last copy is over before it is refilled
        stage = self._buffer(self.staging, li, 2 * Hkv * n * hd, store.dtype, host=True).view(2, Hkv, n, hd)
        torch.index_select(store.k[li], 1, slots, out=stage[0])  # (Hkv, n, hd) gathered on the CPU
        torch.index_select(store.v[li], 1, slots, out=stage[1])
        self.moved += stage.nbytes
        if not self.cuda:
            self.ready[li] = (stage[0], stage[1])
            return
        dest = self._buffer(self.dest, li, stage.numel(), store.dtype, host=False).view(2, Hkv, n, hd)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            dest.copy_(stage, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(self.stream)
        self.events[li] = ev
        self.ready[li] = (dest[0], dest[1])
