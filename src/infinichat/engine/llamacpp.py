"""The llama.cpp backend: quantized GGUF speed behind the same engine protocol and the same KV sequences.

Every private access to llama-cpp-python (its low-level `llama_cpp` C bindings, the model and context
pointers, the batch struct) is confined to this file. Above it, sessions and the CLI see an `Engine`
(`new_sequence` / `prefill` / `decode_one` / `generate`) and `kv.KVSequence` objects, exactly as with the
PyTorch engine: the segment map, the budget and the eviction policies are the same Python objects; only
the store under the sequence differs.

- `LlamaCppStore` implements the store interface `KVSequence` talks to (length, tokens, positions,
  append, truncate, remove_spans, shift, snapshot / load_snapshot, fork) over one llama.cpp sequence.
  Slots are our logical order; llama.cpp keeps cells by position per sequence, and positions are strictly
  increasing along the slots, so slot i is the cell holding the i-th smallest position. Cutting slots
  [s, e) is `llama_memory_seq_rm` over [pos[s], pos[e-1] + 1); shifting the later ones down is
  `llama_memory_seq_add` (llama.cpp re-rotates the cached keys, its "K-shift", at the next decode).
  Snapshots and forks use the per-sequence state API (`llama_state_seq_get_data` / `_set_data`).
- Many sequences on one model: ONE context whose KV cells are shared by all sequences (`kv_unified`),
  with up to `n_seq_max` sequence ids resident at once. A sequence that needs cells or an id when there
  are none parks the least recently used other sequence: its cells are copied to host memory (its state
  bytes) and freed; a parked sequence is copied back on its next use. So any number of sequences can
  be alive; only the working set must fit `n_ctx` cells. Why not one context per sequence: each context
  allocates its whole KV buffer and compute graph up front. Why not per-sequence streams
  (`kv_unified=False`): they split `n_ctx` evenly, while our sequences have different budgets. The price
  of sharing: a decode attends over the used cell range of every resident sequence (masked), so idle
  resident sequences slow the others a little; park them (snapshot + drop) when many are idle.
- Batching (server/worker.py): the decode steps of several resident sequences run in one `llama_decode`
  (`decode_rows`: one token each under its own sequence id), and so do their prompt chunks (`prefill_rows`: each
  chunk's tokens under its sequence's id, the logits of its last token); a parked sequence, or a call that must
  evict or re-evaluate, runs alone.
- Policies that need attention weights (H2O, TOVA, SnapKV, OmniKV) are refused: llama.cpp does not
  expose them. `recompute` works by re-evaluating the kept tokens (except across a positional gap made
  by a positive `shift`: llama.cpp evaluates consecutive positions only).
- Threads: default to the physical cores. llama.cpp's threads busy-wait at every barrier, so running
  more threads than free cores (or another busy process on "its" core) collapses its speed (issue 8, on
  this project's 2-core machine: about 90 tokens/s quiet, under 1 token/s when another process used the
  second core).
  For the same reason callers should keep torch (which only samples here) at one thread.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import logging
import struct
import weakref
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from infinichat.engine.base import Engine
from infinichat.engine.torch_engine import physical_cores
from infinichat.errors import InfinichatError, ModelLoadError
from infinichat.kv.policy import EvictionPolicy
from infinichat.kv.registry import POLICIES
from infinichat.kv.sequence import KVSequence
from infinichat.kv.slots import SlotTable
from infinichat.kv.store import MAGIC as TORCH_MAGIC
from infinichat.kv.store import check_spans
from infinichat.model.gguf_meta import read_gguf_fields
from infinichat.model.tokenizer import Tokenizer

log = logging.getLogger(__name__)

BUILD_FLAGS = "-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
INSTALL = f"CMAKE_ARGS=\"{BUILD_FLAGS}\" pip install 'infinichat[llamacpp]'"
INSTALL_WHY = "the flags avoid the native build, which crashes in the AMX kernels on some CPUs"
SNAP_MAGIC = b"ILCS"
SNAP_VERSION = 1
DEFAULT_BATCH = 512  # tokens per llama_decode call (llama-cpp-python's default n_batch)
DEFAULT_SEQ_MAX = 8  # sequence ids resident at once; more sequences park (see the module docstring)
_KV_BYTES = 2  # f16 K and V cells (llama.cpp's default type_k / type_v)
# llama.cpp evaluates consecutive positions only (its batch check), and attention depends on a gap, so
# tokens after a gap (a positive `shift`) cannot be re-evaluated where they are
_GAP = (
    "the llama.cpp backend cannot re-evaluate tokens across a gap in their positions (made by a positive "
    "shift); use the torch backend to recompute with shifted positions"
)


def supports(policy: type[EvictionPolicy] | EvictionPolicy) -> bool:
    """Whether the llama.cpp backend can run this policy: it sees no attention weights, so only policies
    that act on overflow without them."""
    return not policy.needs_attention_weights and policy.phase == "overflow"


def supported_policies() -> list[str]:
    return [name for name, cls in POLICIES.items() if supports(cls)]


@functools.cache
def _lib():
    """The llama_cpp bindings, with the backend initialized and llama.cpp's log routed to `logging`."""
    try:
        import llama_cpp
    except ImportError:
        raise InfinichatError(
            f"the llama.cpp backend needs llama-cpp-python, which is not installed; install it with {INSTALL} "
            f"({INSTALL_WHY}), or use --backend torch"
        ) from None
    llama_cpp.llama_log_set(_log_callback(llama_cpp), ctypes.c_void_p(0))
    llama_cpp.llama_backend_init()
    return llama_cpp


