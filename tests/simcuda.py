"""A simulated CUDA device, so that CI (no GPU) runs the engine's CUDA code paths with CUDA's device rules.

Inside `simulated_cuda()` torch believes it has one CUDA device: `torch.cuda.is_available()` is True, tensors
made on or moved to `cuda:0` report that device (`.device`, `.is_cuda`), and every op on them runs on the CPU
underneath (a wrapper tensor holding a CPU tensor). What it checks, as a GPU would refuse them:

- an op mixing CUDA tensors with CPU tensors of one or more dimensions (CPU 0-dim scalars are allowed, as CUDA's
  elementwise ops allow them; copies and index tensors may cross devices, as on CUDA);
- a CUDA op given a CPU `torch.Generator` or the reverse;
- a CUDA tensor read as host memory: `.numpy()`;
- `pin_memory=True` / `.pin_memory()` / `.is_pinned()` work on host tensors (page-locked memory is simulated);
- memory touched by two streams, or by a stream and the host, with nothing ordering the two accesses
  (`StreamRace`): a stream reading or overwriting GPU memory another stream wrote or reads without a
  wait_stream / wait_event / host sync between them, the host writing pinned memory an asynchronous host-to-device
  copy may still read or touching memory an asynchronous device-to-host copy may still write. Ops run at once in
  program order underneath, so the results are right whatever the order; the check says whether a GPU, which
  runs streams concurrently, would give them too (vector clocks per stream and for the host, `_Clock`).

What it records (`SimCuda`): host syncs (`.item()`, `.tolist()` of CUDA tensors, blocking copies either way,
`torch.cuda.synchronize`),
host-to-device copies and how many of them were `non_blocking` from memory that was not pinned (such a copy
does not overlap anything on a real GPU), and the bytes of the live GPU storages (`torch.cuda.memory_allocated`,
its peak, `mem_get_info`). Past `memory_bytes` an allocation raises `torch.OutOfMemoryError`, as on a GPU.

PyTorch's CUDA-only int4 kernels are emulated from their documented contract: `_convert_weight_to_int4pack`
keeps the bytes (even input in the high nibble) in the packed shape, `_weight_int4pack_mm` computes
x @ ((q - 8) * scale + zero).T from the (K/g, N, 2) scales. Not simulated: torch.compile / CUDA graphs, kernel
speed, the real packed layout, the caching allocator's reuse of a block freed on one stream while another still
uses it (`record_stream`), events' timing. A pass here says the code keeps CUDA's device and ordering rules on
these paths, not that a GPU runs it fast or at all (benchmarks/gpu_check.py does that on a GPU).
"""

from __future__ import annotations

import contextlib
import threading
import time
import traceback
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

aten = torch.ops.aten
CUDA0 = torch.device("cuda", 0)


class SimCudaError(RuntimeError):
    """What a real CUDA device would refuse."""


class SimTensor(torch.Tensor):
    """A tensor on the simulated cuda:0: its data is a CPU tensor (`inner`) that only the simulation touches."""

    inner: torch.Tensor

    @staticmethod
    def __new__(cls, inner: torch.Tensor) -> SimTensor:
        r = torch.Tensor._make_wrapper_subclass(
            cls,
            inner.shape,
            strides=inner.stride(),
            storage_offset=inner.storage_offset(),
            dtype=inner.dtype,
            device=CUDA0,
            requires_grad=False,
        )
        r.inner = inner
        return r

    __torch_function__ = torch._C._disabled_torch_function_impl  # type: ignore[assignment]

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise SimCudaError(f"a simulated CUDA tensor was used after the simulation ended ({func})")

    def data_ptr(self) -> int:  # type: ignore[override]
        return self.inner.data_ptr()  # an address (identity, alignment), as on CUDA; the C library is CPU-only

    def numpy(self, *a: Any, **k: Any) -> Any:  # type: ignore[override]
        raise SimCudaError("can't convert cuda:0 device type tensor to numpy: use .cpu() first")

    def __repr__(self) -> str:  # type: ignore[override]
        return f"SimTensor(cuda:0, {self.inner!r})"

    # Python's indexing enters C++ through a CUDA device guard, which a CPU-only torch does not have: indexing is
    # done here on the CPU tensor (index tensors may be CPU tensors, as on CUDA)
    def __getitem__(self, idx: Any) -> Any:
        sim = _active("indexing")
        return sim.wrap(self.inner[_unwrap_index(idx)])

    def __setitem__(self, idx: Any, value: Any) -> None:
        sim = _active("indexing")
        if sim.check_streams:
            s = sim.stream()
            src = value.inner.untyped_storage().data_ptr() if isinstance(value, SimTensor) else None
            dst = self.inner.untyped_storage().data_ptr()
            if src is not None:
                sim.clock.check(s, src, False, "__setitem__")
            sim.clock.check(s, dst, True, "__setitem__")
            c = sim.clock.issue(s)
            if src is not None:
                sim.clock.record(s, c, src, False)
            sim.clock.record(s, c, dst, True)
        if isinstance(value, torch.Tensor) and not isinstance(value, SimTensor) and value.dim() > 0:
            sim.note("h2d_copies")  # a slice assigned from host memory: a synchronous copy on CUDA
        self.inner[_unwrap_index(idx)] = value.inner if isinstance(value, SimTensor) else value


