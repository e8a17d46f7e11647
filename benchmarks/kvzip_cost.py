"""What KVzip's reconstruction pass costs: the prefill of one long prompt compressed to a budget, by SnapKV (no
extra pass), Expected Attention (query statistics only) and KVzip (the pass), measured side by side in one run.

    python benchmarks/kvzip_cost.py [--tokens 2048] [--budget-frac 0.25] [--repeats 1] [--threads 0]

Prints the seconds of each and its ratio to SnapKV's; the text is the essay-like haystack of eval niah (plain
text, the default model).
"""

from __future__ import annotations

import argparse
import random
import time

from infinichat.engine.torch_engine import TorchEngine, set_threads
from infinichat.eval import haystack
from infinichat.model.loader import load_model

POLICIES = ("snapkv", "expected_attention", "kvzip")


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
    best: dict[str, float] = {}
    for _ in range(args.repeats):
        for name in POLICIES:  # interleaved, so that a busy machine slows every policy alike
            seq = engine.new_sequence(budget=budget, policy=name)
            t0 = time.perf_counter()
            engine.prefill(seq, ids)
            dt = time.perf_counter() - t0
            assert seq.length == budget
            best[name] = min(best.get(name, dt), dt)
    print(f"prefill of {args.tokens} tokens compressed to {budget}, best of {args.repeats}:")
    for name in POLICIES:
        print(f"  {name:<20} {best[name]:7.2f} s   x{best[name] / best['snapkv']:.2f} of snapkv")


if __name__ == "__main__":
    main()
