"""Time from starting `infinichat generate` to its first streamed token, cold cache and warm.

    python benchmarks/startup.py [--runs 5] [--model PATH] [--dtype bfloat16]

The first run uses an empty cache directory (it converts the GGUF file); the next runs reuse it.
Target: a warm start reaches the first token in under 3 s on the reference machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    cache = tempfile.mkdtemp(prefix="infinichat-startup-")
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