@functools.cache  # also keeps the C callback alive
def _log_callback(llama_cpp):
    """llama.cpp's log lines into `logging` (debug level, warnings and errors above), not onto stderr."""
    levels = {3: logging.WARNING, 4: logging.ERROR}  # ggml: 1 debug, 2 info, 3 warn, 4 error, 5 continued

    @llama_cpp.llama_log_callback
    def on_log(level: int, text: bytes, _user) -> None:
        log.log(levels.get(level, logging.DEBUG), "llama.cpp: %s", text.decode("utf-8", "replace").rstrip())

    return on_log


def gguf_path(path: str | Path | None) -> Path:
    """The GGUF file to run (None: the embedded default model); llama.cpp reads no Hugging Face folders."""
    from infinichat.model.loader import default_model_path

    path = Path(path) if path is not None else default_model_path()
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such file; the llama.cpp backend takes a .gguf file")
    if path.suffix.lower() != ".gguf":
        raise ModelLoadError(f"{path}: the llama.cpp backend takes a .gguf file (use --backend torch for other models)")
    return path


def _arch_field(path: Path) -> dict:
    """The file's metadata for an error message (empty when even that cannot be read)."""
    try:
        return read_gguf_fields(path)
    except ModelLoadError:
        return {}


def load_llamacpp(
    path: str | Path | None = None, n_ctx: int | None = None, threads: int | None = None
) -> tuple[Tokenizer, str, LlamaCppEngine]:
    """Tokenizer, model name and engine for a GGUF file (the CLI's entry point to this backend)."""
    path = gguf_path(path)
    fields = read_gguf_fields(path)
    tokenizer = Tokenizer.from_gguf_fields(fields, source=str(path))
    engine = LlamaCppEngine(path, n_ctx=n_ctx, threads=threads, eos_ids=tokenizer.eos_ids, fields=fields)
    return tokenizer, str(fields.get("general.name", path.stem)), engine


@dataclass(frozen=True)
class LlamaModelInfo:
    """What this backend needs to know of a model, asked of llama.cpp itself once it has loaded the file: any
    architecture its build runs works, whether or not the torch side's architecture table knows it."""

    arch: str  # GGUF general.architecture
    n_layers: int
    n_kv_heads: int
    head_dim: int
    max_position: int  # the trained context
    vocab_size: int
    sliding_window: int  # llama.cpp's n_swa (0: none, or not used by its build for this architecture)

    @classmethod
    def of(cls, lib, model) -> LlamaModelInfo:
        arch = _meta_str(lib, model, "general.architecture") or "?"
        n_head = max(1, lib.llama_model_n_head(model))
        key_length = _meta_str(lib, model, f"{arch}.attention.key_length")
        return cls(
            arch=arch,
            n_layers=lib.llama_model_n_layer(model),
            n_kv_heads=lib.llama_model_n_head_kv(model),
            head_dim=int(key_length) if key_length else lib.llama_model_n_embd(model) // n_head,
            max_position=lib.llama_model_n_ctx_train(model),
            vocab_size=lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(model)),
            sliding_window=lib.llama_model_n_swa(model),
        )


def _meta_str(lib, model, key: str) -> str | None:
    """A GGUF metadata value as llama.cpp holds it, as text (None when absent)."""
    buf = ctypes.create_string_buffer(256)
    n = lib.llama_model_meta_val_str(model, key.encode(), buf, ctypes.sizeof(buf))
    return buf.value.decode("utf-8", "replace") if n >= 0 else None


@dataclass
class LlamaSnapshot:
    """A decoded `LlamaCppStore.snapshot`: token ids, positions, caller extras and llama.cpp's state bytes."""

    tokens: torch.Tensor
    positions: torch.Tensor
    extra: dict
    state: bytes


class _BatchBuffers:
    """A reusable `llama_batch` of at most n tokens whose arrays are numpy buffers (one seq id per token, each
    pointed at by `seq_ptrs`); subclasses say how the seq ids and logits flags are laid out."""

    def __init__(self, lib, n: int, seq_ptrs, logits_flag: int):
        self.n = n
        self.token = np.zeros(n, dtype=np.int32)
        self.pos = np.zeros(n, dtype=np.int32)
        self.n_seq_id = np.ones(n, dtype=np.int32)
        self.logits = np.full(n, logits_flag, dtype=np.int8)
        self._seq_ptrs = seq_ptrs
        self.struct = lib.llama_batch(
            n_tokens=0,
            token=self.token.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)),
            embd=None,
            pos=self.pos.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)),
            n_seq_id=self.n_seq_id.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)),
            seq_id=seq_ptrs,
            logits=self.logits.ctypes.data_as(ctypes.POINTER(ctypes.c_int8)),
        )