def _unwrap_index(idx: Any) -> Any:
    if isinstance(idx, tuple):
        return tuple(_unwrap_index(i) for i in idx)
    if isinstance(idx, list):
        return [_unwrap_index(i) for i in idx]
    return idx.inner if isinstance(idx, SimTensor) else idx


def _arg(func, a: tuple, k: dict, name: str) -> Any:
    """The op's argument `name`, given by position or by keyword (None where absent)."""
    for i, arg in enumerate(func._schema.arguments):
        if arg.name == name:
            return a[i] if i < len(a) and not arg.kwarg_only else k.get(name)
    return None


def _written_ids(func, a: tuple, k: dict) -> set[int]:
    """ids of the tensors the op writes (its schema's mutable arguments, `out=` included)."""
    ids: set[int] = set()
    for i, arg in enumerate(func._schema.arguments):
        if arg.alias_info is not None and arg.alias_info.is_write:
            v = a[i] if i < len(a) and not arg.kwarg_only else k.get(arg.name)
            for t in v if isinstance(v, (list, tuple)) else (v,):
                if isinstance(t, torch.Tensor):
                    ids.add(id(t))
    return ids


def _bool_index(args: tuple) -> bool:
    """Indexing with a boolean mask on the GPU: its nonzero() sizes the output (a sync)."""
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else ()) or ())


def _active(what: str) -> SimCuda:
    if _ACTIVE is None:
        raise SimCudaError(f"a simulated CUDA tensor was used after the simulation ended ({what})")
    return _ACTIVE


# ops whose tensors may sit on different devices on CUDA too (copies; CPU index tensors for advanced indexing)
_CROSS_DEVICE = {
    aten._to_copy.default,
    aten.copy_.default,
    aten.lift_fresh.default,
    aten.lift_fresh_copy.default,
    *(getattr(aten.to, o) for o in aten.to.overloads()),
}
_INDEXING = {aten.index.Tensor, aten.index_put_.default, aten.index_put.default, aten._index_put_impl_.default}
# ops on host memory only
_HOST_ONLY = {aten.is_pinned.default, aten._pin_memory.default, aten.pin_memory.default}
# a CUDA tensor's value read on the host: a sync on a real GPU
# (and ops whose output size depends on the data: the host reads the size before it allocates)
_SYNCS = {
    aten._local_scalar_dense.default,
    aten.nonzero.default,
    aten.masked_select.default,
    aten._unique2.default,
    aten.unique_consecutive.default,
}
# factory-like ops that allocate (for the bytes held)


_RealGenerator = torch.Generator


class _SimGenerator(_RealGenerator):
    """`torch.Generator(device="cuda")` inside the simulation: a CPU generator that says it belongs to the GPU;
    `torch.Generator` is this class while the simulation runs (any other device: a plain generator)."""

    def __new__(cls, device: Any = "cpu") -> Any:
        dev = device if isinstance(device, torch.device) else torch.device(device)
        if dev.type != "cuda":
            return _RealGenerator(dev)
        g = _RealGenerator.__new__(cls, "cpu")
        g.sim_cuda = True
        return g

    def __init__(self, device: Any = "cpu") -> None:
        pass


def _gen_is_cuda(g: torch.Generator) -> bool:
    return bool(getattr(g, "sim_cuda", False))


