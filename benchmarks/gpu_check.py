"""The GPU check of issue 16, as one script: under 8 minutes on one H100/H200-class card, random-weight models
only (no download, no default model needed), writing report.json + report.txt to --out.

    python3 benchmarks/gpu_check.py --out results/gpu-check          # on a CUDA device: the full check
    python3 benchmarks/gpu_check.py --dry-run --device cpu --out DIR  # tiny shapes on the CPU: every section's code

Sections (each under a hard time limit, --budget-* seconds, 430 s in all, and at most what is left of --total,
450 s: under 8 minutes with the start-up; the last section run gets all that is left; a section that fails or
runs out is reported and the next one runs; the report is rewritten after each section):
1. parity: our logits against transformers' on the same device and weights, float32 and bfloat16, for a random
   Llama-3-8B-shaped model with 2 layers (prefill of 64 tokens, then 8 decode steps; max abs difference
   relative to the logits' scale; tolerances 1e-4 and 3e-2). --default-model adds the default model.
2. speed: decode tok/s (batch 1, greedy) and prefill tok/s against transformers `generate()` on the same device
   and weights, random Llama-3.2-1B-shaped model, bfloat16; ratios ours / transformers (target: decode >= 2x).
3. quant: the same 1B-shaped model with --quant int8 and int4 (PyTorch's CUDA kernels) against bf16: decode tok/s,
   ratio, logits distance from bf16 and top-1 agreement over 9 teacher-forced positions.
4. compile: the static-shape decode step (kernels/static_step.py), plain and under torch.compile
   (reduce-overhead: CUDA graphs), against the layer-by-layer step and transformers `generate()` on the same
   (--compile-layers) model: first-call (compile) time, tok/s, logits distance; bf16, int4, int8 (a compiled run
   starts only with --compile-reserve seconds of the section left). On the CPU (dry run) the compiled run is
   skipped unless --cpu-compile (inductor takes ~45 s on a tiny model here).
5. omnikv: a random 8B-shaped model with --omni-layers layers (8; filter layer 1: layers 0-1 resident, 2-7
   offloaded) at 32k and 128k tokens (one prompt evaluation per length, copied into each run): decode tok/s of full
   attention, OmniKV resident, OmniKV offload (pinned host store, picked rows fetched a layer ahead on a side
   stream) and brutal offload; peak GPU memory and GPU bytes of K/V; the longest context that fits the free GPU
   memory, with and without offload (estimated from the measured bytes per token). Targets: OmniKV >= 1.5x full
   at 32k+, offload cuts the GPU KV memory by >= 60%.
6. tests: the suite's CUDA-marked tests (pytest -m cuda: test_device, test_arch_models, test_gpu_paths).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import inspect
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from infinichat.engine.torch_engine import TorchEngine
from infinichat.model.config import ModelConfig
from infinichat.model.hf_loader import canonical_weights
from infinichat.model.transformer import Transformer

REPO = Path(__file__).resolve().parents[1]
CUDA_TESTS = ["tests/test_device.py", "tests/test_arch_models.py", "tests/test_gpu_paths.py"]


@dataclass(frozen=True)
class Shape:
    name: str
    vocab: int
    dim: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    theta: float = 500000.0


LLAMA3_8B = Shape("llama3-8b-shaped", 128256, 4096, 2, 32, 8, 14336)
LLAMA_1B = Shape("llama3.2-1b-shaped", 128256, 2048, 16, 32, 8, 8192)
TINY = Shape("tiny", 512, 128, 4, 4, 2, 256)


class SectionTimeout(Exception):
    pass


class Report:
    """What the run prints, kept for report.txt, and its figures by section for report.json."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.sections: dict[str, dict[str, Any]] = {}
        self.current: dict[str, Any] = {}

    def log(self, msg: str) -> None:
        print(msg, flush=True)
        self.lines.append(msg)

    def row(self, **fields: Any) -> None:
        self.current.setdefault("rows", []).append(fields)

    def write(self, out: Path, meta: dict[str, Any]) -> None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps({"meta": meta, "sections": self.sections}, indent=1) + "\n")
        (out / "report.txt").write_text("\n".join(self.lines) + "\n")


R = Report()
log = R.log


