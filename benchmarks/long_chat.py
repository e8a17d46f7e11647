"""Long-chat repetition benchmark (issue 25): a scripted user talks to a character card for N turns.

  python3 benchmarks/long_chat.py                                  # 200 turns, every preset x policy x budget
  python3 benchmarks/long_chat.py --turns 40 --budgets 512 --threads 1 --out results/long_chat-512
  python3 benchmarks/long_chat.py --merge results/long_chat-512 results/long_chat-2048 --out results/long_chat
  python3 benchmarks/long_chat.py --merge results/long_chat-* --first 40 --out results/long_chat-40   # comparable

The user's messages and the card are fixed, in benchmarks/data/long_chat.json; their order is shuffled
with --seed (each pass over the list reshuffled), and every reply is sampled with seed (--seed, turn), so a
run is reproducible. Per configuration (sampler preset x policy x budget) it reports:

- repetition rate: the share of replies with >= 50% of their word 6-grams seen in earlier replies (the card's
  greeting included); a reply shorter than 6 words counts as repeated when an earlier reply is the same text;
- distinct replies, and distinct-2 (distinct word bigrams / all word bigrams) over all replies;
- on topic: the share of replies sharing a content word (4+ letters, not a stop word) with the user's message;
- mean reply length (tokens), and the time to first token: median of turns 2-6 and of the last 5 turns.

Writes long_chat.json (settings, every turn), long_chat.md (the table) and long_chat.png (the repetition rate
over a sliding window of 10 turns, along the turns). The JSON is rewritten after each configuration.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

DATA = Path(__file__).resolve().parent / "data" / "long_chat.json"
PRESETS: dict[str, dict[str, Any]] = {
    "defaults": {},  # the session defaults as they stand
    "dry": {"dry_multiplier": 0.8, "dry_base": 1.75, "dry_allowed_length": 2},
    "dry+xtc": {"dry_multiplier": 0.8, "dry_base": 1.75, "dry_allowed_length": 2, "xtc_probability": 0.5},
}
_STOP_WORDS = (
    "this that with have what your about there their would could should from they them then than when where which "
    "while been were will just like into some more also very only much many does doesn don't tell know think"
)
STOP = set(_STOP_WORDS.split())
WINDOW = 10


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def ngrams(ws: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(ws[i : i + n]) for i in range(len(ws) - n + 1)]


def score(replies: list[str], greeting: str, users: list[str]) -> dict[str, Any]:
    """Repetition flags per reply and the summary figures over `replies` (user messages aligned)."""
    seen: set[tuple[str, ...]] = set(ngrams(words(greeting), 6))
    earlier = {greeting.strip()}
    flags, topical = [], []
    bigrams: list[tuple[str, ...]] = []
    for text, user in zip(replies, users, strict=True):
        ws = words(text)
        grams = ngrams(ws, 6)
        if grams:
            flags.append(sum(g in seen for g in grams) >= 0.5 * len(grams))
        else:
            flags.append(text.strip() in earlier)
        seen.update(grams)
        earlier.add(text.strip())
        bigrams += ngrams(ws, 2)
        content = {w for w in words(user) if len(w) >= 4 and w not in STOP}
        topical.append(bool(content & set(ws)))
    return {
        "repeated": flags,
        "repetition_rate": sum(flags) / max(1, len(flags)),
        "distinct_replies": len({r.strip() for r in replies}),
        "distinct_2": len(set(bigrams)) / max(1, len(bigrams)),
        "on_topic": sum(topical) / max(1, len(topical)),
    }


def user_script(messages: list[str], turns: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    out: list[str] = []
    while len(out) < turns:
        order = list(messages)
        rng.shuffle(order)
        out += order
    return out[:turns]


def run_config(mgr, card: dict, users: list[str], preset: str, policy: str, budget: int, args) -> dict[str, Any]:
    settings = {"budget": budget, "policy": policy, "max_tokens": args.max_tokens, **PRESETS[preset]}
    s = mgr.create(None, card=card, settings=settings)
    greeting = s.messages[-1].alternatives[s.messages[-1].selected].text if s.messages else ""
    turns: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    for i, text in enumerate(users, 1):
        t0 = time.perf_counter()
        ttft = None
        n_tok = 0
        reply = ""
        for ev in s.send(text, s.settings.sampling(seed=args.seed * 100_003 + i)):
            if ev.kind == "token":
                if ttft is None and ev.token is not None:
                    ttft = time.perf_counter() - t0
                n_tok += ev.token is not None
                reply += ev.text
        turns.append({"turn": i, "user": text, "reply": reply, "tokens": n_tok, "ttft_s": ttft})
        if i % 10 == 0:
            print(f"  {preset} {policy} {budget}: turn {i}, cache {s.seq.length}/{s.seq.budget}", flush=True)
    replies: list[str] = [t["reply"] for t in turns]
    sc = score(replies, greeting, users)
    for t, flag in zip(turns, sc.pop("repeated"), strict=True):
        t["repeated"] = flag
    ttfts: list[float] = [t["ttft_s"] for t in turns if t["ttft_s"] is not None]
    n_tokens: list[int] = [t["tokens"] for t in turns]
    return {
        "preset": preset,
        "policy": policy,
        "budget": budget,
        "settings": s.settings.to_json(),
        "turns_run": len(turns),
        **sc,
        "mean_reply_tokens": statistics.fmean(n_tokens),
        "ttft_start_s": statistics.median(ttfts[1:6]) if len(ttfts) > 1 else None,
        "ttft_end_s": statistics.median(ttfts[-5:]) if ttfts else None,
        "seconds": time.perf_counter() - t_start,
        "greeting": greeting,
        "turns": turns,
    }


def first_turns(c: dict[str, Any], n: int) -> dict[str, Any]:
    """Configuration `c` scored over its first n turns only (the same turns as a run of n turns: the user's
    messages and the per-turn seeds do not depend on the length of the run)."""
    turns = c["turns"][:n]
    sc = score([t["reply"] for t in turns], c["greeting"], [t["user"] for t in turns])
    sc.pop("repeated")
    ttfts = [t["ttft_s"] for t in turns if t["ttft_s"] is not None]
    return {
        **c,
        **sc,
        "turns": turns,
        "turns_run": len(turns),
        "mean_reply_tokens": statistics.fmean([t["tokens"] for t in turns]),
        "ttft_start_s": statistics.median(ttfts[1:6]) if len(ttfts) > 1 else None,
        "ttft_end_s": statistics.median(ttfts[-5:]) if ttfts else None,
    }


def label(c: dict[str, Any]) -> str:
    return f"{c['preset']} / {c['policy']} / {c['budget']}"


def write_report(report: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "long_chat.json").write_text(json.dumps(report, indent=1))
    head = (
        "| preset | policy | budget | turns | repetition rate | distinct replies | distinct-2 | on topic | "
        "mean reply tokens | ttft start | ttft end |"
    )
    lines = [head, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in report["configs"]:

        def ms(v: float | None) -> str:
            return f"{v * 1000:.0f} ms" if v is not None else "-"

        lines.append(
            f"| {c['preset']} | {c['policy']} | {c['budget']} | {c['turns_run']} | {c['repetition_rate']:.0%} | "
            f"{c['distinct_replies']} | {c['distinct_2']:.3f} | {c['on_topic']:.0%} | {c['mean_reply_tokens']:.1f} | "
            f"{ms(c['ttft_start_s'])} | {ms(c['ttft_end_s'])} |"
        )
    (out / "long_chat.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    plot(report, out / "long_chat.png")


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5))
    for c in report["configs"]:
        flags = [t["repeated"] for t in c["turns"]]
        xs = list(range(1, len(flags) + 1))
        ys = [sum(flags[max(0, i - WINDOW) : i]) / min(i, WINDOW) for i in xs]
        ax.plot(xs, ys, label=label(c), linestyle="-" if c["policy"] == "turns" else "--")
    ax.set_xlabel("turn")
    ax.set_ylabel(f"repetition rate over the last {WINDOW} replies")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--turns", type=int, default=200)
    ap.add_argument("--presets", default=",".join(PRESETS), help=f"comma-separated, of {', '.join(PRESETS)}")
    ap.add_argument("--policies", default="turns,streaming")
    ap.add_argument("--budgets", default="512,2048")
    ap.add_argument("--max-tokens", type=int, default=128, help="reply length cap (tokens)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--quant", default="none", choices=["none", "int8", "int4"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--merge", type=Path, nargs="+", default=None, help="combine the reports of these folders")
    ap.add_argument("--first", type=int, default=None, help="with --merge: score only the first N turns of each")
    args = ap.parse_args()
    out = args.out or Path("results") / f"long_chat-{time.strftime('%Y%m%d-%H%M%S')}"
    if args.merge:
        reports = [json.loads((d / "long_chat.json").read_text()) for d in args.merge]
        configs = [c for r in reports for c in r["configs"]]
        if args.first:
            configs = [first_turns(c, args.first) for c in configs]
        merged = {**reports[0], "configs": configs, "merged_from": [str(d) for d in args.merge], "first": args.first}
        write_report(merged, out)
        return
    presets = args.presets.split(",")
    bad = [p for p in presets if p not in PRESETS]
    if bad or args.turns < 1:
        ap.error(f"unknown preset(s) {', '.join(bad)}; accepted: {', '.join(PRESETS)}" if bad else "--turns >= 1")

    from infinichat.engine.torch_engine import TorchEngine, set_threads
    from infinichat.model.loader import load_model
    from infinichat.session.manager import SessionManager

    n = set_threads(args.threads)
    m = load_model(None, args.dtype, quant=args.quant)
    engine = TorchEngine(m.model, sorted(m.tokenizer.eos_ids))
    data = json.loads(DATA.read_text())
    users = user_script(data["messages"], args.turns, args.seed)
    report: dict[str, Any] = {
        "model": "default",
        "dtype": args.dtype,
        "quant": args.quant,
        "threads": n,
        "turns": args.turns,
        "max_tokens": args.max_tokens,
        "seed": args.seed,
        "presets": {p: PRESETS[p] for p in presets},
        "configs": [],
    }
    print(f"default model, {args.dtype}, quant {args.quant}, {n} threads, {args.turns} turns -> {out}", flush=True)
    with tempfile.TemporaryDirectory() as d:
        mgr = SessionManager(engine, m.tokenizer, f"{m.file_hash}:{args.dtype}:torch", d)
        for budget in [int(b) for b in args.budgets.split(",")]:
            for policy in args.policies.split(","):
                for preset in presets:
                    report["configs"].append(run_config(mgr, data["card"], users, preset, policy, budget, args))
                    write_report(report, out)
        mgr.db.close()


if __name__ == "__main__":
    main()