class _Batch(_BatchBuffers):
    """Tokens of one sequence: every token points at one shared seq id."""

    def __init__(self, lib, n: int):
        self.sid = ctypes.c_int32(0)
        super().__init__(lib, n, (ctypes.POINTER(ctypes.c_int32) * n)(*([ctypes.pointer(self.sid)] * n)), 0)

    def fill(self, sid: int, tokens: np.ndarray, first_pos: int, all_logits: bool) -> None:
        m = tokens.shape[0]
        self.sid.value = sid
        self.token[:m] = tokens  # int64 -> int32
        if m == 1:  # a decode step: skip the array calls
            self.pos[0] = first_pos
            self.logits[0] = 1
        else:
            self.pos[:m] = np.arange(first_pos, first_pos + m, dtype=np.int32)
            self.logits[:m] = 1 if all_logits else 0
            self.logits[m - 1] = 1
        self.struct.n_tokens = m


class _RowsBatch(_BatchBuffers):
    """Tokens of several sequences, each token with its own seq id: one token per sequence (batched decode steps),
    or a chunk per sequence (batched prompts)."""

    def __init__(self, lib, n: int):
        self.sids = (ctypes.c_int32 * n)()
        self.sid = np.ctypeslib.as_array(self.sids)  # (n,) int32 view of the same memory
        base = ctypes.addressof(self.sids)
        step = ctypes.sizeof(ctypes.c_int32)
        ptrs = (ctypes.POINTER(ctypes.c_int32) * n)(
            *[ctypes.cast(base + i * step, ctypes.POINTER(ctypes.c_int32)) for i in range(n)]
        )
        super().__init__(lib, n, ptrs, 1)

    def fill(self, rows: list[tuple[int, int, int]]) -> None:
        """rows: (seq id, token, position), at most n; logits for every row."""
        for i, (sid, tok, pos) in enumerate(rows):
            self.sids[i], self.token[i], self.pos[i] = sid, tok, pos
        self.logits[: len(rows)] = 1
        self.struct.n_tokens = len(rows)

    def fill_chunks(self, chunks: list[tuple[int, np.ndarray, int]]) -> list[int]:
        """chunks: (seq id, tokens (m,), first position), at most n tokens in all; logits for each chunk's last
        token. Returns the batch index of each chunk's last token (where its logits are)."""
        a, last = 0, []
        for sid, tokens, p0 in chunks:
            m = tokens.shape[0]
            self.sid[a : a + m] = sid
            self.token[a : a + m] = tokens  # int64 -> int32
            self.pos[a : a + m] = np.arange(p0, p0 + m, dtype=np.int32)
            self.logits[a : a + m] = 0
            self.logits[a + m - 1] = 1
            a += m
            last.append(a - 1)
        self.struct.n_tokens = a
        return last


class _SeqPool:
    """The context's sequence ids: which store holds which id, least recently used first. Stores that die
    release their id through a finalizer that only queues it (it may run on any thread); the queue is
    drained on the engine's thread, before the next operation."""

    def __init__(self, lib, mem, n_seq_max: int):
        self.lib, self.mem = lib, mem
        self.free = list(range(n_seq_max - 1, -1, -1))
        self.resident: OrderedDict[int, weakref.ref] = OrderedDict()
        self.dead: list[int] = []  # ids of stores that were garbage collected
        self.closed = False  # the engine freed its context

    def drain(self) -> None:
        while self.dead:
            self.release(self.dead.pop())

    def acquire(self, store: LlamaCppStore) -> int:
        self.drain()
        if not self.free and not self.park_lru(store):
            raise InfinichatError("no llama.cpp sequence id is free and no other sequence can be parked")
        sid = self.free.pop()
        self.resident[sid] = weakref.ref(store)
        return sid

    def touch(self, sid: int) -> None:
        self.resident.move_to_end(sid)

    def release(self, sid: int) -> None:
        if not self.closed:
            self.lib.llama_memory_seq_rm(self.mem, sid, -1, -1)
        if self.resident.pop(sid, None) is not None:
            self.free.append(sid)

    def park_lru(self, *keep: LlamaCppStore) -> bool:
        """Park the least recently used resident store other than those of `keep`; False if there is none."""
        self.drain()
        for ref in list(self.resident.values()):
            store = ref()
            if store is not None and all(store is not k for k in keep):
                store.park()
                return True
        return False