@contextlib.contextmanager
def hard_limit(seconds: float) -> Iterator[None]:
    """Raise SectionTimeout in the main thread after `seconds` (SIGALRM; between Python bytecodes)."""

    def stop(signum, frame):
        raise SectionTimeout(f"over its {seconds:.0f} s budget")

    old = signal.signal(signal.SIGALRM, stop)
    signal.alarm(max(1, round(seconds)))
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_mib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else 0.0


def random_hf(shape: Shape, dtype: torch.dtype, device: torch.device, context: int = 8192):
    """A transformers Llama of `shape` with random weights (initialised on `device`), eval mode."""
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.dim,
        intermediate_size=shape.ffn,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=context,
        rope_theta=shape.theta,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(cfg).to(dtype)
    return model.eval()


def ours_from_hf(hf, dtype: torch.dtype, device: torch.device, quant: str = "none", step: str = "layers"):
    """Our model on the same weights, through the strict HF loader path (config.json fields + state_dict); the
    torch kernel set (what CUDA runs; on the CPU too, so a dry run runs the GPU's code)."""
    d = hf.config.to_dict()
    d["architectures"] = ["LlamaForCausalLM"]
    cfg = ModelConfig.from_hf(d, source=f"random {hf.config.model_type}")
    weights = canonical_weights(cfg, dict(hf.state_dict()), "random model")
    return Transformer(cfg, weights, dtype, quant=quant, device=device, kernels="torch", step=step)


def hf_from_ours(model: Transformer, dtype: torch.dtype):
    """A transformers Llama holding our (unquantized) model's weights, on its device."""
    import transformers

    cfg = model.cfg
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.dim,
        intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim,
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,
        max_position_embeddings=cfg.max_position,
        tie_word_embeddings=cfg.tie_embeddings,
    )
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    sd = {"model.embed_tokens.weight": model.embed, "model.norm.weight": model.norm[0]}
    if not cfg.tie_embeddings:
        sd["lm_head.weight"] = model.lm_head  # type: ignore[assignment]
    for i, L in enumerate(model.layers):
        p = f"model.layers.{i}."
        wqkv, w_in = L["wqkv.weight"], L["w_in.weight"]
        if not isinstance(wqkv, torch.Tensor) or not isinstance(w_in, torch.Tensor):
            raise SystemExit("the transformers twin is built from an unquantized model only")
        wq, wk, wv = wqkv.split((q, kv, kv))
        gate, up = w_in.chunk(2)
        sd |= {
            p + "self_attn.q_proj.weight": wq,
            p + "self_attn.k_proj.weight": wk,
            p + "self_attn.v_proj.weight": wv,
            p + "self_attn.o_proj.weight": L["wo.weight"],
            p + "mlp.gate_proj.weight": gate,
            p + "mlp.up_proj.weight": up,
            p + "mlp.down_proj.weight": L["w_out.weight"],
            p + "input_layernorm.weight": L["attn_norm.weight"],
            p + "post_attention_layernorm.weight": L["ffn_norm.weight"],
        }
    with torch.device(model.device):
        hf = transformers.LlamaForCausalLM(hf_cfg).to(dtype)
    hf.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=not cfg.tie_embeddings)
    return hf.eval()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    a, b = a.float().cpu(), b.float().cpu()
    return float((a - b).abs().max() / b.abs().max())


# ---------------------------------------------------------------------------------------------- 1. parity
def parity(ours: Transformer, hf, vocab: int, device: torch.device, n: int = 64, steps: int = 8) -> float:
    """max |ours - transformers| / max |transformers| over a prefill and `steps` decode steps."""
    from transformers import DynamicCache

    ids = torch.randint(0, vocab, (n + steps,), generator=torch.Generator().manual_seed(1))
    engine = TorchEngine(ours)
    seq = engine.new_cache(n + steps + 1)
    got = [engine.prefill(seq, ids[:n].tolist(), all_logits=True).float()]
    # transformers 5.x renames the forward's `past_key_values` to `cache` (the old name warns, then goes in 5.40):
    # whichever this version takes; the cache object is updated in place, so it is passed again as it is
    key = "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"
    with torch.inference_mode():
        cache = {key: DynamicCache(config=hf.config)}
        out = hf(ids[None, :n].to(device), use_cache=True, **cache)
        want = [out.logits[0].float()]
        for t in range(n, n + steps):
            got.append(engine.decode_one(seq, int(ids[t])).float()[None])
            out = hf(ids[None, t : t + 1].to(device), use_cache=True, **cache)
            want.append(out.logits[0].float())
    return rel(torch.cat(got), torch.cat(want))


