"""OmniKV decode speed against full attention at a long context, side by side in one run.

    python benchmarks/omnikv_speed.py [--context 7000] [--decode 64] [--dtype bfloat16] [--k 0.1]
                                      [--filter-layers 2,14,24] [--threads 0] [--model PATH]

The context (the text of moby_dick.txt, or a built-in filler when that file is absent) is evaluated once
with full attention; the sequence is then forked, and the fork gets the omnikv policy (the cached tokens
are its context; decoding starts after them). Then --decode steps, interleaved token by token: full
decodes its greedy token, omnikv is fed the same token (teacher forcing: both do the same work at the
same cache length), each step timed on its own, so a change in the machine's load hits both alike.
Printed: tokens/s of each (total time, and from the median step), the ratio omnikv / full (issue target
on this CPU: >= 1.2x), and how often omnikv's greedy choice equals full's (a sanity check of the
selection, not an accuracy measurement). Absolute numbers drift with the load; the ratio is what counts.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from bench_data import shared_moby

from infinichat.engine.torch_engine import TorchEngine, set_threads
from infinichat.kv.registry import make_policy
from infinichat.kv.sequence import KVSequence
from infinichat.model.loader import load_model

MOBY = shared_moby()
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def context_ids(tokenizer, n: int) -> list[int]:
    text = MOBY.read_text(encoding="utf-8") if MOBY.exists() else FILLER * (n // 4)
    ids = tokenizer.encode(text, parse_special=False)
    return (ids * (n // len(ids) + 1))[:n]


def timed(engine: TorchEngine, seq: KVSequence, tok: int) -> tuple[float, torch.Tensor]:
    t0 = time.perf_counter()
    logits = engine.decode_one(seq, tok)
    return time.perf_counter() - t0, logits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    ap.add_argument("--context", type=int, default=7000)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--k", default="0.1", help="omnikv k: a token count or a fraction (default 0.1)")
    ap.add_argument("--filter-layers", default=None, help="comma-separated (default: the model's measured default)")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()

    threads = set_threads(args.threads or None)
    loaded = load_model(args.model, args.dtype)
    engine = TorchEngine(loaded.model, eos_ids=())
    ids = context_ids(loaded.tokenizer, args.context)
    cap = args.context + args.decode + 8
    full = engine.new_sequence(budget=cap, capacity=cap)
    t0 = time.perf_counter()
    logits = engine.prefill(full, ids)
    print(
        f"{loaded.name}, {args.dtype}, {threads} threads: prefilled {len(ids)} tokens in "
        f"{time.perf_counter() - t0:.1f} s"
    )
    first = int(torch.argmax(logits))

    k = int(args.k) if args.k.isdigit() else float(args.k)
    params = {"k": k}
    if args.filter_layers:
        params["filter_layers"] = tuple(int(x) for x in args.filter_layers.split(","))
    omni = full.fork()
    omni.policy = make_policy("omnikv", **params)
    filters = omni.policy.filters(loaded.cfg)
    n_pick = omni.policy.n_pick(len(ids) - omni.policy.n_sink)
    print(f"omnikv: filter layers {filters}, k={k} ({n_pick} of {len(ids)} tokens picked per filter layer)")

    for seq in (full, omni):  # warm-up (allocations, oneDNN primitives), then back to the context
        for _ in range(3):
            engine.decode_one(seq, first)
        seq.truncate(len(ids))
    times: dict[str, list[float]] = {"full": [], "omnikv": []}
    tok, agree = first, 0
    for i in range(args.decode):
        pair = [("full", full), ("omnikv", omni)]
        for name, seq in pair if i % 2 == 0 else pair[::-1]:
            secs, logits = timed(engine, seq, tok)
            times[name].append(secs)
            choice = int(torch.argmax(logits))
            if name == "full":
                nxt = choice
            else:
                omni_choice = choice
        agree += nxt == omni_choice
        tok = nxt
    for name, ts in times.items():
        print(
            f"{name:>7}: decode at {len(ids)}-{len(ids) + args.decode} tokens: {len(ts) / sum(ts):.2f} tok/s "
            f"(total), {1 / statistics.median(ts):.2f} tok/s (median step)"
        )
    total = sum(times["full"]) / sum(times["omnikv"])
    median = statistics.median(times["full"]) / statistics.median(times["omnikv"])
    print(f"greedy choice equal to full's: {agree}/{args.decode} steps (same tokens fed to both)")
    print(f"ratio omnikv/full: {total:.2f}x (total time), {median:.2f}x (median step) (target >= 1.2x)")


if __name__ == "__main__":
    main()
