"""The cluster against the single-process server, side by side in one run, on the default model.

Servers, each a subprocess with a fresh data directory:
  single   `infinichat serve --threads 1`                      (the baseline of the router's added latency)
  1x2      `infinichat serve --replicas 1 --threads 2`         (one engine replica with both threads)
  2x1      `infinichat serve --replicas 2 --threads 1`         (two engine replicas, one thread each)
Measures:
- latency: `single` and `2x1` run at the same time; 1 client each, `--latency-turns` turns of 1 token,
  alternating between the two (the same machine load for both): time to first token p50 / p95; the
  difference of the p50s is the cost of the HTTP proxy, the ingress and the router (target <= 10 ms);
- load: `--clients` concurrent sessions x `--turns` turns of `--max-tokens` tokens on `1x2` and `2x1`, in
  the order 1x2, 2x1, 2x1, 1x2: aggregate tokens/s, time to first token p50 / p95 (target: 2x1 >= 1.3 x
  1x2); every transcript is read back and compared with what was streamed, and every session must have been
  served by one replica.

    python benchmarks/cluster_load.py [--clients 8] [--turns 2] [--max-tokens 16] [--latency-turns 20]

Ratios only count within one run; the load average printed with them says how busy the machine was.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from server_load import free_port, pct  # the sibling benchmark (this script's folder is on sys.path)

ROOT = Path(__file__).resolve().parents[1]


async def turn(c: httpx.AsyncClient, sid: str, text: str, max_tokens: int, stats: dict) -> str | None:
    t0 = time.perf_counter()
    first, n, streamed, done = None, 0, "", None
    body = {"text": text, "params": {"max_tokens": max_tokens, "temperature": 0.0}}
    async with c.stream("POST", f"/api/sessions/{sid}/messages", json=body) as r:
        if r.status_code != 200:
            stats["errors"].append(f"{sid}: {r.status_code} {(await r.aread())[:200]!r}")
            return None
        stats["replicas"].setdefault(sid, set()).add(r.headers.get("x-infinichat-replica", "-"))
        event = None
        async for line in r.aiter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                data = json.loads(line[6:])
                if event == "token" and data["token"] is not None:
                    first = first or time.perf_counter()
                    n += 1
                    streamed += data["text"]
                elif event == "token":
                    streamed += data["text"]
                elif event == "done":
                    done = data
    if done is None or done["text"] != streamed:
        stats["errors"].append(f"{sid}: the stream ended without a matching done event")
        return None
    if first is not None:
        stats["ttft"].append(first - t0)
    stats["tokens"] += n
    return streamed


async def client(c: httpx.AsyncClient, i: int, turns: int, max_tokens: int, stats: dict) -> None:
    r = await c.post("/api/sessions", json={"system_prompt": "You are a helpful assistant. Be brief."})
    if r.status_code != 201:
        stats["errors"].append(f"create: {r.status_code} {r.text[:200]}")
        return
    sid = r.json()["id"]
    want = []
    for t in range(turns):
        text = f"I am client {i}, this is my message {t}. Name a fruit."
        got = await turn(c, sid, text, max_tokens, stats)
        if got is None:
            return
        want += [("user", text), ("assistant", got)]
    h = (await c.get(f"/api/sessions/{sid}")).json()
    if [(m["kind"], m["text"]) for m in h["messages"]] != want:
        stats["errors"].append(f"{sid}: transcript mismatch")
    else:
        stats["checked"] += 1


async def run_load(url: str, clients: int, turns: int, max_tokens: int) -> dict:
    stats: dict = {"errors": [], "ttft": [], "tokens": 0, "checked": 0, "replicas": {}}
    limits = httpx.Limits(max_connections=clients + 5)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(60, read=1800), limits=limits) as c:
        warm: dict = {"errors": stats["errors"], "ttft": [], "tokens": 0, "checked": 0, "replicas": {}}
        await client(c, 99, 1, 2, warm)  # warm-up, not counted
        t0 = time.perf_counter()
        await asyncio.gather(*(client(c, i, turns, max_tokens, stats) for i in range(clients)))
        stats["wall"] = time.perf_counter() - t0
    return stats


class Server:
    def __init__(self, extra: list[str], dtype: str):
        self.replicas = int(extra[extra.index("--replicas") + 1]) if "--replicas" in extra else None
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.data = tempfile.TemporaryDirectory()
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_WAIT_POLICY": "PASSIVE"}
        cmd = [sys.executable, "-m", "infinichat", "serve", "--port", str(self.port), "--data-dir", self.data.name]
        self.proc = subprocess.Popen([*cmd, "--dtype", dtype, "--budget", "1024", *extra], env=env)

    def __enter__(self) -> Server:
        deadline = time.monotonic() + 600
        while True:
            try:
                r = httpx.get(self.url + "/health", timeout=5)
                # a cluster: every replica known to the router, or the first sessions would all pin to one
                if r.status_code == 200 and r.json().get("replicas", self.replicas) == self.replicas:
                    return self
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(1)

    def __exit__(self, *exc) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(30)
        self.data.cleanup()


def report(name: str, s: dict, clients: int) -> float:
    split = sorted(len([1 for r in s["replicas"].values() if rid in r]) for rid in set().union(*s["replicas"].values()))
    pinned = all(len(r) == 1 for r in s["replicas"].values())
    agg = s["tokens"] / s["wall"]
    print(
        f"| {name} | {agg:.1f} | {pct(s['ttft'], 0.5) * 1000:.0f} | {pct(s['ttft'], 0.95) * 1000:.0f} | "
        f"{s['checked']}/{clients} | {len(s['errors'])} | {split} {'pinned' if pinned else 'NOT PINNED'} |"
    )
    for e in s["errors"][:5]:
        print("   ", e)
    return agg


async def run_latency(urls: dict[str, str], turns: int) -> dict[str, list[float]]:
    """1 client per server, their 1-token turns alternating between the servers (the same machine load)."""
    stats = {name: {"errors": [], "ttft": [], "tokens": 0, "checked": 0, "replicas": {}} for name in urls}
    async with httpx.AsyncClient(timeout=httpx.Timeout(60, read=600)) as c:
        sids = {}
        for name, url in urls.items():
            r = await c.post(url + "/api/sessions", json={"system_prompt": "You are a helpful assistant."})
            sids[name] = r.json()["id"]
        for t in range(turns + 2):  # the first two are warm-up
            for name, url in urls.items():
                c.base_url = httpx.URL(url)
                await turn(c, sids[name], f"Message {t}. Name a fruit.", 1, stats[name])
                if t < 2:
                    stats[name]["ttft"].clear()
    for name, s in stats.items():
        for e in s["errors"][:3]:
            print(name, "latency error:", e)
    return {name: s["ttft"] for name, s in stats.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--turns", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--latency-turns", type=int, default=20)
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    print(f"load average before: {os.getloadavg()}")
    configs = {"1x2": ["--replicas", "1", "--threads", "2"], "2x1": ["--replicas", "2", "--threads", "1"]}
    with Server(["--threads", "1"], args.dtype) as single, Server(configs["2x1"], args.dtype) as two:
        latency = asyncio.run(run_latency({"single": single.url, "2x1": two.url}, args.latency_turns))
    runs: list[tuple[str, dict]] = []
    for name in ("1x2", "2x1", "2x1", "1x2"):  # ABBA: a drift of the machine's load hits both alike
        with Server(configs[name], args.dtype) as srv:
            runs.append((name, asyncio.run(run_load(srv.url, args.clients, args.turns, args.max_tokens))))
    print(f"load average after: {os.getloadavg()}")
    print(f"\nlatency, 1 client per server, {args.latency_turns} turns of 1 token, alternating (TTFT, ms):")
    print("| server | p50 | p95 | mean |\n|---|---:|---:|---:|")
    for name, xs in latency.items():
        p50, p95, mean = pct(xs, 0.5) * 1000, pct(xs, 0.95) * 1000, statistics.fmean(xs) * 1000
        print(f"| {name} | {p50:.1f} | {p95:.1f} | {mean:.1f} |")
    overhead = (pct(latency["2x1"], 0.5) - pct(latency["single"], 0.5)) * 1000
    print(f"router overhead (p50 2x1 - p50 single): {overhead:.1f} ms (target <= 10 ms)")
    print(f"\nload: {args.clients} sessions x {args.turns} turns x {args.max_tokens} tokens, {args.dtype}, order ABBA")
    print("| cluster | aggregate tok/s | TTFT p50 ms | TTFT p95 ms | intact | errors | sessions per replica |")
    print("|---|---:|---:|---:|---:|---:|---|")
    agg: dict[str, list[float]] = {"1x2": [], "2x1": []}
    for name, s in runs:
        label = "1 replica x 2 threads" if name == "1x2" else "2 replicas x 1 thread"
        agg[name].append(report(label, s, args.clients))
    ratio = statistics.fmean(agg["2x1"]) / statistics.fmean(agg["1x2"])
    print(f"2 replicas / 1 replica aggregate (mean of 2 runs each): {ratio:.2f}x (target >= 1.3x)")
    ok = all(not s["errors"] and s["checked"] == args.clients for _, s in runs)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