def section_parity(args, device: torch.device) -> None:
    for dtype in (torch.float32, torch.bfloat16):
        tol = 1e-4 if dtype == torch.float32 else 3e-2
        name = str(dtype).removeprefix("torch.")
        if args.default_model:
            from infinichat.model.loader import load_model  # a GGUF file: needs the gguf package (the rest does not)

            ours = load_model(None, dtype, device=device, kernels="torch").model
            hf = hf_from_ours(ours, dtype)
            r = parity(ours, hf, ours.cfg.vocab_size, device)
            log(f"  default model, {name}: max rel diff {r:.2e} (tolerance {tol:g}) {'ok' if r <= tol else 'FAIL'}")
            R.row(model="default", dtype=name, rel_diff=r, tolerance=tol, ok=r <= tol)
            del ours, hf
            free(device)
        shape = replace(TINY, layers=2) if args.dry_run else LLAMA3_8B
        hf = random_hf(shape, dtype, device)
        ours = ours_from_hf(hf, dtype, device)
        r = parity(ours, hf, shape.vocab, device)
        log(
            f"  {shape.name} x{shape.layers} layers, {name}: max rel diff {r:.2e} (tolerance {tol:g}) "
            f"{'ok' if r <= tol else 'FAIL'}"
        )
        R.row(model=shape.name, layers=shape.layers, dtype=name, rel_diff=r, tolerance=tol, ok=r <= tol)
        del ours, hf
        free(device)


# ---------------------------------------------------------------------------------------------- 2. speed
def best_of(fn: Callable[[], float], repeats: int) -> float:
    return min(fn() for _ in range(repeats))


@dataclass
class Probe:
    first_call_s: float  # the first one-token step (a compiled step compiles here)
    logits: torch.Tensor  # (1 + len(follow), V) float32 on the CPU: the prompt's last row, then teacher-forced steps
    rate: float  # greedy decode tok/s, best of the repeats
    tokens: list[int]  # the greedy tokens of the last repeat


def probe(model: Transformer, prompt: list[int], follow: list[int], n: int, repeats: int) -> Probe:
    """One sequence for everything (a compiled step stays bound to its store: a new store would compile again):
    the prompt, teacher-forced steps over `follow`, then greedy decode of n tokens `repeats` times, each time
    from the prompt again (the cache truncated back to it)."""
    engine, dev = TorchEngine(model, eos_ids=()), model.device
    seq = engine.new_cache(len(prompt) + max(n, len(follow)) + 2)
    last = engine.prefill(seq, prompt).float()
    rows = [last.cpu()]
    sync(dev)
    t = time.perf_counter()
    for i, tok in enumerate(follow):
        rows.append(engine.decode_one(seq, tok).float().cpu())
        if i == 0:
            first = time.perf_counter() - t
    tokens: list[int] = []

    def run() -> float:
        seq.truncate(len(prompt))
        tok = int(last.argmax())
        tokens[:] = [tok]
        sync(dev)
        t = time.perf_counter()
        for _ in range(n - 1):
            tok = int(engine.decode_one(seq, tok).argmax())
            tokens.append(tok)
        sync(dev)
        return (time.perf_counter() - t) / (n - 1)

    run()  # warm-up
    return Probe(first, torch.stack(rows), 1 / best_of(run, repeats), list(tokens))


def prefill_rate(model: Transformer, ids: list[int], repeats: int) -> float:
    engine, dev = TorchEngine(model, eos_ids=()), model.device

    def prefill() -> float:
        seq = engine.new_cache(len(ids) + 1)
        sync(dev)
        t = time.perf_counter()
        engine.prefill(seq, ids)
        sync(dev)
        return time.perf_counter() - t

    prefill()
    return len(ids) / best_of(prefill, repeats)


def hf_rates(hf, prompt: list[int], n: int, prefill_ids: list[int], repeats: int, device: torch.device):
    def run(ids: list[int], k: int) -> float:
        x = torch.tensor([ids], device=device)
        sync(device)
        t = time.perf_counter()
        with torch.inference_mode():
            hf.generate(x, max_new_tokens=k, min_new_tokens=k, do_sample=False, eos_token_id=None, pad_token_id=0)
        sync(device)
        return time.perf_counter() - t

    run(prompt, 4)  # warm-up
    decode = best_of(lambda: run(prompt, n) - run(prompt, 1), repeats) / (n - 1)
    prefill = best_of(lambda: run(prefill_ids, 1), repeats)
    return 1 / decode, len(prefill_ids) / prefill


