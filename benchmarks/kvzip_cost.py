"""What KVzip's reconstruction pass costs: the prefill of one long prompt compressed to a budget, by SnapKV (no
extra pass), Expected Attention (query statistics only) and KVzip (the pass), measured side by side in one run.

    python benchmarks/kvzip_cost.py [--tokens 2048] [--budget-frac 0.25] [--repeats 1] [--threads 0]

Prints the wall and CPU seconds of each (best of the repeats, interleaved) and their ratio to SnapKV's; on a
machine shared with other jobs the CPU time of this (single-threaded with --threads 1) process is the steadier
measure of the work. `full` (no compression, no attention weights) is the baseline forward. The text is the
essay-like haystack of eval niah (plain text, the default model).
"""

from __future__ import annotations

import argparse
import random
import time

from infinichat.engine.torch_engine import TorchEngine, set_threads
from infinichat.eval import haystack
from infinichat.model.loader import load_model

POLICIES = ("full", "snapkv", "expected_attention", "kvzip")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--budget-frac", type=float, default=0.25)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    set_threads(args.threads or None)
    loaded = load_model(None, "float32")
    tok = loaded.tokenizer
    engine = TorchEngine(loaded.model, tok.eos_ids)
    sentences = haystack.essay_filler(random.Random(0))
    ids: list[int] = []
    while len(ids) < args.tokens:
        ids += tok.encode(" " + next(sentences))
    ids = ids[: args.tokens]
    budget = max(1, round(args.budget_frac * args.tokens))
    wall: dict[str, float] = {}
    cpu: dict[str, float] = {}
    for _ in range(args.repeats):
        for name in POLICIES:  # interleaved, so that a busy machine slows every policy alike
            seq = engine.new_sequence(budget=args.tokens if name == "full" else budget, policy=name)
            t0, c0 = time.perf_counter(), time.process_time()
            engine.prefill(seq, ids)
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            assert seq.length == (args.tokens if name == "full" else budget)
            wall[name], cpu[name] = min(wall.get(name, dt), dt), min(cpu.get(name, dc), dc)
    print(f"prefill of {args.tokens} tokens compressed to {budget} (full: kept), best of {args.repeats}:")
    for name in POLICIES:
        print(
            f"  {name:<20} wall {wall[name]:7.2f} s  x{wall[name] / wall['snapkv']:.2f}   "
            f"cpu {cpu[name]:7.2f} s  x{cpu[name] / cpu['snapkv']:.2f} of snapkv"
        )


if __name__ == "__main__":
    main()
