"""Quantized models on calls of several tokens (a chat turn's prompt, a tool result): the products each weight
layout runs on, by chunk length, and where the float32 product over dequantized weights overtakes them
(kernels/cpu_native.py QUANT_DENSE_MIN_T: the model's `dense_min_t`).

    python3 benchmarks/quant_chunks.py [--chunks 2 8 32 64 128 256 512] [--rounds 3] [--threads 2]

Variants, each on the default model, a chunk of T tokens of Moby Dick appended after 64 tokens of context:
  int8            grouped int8 (what --quant int8 stores where the native library builds): the native
                  multi-token product (decode.c's ic_matmul), float32 activations from 32 tokens on
  int8-row        per-row int8 (what it stores elsewhere): torch._weight_int8pack_mm
  int4            int4: aten._weight_int4pack_mm_for_cpu
  <mode> f32      the same weights dequantized to float32 per call and multiplied by MKL's GEMM
Each round measures every variant once per chunk length, the order reversed every other round; printed: the
median over rounds of tokens/s, and each quantized kernel's median per-round ratio against its float32 path.
"""

from __future__ import annotations

import argparse
import statistics
import time
from unittest import mock

from bench_data import shared_moby

from infinichat.engine.torch_engine import TorchEngine, set_threads
from infinichat.model import quant
from infinichat.model.loader import load_model

MOBY = shared_moby()
CONTEXT = 64


def chunk_rate(model, ids: list[int], T: int, dense: bool) -> float:
    """tokens/s of one T-token call after CONTEXT tokens (the float32 path if `dense`)."""
    engine = TorchEngine(model)
    seq = engine.new_cache(CONTEXT + T + 8)
    engine.prefill(seq, ids[:CONTEXT])
    never = 1 << 30
    if dense:  # float32 activations, products over the dequantized weights
        limits = {"dense_min_t": 0, "fp32_min": 0}
    else:  # the kernels at any length, activations as the model keeps them below its threshold
        limits = {
            "dense_min_t": never,
            "fp32_min": never if model.kernels.fp32_min == model.kernels.dense_min_t else model.kernels.fp32_min,
        }
    with mock.patch.multiple(model.kernels, **limits):
        t0 = time.perf_counter()
        engine.prefill(seq, ids[CONTEXT : CONTEXT + T], chunk=T)
        return T / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunks", type=int, nargs="+", default=[2, 8, 32, 64, 128, 256, 512])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    set_threads(args.threads)

    models = {"int8": load_model(None, "bfloat16", quant="int8").model}
    if quant.cache_tag("int8") != "int8g":
        raise SystemExit("the native library is not available here: --quant int8 is stored per row")
    with mock.patch.object(quant, "int8_layout", lambda: "row"):
        models["int8-row"] = load_model(None, "bfloat16", quant="int8").model
    models["int4"] = load_model(None, "bfloat16", quant="int4").model
    tok = load_model(None, "bfloat16").tokenizer
    ids = tok.encode(MOBY.read_text(encoding="utf-8")[:40000], parse_special=False)
    if len(ids) < CONTEXT + max(args.chunks):
        raise SystemExit("the text is too short for the longest chunk")
    variants = [(name, dense) for name in models for dense in (False, True)]
    for name, dense in variants:  # warm-up: first calls build kernels' packed copies and the native binding
        chunk_rate(models[name], ids, 8, dense)

    print(f"tokens/s, median of {args.rounds} rounds, {args.threads} threads, after {CONTEXT} tokens of context\n")
    head = " | ".join(f"{n}{' f32' if d else ''}" for n, d in variants)
    print(f"| T | {head} | " + " | ".join(f"{n} / f32" for n in models) + " |")
    print("|---:|" + "---:|" * (len(variants) + len(models)))
    for T in args.chunks:
        rates: dict[tuple[str, bool], list[float]] = {v: [] for v in variants}
        for r in range(args.rounds):
            for v in variants if r % 2 == 0 else variants[::-1]:
                rates[v].append(chunk_rate(models[v[0]], ids, T, v[1]))
        cells = [f"{statistics.median(rates[v]):.0f}" for v in variants]
        ratios = [
            statistics.median(a / b for a, b in zip(rates[(n, False)], rates[(n, True)], strict=True)) for n in models
        ]
        print(f"| {T} | " + " | ".join(cells) + " | " + " | ".join(f"{x:.2f}x" for x in ratios) + " |", flush=True)


if __name__ == "__main__":
    main()