class _Stream:
    """A stream: its work runs at once, in program order, on the CPU; what it would wait for on a GPU (other
    streams' work it was told to wait for) is kept by the simulation's `_Clock`, which checks every access."""

    def __init__(self, device: Any = None, priority: int = 0, **_: Any):
        self.device = CUDA0

    def wait_stream(self, other: _Stream) -> None:
        if _ACTIVE is not None:
            _ACTIVE.clock.wait_stream(self, other)

    def wait_event(self, ev: _Event) -> None:
        if _ACTIVE is not None and ev.at is not None:
            _ACTIVE.clock.learn(self, *ev.at)

    def record_event(self, ev: _Event | None = None) -> _Event:
        ev = ev or _Event()
        ev.record(self)
        return ev

    def synchronize(self) -> None:
        if _ACTIVE is not None:
            _ACTIVE.clock.host_waits(self)

    def query(self) -> bool:
        return True


class _Event:
    def __init__(self, enable_timing: bool = False, blocking: bool = False, interprocess: bool = False):
        self.t: float | None = None
        self.at: tuple[_Stream, int] | None = None  # the stream and the point of its work the event marks

    def record(self, stream: _Stream | None = None) -> None:
        self.t = time.perf_counter()
        if _ACTIVE is not None:
            s = stream or _ACTIVE.stream()
            self.at = (s, _ACTIVE.clock.count.get(s, 0))

    def wait(self, stream: _Stream | None = None) -> None:
        if _ACTIVE is not None and self.at is not None:
            _ACTIVE.clock.learn(stream or _ACTIVE.stream(), *self.at)

    def synchronize(self) -> None:
        if _ACTIVE is not None and self.at is not None:
            _ACTIVE.clock.host_learns(*self.at)

    def query(self) -> bool:
        return True

    def elapsed_time(self, end: _Event) -> float:
        if self.t is None or end.t is None:
            raise SimCudaError("elapsed_time() of an event that was not recorded")
        return (end.t - self.t) * 1000.0


class StreamRace(SimCudaError):
    """Memory touched by two streams (or a stream and the host) with nothing ordering the two accesses: on a GPU
    the result depends on timing."""


class _Clock:
    """What each stream, and the host, know to be finished: per stream the number of ops issued, and per stream
    (and for the host) the point of every other stream's work it is ordered after (by wait_stream, wait_event, a
    host sync). Per GPU storage its last writer and its readers since; per pinned host storage its asynchronous
    copies in flight. An access that two streams (or a stream and the host) make without that order is a race."""

    def __init__(self) -> None:
        self.count: dict[_Stream, int] = {}
        self.known: dict[_Stream, dict[_Stream, int]] = {}
        self.host: dict[_Stream, int] = {}
        self.writer: dict[int, tuple[_Stream, int]] = {}  # GPU storage -> (stream, op) of its last write
        self.readers: dict[int, dict[_Stream, int]] = {}  # GPU storage -> stream -> its last read there
        self.in_flight: dict[int, list[tuple[_Stream, int, str]]] = {}  # pinned storage -> async copies

    def issue(self, s: _Stream) -> int:
        self.count[s] = self.count.get(s, 0) + 1
        return self.count[s]

    def knows(self, s: _Stream, t: _Stream, c: int) -> bool:
        """Stream s's next op is ordered after op c of stream t."""
        return s is t or max(self.known.get(s, {}).get(t, 0), self.host.get(t, 0)) >= c

    def learn(self, s: _Stream, t: _Stream, c: int) -> None:
        k = self.known.setdefault(s, {})
        k[t] = max(k.get(t, 0), c)

    def wait_stream(self, s: _Stream, t: _Stream) -> None:
        self.learn(s, t, self.count.get(t, 0))

    def host_learns(self, t: _Stream, c: int) -> None:
        self.host[t] = max(self.host.get(t, 0), c)

    def host_waits(self, t: _Stream | None = None) -> None:
        for s in [t] if t is not None else list(self.count):
            self.host_learns(s, self.count.get(s, 0))

    def check(self, s: _Stream, ptr: int, write: bool, what: str) -> None:
        w = self.writer.get(ptr)
        if w is not None and not self.knows(s, *w):
            raise StreamRace(f"{what}: GPU memory written on another stream (op {w[1]}) with no wait before this")
        if write:
            for t, r in self.readers.get(ptr, {}).items():
                if not self.knows(s, t, r):
                    raise StreamRace(f"{what}: GPU memory overwritten while another stream may still read it")

    def record(self, s: _Stream, c: int, ptr: int, write: bool) -> None:
        if write:
            self.writer[ptr] = (s, c)
            self.readers[ptr] = {}
        else:
            self.readers.setdefault(ptr, {})[s] = c

    def host_access(self, ptr: int, write: bool, what: str) -> None:
        flights = self.in_flight.get(ptr)
        if not flights:
            return
        left = [(t, c, kind) for t, c, kind in flights if self.host.get(t, 0) < c]
        for _t, _c, kind in left:
            if kind == "d2h" or write:
                raise StreamRace(
                    f"{what}: the host {'writes' if write else 'reads'} pinned memory an asynchronous "
                    f"{'device-to-host' if kind == 'd2h' else 'host-to-device'} copy may still be using"
                )
        self.in_flight[ptr] = left


