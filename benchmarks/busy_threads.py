"""Decode speed at the default thread count against fixed counts, on a quiet machine and with a competing busy
loop on one core, measured side by side in one run (issue 22).

    python3 benchmarks/busy_threads.py                      # bf16 and int4, default vs 1 vs 2 threads
    python3 benchmarks/busy_threads.py --tokens 64 --rounds 4 --quant none int4 --threads default 1 2
    python3 benchmarks/busy_threads.py --cli --quant int4 --threads default 1   # `generate` end to end

For each model variant (the default model in bf16, and --quant int4 by default), each condition (quiet: nothing
started by us; busy: a subprocess spinning a pure-Python loop, pinned to CPU --spin-cpu) and each thread setting
("default" = what `generate`, `story` and the in-process `chat` do without --threads; N = --threads N), it
decodes --tokens greedy tokens after a short prompt and times the decode steps (the prompt excluded).

Honesty on a shared host: other processes' load is not ours to stop, so every cell is measured --rounds times,
interleaved (round r runs the conditions and the settings in an order rotated by r, so that no setting is always
first or last while the host's load drifts), and the table gives the median tok/s per cell with the 1-minute load
average seen at the start and end of the run. The verdict compares, per condition, the default's median with
the best setting's median: the target is default >= best / 1.2.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch

from infinichat.engine.torch_engine import TorchEngine, configure_threads
from infinichat.model.loader import load_model

PROMPT = "Once upon a time, in a small village by the sea, there lived an old fisherman who"
TARGET = 1.2


def spinner(cpu: int) -> subprocess.Popen:
    """A process that keeps one core busy (pinned to `cpu`; -1 = wherever the scheduler puts it)."""
    pin = f"import os; os.sched_setaffinity(0, {{{cpu}}})\n" if cpu >= 0 else ""
    return subprocess.Popen([sys.executable, "-c", pin + "while True:\n    pass\n"])


def decode_rate(engine: TorchEngine, ids: list[int], n: int, max_seconds: float) -> tuple[float, int]:
    """tok/s of `n` greedy decode steps after `ids` (a fresh sequence; the prompt is not timed), or of the steps
    done within `max_seconds` (a starved setting would take minutes); and the steps done."""
    seq = engine.new_cache(len(ids) + n + 1)
    logits = engine.prefill(seq, ids)
    t = time.perf_counter()
    done = 0
    while done < n and (done < 2 or time.perf_counter() - t < max_seconds):
        logits = engine.decode_one(seq, int(torch.argmax(logits)))
        done += 1
    return done / (time.perf_counter() - t), done


def cli_rounds(args, settings: list[int | None], label: dict) -> None:
    """--cli: `infinichat generate` end to end (model load, prompt, decode: what a user waits for), wall seconds
    per run, the same interleaving; the line it prints on stderr gives its decode rate."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root / "src")}
    walls: dict[tuple[str, str, int | None], list[float]] = {}
    for quant in args.quant:
        for r in range(args.rounds):
            for cond in ["quiet", "busy"] if r % 2 == 0 else ["busy", "quiet"]:
                spin = spinner(args.spin_cpu) if cond == "busy" else None
                try:
                    order = settings[r % len(settings) :] + settings[: r % len(settings)]
                    for n in order:
                        cmd = [sys.executable, "-m", "infinichat", "generate", PROMPT, "-n", str(args.tokens)]
                        cmd += ["--temperature", "0", "--quant", quant] + ([] if n is None else ["--threads", str(n)])
                        t = time.perf_counter()
                        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
                        wall = time.perf_counter() - t
                        walls.setdefault((quant, cond, n), []).append(wall)
                        said = out.stderr.replace("\r", "\n").strip().splitlines()[-1:] or ["(nothing)"]
                        print(f"  {quant:5s} {cond:5s} {label[n]:9s} round {r}: {wall:6.1f} s; {said[0]}", flush=True)
                finally:
                    if spin is not None:
                        spin.kill()
                        spin.wait()
    print(f"\n`generate -n {args.tokens}` wall seconds, median of {args.rounds} interleaved rounds\n")
    print("| model | condition | " + " | ".join(label[n] for n in settings) + " |")
    print("|" + "---|" * (len(settings) + 2))
    for quant in args.quant:
        for cond in ("quiet", "busy"):
            cells = " | ".join(f"{statistics.median(walls[(quant, cond, n)]):.1f}" for n in settings)
            print(f"| {'bf16' if quant == 'none' else quant} | {cond} | {cells} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quant", nargs="+", default=["none", "int4"], help="none (bf16), int8, int4")
    ap.add_argument("--threads", nargs="+", default=["default", "1", "2"], help="'default' and/or counts")
    ap.add_argument("--tokens", type=int, default=64, help="decode steps per measurement (default 64)")
    ap.add_argument(
        "--max-seconds",
        type=float,
        default=15.0,
        help="a measurement stops after this long, its rate from the steps done (default 15)",
    )
    ap.add_argument("--rounds", type=int, default=3, help="measurements per cell, interleaved (default 3)")
    ap.add_argument("--spin-cpu", type=int, default=0, help="CPU the busy loop is pinned to (-1: not pinned)")
    ap.add_argument(
        "--cli", action="store_true", help="time `infinichat generate` end to end instead (subprocesses, wall time)"
    )
    args = ap.parse_args()
    settings = [None if t == "default" else int(t) for t in args.threads]
    label = {None: "default"} | {n: f"{n} thread{'s' * (n > 1)}" for n in settings if n is not None}
    load0 = os.getloadavg()
    print(f"host: {os.cpu_count()} CPUs, affinity {sorted(os.sched_getaffinity(0))}, load average {load0}")
    print(f"torch {torch.__version__}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}")
    if args.cli:
        cli_rounds(args, settings, label)
        print(f"\nload average at the start {load0[0]:.2f}, at the end {os.getloadavg()[0]:.2f}")
        return
    rates: dict[tuple[str, str, int | None], list[float]] = {}
    for quant in args.quant:
        loaded = load_model(None, "bfloat16", quant=quant)
        engine = TorchEngine(loaded.model, eos_ids=())
        ids = loaded.tokenizer.encode(PROMPT, add_bos=loaded.tokenizer.add_bos)
        configure_threads(engine, 1)
        decode_rate(engine, ids, 8, args.max_seconds)  # warm up (the native library, the first calls)
        for r in range(args.rounds):
            conditions = ["quiet", "busy"] if r % 2 == 0 else ["busy", "quiet"]
            for cond in conditions:
                spin = spinner(args.spin_cpu) if cond == "busy" else None
                try:
                    if spin is not None:
                        time.sleep(0.5)  # let it start spinning
                    order = settings[r % len(settings) :] + settings[: r % len(settings)]
                    for n in order:
                        configure_threads(engine, n)
                        rate, done = decode_rate(engine, ids, args.tokens, args.max_seconds)
                        rates.setdefault((quant, cond, n), []).append(rate)
                        g = engine.threads
                        how = f", ended on {g.current} thread(s) after {g.probes} probes" if g is not None else ""
                        print(
                            f"  {quant:5s} {cond:5s} {label[n]:9s} round {r}: {rate:6.1f} tok/s ({done} steps{how}), "
                            f"load {os.getloadavg()[0]:.1f}",
                            flush=True,
                        )
                finally:
                    if spin is not None:
                        spin.kill()
                        spin.wait()
        del engine, loaded
    load1 = os.getloadavg()
    print(f"\nload average at the start {load0[0]:.2f}, at the end {load1[0]:.2f} (1-minute; the host has other users)")
    print(f"decode tok/s, median of {args.rounds} interleaved rounds of {args.tokens} tokens (or --max-seconds)\n")
    head = "| model | condition | " + " | ".join(label[n] for n in settings) + " | default / best |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    worst = 0.0
    for quant in args.quant:
        name = "bf16" if quant == "none" else quant
        for cond in ("quiet", "busy"):
            med = {n: statistics.median(rates[(quant, cond, n)]) for n in settings}
            cells = " | ".join(f"{med[n]:.1f}" for n in settings)
            verdict = ""
            if None in med:
                slow = max(med.values()) / med[None]
                worst = max(worst, slow)
                verdict = f"{1 / slow:.2f} ({'ok' if slow <= TARGET else 'over the 1.2x target'})"
            print(f"| {name} | {cond} | {cells} | {verdict} |")
    if None in settings:
        print(f"\nworst: the default is {worst:.2f}x slower than the best setting (target <= {TARGET}x)")


if __name__ == "__main__":
    main()
