"""Load test of the real HTTP server: N concurrent clients x T turns on the default model.

Starts `infinichat serve` in a subprocess (a fresh data dir), runs N asyncio clients, each with its own
session, sending T messages one after the other through the session API (SSE), and checks:
- no request fails (any HTTP error or SSE error event is counted and reported);
- each transcript, read back with GET /api/sessions/{id}, holds exactly that client's messages in order,
  each reply equal to the text streamed for it (no lost or mixed-up turns);
then prints time-to-first-token and per-reply decode tokens/s (p50 / p95) and the aggregate throughput (after one
untimed warm-up request on its own session). By default every client sends its next message the moment its reply
ends, and all start together: the worst case for time to first token (requests arrive in bursts). With `--think S`
each client waits a random time, uniform in [0, 2 S] (seeded by `--think-seed` and the client's number), before each
turn after the first, as a person reads and types: arrivals drift apart (the aggregate tok/s then counts the
thinking time too).

    python benchmarks/server_load.py [--clients 20] [--turns 10] [--max-tokens 24] [--threads 1]
        [--quant none|int8|int4] [--backend torch|llamacpp] [--max-batch 8] [--prefill-group N]
        [--think SECONDS] [--think-seed 0]
    python benchmarks/server_load.py --clients 1 8 --turns 3    # one server per client count, then compared:
        aggregate tok/s and time to first token p50 / p95 (issue 17: p95 with 8 clients <= 2x that of 1), the
        first turns (new sessions) apart, inter-token latency, and where the time to first token went (the
        worker's probes in /metrics, server/first_item.py, where the served tree has them)
    python benchmarks/server_load.py --clients 1 8 --turns 3 --src /work/main/src src   # before / after
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))] if xs else float("nan")


async def client(c: httpx.AsyncClient, i: int, args, stats: dict) -> None:
    turns, max_tokens = args.turns, args.max_tokens
    think = random.Random(args.think_seed * 100003 + i)  # this client's thinking times
    sid = f"load-{i:02d}"
    r = await c.post("/api/sessions", json={"id": sid, "system_prompt": "You are a helpful assistant. Be brief."})
    if r.status_code != 201:
        stats["errors"].append(f"{sid} create: {r.status_code} {r.text[:200]}")
        return
    sent, got = [], []
    for t in range(turns):
        if t and args.think > 0:
            await asyncio.sleep(think.uniform(0, 2 * args.think))
        text = f"I am client {i}, this is my message {t}. Name a fruit."
        t0 = time.perf_counter()
        first = last = None
        n, streamed, done = 0, "", None
        async with c.stream(
            "POST",
            f"/api/sessions/{sid}/messages",
            json={"text": text, "params": {"max_tokens": max_tokens, "seed": i * 100 + t}},
        ) as resp:
            if resp.status_code != 200:
                stats["errors"].append(f"{sid} turn {t}: {resp.status_code} {(await resp.aread())[:200]!r}")
                return
            event = None
            async for line in resp.aiter_lines():
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: "):
                    data = json.loads(line[6:])
                    if event == "token":
                        now = time.perf_counter()
                        if data["token"] is not None:
                            if last is not None:
                                stats["itl"].append(now - last)
                            first = first or now
                            last = now
                            n += 1
                        streamed += data["text"]
                    elif event == "done":
                        done = data
                    elif event == "error":
                        stats["errors"].append(f"{sid} turn {t}: {data}")
                        return
        if done is None or done["text"] != streamed:
            stats["errors"].append(f"{sid} turn {t}: stream ended without a matching done event")
            return
        sent.append(text)
        got.append(streamed)
        if first is not None:
            stats["ttft"].append(first - t0)
            stats["ttft_later" if t else "ttft_first"].append(first - t0)
            if n > 1:
                stats["tps"].append((n - 1) / (last - first))
        stats["tokens"] += n
    h = (await c.get(f"/api/sessions/{sid}")).json()
    have = [(m["kind"], m["text"]) for m in h["messages"]]
    # a turn that failed has no reply: the lengths may differ, and the comparison below reports it
    want = [x for s, g in zip(sent, got, strict=False) for x in (("user", s), ("assistant", g))]
    if have != want:
        stats["errors"].append(f"{sid}: transcript mismatch ({len(have)} messages, {len(want)} expected)")
    else:
        stats["checked"] += 1


async def main_async(args, url: str) -> dict:
    stats = {
        "errors": [],
        "ttft": [],
        "ttft_first": [],  # each client's first turn (a new session: system prompt + message)
        "ttft_later": [],
        "itl": [],  # gaps between two tokens of one reply
        "tps": [],
        "tokens": 0,
        "checked": 0,
    }
    limits = httpx.Limits(max_connections=args.clients + 5)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(60, read=1800), limits=limits) as c:
        # warm-up, untimed: a fresh server's first generation pays one-time costs (native library, first buffers)
        r = await c.post("/api/sessions", json={"id": "warmup"})
        if r.status_code == 201:
            await c.post("/api/sessions/warmup/messages", json={"text": "Hello", "params": {"max_tokens": 4}})
        stats["metrics_warmup"] = (await c.get("/metrics")).text  # the warm-up's probes, subtracted in the report
        t0 = time.perf_counter()
        await asyncio.gather(*(client(c, i, args, stats) for i in range(args.clients)))
        stats["wall"] = time.perf_counter() - t0
        stats["metrics"] = (await c.get("/metrics")).text
    return stats


def run_server(args, clients: int) -> dict | None:
    """A fresh `infinichat serve` (its own data dir), `clients` concurrent clients; the stats, or None if it
    did not start."""
    args = argparse.Namespace(**{**vars(args), "clients": clients})
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as data:
        env = {**os.environ, "PYTHONPATH": str(args.src), "OMP_WAIT_POLICY": "PASSIVE"}
        cmd = [sys.executable, "-m", "infinichat", "serve", "--port", str(port), "--data-dir", data]
        cmd += ["--threads", str(args.threads), "--budget", str(args.budget), "--dtype", args.dtype]
        cmd += ["--max-batch", str(args.max_batch), "--backend", args.backend]
        if args.backend == "torch":
            cmd += ["--quant", args.quant]
        if args.prefill_group is not None:
            cmd += ["--prefill-group", str(args.prefill_group)]
        proc = subprocess.Popen(cmd, env=env)
        try:
            deadline = time.monotonic() + 300
            while True:
                try:
                    if httpx.get(url + "/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    print("the server did not start", file=sys.stderr)
                    return None
                time.sleep(0.5)
            return asyncio.run(main_async(args, url))
        finally:
            proc.terminate()
            proc.wait(60)


def first_item_parts(metrics: str) -> dict[str, float]:
    """The worker's time-to-first-item sums by part from /metrics (empty for a server without them)."""
    out = {}
    for line in metrics.splitlines():
        if line.startswith("infinichat_first_item_seconds{part="):
            out[line.split('"')[1]] = float(line.split()[-1])
        elif line.startswith("infinichat_first_item_seconds_count"):
            out["count"] = float(line.split()[-1])
    return out