def speed_shape(args) -> Shape:
    return TINY if args.dry_run else LLAMA_1B


def section_speed(args, device: torch.device) -> None:
    dtype = torch.bfloat16
    n, P = (8, 64) if args.dry_run else (args.decode, args.prefill)
    g = torch.Generator().manual_seed(2)
    shape = speed_shape(args)
    hf = random_hf(shape, dtype, device)
    ours = ours_from_hf(hf, dtype, device)
    prompt = torch.randint(0, shape.vocab, (16,), generator=g).tolist()
    prefill_ids = torch.randint(0, shape.vocab, (P,), generator=g).tolist()
    log(f"  {shape.name} (random), batch 1, bf16, decode {n} tokens after 16, prefill {P}; best of {args.repeats}")
    od = probe(ours, prompt, prompt[:2], n, args.repeats).rate
    op = prefill_rate(ours, prefill_ids, args.repeats)
    hd, hp = hf_rates(hf, prompt, n, prefill_ids, args.repeats, device)
    log("  | model | ours decode tok/s | hf decode | ratio [>= 2] | ours prefill tok/s | hf prefill | ratio |")
    log("  |---|---:|---:|---:|---:|---:|---:|")
    log(f"  | {shape.name} | {od:.1f} | {hd:.1f} | {od / hd:.2f}x | {op:.0f} | {hp:.0f} | {op / hp:.2f}x |")
    R.row(model=shape.name, ours_decode=od, hf_decode=hd, decode_ratio=od / hd, ours_prefill=op, hf_prefill=hp)


# ---------------------------------------------------------------------------------------------- 3. quant
def section_quant(args, device: torch.device) -> None:
    dtype = torch.bfloat16
    shape = speed_shape(args)
    n = 8 if args.dry_run else args.decode
    hf = random_hf(shape, dtype, device)
    g = torch.Generator().manual_seed(4)
    prompt = torch.randint(0, shape.vocab, (16,), generator=g).tolist()
    follow = torch.randint(0, shape.vocab, (8,), generator=g).tolist()
    log(f"  {shape.name} (random), batch 1, decode {n} tokens after 16; best of {args.repeats}")
    log("  | weights | decode tok/s | vs bf16 | weight MiB | logits rel diff vs bf16 | top-1 agreement |")
    log("  |---|---:|---:|---:|---:|---:|")
    base: Probe | None = None
    for quant in ("none", "int8", "int4"):
        model = ours_from_hf(hf, dtype, device, quant=quant)
        pr = probe(model, prompt, follow, n, args.repeats)
        mib = weight_bytes(model) / 2**20
        base = base or pr
        # top-1 agreement over the teacher-forced rows (free-running greedy tokens diverge at the first near-tie
        # of a random model and then compare shifted sequences)
        agree = (pr.logits.argmax(-1) == base.logits.argmax(-1)).float().mean().item()
        d = rel(pr.logits, base.logits)
        name = "bf16" if quant == "none" else quant
        log(f"  | {name} | {pr.rate:.1f} | {pr.rate / base.rate:.2f}x | {mib:.0f} | {d:.3f} | {agree:.0%} |")
        R.row(weights=name, decode=pr.rate, vs_bf16=pr.rate / base.rate, weight_mib=mib, rel_diff=d, agreement=agree)
        del model
        free(device)


def weight_bytes(model: Transformer) -> int:
    from infinichat.kernels.static_step import _tensors

    return sum(t.nbytes for t in _tensors(model) if t.device == model.device)


