"""Session benchmarks on the default model (issue 4), printed as ratios measured in one run.

  python3 benchmarks/session_bench.py                 # both parts
  python3 benchmarks/session_bench.py --part ttft --turns 200 --budget 2048
  python3 benchmarks/session_bench.py --part prefix --card-tokens 2000

ttft:   a chat of N turns inside a fixed budget (whole old turns evicted as it outgrows it): the time to the
        first token of the reply at turn 2 and at turn N (and medians over 5-turn windows), target <= 1.2x.
prefix: a new session with a ~2000-token character card, then its first reply: with a cold prefix cache
        (the card is evaluated) and with a warm one (the card's KV is read from disk), target >= 10x.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from bench_data import shared_moby

from infinichat.engine.torch_engine import TorchEngine, set_threads
from infinichat.model.loader import load_model
from infinichat.session.manager import SessionManager

QUESTIONS = [
    "Tell me one fact about the sea.",
    "What should I cook tonight?",
    "Name a bird that cannot fly.",
    "Why is the sky blue?",
    "Give me a word that rhymes with cat.",
    "What is a good name for a dog?",
]


def first_token_time(gen) -> float:
    t0 = time.perf_counter()
    ttft = None
    for ev in gen:
        if ev.kind == "token" and ttft is None:
            ttft = time.perf_counter() - t0
    return ttft if ttft is not None else float("nan")


def part_ttft(engine, tok, model_id, args) -> None:
    with tempfile.TemporaryDirectory() as d:
        mgr = SessionManager(engine, tok, model_id, d)
        s = mgr.create(
            "bench",
            system_prompt="You are a friendly assistant. Answer in one or two sentences.",
            settings={"budget": args.budget, "max_tokens": args.reply_tokens, "temperature": 0.7},
        )
        times = []
        for turn in range(1, args.turns + 1):
            params = s.settings.sampling(seed=turn)
            times.append(first_token_time(s.send(QUESTIONS[turn % len(QUESTIONS)], params)))
            if turn % 25 == 0:
                print(
                    f"  turn {turn}: ttft {times[-1] * 1000:.0f} ms, cache {s.seq.length}/{s.seq.budget} tokens, "
                    f"{s.seq.n_evictions} evictions ({s.seq.n_evicted} tokens)",
                    flush=True,
                )
        n = args.turns
        early, late = times[1:6], times[n - 5 : n]
        print(
            f"\n| budget {args.budget}, {n} turns | turn 2 | turn {n} | ratio | median turns 2-6 | "
            f"median turns {n - 4}-{n} | ratio |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|")
        print(
            f"| time to first token | {times[1] * 1000:.0f} ms | {times[n - 1] * 1000:.0f} ms | "
            f"{times[n - 1] / times[1]:.2f}x | {statistics.median(early) * 1000:.0f} ms | "
            f"{statistics.median(late) * 1000:.0f} ms | {statistics.median(late) / statistics.median(early):.2f}x |"
        )
        print(
            f"final cache: {s.seq.length}/{s.seq.budget} tokens; evictions {s.seq.n_evictions} "
            f"({s.seq.n_evicted} tokens); messages {len(s.messages)}"
        )
        mgr.db.close()


def card_text(n_tokens: int, tok) -> str:
    src = shared_moby()
    base = (
        src.read_text(encoding="utf-8")[20000:80000]
        if src.exists()
        else "The old ship sailed on through the grey morning, and the crew watched the long swell. " * 400
    )
    ids = tok.encode(base)[:n_tokens]
    return tok.decode(ids)


def part_prefix(engine, tok, model_id, args) -> None:
    desc = card_text(args.card_tokens, tok)
    card = {
        "spec": "chara_card_v2",
        "spec_version": "2.0",
        "data": {"name": "Ishmael", "description": desc, "first_mes": "Call me Ishmael."},
    }
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for label in ("cold", "warm", "warm"):
            mgr = SessionManager(engine, tok, model_id, d)
            t0 = time.perf_counter()
            s = mgr.create(None, card=card, settings={"max_tokens": 8, "temperature": 0.0, "budget": 4096})
            t_create = time.perf_counter() - t0
            t_first = first_token_time(s.send("Who are you?"))
            rows.append((label, t_create, t_first, len(s.fmt.system_tokens(s.system_prompt))))
            mgr.db.close()
    cold = rows[0][1] + rows[0][2]
    warm = min(r[1] + r[2] for r in rows[1:])
    print("\n| prefix cache | card tokens | create session | first token of the first reply | total |")
    print("|---|---:|---:|---:|---:|")
    for label, c, f, n in rows:
        print(f"| {label} | {n} | {c * 1000:.0f} ms | {f * 1000:.0f} ms | {(c + f) * 1000:.0f} ms |")
    print(f"cold / warm (best warm): {cold / warm:.1f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["ttft", "prefix", "all"], default="all")
    ap.add_argument("--turns", type=int, default=200)
    ap.add_argument("--budget", type=int, default=2048)
    ap.add_argument("--reply-tokens", type=int, default=24)
    ap.add_argument("--card-tokens", type=int, default=2000)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    n = set_threads(args.threads)
    m = load_model(None, args.dtype)
    engine = TorchEngine(m.model, m.tokenizer.eos_ids)
    print(f"default model, {args.dtype}, {n} threads")
    model_id = f"{m.file_hash}:{args.dtype}:torch"
    if args.part in ("prefix", "all"):
        part_prefix(engine, m.tokenizer, model_id, args)
    if args.part in ("ttft", "all"):
        part_ttft(engine, m.tokenizer, model_id, args)


if __name__ == "__main__":
    main()