class LlamaCppStore(SlotTable):
    """A sequence's cache held by llama.cpp: token ids and positions here (policies read `tokens`), K/V in
    the context's cells under one sequence id, or in host memory as state bytes while parked."""

    def __init__(self, engine: LlamaCppEngine, capacity: int):
        super().__init__(capacity)
        self.engine = engine
        self.cfg = engine.cfg
        self._sid: int | None = None  # resident: its llama.cpp sequence id
        self._parked: bytes | None = None  # parked: llama.cpp's state bytes of its cells
        self._finalizer: weakref.finalize | None = None

    @property
    def nbytes(self) -> int:
        """Bytes of the K/V cells this sequence holds (f16 K and V)."""
        cfg = self.cfg
        return self._length * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * 2 * _KV_BYTES

    @property
    def resident(self) -> bool:
        return self._sid is not None

    @property
    def parked(self) -> bool:
        """Its cells are in host memory (state bytes), to be copied back on its next use."""
        return self._sid is None and self._parked is not None

    def cell_positions(self) -> tuple[int, int] | None:
        """(lowest, highest) position llama.cpp holds for this sequence (None while parked or empty): a
        check that its cells agree with `positions`."""
        if self._sid is None or not self._length:
            return None
        lib, mem = self.engine._lib, self.engine._mem
        return lib.llama_memory_seq_pos_min(mem, self._sid), lib.llama_memory_seq_pos_max(mem, self._sid)

    # ------------------------------------------------------------------ residency
    def activate(self) -> int:
        """This sequence's id, resident in the context (unparking it, or parking another, if needed)."""
        pool = self.engine._pool
        if pool.closed:
            raise InfinichatError("the llama.cpp engine of this KV sequence was closed")
        pool.drain()
        if self._sid is not None:
            pool.touch(self._sid)
            return self._sid
        sid = pool.acquire(self)
        self._sid = sid
        self._finalizer = weakref.finalize(self, pool.dead.append, sid)
        self._finalizer.atexit = False
        if self._parked:
            lib, ctx = self.engine._lib, self.engine._ctx
            buf = (ctypes.c_uint8 * len(self._parked)).from_buffer_copy(self._parked)
            while lib.llama_state_seq_set_data(ctx, buf, len(self._parked), sid) == 0:
                if not pool.park_lru(self):  # no room for its cells: park others, else give up
                    self._drop()
                    raise InfinichatError(
                        f"cannot bring a parked sequence of {self._length} tokens back into the llama.cpp "
                        f"context ({self.engine.n_ctx} cells): its state was refused (damaged, or too large)"
                    )
        self._parked = None
        return sid

    def park(self) -> None:
        """Copy the cells to host memory and free them (and the sequence id)."""
        if self._sid is None:
            return
        self._parked = self._state_bytes() if self._length else None
        self._release()
        self.engine.n_parked += 1
        log.debug("parked a sequence of %d tokens (%d bytes)", self._length, len(self._parked or b""))

    def _release(self) -> None:
        sid, self._sid = self._sid, None
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if sid is not None:
            self.engine._pool.release(sid)

    def _drop(self) -> None:
        """Forget everything (after a failed restore)."""
        self._release()
        self._parked = None
        self._set_length(0)

    def _state_bytes(self) -> bytes:
        """llama.cpp's state of this (resident) sequence's cells."""
        if self.engine._pool.closed:
            raise InfinichatError("the llama.cpp engine of this KV sequence was closed")
        lib, ctx = self.engine._lib, self.engine._ctx
        size = lib.llama_state_seq_get_size(ctx, self._sid)
        buf = (ctypes.c_uint8 * size)()
        n = lib.llama_state_seq_get_data(ctx, buf, size, self._sid)
        if n == 0:
            raise InfinichatError(f"llama.cpp could not serialize a sequence of {self._length} tokens")
        return bytes(memoryview(buf)[:n])

    def drop_uncommitted(self) -> None:
        """Remove cells past the last committed position (a batched step written but never claimed:
        `LlamaCppEngine.decode_rows`); positions increase along the slots, so such cells come after it."""
        if self._sid is None:
            return
        top = int(self.positions[self._length - 1]) if self._length else -1
        if self.engine._lib.llama_memory_seq_pos_max(self.engine._mem, self._sid) > top:
            self._rm(top + 1, -1)

    def _rm(self, p0: int, p1: int) -> None:
        if not self.engine._lib.llama_memory_seq_rm(self.engine._mem, self._sid, p0, p1):
            raise InfinichatError(f"llama.cpp refused to remove positions [{p0}, {p1}) of a sequence")

    def _add(self, p0: int, delta: int) -> None:
        self.engine._lib.llama_memory_seq_add(self.engine._mem, self._sid, p0, -1, delta)

    # ------------------------------------------------------------------ truncate / remove / shift
    def truncate(self, n: int) -> None:
        """Drop every slot from n on."""
        self._check_truncate(n)
        if n == self._length:
            return
        if n == 0 and self._sid is None:
            self._parked = None
        else:
            self.activate()
            self._rm(int(self.positions[n]), -1)
        self._set_length(n)

    def remove_spans(self, spans: Sequence[tuple[int, int]], shift: bool = True, rotate: bool = True) -> None:
        """Cut out sorted, disjoint slot spans, as `KVStore.remove_spans`. llama.cpp always re-rotates the
        shifted keys (`rotate=False` only saves work on the torch store; the recomputing engine overwrites
        them here)."""
        spans = [(int(s), int(e)) for s, e in spans if e > s]
        check_spans(spans, self._length)
        if not spans:
            return
        self.activate()
        pos, L = self.positions, self._length
        for s, e in reversed(spans):  # right to left: the positions of earlier spans are still the old ones
            self._rm(int(pos[s]), int(pos[e - 1]) + 1)
            if shift and e < L:
                self._add(int(pos[e]), -int(pos[e] - pos[s]))
        self._cut(spans, shift)

    def shift(self, start: int, delta: int) -> None:
        """Move the positions of slots [start, length) by `delta` (`llama_memory_seq_add`). Positions must stay
        strictly increasing, >= 0 and below the capacity."""
        if not self._check_shift(start, delta):
            return
        self.activate()
        self._add(int(self.positions[start]), delta)
        self._shift_positions(start, delta)

    # ------------------------------------------------------------------ snapshot / restore / fork
    def _current_state(self) -> bytes:
        if not self._length:
            return b""
        if self._sid is not None:
            return self._state_bytes()
        if self._parked is None:
            raise InfinichatError(f"a parked llama.cpp sequence of {self._length} tokens has lost its state bytes")
        return self._parked

    def _snapshot_parts(self, extra: dict | None):
        n = self._length
        state = self._current_state()
        header = {
            "version": SNAP_VERSION,
            "model": self.engine.fingerprint,
            "length": n,
            "state_bytes": len(state),
            "extra": extra or {},
        }
        hb = json.dumps(header).encode()
        yield SNAP_MAGIC + struct.pack("<I", len(hb)) + hb
        yield self.tokens[:n].numpy().tobytes()
        yield self.positions[:n].numpy().tobytes()
        yield state

    def decode_snapshot(self, data: bytes) -> LlamaSnapshot:
        """Parse and check `snapshot` bytes (written on this model)."""
        if data[:4] == TORCH_MAGIC:
            raise InfinichatError(
                "this KV snapshot was written by the torch engine; the llama.cpp backend cannot "
                "restore it (a snapshot restores on the backend and model that wrote it)"
            )
        if len(data) < 8 or data[:4] != SNAP_MAGIC:
            raise InfinichatError("not an infinichat llama.cpp KV snapshot (bad magic bytes)")
        (hlen,) = struct.unpack("<I", data[4:8])
        try:
            header = json.loads(data[8 : 8 + hlen])
            n, n_state, version, model = (header[k] for k in ("length", "state_bytes", "version", "model"))
            n, n_state = int(n), int(n_state)
        except (ValueError, KeyError, TypeError) as e:
            raise InfinichatError(f"the KV snapshot header is damaged ({e})") from None
        if version != SNAP_VERSION:
            raise InfinichatError(f"KV snapshot version {version} is not supported; accepted: {SNAP_VERSION}")
        if model != self.engine.fingerprint:
            raise InfinichatError(
                f"the KV snapshot is for another model ({model}); this one is {self.engine.fingerprint}"
            )
        off = 8 + hlen
        if len(data) != off + 16 * n + n_state:
            raise InfinichatError(
                f"the KV snapshot is truncated or damaged: {len(data)} bytes, expected {off + 16 * n + n_state}"
            )
        raw = bytearray(data[off : off + 16 * n])
        ids = torch.frombuffer(raw, dtype=torch.long) if n else torch.zeros(0, dtype=torch.long)  # (2n,)
        tokens, positions = ids[:n], ids[n:]  # (n,), (n,)
        if n and not bool((positions[1:] > positions[:-1]).all()):
            raise InfinichatError("the KV snapshot is damaged: its positions are not increasing")
        return LlamaSnapshot(tokens, positions, header.get("extra") or {}, bytes(data[off + 16 * n :]))

    def load_snapshot(self, snap: LlamaSnapshot) -> None:
        n = snap.tokens.shape[0]
        if n > self.capacity or (n and int(snap.positions[-1]) >= self.capacity):
            raise InfinichatError(f"the KV snapshot holds {n} tokens, more than this cache's capacity {self.capacity}")
        self._release()
        self._parked = snap.state or None
        self._load_slots(snap.tokens, snap.positions)
        if n:
            self.activate()  # load the cells now, so that a refused state is reported here

    def fork(self) -> LlamaCppStore:
        """An independent copy. It starts parked (its cells are copied in on its first use)."""
        other = LlamaCppStore(self.engine, self.capacity)
        n = self._length
        other._load_slots(self.tokens[:n], self.positions[:n])
        other._parked = self._current_state() or None
        return other