# ---------------------------------------------------------------------------------------------- 4. compile
def section_compile(args, device: torch.device) -> None:
    dtype = torch.bfloat16
    shape = replace(speed_shape(args), layers=args.compile_layers if not args.dry_run else 2)
    n = 8 if args.dry_run else args.decode
    hf = random_hf(shape, dtype, device)
    g = torch.Generator().manual_seed(5)
    prompt = torch.randint(0, shape.vocab, (16,), generator=g).tolist()
    follow = torch.randint(0, shape.vocab, (8,), generator=g).tolist()
    steps = ["layers", "static"]
    if device.type == "cuda" or args.cpu_compile:
        steps.append("compiled")
    else:
        log("  compiled step skipped on the CPU (inductor takes ~45 s on a tiny model here; --cpu-compile runs it)")
    hf_rate, _ = hf_rates(hf, prompt, n, prompt[:4], args.repeats, device)
    log(f"  {shape.name} x{shape.layers} layers (random), batch 1, decode {n} tokens after 16; best of {args.repeats}")
    log(f"  transformers generate() on the same model: {hf_rate:.1f} tok/s")
    R.current["hf_decode"] = hf_rate
    log("  | weights | step | first call s | decode tok/s | vs layers | vs transformers [>= 2] | logits rel diff |")
    log("  |---|---|---:|---:|---:|---:|---:|")
    for quant in ("none", "int4", "int8"):
        base: Probe | None = None
        for step in steps:
            name = "bf16" if quant == "none" else quant
            if step == "compiled" and time.perf_counter() > args.deadline - args.compile_reserve:
                log(f"  | {name} | {step} | skipped: under {args.compile_reserve:.0f} s left of the section's budget |")
                R.row(weights=name, step=step, skipped=True)
                continue
            model = ours_from_hf(hf, dtype, device, quant=quant, step=step)
            pr = probe(model, prompt, follow, n, args.repeats)
            base = base or pr
            d = rel(pr.logits, base.logits)
            same = pr.tokens == base.tokens
            log(
                f"  | {name} | {step} | {pr.first_call_s:.2f} | {pr.rate:.1f} | {pr.rate / base.rate:.2f}x | "
                f"{pr.rate / hf_rate:.2f}x | {d:.1e}{'' if same else ' (greedy differs)'} |"
            )
            R.row(weights=name, step=step, first_call_s=pr.first_call_s, decode=pr.rate, rel_diff=d, same_greedy=same)
            del model
            free(device)
            if step == "compiled":
                torch._dynamo.reset()  # each compiled model is its own graph


# ---------------------------------------------------------------------------------------------- 5. OmniKV
def kv_gpu_bytes(seq, device: torch.device) -> int:
    """Bytes of K/V this sequence holds on the compute device: its store if it lives there, else the policy's
    mirrors and the offloaded rows' device buffers (kv/offload.py)."""
    store = seq.store
    if store.k_all.device.type == device.type:  # one device of its type: cuda:0 and cuda are the same one here
        return store.nbytes
    total = 0
    mirrors = getattr(seq.policy, "_mirrors", None)
    if mirrors is not None:
        total += mirrors.nbytes
    fetcher = getattr(seq.policy, "_fetcher", None)
    if fetcher is not None:
        total += sum(t.nbytes for t in fetcher.dest.values())
    return total


