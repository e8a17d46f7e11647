"""The PyTorch engine: token ids in, logits / sampled tokens out. No chat templates, no JSON.

gpt-fast style: one forward call `_append` over an explicit cache (a `kv.KVSequence`); `prefill`,
`decode_one` and `generate` (the loop that samples, checks stop conditions and yields one `Step` per
token) are shared with the llama.cpp backend in `engine.base`. Before each forward call the sequence
makes room within its budget through its eviction policy; a policy that asks for recomputation leaves
stale slots, which are re-evaluated here before the new tokens.
A policy that needs attention weights (or offloads) is asked for an `AttentionRequest` for each call; one
whose phase is "prefill" lets a prompt grow the cache up to its capacity and is compressed to the budget
after it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence

import torch

from infinichat.engine.base import Engine
from infinichat.engine.threads import ThreadGovernor
from infinichat.errors import InfinichatError
from infinichat.kv.policy import EvictionPolicy
from infinichat.kv.quantized import DENSE_KV_DTYPES, QUANT_KV_DTYPES, check_hadamard, check_kv_dtype, make_store
from infinichat.kv.sequence import KVSequence
from infinichat.kv.store import KVStore, torch_store
from infinichat.model.config import ModelConfig
from infinichat.model.transformer import BatchItem, Transformer

log = logging.getLogger(__name__)

# Max tokens per forward call while prefilling. A prompt from slot 0 in one call uses SDPA's causal kernel
# (no mask) and converts the layers' weights to float32 once: 2048 covers the common prompt in one call.
# Later chunks build a (T, start+T) bool mask; all-logits calls stop at LOGITS_CHUNK ((T, V) float32 each).
PREFILL_CHUNK = 2048
LOGITS_CHUNK = 1024


def physical_cores() -> int:
    """Physical cores available to this process (hyper-threads share one core's matmul units)."""
    try:
        n_avail = len(os.sched_getaffinity(0))
    except AttributeError:
        n_avail = os.cpu_count() or 1
    try:
        with open("/proc/cpuinfo") as f:
            info = {k.strip(): v for k, v in (ln.split(":", 1) for ln in f if ln.startswith(("siblings", "cpu cores")))}
        siblings, cores = int(info["siblings"]), int(info["cpu cores"])
        if siblings > cores:
            return max(1, n_avail * cores // siblings)
    except (OSError, ValueError, KeyError):
        pass
    return max(1, n_avail)


def set_threads(n: int | None) -> int:
    n = n or physical_cores()
    torch.set_num_threads(n)
    return n


def configure_threads(engine: TorchEngine, n: int | None, start: int | None = None) -> None:
    """The engine's CPU threads: `n` fixed, or None (--threads 0, the default) = the physical cores at most, the
    count chosen at run time by a ThreadGovernor (engine/threads.py) from the measured decode steps, starting at
    `start` (default: what the idle CPUs allow now)."""
    cores = set_threads(n)
    engine.threads = None
    if n is None and cores > 1 and engine.model.device.type == "cpu":
        engine.threads = ThreadGovernor(cores, start=start)
        torch.set_num_threads(engine.threads.current)  # the prompt runs at the starting count too


class TorchEngine(Engine):
    max_chunk = PREFILL_CHUNK
    logits_chunk = LOGITS_CHUNK

    def __init__(self, model: Transformer, eos_ids: Iterable[int] = (), kv_dtype: str = "auto"):
        """`kv_dtype` (--kv-dtype): how the KV stores hold K/V: auto (the model's dtype), bf16, f16, f32, or
        quantized int8 / int4, int8h / int4h with Hadamard-rotated keys (kv/quantized.py)."""
        self.model = model
        self.cfg: ModelConfig = model.cfg
        self.eos_ids = frozenset(eos_ids)
        self.kv_dtype = check_kv_dtype(kv_dtype)
        if kv_dtype in ("int8h", "int4h"):
            check_hadamard(self.cfg.head_dim)  # refused here, not at the first sequence
        self.threads: ThreadGovernor | None = None  # configure_threads: decode steps' thread count at run time

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def kv_format(self) -> str:
        """What the stores hold (keys the prefix cache): the dtype name of a dense store, or int8 / int4 / int8h /
        int4h."""
        if self.kv_dtype in QUANT_KV_DTYPES:
            return self.kv_dtype
        return str(self.model.dtype if self.kv_dtype == "auto" else DENSE_KV_DTYPES[self.kv_dtype])

    def _new_store(self, policy: EvictionPolicy, budget: int | None, capacity: int | None) -> KVStore:
        """The capacity defaults to the budget, else the model's trained context; positions never reach it."""
        if not capacity and policy.phase == "prefill":  # a prompt grows past the budget before compression
            capacity = max(budget or 0, self.cfg.max_position) + policy.scratch_slots()
        capacity = capacity or budget or self.cfg.max_position
        device = self.model.device
        home = policy.home_in_host_memory() and device.type != "cpu"
        if home:  # OmniKV / brutal offload: the store is the home copy in host memory; the policy's mirrors and
            # the picked rows go to the model's device (kv/offload.py)
            if getattr(policy, "device", "") is None:  # the offloading policies' compute device: the model's
                policy.device = str(device)  # type: ignore[attr-defined]
            device = torch.device("cpu")
        if (policy.offloads or policy.home_in_host_memory()) and self.kv_dtype in QUANT_KV_DTYPES:
            raise InfinichatError(
                f"the {policy.name} policy offloads dense K/V buffers; it does not run on --kv-dtype {self.kv_dtype} "
                "(use --kv-dtype auto, bf16 or f16)"
            )
        store = make_store(self.kv_dtype, self.cfg, capacity, self.model.dtype, rope=self.model.rope, device=device)
        if home and self.model.device.type == "cuda":
            store.pin_host_memory()  # page-locked: the per-step row copies to the GPU run asynchronously
        return store

    # ------------------------------------------------------------------ one forward call (prefill / decode_one: Engine)
    def _append(self, seq: KVSequence, ids: torch.Tensor, all_logits: bool, stage: str = "decode") -> torch.Tensor:
        """One forward call: make room within the budget, recompute stale slots, evaluate `ids` (T,).
        `stage`: "prompt", "prompt_end" (a prompt's last call) or "decode" (kv/policy.py)."""
        policy = seq.policy
        compress = policy.phase == "prefill" and stage != "decode"
        seq.make_room(ids.shape[0], limit=seq.capacity if compress else None)
        if seq.stale_from is not None:
            self._recompute(seq, seq.stale_from)
        start = seq.length
        positions = seq.next_positions(ids.shape[0])
        attn = None
        if policy.needs_attention_weights or policy.offloads:
            attn = policy.attention_request(seq, start, ids.shape[0], stage)
        store = torch_store(seq.store, "the torch engine")
        if stage == "decode" and self.threads is not None:
            with self.threads.step():  # timed: the thread count follows the measured step times
                out = self.model(ids, positions, store, start, all_logits=all_logits, attn=attn)
        else:
            out = self.model(ids, positions, store, start, all_logits=all_logits, attn=attn)
        if store.pinned:  # the forward's rows went to pinned host memory asynchronously: placed before anyone reads
            store.flush()
        seq.append(ids, positions)
        if compress and stage == "prompt_end":
            if policy.scoring_pass and seq.length > seq.budget:
                self._scoring_pass(seq)
            seq.make_room(0)  # down to the budget, with the scores of the prompt's last queries
        return out

    def _scoring_pass(self, seq: KVSequence) -> None:
        """The policy's scratch forward calls after the cache's last slot (KVzip's reconstruction): their K/V
        go into the store's free slots and nothing is appended, so the cache is as before."""
        store = torch_store(seq.store, "the torch engine")
        for ids, req in seq.policy.probe_calls(seq):
            self.model(ids, store.next_positions(ids.shape[0]), store, seq.length, attn=req)
            store.flush()

    # ------------------------------------------------------------------ batched decode (engine/batch.py)
    def can_batch(self, seq: KVSequence) -> bool:
        p = seq.policy
        return (
            not (p.needs_attention_weights or p.offloads)
            and seq.stale_from is None
            and seq.length + 1 <= seq.budget  # make_room would do nothing
            and isinstance(seq.store, KVStore)
        )

    def can_batch_prompt(self, seq: KVSequence, n: int) -> bool:
        p = seq.policy
        return (
            not (p.needs_attention_weights or p.offloads or p.scoring_pass)
            and p.phase != "prefill"
            and p.prompt_tail == 0
            and seq.stale_from is None
            and seq.length + n <= seq.budget  # make_room would do nothing
            and isinstance(seq.store, KVStore)
        )

    def prefill_rows(self, items: Sequence[tuple[KVSequence, torch.Tensor]]) -> list[torch.Tensor]:
        batch = []
        for seq, ids in items:
            if not self.can_batch_prompt(seq, ids.shape[0]):
                raise ValueError("prefill_rows: a sequence whose prompt needs eviction or attention weights")
            positions = seq.next_positions(ids.shape[0])  # (T,)
            batch.append(BatchItem(ids, positions, torch_store(seq.store, "the torch engine"), seq.length))
        logits = self.model.forward_batch(batch)  # B x (V,)
        for (seq, ids), b in zip(items, batch, strict=True):
            seq.append(ids, b.positions)
        return logits

    def decode_rows(self, items: Sequence[tuple[KVSequence, int]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        batch = []
        for seq, token in items:
            if not self.can_batch(seq):
                raise ValueError("decode_rows: a sequence whose next step needs eviction or attention weights")
            batch.append(
                BatchItem(
                    torch.tensor([token]), seq.next_positions(1), torch_store(seq.store, "the torch engine"), seq.length
                )
            )
        logits = self.model.forward_batch(batch)  # B x (V,)
        return [(b.positions, x) for b, x in zip(batch, logits, strict=True)]

    def _recompute(self, seq: KVSequence, stale_from: int) -> None:
        """Re-evaluate the K/V of slots [stale_from, length) in place (a recomputing policy evicted)."""
        store, end = torch_store(seq.store, "the torch engine"), seq.length
        for a in range(stale_from, end, PREFILL_CHUNK):
            b = min(a + PREFILL_CHUNK, end)
            self.model(store.tokens[a:b], store.positions[a:b], store, a)
            store.flush()
        seq.mark_fresh()