@dataclass
class SimCuda:
    """The simulation's records (see the module's docstring)."""

    syncs: int = 0
    h2d_copies: int = 0
    h2d_unpinned_non_blocking: int = 0
    d2h_copies: int = 0
    peak_bytes: int = 0
    ops: int = 0
    memory_limit: int = 80 * 2**30  # bytes the GPU has: past them an allocation raises torch.OutOfMemoryError
    allocated: int = 0  # bytes of the live GPU storages
    _storages: dict[int, list[int]] = field(default_factory=dict, repr=False)  # address -> [live wrappers, bytes]
    _pinned: dict[int, torch.UntypedStorage] = field(default_factory=dict, repr=False)
    default_stream: _Stream = field(default_factory=_Stream, repr=False)
    _current: list[_Stream] = field(default_factory=list, repr=False)
    clock: _Clock = field(default_factory=_Clock, repr=False)
    check_streams: bool = True  # raise StreamRace on unordered accesses

    def stream(self) -> _Stream:
        return self._current[-1] if self._current else self.default_stream

    where: list[tuple[str, str]] | None = field(default=None, repr=False)  # a list: (what, where) of each event

    def note(self, what: str) -> None:
        """Count a sync / copy; with `where` set to a list, also record the innermost infinichat frame."""
        setattr(self, what, getattr(self, what) + 1)
        if self.where is not None:
            frames = [f for f in traceback.extract_stack() if "/infinichat/" in f.filename]
            at = f"{frames[-1].filename.split('/infinichat/')[-1]}:{frames[-1].lineno}" if frames else "(test)"
            self.where.append((what, at))

    # ------------------------------------------------------------------ host memory
    def pin(self, t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        self._pinned[s.data_ptr()] = s  # held for the simulation's life: the address is never reused meanwhile
        return t

    def is_pinned(self, t: torch.Tensor) -> bool:
        return not isinstance(t, SimTensor) and t.untyped_storage().data_ptr() in self._pinned

    # ------------------------------------------------------------------ device memory
    def memory_allocated(self) -> int:
        return self.allocated

    def wrap(self, t: torch.Tensor) -> SimTensor:
        """`t` as a GPU tensor. A storage no live GPU tensor held before is an allocation: counted (and refused
        past `memory_limit`, as the CUDA allocator would) until its last GPU tensor is gone."""
        st = t.untyped_storage()
        ptr = st.data_ptr()
        entry = self._storages.get(ptr)
        if entry is None:
            n = st.nbytes()
            if self.allocated + n > self.memory_limit:
                free = self.memory_limit - self.allocated
                raise torch.OutOfMemoryError(
                    f"CUDA out of memory (simulated). Tried to allocate {n / 2**20:.2f} MiB. GPU 0 has a total "
                    f"capacity of {self.memory_limit / 2**30:.2f} GiB of which {free / 2**20:.2f} MiB is free."
                )
            entry = self._storages[ptr] = [0, n]
            self.allocated += n
            self.clock.writer.pop(ptr, None)  # new memory (an address the allocator may have had before)
            self.clock.readers.pop(ptr, None)
            self.peak_bytes = max(self.peak_bytes, self.allocated)
        entry[0] += 1
        w = SimTensor(t)
        weakref.finalize(w, self._release, ptr)
        return w

    def _release(self, ptr: int) -> None:
        entry = self._storages.get(ptr)
        if entry is not None:
            entry[0] -= 1
            if entry[0] == 0:
                del self._storages[ptr]
                self.allocated -= entry[1]


_ACTIVE: SimCuda | None = None


class _Mode(TorchDispatchMode):
    def __init__(self, sim: SimCuda):
        super().__init__()
        self.sim = sim

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        sim = self.sim
        sim.ops += 1
        kwargs = dict(kwargs or {})
        originals: dict[int, SimTensor] = {}
        roles: list[tuple[str, int, torch.Tensor]] = []  # (device type, dim, tensor) of every tensor argument

        def unwrap(x: Any) -> Any:
            if isinstance(x, SimTensor):
                originals[id(x.inner)] = x
                roles.append(("cuda", x.dim(), x.inner))
                return x.inner
            if isinstance(x, torch.Tensor):
                if x.device.type != "cpu":
                    raise SimCudaError(f"{func}: a {x.device} tensor in the simulation")
                roles.append(("cpu", x.dim(), x))
            return x

        a = tree_map(unwrap, args)
        k = tree_map(unwrap, kwargs)
        target: str | None = None  # the device a factory / copy was asked for
        if k.get("device") is not None:
            target = torch.device(k["device"]).type
            if target == "cuda":
                k["device"] = torch.device("cpu")
        if any(isinstance(x, torch.device) for x in a):  # e.g. aten.to.device(self, device, dtype, ...)
            target = next(x for x in a if isinstance(x, torch.device)).type
            a = tuple(torch.device("cpu") if isinstance(x, torch.device) else x for x in a)
        pin = bool(k.pop("pin_memory", False)) if "pin_memory" in k else False
        if pin and target == "cuda":
            raise SimCudaError(f"{func}: pin_memory=True for a CUDA tensor (only host memory can be pinned)")
        has_cuda = any(r[0] == "cuda" for r in roles)

        if func in _HOST_ONLY:
            if has_cuda:
                raise SimCudaError(f"{func}: pinning is for host tensors, not a CUDA tensor")
            if func is aten.is_pinned.default:
                return sim.is_pinned(a[0])
            if func is aten.pin_memory.default and sim.is_pinned(a[0]):
                return a[0]  # already page-locked: itself, as torch does
            return sim.pin(a[0].clone())

        if func is aten._convert_weight_to_int4pack.default:
            return self._int4pack(a, has_cuda)
        if func is aten._weight_int4pack_mm.default:
            return self._int4mm(a, roles)

        # -- CUDA's device rules
        src_dev = dst_dev = ""
        if func in _CROSS_DEVICE:
            src_dev = roles[-1][0] if func is aten.copy_.default else roles[0][0] if roles else "cpu"
            dst_dev = roles[0][0] if func is aten.copy_.default else (target or src_dev)
            is_copy = func is aten.copy_.default
            non_blocking = bool(_arg(func, a, k, "non_blocking"))
            if src_dev == "cpu" and dst_dev == "cuda":
                sim.note("h2d_copies")
                if non_blocking and not sim.is_pinned(roles[-1][2] if is_copy else roles[0][2]):
                    sim.note("h2d_unpinned_non_blocking")  # from pageable memory: staged, no overlap
                if not non_blocking:
                    sim.note("syncs")  # PyTorch's blocking copy synchronizes the stream (memcpy_and_sync)
            elif src_dev == "cuda" and dst_dev == "cpu":
                sim.note("d2h_copies")
                # the host waits for the GPU, but for a non_blocking copy into pinned memory (`.to("cpu",
                # non_blocking=True)` pins its own output): then only a later sync makes the bytes readable
                if not non_blocking or (is_copy and not sim.is_pinned(roles[0][2])):
                    sim.note("syncs")
            out_dev = dst_dev
        elif func in _INDEXING:
            self_dev = roles[0][0]
            # indices may be CPU tensors (PyTorch copies them to the GPU first, a blocking copy: a sync); the values
            # put must be on self's device (or a 0-dim scalar)
            idx = a[1] if len(a) > 1 else k.get("indices", ())
            if self_dev == "cuda" and any(isinstance(i, torch.Tensor) and id(i) not in originals for i in idx or ()):
                sim.note("h2d_copies")
                sim.note("syncs")
            if func is not aten.index.Tensor:
                vals = a[2] if len(a) > 2 else k.get("values")
                if isinstance(vals, torch.Tensor) and vals.dim() > 0:
                    vdev = "cuda" if id(vals) in originals else "cpu"
                    if vdev != self_dev:
                        raise SimCudaError(f"{func}: values on {vdev}, tensor on {self_dev}")
            out_dev = self_dev
        else:
            devs = {r[0] for r in roles if r[0] == "cuda" or r[1] > 0}
            if len(devs) > 1 or (target == "cuda" and "cpu" in devs) or (target == "cpu" and has_cuda):
                shapes = ", ".join(f"{d}:{tuple(t.shape)}" for d, _, t in roles)
                raise SimCudaError(
                    f"Expected all tensors to be on the same device, but found at least two devices, cuda:0 and "
                    f"cpu! ({func} on {shapes})"
                )
            out_dev = "cuda" if (target == "cuda" or has_cuda) else "cpu"
        if has_cuda and (func in _SYNCS or (func is aten.index.Tensor and _bool_index(args))):
            sim.note("syncs")

        on_gpu = out_dev == "cuda" or has_cuda
        order = self._order(func, a, k, roles, on_gpu, src_dev, dst_dev) if sim.check_streams else None
        out = func(*a, **k)  # (a race is raised before the op runs: it changes nothing)
        if func in _CROSS_DEVICE and func is not aten.copy_.default and src_dev != dst_dev and out is a[0]:
            out = out.clone()  # `.to()` across devices copies; on the CPU underneath it would return its input

        if pin:
            tree_map(lambda t: sim.pin(t) if isinstance(t, torch.Tensor) else t, out)
        if out_dev != "cuda":
            if order is not None:
                order(out)
            return out

        def wrap(t: Any) -> Any:
            if not isinstance(t, torch.Tensor):
                return t
            if id(t) in originals:
                return originals[id(t)]  # an in-place op returns its own argument
            return sim.wrap(t)

        wrapped = tree_map(wrap, out)  # (a new storage's address starts with no history: before the record)
        if order is not None:
            order(out)
        return wrapped

    def _order(self, func, a: tuple, k: dict, roles: list, on_gpu: bool, src_dev: str, dst_dev: str):
        """The op's accesses against the streams' order (see _Clock), checked before it runs: a GPU op runs on
        the current stream and reads / writes its GPU tensors there; a host op touching pinned memory meets the
        copies in flight. Returns what records the op's outputs once it ran (None: nothing to record)."""
        sim, clock = self.sim, self.sim.clock
        if func.is_view or func in (aten.lift_fresh.default, aten.is_pinned.default):
            return None  # no data touched
        written = _written_ids(func, a, k)
        what = str(func)
        if not on_gpu:  # runs on the host now
            for dev, _, t in roles:
                if dev == "cpu" and sim.is_pinned(t):
                    clock.host_access(t.untyped_storage().data_ptr(), id(t) in written, what)
            return None
        s = sim.stream()
        for dev, _, t in roles:
            if dev == "cuda":
                clock.check(s, t.untyped_storage().data_ptr(), id(t) in written, what)
        c = clock.issue(s)
        for dev, _, t in roles:
            if dev == "cuda":
                clock.record(s, c, t.untyped_storage().data_ptr(), id(t) in written)
        non_blocking = bool(_arg(func, a, k, "non_blocking"))
        crossing = func in _CROSS_DEVICE and src_dev != dst_dev

        def outputs(out: Any) -> None:
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and id(t) not in written and (dst_dev or "cuda") != "cpu":
                    clock.record(s, c, t.untyped_storage().data_ptr(), True)  # a new GPU tensor
            if crossing:
                if dst_dev == "cuda":  # the host side: the source
                    host = roles[-1][2] if func is aten.copy_.default else roles[0][2]
                else:  # the destination: copy_'s own, or the new tensor
                    host = roles[0][2] if func is aten.copy_.default else out
                if non_blocking and isinstance(host, torch.Tensor) and sim.is_pinned(host):
                    flight = (s, c, "d2h" if dst_dev == "cpu" else "h2d")
                    clock.in_flight.setdefault(host.untyped_storage().data_ptr(), []).append(flight)
                else:  # a synchronous copy: the host waits for it (device to host: for the stream up to it)
                    clock.host_learns(s, c)
            elif func in _SYNCS:
                clock.host_learns(s, c)

        return outputs

    def _int4pack(self, a: tuple, has_cuda: bool) -> Any:
        w, tiles = a[0], int(a[1])
        if not has_cuda:
            raise SimCudaError("_convert_weight_to_int4pack is a CUDA kernel: its input must be on the GPU")
        if w.dtype != torch.uint8 or w.dim() != 2:
            raise SimCudaError(f"_convert_weight_to_int4pack takes (N, K/2) uint8, got {w.dtype} {tuple(w.shape)}")
        N, K = w.shape[0], w.shape[1] * 2
        if N % 8 or K % (16 * tiles) or tiles not in (2, 4, 8):
            raise SimCudaError(f"_convert_weight_to_int4pack: N={N} K={K} inner k tiles={tiles} not a valid layout")
        packed = w.contiguous().view(torch.int32).reshape(N // 8, K // (16 * tiles), 32, tiles // 2)
        return self.sim.wrap(packed.clone())

    def _int4mm(self, a: tuple, roles: list) -> Any:
        x, packed, group, sz = a[0], a[1], int(a[2]), a[3]
        if any(r[0] != "cuda" for r in roles):
            raise SimCudaError("_weight_int4pack_mm (CUDA): all its tensors must be on the GPU")
        if x.dtype != torch.bfloat16 or sz.dtype != torch.bfloat16:
            raise SimCudaError(f"_weight_int4pack_mm takes bfloat16 activations and scales, got {x.dtype} {sz.dtype}")
        N = packed.shape[0] * 8
        K = x.shape[-1]
        b = packed.contiguous().view(torch.uint8).reshape(N, K // 2)
        q = torch.stack((b >> 4, b & 15), dim=-1).reshape(N, K).float()  # even input in the high nibble
        if tuple(sz.shape) != (K // group, N, 2):
            raise SimCudaError(f"_weight_int4pack_mm: scales {tuple(sz.shape)}, expected {(K // group, N, 2)}")
        s, z = sz.float().unbind(-1)  # (K/g, N)
        w = (q.view(N, K // group, group) - 8) * s.t()[..., None] + z.t()[..., None]  # (N, K/g, g)
        y = x.float() @ w.view(N, K).t()
        return self.sim.wrap(y.to(torch.bfloat16))


_OP_NAMES = {"__invert__": "bitwise_not", "__rand__": "__and__", "__ror__": "__or__", "__rxor__": "__xor__"}
_HOST_READS = {"__int__", "__float__", "__bool__", "__index__", "item", "tolist", "__format__"}


class _FunctionMode(TorchFunctionMode):
    """Checks at the Python level what the dispatcher cannot see: a generator's device (a Generator crosses into
    C++ and comes back a new object), and `.to("cuda")` / `.cuda()` without an index, which a CPU-only torch cannot
    resolve (they mean cuda:0 here, the current device on a real GPU)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        gen = kwargs.get("generator")
        if gen is not None:
            dev = kwargs.get("device")
            on_cuda = (
                torch.device(dev).type == "cuda"
                if dev is not None
                else any(isinstance(t, SimTensor) for t in args if isinstance(t, torch.Tensor))
            )
            if bool(getattr(gen, "sim_cuda", False)) != on_cuda:
                raise SimCudaError(
                    f"{getattr(func, '__name__', func)}: Expected a '{'cuda' if on_cuda else 'cpu'}' device type "
                    f"for generator but found '{'cuda' if getattr(gen, 'sim_cuda', False) else 'cpu'}'"
                )
        if func in (torch.tensor, torch.as_tensor) and kwargs.get("device") is not None:
            dev = torch.device(kwargs.pop("device"))
            t = func(*args, **kwargs)  # built on the host by C++, which a dispatch mode does not see: move it
            return t.to(CUDA0) if dev.type == "cuda" else t
        if args and isinstance(args[0], SimTensor) and getattr(func, "__name__", "") in _HOST_READS:
            sim = _active("a read")
            sim.note("syncs")  # the value comes to the host: a sync on a real GPU
            sim.clock.host_waits(sim.stream())
            return getattr(args[0].inner, func.__name__)(*args[1:], **kwargs)
        if func is torch.Tensor.cuda:
            return args[0].to(CUDA0, **{n: v for n, v in kwargs.items() if n == "non_blocking"})
        if func is torch.Tensor.to:
            args = tuple(CUDA0 if a in ("cuda", torch.device("cuda")) else a for a in args)
            if kwargs.get("device") in ("cuda", torch.device("cuda")):
                kwargs["device"] = CUDA0
        try:
            return func(*args, **kwargs)
        except RuntimeError as e:
            if "not linked with support for cuda" not in str(e):
                raise
            # a hand-written Python binding (contiguous, copy_, ...) takes a CUDA device guard before its op; the
            # op called through torch.ops takes none (the guard fails before the op runs: nothing happened yet)
            name = getattr(func, "__name__", "")
            op = getattr(torch.ops.aten, _OP_NAMES.get(name, name), None)
            if op is None:
                raise SimCudaError(f"{func}: a Python binding that needs a real CUDA device guard ({e})") from e
            return op(*args, **kwargs)


@contextlib.contextmanager
def simulated_cuda(memory_bytes: int = 80 * 2**30) -> Iterator[SimCuda]:
    """Run the block as if torch had one CUDA device of `memory_bytes` (see the module's docstring); yields its
    records."""
    global _ACTIVE
    if _ACTIVE is not None:
        raise SimCudaError("simulated_cuda() is already active")
    if torch.cuda.is_available():
        raise SimCudaError("a real CUDA device is here: run on it instead of the simulation")
    sim = SimCuda(memory_limit=memory_bytes)
    cuda = torch.cuda

    def synchronize(device: Any = None) -> None:
        sim.note("syncs")
        sim.clock.host_waits()

    def current_stream(device: Any = None) -> _Stream:
        return sim._current[-1] if sim._current else sim.default_stream

    @contextlib.contextmanager
    def stream(s: _Stream | None) -> Iterator[None]:
        if s is not None:
            sim._current.append(s)
        try:
            yield
        finally:
            if s is not None:
                sim._current.pop()

    def max_memory_allocated(device: Any = None) -> int:
        return sim.peak_bytes

    def reset_peak_memory_stats(device: Any = None) -> None:
        sim.peak_bytes = sim.memory_allocated()

    class _Props:
        name = "simulated CUDA (CPU underneath)"
        total_memory = sim.memory_limit
        major, minor = 9, 0
        multi_processor_count = 132

    patches: dict[str, Any] = {
        "_lazy_init": lambda: None,
        "is_available": lambda: True,
        "device_count": lambda: 1,
        "current_device": lambda: 0,
        "get_device_name": lambda device=None: _Props.name,
        "get_device_properties": lambda device=None: _Props(),
        "get_device_capability": lambda device=None: (9, 0),
        "is_bf16_supported": lambda *a, **k: True,
        "synchronize": synchronize,
        "Stream": _Stream,
        "Event": _Event,
        "current_stream": current_stream,
        "default_stream": lambda device=None: sim.default_stream,
        "stream": stream,
        "memory_allocated": lambda device=None: sim.memory_allocated(),
        "max_memory_allocated": max_memory_allocated,
        "reset_peak_memory_stats": reset_peak_memory_stats,
        "memory_reserved": lambda device=None: sim.memory_allocated(),
        "max_memory_reserved": max_memory_allocated,
        "empty_cache": lambda: None,
        "manual_seed": lambda seed: None,
        "manual_seed_all": lambda seed: None,
        "mem_get_info": lambda device=None: (sim.memory_limit - sim.allocated, sim.memory_limit),
    }
    saved = {name: getattr(cuda, name) for name in patches}
    bootstrap = threading.Thread._bootstrap_inner  # type: ignore[attr-defined]

    def bootstrap_in_simulation(self: threading.Thread) -> None:
        # torch's modes are per thread: a thread started inside the simulation (a server, its engine worker,
        # anyio's pool) runs in it too; it must end before the simulation does
        with _FunctionMode(), _Mode(sim):
            bootstrap(self)

    mode = _Mode(sim)
    _ACTIVE = sim
    try:
        for name, fn in patches.items():
            setattr(cuda, name, fn)
        torch.Generator = _SimGenerator  # type: ignore[misc]
        threading.Thread._bootstrap_inner = bootstrap_in_simulation  # type: ignore[attr-defined]
        with _FunctionMode(), mode:
            yield sim
    finally:
        for name, fn in saved.items():
            setattr(cuda, name, fn)
        torch.Generator = _RealGenerator  # type: ignore[misc]
        threading.Thread._bootstrap_inner = bootstrap  # type: ignore[attr-defined]
        _ACTIVE = None
