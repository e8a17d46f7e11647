"""Time from starting `infinichat generate` to its first streamed token, cold cache and warm; with --serve, the
time from starting `infinichat serve` to its first answer on /health (503 "loading") and to "ready" (200).

    python benchmarks/startup.py [--runs 5] [--model PATH] [--dtype bfloat16] [--serve]

The first run uses an empty cache directory (it converts the GGUF file); the next runs reuse it.
Target: a warm start reaches the first token in under 3 s on the reference machine.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request


def first_token_seconds(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    assert proc.stdout is not None
    first = proc.stdout.read(1)  # the first byte of generated text
    elapsed = time.perf_counter() - t0
    proc.stdout.read()
    if proc.wait() != 0 or not first:
        raise SystemExit(f"the command failed: {' '.join(cmd)}")
    return elapsed


def serve_seconds(cmd: list[str], env: dict[str, str]) -> tuple[float, float, float]:
    """(seconds until the port accepts a connection, to the first answer on /health, to a 200 there) for
    `infinichat serve` on a free port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.perf_counter()
    proc = subprocess.Popen([*cmd, "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    first = None
    while proc.poll() is None:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.01)
    bound = time.perf_counter() - t0
    try:
        while proc.poll() is None and time.perf_counter() - t0 < 600:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    status = r.status
            except urllib.error.HTTPError as e:
                status = e.code
            except OSError:
                time.sleep(0.01)
                continue
            first = first if first is not None else time.perf_counter() - t0
            if status == 200:
                return bound, first, time.perf_counter() - t0
            time.sleep(0.05)
        raise SystemExit(f"the server did not become ready: {' '.join(cmd)}")
    finally:
        proc.terminate()
        proc.wait(60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--serve", action="store_true", help="time `infinichat serve` to /health answers")
    args = ap.parse_args()
    cache = tempfile.mkdtemp(prefix="infinichat-startup-")
    if args.serve:
        data = tempfile.mkdtemp(prefix="infinichat-startup-data-")
        cmd = [sys.executable, "-m", "infinichat", "serve", "--dtype", args.dtype, "--cache-dir", cache]
        cmd += ["--data-dir", data] + (["--model", args.model] if args.model else [])
        runs = [serve_seconds(cmd, dict(os.environ)) for _ in range(1 + args.runs)]

        def line(what: str, b: float, f: float, r: float) -> None:
            print(f"{what}: the port accepted after {b:.2f} s, /health answered after {f:.2f} s, ready after {r:.2f} s")

        line("cold start (converts the model)", *runs[0])
        again = runs[1:]
        line(f"warm starts (median of {len(again)})", *(statistics.median(x[i] for x in again) for i in range(3)))
        return
    cmd = [
        sys.executable,
        "-m",
        "infinichat",
        "generate",
        "Once upon a time",
        "-n",
        "8",
        "--temperature",
        "0",
        "--dtype",
        args.dtype,
        "--cache-dir",
        cache,
    ]
    if args.model:
        cmd += ["--model", args.model]
    env = dict(os.environ)
    cold = first_token_seconds(cmd, env)
    warm = [first_token_seconds(cmd, env) for _ in range(args.runs)]
    print(f"cold start (converts the model): {cold:.2f} s to the first token")
    print(
        f"warm starts: median {statistics.median(warm):.2f} s, min {min(warm):.2f} s, max {max(warm):.2f} s "
        f"over {len(warm)} runs (target < 3 s)"
    )


if __name__ == "__main__":
    main()