def _weights(args) -> str:
    return f"{args.dtype} quant {args.quant}" if args.backend == "torch" else "llama.cpp backend (the GGUF's types)"


def _think(args) -> str:
    if args.think <= 0:
        return "no think time (each client sends its next message at once; all start together)"
    return f"think time uniform in [0, {2 * args.think:g}] s before each later turn (seed {args.think_seed})"


def _group(args) -> str:
    return "" if args.prefill_group is None else f"prefill_group {args.prefill_group}, "


def report(args, clients: int, stats: dict) -> bool:
    n = clients * args.turns
    print(
        f"\n{clients} clients x {args.turns} turns, max_tokens {args.max_tokens}, budget {args.budget}, "
        f"{_weights(args)}, max_batch {args.max_batch}, {_group(args)}{args.threads} thread(s), "
        f"{_think(args)}, wall {stats['wall']:.0f} s"
    )
    print(
        f"errors: {len(stats['errors'])}; transcripts checked and intact: {stats['checked']}/{clients}; "
        f"replies: {len(stats['ttft'])}/{n}"
    )
    for e in stats["errors"][:10]:
        print("  ", e)
    print("\n| measure | p50 | p95 | mean |\n|---|---:|---:|---:|")
    for name, xs, unit in (
        ("time to first token", stats["ttft"], "s"),
        ("  first turn (new session)", stats["ttft_first"], "s"),
        ("  later turns", stats["ttft_later"], "s"),
        ("inter-token latency", stats["itl"], "s"),
        ("decode tokens/s per reply", stats["tps"], ""),
    ):
        print(
            f"| {name} ({unit or 'tok/s'}) | {pct(xs, 0.5):.2f} | {pct(xs, 0.95):.2f} | {statistics.fmean(xs):.2f} |"
            if xs
            else f"| {name} | - | - | - |"
        )
    print(
        f"\naggregate: {stats['tokens']} tokens generated in {stats['wall']:.0f} s = "
        f"{stats['tokens'] / stats['wall']:.1f} tok/s over all clients"
    )
    parts = first_item_parts(stats["metrics"])
    warm = first_item_parts(stats.get("metrics_warmup", ""))
    parts = {k: v - warm.get(k, 0.0) for k, v in parts.items()}
    if parts:
        n = parts.pop("count") or 1
        http = statistics.fmean(stats["ttft"]) - sum(parts.values()) / n if stats["ttft"] else float("nan")
        print(
            "time to first token, mean by part (s; the worker's probes, server/first_item.py): "
            + ", ".join(f"{k} {v / n:.3f}" for k, v in parts.items())
            + f", HTTP/SSE and the rest {http:.3f}"
        )
    for line in stats["metrics"].splitlines():
        if line.startswith(
            (
                "infinichat_kv_offloads",
                "infinichat_evictions",
                "infinichat_tokens_in",
                "infinichat_tokens_out",
                "infinichat_decode_batch_size",
                "infinichat_prefill_batch_size",
            )
        ):
            print(line)
    return not stats["errors"] and stats["checked"] == clients


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, nargs="+", default=[20], help="one run per value (e.g. 1 8: compared)")
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--budget", type=int, default=1024)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--quant", default="none", choices=["none", "int8", "int4"])
    ap.add_argument("--backend", choices=["torch", "llamacpp"], default="torch", help="serve --backend")
    ap.add_argument("--max-batch", type=int, default=8, help="serve --max-batch (1: round-robin, no batching)")
    ap.add_argument("--prefill-group", type=int, default=None, help="serve --prefill-group (default: the server's)")
    ap.add_argument(
        "--think",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="each client waits uniform [0, 2 x SECONDS] before each turn after the first (default 0: at once)",
    )
    ap.add_argument("--think-seed", type=int, default=0, help="seed of the clients' thinking times")
    ap.add_argument(
        "--src",
        nargs="+",
        type=Path,
        default=[ROOT / "src"],
        help="the source tree(s) to serve (default: this checkout's); several (e.g. main's and a branch's): each "
        "client count runs on each in turn, back to back, for a before/after comparison in the same conditions",
    )
    args = ap.parse_args()
    if not 0 <= args.think <= 3600:
        ap.error(f"--think must be in [0, 3600] seconds, got {args.think}")
    ok, results = True, {}
    for clients in args.clients:
        for src in args.src:
            print(f"\n== {clients} client(s), serving {src}")
            stats = run_server(argparse.Namespace(**{**vars(args), "src": src}), clients)
            if stats is None:
                return 1
            ok = report(args, clients, stats) and ok
            results[(str(src), clients)] = stats
    for src in args.src:
        table({c: st for (s, c), st in results.items() if s == str(src)}, str(src) if len(args.src) > 1 else "")
    if len(results) > 1:
        print(f"\n({_think(args)})")
    return 0 if ok else 1


def table(results: dict[int, dict], title: str) -> None:
    if len(results) > 1:
        base = min(results)
        b = results[base]
        if title:
            print(f"\n{title}:")
        print(
            "\n| clients | aggregate tok/s | TTFT p50 (s) | TTFT p95 (s) | p95 / p95 of "
            f"{base} client(s) | later turns TTFT p50 / p95 (s) | ITL p50 / p95 (s) |"
        )
        print("|---:|---:|---:|---:|---:|---:|---:|")
        for clients, st in results.items():
            ratio = pct(st["ttft"], 0.95) / pct(b["ttft"], 0.95)
            print(
                f"| {clients} | {st['tokens'] / st['wall']:.1f} | {pct(st['ttft'], 0.5):.2f} | "
                f"{pct(st['ttft'], 0.95):.2f} | {ratio:.2f} | {pct(st['ttft_later'], 0.5):.2f} / "
                f"{pct(st['ttft_later'], 0.95):.2f} | {pct(st['itl'], 0.5):.3f} / {pct(st['itl'], 0.95):.3f} |"
            )


if __name__ == "__main__":
    raise SystemExit(main())