def adopt(seq, ids: list[int], k: torch.Tensor, v: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Fill `seq` with a prompt's K/V (L, Hkv, n, hd) evaluated by another sequence of the same model (the
    policy then treats the cache as its context, as when attached to a filled cache); -> its last logits."""
    n = len(ids)
    store = seq.store
    store.reserve(n)
    store.k_all[:, :, :n].copy_(k)
    store.v_all[:, :, :n].copy_(v)
    seq.append(torch.tensor(ids), torch.arange(n))
    return logits


def section_omnikv(args, device: torch.device) -> None:
    dtype = torch.bfloat16
    shape = TINY if args.dry_run else replace(LLAMA3_8B, layers=args.omni_layers)
    contexts = [128, 256] if args.dry_run else [32768, 131072]
    hf = random_hf(shape, dtype, device, context=max(contexts) + 1024)
    model = ours_from_hf(hf, dtype, device)
    del hf
    free(device)
    engine = TorchEngine(model, eos_ids=())
    engine.max_chunk = max(contexts)  # one prompt call: SDPA's causal kernel, no (T, S) mask
    filters = (1,)
    steps = 4 if args.dry_run else args.omni_decode
    log(f"  {shape.name}, {shape.layers} layers, bf16, filter layers {filters}, k = 10%, {steps} decode steps")
    log("  | context | run | decode tok/s | vs full | peak GPU MiB | GPU KV MiB | KV cut |")
    log("  |---:|---|---:|---:|---:|---:|---:|")
    g = torch.Generator().manual_seed(3)
    per_token: dict[str, float] = {}
    for ctx in contexts:
        ids = torch.randint(0, shape.vocab, (ctx,), generator=g).tolist()
        runs: list[tuple[str, str, dict[str, Any]]] = [
            ("full", "full", {}),
            ("omnikv", "omnikv", {"filter_layers": filters, "k": 0.1}),
            ("omnikv offload", "omnikv", {"filter_layers": filters, "k": 0.1, "offload": True}),
            ("brutal offload", "brutal-offload", {"filter_layers": filters}),
        ]
        base, base_kv, donor = None, None, None
        for label, policy, params in runs:
            free(device)
            reset_peak(device)
            try:
                seq = engine.new_sequence(budget=ctx + steps + 8, capacity=ctx + steps + 8, policy=policy, **params)
                if donor is None:  # the full run evaluates the prompt; the others take a copy of its K/V
                    logits = engine.prefill(seq, ids)
                    donor = (seq.store.k_all[:, :, :ctx].cpu(), seq.store.v_all[:, :, :ctx].cpu(), logits)
                else:
                    logits = adopt(seq, ids, *donor)
                tok = int(logits.argmax())
                engine.decode_one(seq, tok)  # warm-up step
                sync(device)
                t = time.perf_counter()
                for _ in range(steps):
                    tok = int(engine.decode_one(seq, tok).argmax())
                sync(device)
                rate = steps / (time.perf_counter() - t)
                kv = kv_gpu_bytes(seq, device)
                base = rate if label == "full" else base
                base_kv = kv if label == "full" else base_kv
                cut = f"{1 - kv / base_kv:.0%}" if base_kv else "-"
                ratio = f"{rate / base:.2f}x" if base else "-"
                log(f"  | {ctx} | {label} | {rate:.1f} | {ratio} | {peak_mib(device):.0f} | {kv / 2**20:.0f} | {cut} |")
                R.row(context=ctx, run=label, decode=rate, peak_mib=peak_mib(device), kv_mib=kv / 2**20)
                per_token[label] = kv / seq.capacity
                del seq
            except torch.OutOfMemoryError:
                donor = donor if label != "full" else None
                log(f"  | {ctx} | {label} | out of GPU memory | | | | |")
                R.row(context=ctx, run=label, error="out of GPU memory")
    if device.type == "cuda" and per_token.get("full") and per_token.get("omnikv offload"):
        free(device)
        free_bytes = torch.cuda.mem_get_info(device)[0]
        fits = {k: int(free_bytes / v) for k, v in per_token.items() if v}
        log(
            f"  longest context in the {free_bytes / 2**30:.1f} GiB free (estimate from the bytes per token above, "
            f"activations not counted): full {fits['full']}, omnikv offload {fits['omnikv offload']} tokens"
        )
        R.current["fits"] = fits


# ---------------------------------------------------------------------------------------------- 6. CUDA tests
def section_tests(args, device: torch.device, budget: float) -> None:
    """pytest -m cuda on CUDA_TESTS, one line per test as it finishes (-v): a run cut short by its time limit
    still reports the tests it got through."""
    paths = [str(REPO / "src"), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}  # ours first; what the caller had stays after it
    cmd = [sys.executable, "-m", "pytest", "-v", "-m", "cuda", "-rfEs", "-p", "no:cacheprovider", *CUDA_TESTS]
    cmd.append("--continue-on-collection-errors")  # a module this machine cannot import costs its tests only
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=max(10, budget - 5))
        code: int | str = proc.returncode
        stdout, stderr = proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as e:
        code = "timeout"
        stdout, stderr = (x.decode(errors="replace") if isinstance(x, bytes) else x or "" for x in (e.stdout, e.stderr))
    lines = stdout.strip().splitlines()
    verdicts = (" PASSED", " FAILED", " ERROR", " SKIPPED", " XFAIL", " XPASS")
    per_test = [ln for ln in lines if "::" in ln and any(v in ln for v in verdicts)]
    at = next((i for i, ln in enumerate(lines) if "short test summary" in ln), max(0, len(lines) - 1))
    summary = lines[at:][-30:]  # the summary (failures, errors, skips) and the counts
    tail = per_test + [ln for ln in summary if ln not in per_test]
    if code not in (0, 5):
        tail += stderr.strip().splitlines()[-12:]
    log("\n".join("  " + ln for ln in tail))
    log(f"  pytest exit code {code}")
    R.current["pytest_exit"] = code
    R.current["pytest_tail"] = tail


SECTIONS: dict[str, Callable[..., None]] = {
    "parity": section_parity,
    "speed": section_speed,
    "quant": section_quant,
    "compile": section_compile,
    "omnikv": section_omnikv,
    "tests": section_tests,
}
BUDGETS = {"parity": 35, "speed": 50, "quant": 50, "compile": 85, "omnikv": 135, "tests": 75}  # 430 s in all


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", "--smoke", action="store_true", help="tiny shapes on any device: code paths only")
    ap.add_argument("--device", default=None, help="default: cuda (the full check); cpu or cuda with --dry-run")
    ap.add_argument("--out", default=None, help="folder for report.json and report.txt (default results/gpu-check-*)")
    ap.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    ap.add_argument("--decode", type=int, default=64, help="decode tokens of the speed sections (default 64)")
    ap.add_argument("--prefill", type=int, default=2048, help="prompt tokens of the speed section (default 2048)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compile-layers", type=int, default=4, help="layers of the compile section's model (default 4)")
    ap.add_argument("--omni-layers", type=int, default=8, help="layers of the OmniKV model (default 8)")
    ap.add_argument("--omni-decode", type=int, default=32, help="decode steps per OmniKV run (default 32)")
    ap.add_argument("--default-model", action="store_true", help="parity on the default model too (needs it)")
    ap.add_argument("--cpu-compile", action="store_true", help="dry run on the CPU: run the compiled step too")
    ap.add_argument(
        "--compile-reserve", type=float, default=25, help="compile section: no new compiled run with less left (s)"
    )
    ap.add_argument("--budget-scale", type=float, default=1.0, help="multiply every section's time budget")
    ap.add_argument(
        "--total",
        type=float,
        default=450,
        help="seconds for the whole run: a section gets at most what is "
        "left of it (default 450: under 8 minutes with the start-up)",
    )
    for name, sec in BUDGETS.items():
        ap.add_argument(f"--budget-{name}", type=float, default=sec, help=f"seconds for {name} (default {sec})")
    args = ap.parse_args()
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() or not args.dry_run else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(
            f"gpu_check: --device {args.device}: torch sees no CUDA device; use --dry-run --device cpu", file=sys.stderr
        )
        return 2
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:  # the models' device is cuda:N: compare like with like
        device = torch.device("cuda", torch.cuda.current_device())
    out = Path(args.out) if args.out else REPO / "results" / time.strftime("gpu-check-%Y%m%d-%H%M%S")
    torch.set_num_threads(min(4, torch.get_num_threads()))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    meta = {
        "device": str(device),
        "device_name": name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "dry_run": args.dry_run,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    with contextlib.suppress(ImportError):
        import transformers

        meta["transformers"] = transformers.__version__
    log(f"gpu_check on {device} ({name}), torch {torch.__version__}{', dry run (tiny shapes)' if args.dry_run else ''}")
    t0 = time.perf_counter()
    failed = []
    for sec in args.sections:
        left = args.total * args.budget_scale - (time.perf_counter() - t0)
        last = sec == args.sections[-1]  # the last section takes what the others left over (nothing comes after it)
        budget = left if last else min(getattr(args, f"budget_{sec}") * args.budget_scale, left)
        log(f"\n[{sec}] (at {time.perf_counter() - t0:.0f} s; budget {budget:.0f} s)")
        R.current = {"budget_s": budget}
        args.deadline = time.perf_counter() + budget
        if budget < 5:
            log("  skipped: the run's total time is spent")
            failed.append(sec)
            R.sections[sec] = R.current | {"status": "skipped"}
            continue
        t = time.perf_counter()
        try:
            with hard_limit(budget):
                if sec == "tests":
                    section_tests(args, device, budget)
                else:
                    SECTIONS[sec](args, device)
            status = "ok" if R.current.get("pytest_exit", 0) in (0, 5) else "failed"
        except SectionTimeout as e:
            status = "timeout"
            log(f"  stopped: {e}")
        except Exception:  # report, go on with the next section
            status = "error"
            log(traceback.format_exc())
        if status != "ok":
            failed.append(sec)
        R.current |= {"status": status, "seconds": round(time.perf_counter() - t, 1)}
        R.sections[sec] = R.current
        with contextlib.suppress(Exception):  # a section stopped inside a compilation leaves nothing behind
            torch._dynamo.reset()
        free(device)
        R.write(out, meta)  # after every section: a run killed from outside keeps what it measured
    total = time.perf_counter() - t0
    log(f"\ndone in {total:.0f} s; sections not ok: {', '.join(failed) or 'none'}")
    meta["seconds"] = round(total, 1)
    R.write(out, meta)
    log(f"report: {out / 'report.json'}, {out / 'report.txt'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