class LlamaCppEngine(Engine):
    """Token ids in, logits out, through llama.cpp on a GGUF file (default: the embedded default model)."""

    def __init__(
        self,
        path: str | Path | None = None,
        n_ctx: int | None = None,
        threads: int | None = None,
        n_seq_max: int = DEFAULT_SEQ_MAX,
        n_batch: int = DEFAULT_BATCH,
        eos_ids: Iterable[int] | None = None,
        flash_attn: bool = False,
        fields: dict | None = None,
    ):
        """`path`: a GGUF file (default: the embedded model); `n_ctx`: KV cells shared by all sequences
        (default: the trained context); `threads`: default the physical cores; `n_seq_max`: sequences
        resident at once; `eos_ids`: default llama.cpp's end-of-generation tokens; `fields`: the file's
        metadata when the caller has read it already."""
        lib = _lib()
        path = gguf_path(path)
        self.path = path
        self.threads = threads or physical_cores()
        if not 1 <= n_seq_max <= lib.llama_max_parallel_sequences():
            raise InfinichatError(f"n_seq_max must be in [1, {lib.llama_max_parallel_sequences()}], got {n_seq_max}")
        self._lib = lib
        self._model = self._ctx = None
        mparams = lib.llama_model_default_params()
        self._model = lib.llama_model_load_from_file(str(path).encode(), mparams)
        if not self._model:
            arch = (fields if fields is not None else _arch_field(path)).get("general.architecture", "?")
            raise ModelLoadError(
                f"{path}: llama.cpp could not load this GGUF file (architecture {arch!r}; see the log with -v)"
            )
        # the model's shape from llama.cpp, not from the torch side's architecture table (model/arch.py)
        self.cfg = LlamaModelInfo.of(lib, self._model)
        self.n_ctx = n_ctx or self.cfg.max_position
        cparams = lib.llama_context_default_params()
        cparams.n_ctx = self.n_ctx
        cparams.n_batch = cparams.n_ubatch = n_batch
        cparams.n_seq_max = n_seq_max
        cparams.kv_unified = True
        cparams.n_threads = cparams.n_threads_batch = self.threads
        cparams.flash_attn_type = (
            lib.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else lib.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        cparams.no_perf = True
        self._ctx = lib.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            self.close()
            raise ModelLoadError(f"{path}: llama.cpp could not create a context of {self.n_ctx} tokens")
        self._mem = lib.llama_get_memory(self._ctx)
        if not lib.llama_memory_can_shift(self._mem):
            self.close()
            raise ModelLoadError(f"{path}: llama.cpp cannot shift positions in this model's cache")
        vocab = lib.llama_model_get_vocab(self._model)
        self.n_vocab = self.cfg.vocab_size
        if eos_ids is None:
            eos_ids = [t for t in range(self.n_vocab) if lib.llama_vocab_is_eog(vocab, t)]
        self.eos_ids = frozenset(eos_ids)
        self.n_batch = self.max_chunk = n_batch  # tokens per llama_decode call
        self._batch = _Batch(lib, n_batch)
        # batched decode steps (one token of each resident sequence) and batched prompts (chunks of several)
        self._rows = _RowsBatch(lib, max(n_batch, n_seq_max))
        self.max_rows = n_seq_max  # sequences per batched call (engine/batch.py reads it)
        self._pool = _SeqPool(lib, self._mem, n_seq_max)
        self.n_parked = 0  # how often a sequence was moved out to host memory
        self.fingerprint = {  # what a snapshot must match
            "n_params": lib.llama_model_n_params(self._model),
            "size": lib.llama_model_size(self._model),
            "n_layers": self.cfg.n_layers,
            "n_vocab": self.n_vocab,
            "kv": "f16",
        }
        log.info(
            "llama.cpp: %s, n_ctx %d, %d threads, %d resident sequences", path.name, self.n_ctx, self.threads, n_seq_max
        )

    def close(self) -> None:
        """Free the context and the model (sequences of this engine are unusable afterwards)."""
        lib = self._lib
        if getattr(self, "_pool", None) is not None:
            self._pool.closed = True
        if self._ctx:
            lib.llama_free(self._ctx)
            self._ctx = None
        if self._model:
            lib.llama_model_free(self._model)
            self._model = None

    def __del__(self) -> None:
        if getattr(self, "_lib", None) is not None:
            with contextlib.suppress(Exception):  # interpreter shutdown: the library may be gone already
                self.close()

    # ------------------------------------------------------------------ sequences
    def _new_store(self, policy: EvictionPolicy, budget: int | None, capacity: int | None) -> LlamaCppStore:
        """The capacity defaults to the budget, else the context size; it cannot exceed the context's `n_ctx`.
        Policies that need attention weights are refused."""
        if not supports(policy):
            raise InfinichatError(
                f"the {policy.name} policy needs attention weights, which the llama.cpp backend does not expose; "
                f"policies that work here: {', '.join(supported_policies())} (or use --backend torch)"
            )
        capacity = capacity or budget or self.n_ctx
        if capacity > self.n_ctx:
            raise InfinichatError(
                f"a KV capacity of {capacity} tokens does not fit the llama.cpp context of {self.n_ctx} tokens; "
                f"use a budget <= {self.n_ctx} or start the engine with a larger context (--ctx)"
            )
        return LlamaCppStore(self, capacity)

    # ------------------------------------------------------------------ one forward call (prefill / decode_one: Engine)
    def _append(self, seq: KVSequence, ids: torch.Tensor, all_logits: bool, stage: str = "decode") -> torch.Tensor:
        store = seq.store
        if not isinstance(store, LlamaCppStore) or store.engine is not self:
            raise InfinichatError("this KV sequence belongs to another engine; make it with this engine's new_sequence")
        seq.make_room(ids.shape[0])
        if seq.stale_from is not None:  # a recomputing policy evicted: re-evaluate the kept tokens after the cut
            a, end = seq.stale_from, seq.length
            first = int(store.positions[a - 1]) + 1 if a else int(store.positions[0])
            if int(store.positions[end - 1]) - first != end - a - 1:
                raise InfinichatError(_GAP)
            store.activate()
            store._rm(int(store.positions[a]), -1)
            for b in range(a, end, self.n_batch):
                c = min(b + self.n_batch, end)
                self._write(store, store.tokens[b:c], store.positions[b:c], False)
            seq.mark_fresh()
        positions = seq.next_positions(ids.shape[0])
        out = self._write(store, ids, positions, all_logits)
        seq.append(ids, positions)
        return out

    # ------------------------------------------------------------------ batched decode (engine/batch.py)
    def can_batch(self, seq: KVSequence) -> bool:
        """A plain step (no eviction, no re-evaluation) of a resident sequence of this engine: batching never
        parks or brings back a sequence (the batch's members stay in the context's `n_seq_max` ids)."""
        store = seq.store
        return (
            isinstance(store, LlamaCppStore)
            and store.engine is self
            and store.resident
            and seq.stale_from is None
            and seq.length + 1 <= seq.budget
        )

    def decode_rows(self, items: Sequence[tuple[KVSequence, int]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One `llama_decode` of one token per sequence, each under its own seq id at its next position. The
        cell written for a step that is not claimed (a stop between the batched call and the generation's turn)
        is removed by `discard_row`, or, at the latest, by the sequence's next write."""
        if len(items) > self.max_rows:
            raise ValueError(f"decode_rows: {len(items)} sequences, the context holds {self.max_rows} at once")
        lib, mem = self._lib, self._mem
        rows, positions = [], []
        for seq, token in items:
            if not self.can_batch(seq):
                raise ValueError("decode_rows: a sequence that is parked or needs eviction or re-evaluation")
            store = seq.store
            assert isinstance(store, LlamaCppStore) and store._sid is not None
            pos = seq.next_positions(1)
            p0 = int(pos[0])
            store.drop_uncommitted()
            last = lib.llama_memory_seq_pos_max(mem, store._sid)
            if last >= 0 and p0 != last + 1:
                raise InfinichatError(_GAP)
            self._pool.touch(store._sid)
            rows.append((store._sid, token, p0))
            positions.append(pos)
        self._rows.fill(rows)
        rc = lib.llama_decode(self._ctx, self._rows.struct)
        if rc != 0:  # 1: no free cells for them all; the steps run one by one (parking as needed) instead
            raise InfinichatError(f"llama.cpp could not evaluate a batch of {len(rows)} steps (llama_decode {rc})")
        out = []
        for i, pos in enumerate(positions):
            logits = torch.empty(self.n_vocab, dtype=torch.float32)  # (V,)
            ctypes.memmove(logits.data_ptr(), lib.llama_get_logits_ith(self._ctx, i), logits.nbytes)
            out.append((pos, logits))
        return out

    # ------------------------------------------------------------------ batched prompts (server/worker.py)
    def can_batch_prompt(self, seq: KVSequence, n: int) -> bool:
        """A plain prompt call (no eviction, no re-evaluation, consecutive positions) of at most `n_batch` tokens
        of a sequence of this engine that is resident or new: a parked sequence (its cells in host memory) runs
        alone, as in `can_batch`."""
        store = seq.store
        if not (isinstance(store, LlamaCppStore) and store.engine is self) or store.parked:
            return False
        L = store.length
        return (
            seq.stale_from is None
            and 1 <= n <= self.n_batch
            and seq.length + n <= seq.budget  # make_room would do nothing
            and store.next_position + n <= store.capacity
            and (L == 0 or int(store.positions[L - 1]) + 1 == store.next_position)  # no gap (a positive shift)
        )

    def prefill_rows(self, items: Sequence[tuple[KVSequence, torch.Tensor]]) -> list[torch.Tensor]:
        """Several sequences' prompt chunks in one `llama_decode` (in several where they hold more than
        `n_seq_max` sequences or `n_batch` tokens): each token under its sequence's id at its next position,
        logits of each chunk's last token. Each sequence records its chunk exactly as `prefill` does alone. A new
        sequence takes an id here (parking a sequence outside the call if none is free); a call that finds no free
        cells parks sequences outside it, else its chunks run one by one."""
        for seq, ids in items:
            if not self.can_batch_prompt(seq, ids.shape[0]):
                raise ValueError("prefill_rows: a sequence that is parked or whose prompt needs eviction")
        if len({id(seq) for seq, _ in items}) != len(items):
            raise ValueError("prefill_rows: a sequence appears twice")
        out: list[torch.Tensor] = []
        group: list[tuple[KVSequence, torch.Tensor]] = []
        size = 0
        for seq, ids in items:
            if group and (len(group) == self.max_rows or size + ids.shape[0] > self.n_batch):
                out += self._prompt_call(group)
                group, size = [], 0
            group.append((seq, ids))
            size += ids.shape[0]
        return out + self._prompt_call(group)

    def _prompt_call(self, items: list[tuple[KVSequence, torch.Tensor]]) -> list[torch.Tensor]:
        """One `llama_decode` of the chunks (at most `n_seq_max` sequences, `n_batch` tokens); logits (V,) each."""
        lib, mem, pool = self._lib, self._mem, self._pool
        stores = [st for seq, _ in items if isinstance(st := seq.store, LlamaCppStore)]
        assert len(stores) == len(items)  # checked by prefill_rows
        for st in stores:  # the resident ones first become the most recently used: a new one that takes an id
            if st._sid is not None:  # parks a sequence outside the call (there is one: the call holds at most
                pool.touch(st._sid)  # n_seq_max sequences)
        chunks = []
        for (seq, ids), st in zip(items, stores, strict=True):
            sid = st.activate()
            st.drop_uncommitted()  # the cell of an unclaimed batched step (decode_rows), if any
            p0 = seq.store.next_position
            last = lib.llama_memory_seq_pos_max(mem, sid)  # -1 when empty
            if last >= 0 and p0 != last + 1:
                raise InfinichatError(_GAP)
            chunks.append((sid, ids.numpy(), p0))
        if any(not st.resident for st in stores):  # not expected (see above): the chunks run one by one
            return [self._append(seq, ids, False, "prompt") for seq, ids in items]
        index = self._rows.fill_chunks(chunks)
        while (rc := lib.llama_decode(self._ctx, self._rows.struct)) == 1:  # no free cells: park another sequence
            if not pool.park_lru(*stores):
                log.debug("no free cells for a batched prompt call of %d sequences: one by one", len(items))
                return [self._append(seq, ids, False, "prompt") for seq, ids in items]
        if rc != 0:
            raise InfinichatError(
                f"llama.cpp could not evaluate a batch of {len(items)} prompt chunks (llama_decode {rc})"
            )
        out = []
        for (seq, ids), i in zip(items, index, strict=True):
            logits = torch.empty(self.n_vocab, dtype=torch.float32)  # (V,)
            ctypes.memmove(logits.data_ptr(), lib.llama_get_logits_ith(self._ctx, i), logits.nbytes)
            seq.append(ids, seq.next_positions(ids.shape[0]))
            out.append(logits)
        return out

    def discard_row(self, seq: KVSequence, positions: torch.Tensor) -> None:
        """An unclaimed batched step: remove its cell (if the sequence still holds it, uncommitted)."""
        store = seq.store
        if isinstance(store, LlamaCppStore) and store.engine is self and not self._pool.closed:
            store.drop_uncommitted()

    def _write(
        self, store: LlamaCppStore, ids: torch.Tensor, positions: torch.Tensor, all_logits: bool
    ) -> torch.Tensor:
        """Decode tokens (m,) <= n_batch into the store's cells at `positions`; logits (V,) or (m, V)."""
        lib, ctx = self._lib, self._ctx
        m, p0 = ids.shape[0], int(positions[0])
        sid = store.activate()
        store.drop_uncommitted()  # the cell of an unclaimed batched step (decode_rows), if any
        last = lib.llama_memory_seq_pos_max(self._mem, sid)  # -1 when empty
        if int(positions[-1]) - p0 != m - 1 or (last >= 0 and p0 != last + 1):
            raise InfinichatError(_GAP)
        self._batch.fill(sid, ids.numpy(), p0, all_logits)
        while (rc := lib.llama_decode(ctx, self._batch.struct)) == 1:  # no free cells: park another sequence
            if not self._pool.park_lru(store):
                raise InfinichatError(
                    f"the llama.cpp context is full ({self.n_ctx} cells): {store.length} cached + {m} new tokens "
                    "do not fit; use a smaller budget or a larger context (--ctx)"
                )
        if rc != 0:
            raise InfinichatError(f"llama.cpp failed to evaluate {m} tokens (llama_decode returned {rc})")
        out = torch.empty((m, self.n_vocab) if all_logits else (self.n_vocab,), dtype=torch.float32)  # (m, V) | (V,)
        ptr = lib.llama_get_logits(ctx) if all_logits else lib.llama_get_logits_ith(ctx, -1)
        ctypes.memmove(out.data_ptr(), ptr, out.nbytes)  # llama.cpp reuses its buffer at the next decode
        return out
