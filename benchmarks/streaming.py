"""Streaming speed and memory: does a fixed KV budget keep decode speed and memory flat over a long stream?

    python benchmarks/streaming.py [--stream-tokens 100000] [--dtype bfloat16] [--threads 1]

In one run, on the default model (or --model), with the `streaming` policy (4 sinks, budget --budget):
  (a) decode tokens/s right after 2k streamed tokens and right after --stream-tokens (100k): the sequence
      is forked at 2k, and both states are timed side by side (alternately, best of --repeats) over
      --decode-tokens greedy tokens (default 256 = one eviction cycle of n_discard 256, so both see the
      same mix of cache fills and one eviction), in ABBA order; best and median of --repeats are shown.
      Target: the second >= 90% of the first.
  (b) resident memory (VmRSS) after 10k and after --stream-tokens streamed tokens, as is and after
      glibc's malloc_trim(0) (freed heap pages handed back). Target: growth < 5%.
  (c) per-token decode latency once the cache is full, at budgets 512/1024/2048, `streaming` (evict one
      token, re-rotate the kept keys) against `recompute` (evict one token, re-evaluate the whole window),
      both with n_discard 1 as in the paper's Fig. 1c / Fig. 10 baseline (which reports up to 22x at 4096);
      and streaming with the engine's default n_discard 256 (one eviction per 256 tokens), over 256 tokens.
The stream is the text of moby_dick.txt (repeated if shorter), fed through `engine.prefill(seq, ids,
chunk=64)`: the budget holds and evictions happen at every 64-token chunk. Absolute numbers drift with
the machine's load; the ratios are measured in one run.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import statistics
import time
from pathlib import Path

from bench_data import shared_moby

from infinichat.engine.torch_engine import TorchEngine, set_threads
from infinichat.kv.sequence import KVSequence
from infinichat.model.loader import load_model

MOBY = shared_moby()
STREAM_CHUNK = 64
AMORTIZED = 256  # the engine's default n_discard: (c) also times streaming with it, over one eviction cycle
FEED = 4096  # tokens handed to one prefill call while streaming (it evaluates them 64 at a time)


def rss_mb(trim: bool = False) -> float:
    """Resident set size of this process, from /proc/self/status (Linux). With `trim`, first hand the
    heap's free pages back to the OS (glibc `malloc_trim`): what is left is memory in use, not freed
    blocks the allocator keeps (bf16 prefills allocate ~100 MB of float32 weight copies per call)."""
    gc.collect()
    if trim:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status (Linux only)")


def text_ids(tokenizer, n: int) -> list[int]:
    text = MOBY.read_text(encoding="utf-8") if MOBY.exists() else "The sea was calm that day. " * 20000
    ids = tokenizer.encode(text, parse_special=False)
    return (ids * (n // len(ids) + 1))[:n]


class Stream:
    """A text streaming through one sequence; `to(n)` evaluates it up to n tokens."""

    def __init__(self, engine: TorchEngine, seq: KVSequence, ids: list[int]):
        self.engine, self.seq, self.ids, self.done = engine, seq, ids, 0
        self.t0 = time.perf_counter()

    def to(self, n: int) -> None:
        while self.done < n:
            b = min(self.done + FEED, n)
            self.engine.prefill(self.seq, self.ids[self.done : b], chunk=STREAM_CHUNK)
            assert self.seq.length <= self.seq.budget
            self.done = b
            rate = self.done / (time.perf_counter() - self.t0)
            print(
                f"\r  streamed {self.done:>7} tokens, {rate:.0f} tok/s, cache {self.seq.length}/{self.seq.budget}, "
                f"{self.seq.n_evictions} evictions",
                end="",
                flush=True,
            )
        print()


def decode_rate(engine: TorchEngine, seq: KVSequence, first: int, n: int) -> float:
    """Greedy tokens/s over n one-token forward calls (evictions included) on `seq`, starting from `first`."""
    tok = first
    t = time.perf_counter()
    for _ in range(n):
        tok = int(engine.decode_one(seq, tok).argmax())
    return n / (time.perf_counter() - t)


def decode_latency(engine: TorchEngine, ids: list[int], budget: int, policy: str, n: int, n_discard: int = 1) -> float:
    """Mean seconds per decoded token once a `policy` cache of `budget` tokens is full."""
    params = {"n_sink": 4} if policy == "streaming" else {}
    seq = engine.new_sequence(budget=budget, policy=policy, n_discard=n_discard, **params)
    logits = engine.prefill(seq, ids[:budget], chunk=STREAM_CHUNK)
    assert seq.length == budget
    tok = int(logits.argmax())
    tok = int(engine.decode_one(seq, tok).argmax())  # warm-up step (first eviction)
    t = time.perf_counter()
    for _ in range(n):
        tok = int(engine.decode_one(seq, tok).argmax())
    assert n_discard > 1 or (seq.length == budget and seq.n_evictions == n + 1)
    return (time.perf_counter() - t) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="a .gguf file (default: the embedded model)")
    ap.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (default: physical cores)")
    ap.add_argument("--budget", type=int, default=1024, help="budget of the long stream (a) and (b)")
    ap.add_argument("--stream-tokens", type=int, default=100_000, help="length of the long stream (default 100k)")
    ap.add_argument("--decode-tokens", type=int, default=256, help="tokens per decode-speed measurement")
    ap.add_argument("--repeats", type=int, default=4, help="decode-speed measurements per state (best and median)")
    ap.add_argument("--budgets", type=int, nargs="+", default=[512, 1024, 2048], help="budgets of (c)")
    ap.add_argument(
        "--latency-tokens",
        type=int,
        nargs=2,
        default=[32, 4],
        metavar=("STREAMING", "RECOMPUTE"),
        help="tokens timed per budget in (c), for streaming and for recompute (default 32 4)",
    )
    args = ap.parse_args()
    if args.stream_tokens < 10_000:
        raise SystemExit("--stream-tokens must be at least 10000 (memory is compared after 10k)")

    threads = set_threads(args.threads or None)
    loaded = load_model(args.model, args.dtype)
    engine = TorchEngine(loaded.model, eos_ids=())
    ids = text_ids(loaded.tokenizer, args.stream_tokens + 1)
    print(
        f"model {loaded.name}, {args.dtype}, {threads} thread(s); stream of {args.stream_tokens} tokens, "
        f"budget {args.budget}, streaming 4 sinks, n_discard 256, chunk {STREAM_CHUNK}"
    )

    # (a) and (b): one long stream
    seq = engine.new_sequence(budget=args.budget, policy="streaming", n_sink=4)
    stream = Stream(engine, seq, ids)
    stream.to(2000)
    at_2k = seq.fork()
    stream.to(10_000)
    rss_10k, trim_10k = rss_mb(), rss_mb(trim=True)
    t = time.perf_counter()
    stream.to(args.stream_tokens)
    stream_s = time.perf_counter() - t
    rss_end, trim_end = rss_mb(), rss_mb(trim=True)
    at_end = seq.fork()
    rates: dict[str, list[float]] = {"2k": [], "end": []}
    states = {"2k": (at_2k, ids[2000]), "end": (at_end, ids[args.stream_tokens])}
    for r in range(args.repeats):  # ABBA order, so that load drift on the shared machine hits both alike
        for name in ("2k", "end") if r % 2 == 0 else ("end", "2k"):
            state, first = states[name]
            rates[name].append(decode_rate(engine, state.fork(), first, args.decode_tokens))
    r2k, rend = max(rates["2k"]), max(rates["end"])
    m2k, mend = statistics.median(rates["2k"]), statistics.median(rates["end"])

    # (c): per-token latency with a full cache, streaming vs recompute
    lat = {}
    for b in args.budgets:
        lat[b] = (
            decode_latency(engine, ids, b, "streaming", args.latency_tokens[0]),
            decode_latency(engine, ids, b, "recompute", args.latency_tokens[1]),
            decode_latency(engine, ids, b, "streaming", AMORTIZED, n_discard=AMORTIZED),
        )
        print(
            f"  budget {b}: streaming {lat[b][0] * 1000:.1f} ms/token, recompute {lat[b][1] * 1000:.0f} ms/token, "
            f"streaming with n_discard {AMORTIZED} {lat[b][2] * 1000:.1f} ms/token"
        )

    n_end = f"{args.stream_tokens // 1000}k"

    def ok(cond: bool) -> str:
        return "PASS" if cond else "FAIL"

    print(
        f"\nstreamed {args.stream_tokens - 10_000} tokens in {stream_s:.0f} s "
        f"({(args.stream_tokens - 10_000) / stream_s:.0f} tok/s, chunks of {STREAM_CHUNK}); "
        f"{seq.n_evictions} evictions, {seq.n_evicted} tokens evicted\n"
    )
    print("| measurement | after 2k / 10k | after " + n_end + " | ratio | target | result |")
    print("|---|---:|---:|---:|---|---|")
    print(
        f"| (a) decode tok/s (budget {args.budget}, {args.decode_tokens} tokens, best of {args.repeats}) | "
        f"{r2k:.1f} | {rend:.1f} | {rend / r2k:.3f} | >= 0.90 | {ok(rend / r2k >= 0.9)} |"
    )
    print(
        f"| (a') the same, median of {args.repeats} | {m2k:.1f} | {mend:.1f} | {mend / m2k:.3f} | >= 0.90 | "
        f"{ok(mend / m2k >= 0.9)} |"
    )
    print(
        f"| (b) resident memory MB (VmRSS) | {rss_10k:.0f} | {rss_end:.0f} | {rss_end / rss_10k:.3f} | "
        f"< 1.05 | {ok(rss_end / rss_10k < 1.05)} |"
    )
    print(
        f"| (b') VmRSS MB after malloc_trim(0) | {trim_10k:.0f} | {trim_end:.0f} | {trim_end / trim_10k:.3f} | "
        f"< 1.05 | {ok(trim_end / trim_10k < 1.05)} |"
    )
    print(
        f"\n| (c) budget | streaming ms/token | recompute ms/token | recompute / streaming | "
        f"streaming, n_discard {AMORTIZED} | recompute / that |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    for b, (s, r, s_am) in lat.items():
        print(f"| {b} | {s * 1000:.1f} | {r * 1000:.0f} | {r / s:.1f}x | {s_am * 1000:.1f} | {r / s_am:.1f}x |")
    print(
        f"\ndecode tok/s samples: after 2k {[round(x, 1) for x in rates['2k']]}, "
        f"after {n_end} {[round(x, 1) for x in rates['end']]}; KV store {seq.store.nbytes / 2**20:.0f} MB"
    )


if __name__ == "__main__":
    main()
