"""The cost of a sampling step with DRY (and XTC) against a decode step of the default model (issue 25).

  python3 benchmarks/sampler_cost.py --threads 1 [--history 2048] [--rounds 200] [--quant none]

A 2048-token history is prefilled, then, alternating in every round, one decode step of the model (at that
context) and one `Sampler.sample` each of: the session settings without DRY (penalties, top-k, top-p, min-p), the same
plus DRY (multiplier 0.8, the whole history as window, the default breakers), and DRY + XTC (p 0.5), in an
order that rotates every round. Two
histories: real text (the chat card and book text) and a looping one (a 256-token block repeated, so every
step of DRY follows long matches: its worst case). Prints the median time of each and the ratios
(sample with DRY - sample without) / decode step and (sample with DRY) / decode step.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch
from bench_data import shared_moby

from infinichat.engine.sampling import Sampler
from infinichat.engine.torch_engine import TorchEngine, set_threads
from infinichat.model.loader import load_model
from infinichat.session.settings import SessionSettings

BOOK = shared_moby()


def median_ms(xs: list[float]) -> float:
    return statistics.median(xs) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--history", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--quant", default="none", choices=["none", "int8", "int4"])
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    n_threads = set_threads(args.threads)
    m = load_model(None, args.dtype, quant=args.quant)
    tok = m.tokenizer
    engine = TorchEngine(m.model, ())
    V = m.model.cfg.vocab_size
    text = BOOK.read_text(encoding="utf-8")[30000:80000] if BOOK.exists() else "The sea was calm that night. " * 2000
    real = tok.encode(text, parse_special=False)[: args.history]
    block = real[:256]
    looping = (block * (args.history // 256 + 1))[: args.history]
    base = SessionSettings()
    presets = {
        "no DRY": base.updated({"dry_multiplier": 0.0}).sampling(seed=1),
        "dry": base.updated({"dry_multiplier": 0.8}).sampling(seed=1),
        "dry+xtc": base.updated({"dry_multiplier": 0.8, "xtc_probability": 0.5}).sampling(seed=1),
    }
    mask = tok.tokens_containing(base.dry_sequence_breakers)
    print(f"default model, {args.dtype}, quant {args.quant}, {n_threads} threads, history {args.history} tokens")
    print(
        "\n| history | decode step | sample: no DRY | + DRY | + DRY + XTC | DRY extra / decode | "
        "sample with DRY / decode |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, hist in (("text", real), ("looping", looping)):
        seq = engine.new_sequence(len(hist) + args.rounds + 8)
        logits = engine.prefill(seq, hist)
        history = list(hist)
        samplers = {k: Sampler(p, V, mask) for k, p in presets.items()}
        times: dict[str, list[float]] = {k: [] for k in ("decode", *presets)}
        names = list(samplers)
        for r in range(args.rounds):
            for k in names[r % 3 :] + names[: r % 3]:  # each first after the decode step in turn (a cold cache)
                s = samplers[k]
                t = time.perf_counter()
                s.sample(logits, history)
                times[k].append(time.perf_counter() - t)
            nxt = history[len(history) - 256] if name == "looping" else int(torch.argmax(logits))
            t = time.perf_counter()
            logits = engine.decode_one(seq, nxt)
            times["decode"].append(time.perf_counter() - t)
            history.append(nxt)
        d, s0, s1, s2 = (median_ms(times[k]) for k in ("decode", "no DRY", "dry", "dry+xtc"))
        print(
            f"| {name} | {d:.2f} ms | {s0:.3f} ms | {s1:.3f} ms | {s2:.3f} ms | {(s1 - s0) / d:.1%} | {s1 / d:.1%} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
