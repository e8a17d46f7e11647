"""Decode speed of our llama.cpp backend against plain llama-cpp-python, side by side in one run.

Ours: `LlamaCppEngine.generate` (greedy, our Sampler, a KVSequence with its segment map and budget).
Plain: `llama_cpp.Llama.generate` (what `Llama.__call__` runs: `eval` + llama.cpp's greedy sampler).
Same GGUF file, same n_ctx, threads, batch size and attention kernel. For each context (tokens already
in the cache before decoding: 0, 1k, 4k of Moby Dick) both decode `--tokens` tokens, alternately, `--repeats`
times (which side goes first alternates too); the tables show the median and best tokens/s, of wall time and
of this process's CPU time (on a loaded machine the CPU time is the fairer clock), and the ratio ours / plain
(target >= 0.95): of the medians, of the bests, and the median of the ratios of back-to-back pairs, which the
host's slow drifts in speed affect least (the pass/fail line uses it).

    python benchmarks/llamacpp_backend.py --threads 1 [--tokens 128] [--repeats 5]

Speed on a shared machine is noisy: compare the ratio, measured side by side, not the absolute numbers.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from bench_data import shared_moby

from infinichat.engine.llamacpp import LlamaCppEngine, gguf_path
from infinichat.engine.sampling import SamplingParams
from infinichat.engine.torch_engine import physical_cores
from infinichat.model.tokenizer import Tokenizer

CONTEXTS = (0, 1024, 4096)
TEXT_CANDIDATES = (
    shared_moby(),
    Path(__file__).resolve().parents[1] / "tests" / "data" / "moby_dick_loomings.txt",
)


def text_ids(tok: Tokenizer, n: int) -> list[int]:
    for p in TEXT_CANDIDATES:
        if p.is_file():
            ids = tok.encode(p.read_text(encoding="utf-8"), add_bos=tok.add_bos, parse_special=False)
            while len(ids) < n + 1:  # the short test excerpt, repeated
                ids += ids
            return ids[: n + 1]
    raise SystemExit("no text found: " + ", ".join(map(str, TEXT_CANDIDATES)))


def timed(tokens, n: int) -> tuple[float, float]:
    """(tokens/s of wall time, tokens/s of this process's CPU time) over n tokens after the first one
    (which comes from the prompt's logits: no decode)."""
    t0 = c0 = None
    count = 0
    for _ in tokens:
        if t0 is None:
            t0, c0 = time.perf_counter(), time.process_time()
            continue
        count += 1
        if count == n:
            break
    return count / (time.perf_counter() - t0), count / (time.process_time() - c0)


def ours_tps(engine: LlamaCppEngine, seq, prompt_logits: torch.Tensor, n_keep: int, n: int) -> tuple[float, float]:
    seq.truncate(n_keep)
    params = SamplingParams(temperature=0, max_tokens=n + 1)
    return timed(engine.generate(seq, [], params, logits=prompt_logits), n)


def plain_tps(llm, prompt: list[int], n: int) -> tuple[float, float]:
    return timed(llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0), n)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="a GGUF file (default: the embedded default model)")
    ap.add_argument("--threads", type=int, default=0, help="llama.cpp threads (default: physical cores)")
    ap.add_argument("--tokens", type=int, default=128, help="tokens decoded per measurement")
    ap.add_argument("--repeats", type=int, default=5, help="alternating measurements per context and side")
    ap.add_argument("--flash-attn", action="store_true", help="flash attention on both sides")
    args = ap.parse_args()

    import llama_cpp

    threads = args.threads or physical_cores()
    torch.set_num_threads(1)  # torch only samples on our side; its threads must not compete with llama.cpp's
    path = gguf_path(args.model)
    tok = Tokenizer.from_gguf(path)
    n_ctx = max(CONTEXTS) + args.tokens + 64
    ours = LlamaCppEngine(path, n_ctx=n_ctx, threads=threads, eos_ids=(), flash_attn=args.flash_attn)
    plain = llama_cpp.Llama(
        str(path),
        n_ctx=n_ctx,
        n_threads=threads,
        n_threads_batch=threads,
        n_batch=512,
        n_ubatch=512,
        flash_attn=args.flash_attn,
        verbose=False,
    )
    print(
        f"model {path.name}, {threads} thread(s), n_ctx {n_ctx}, {args.tokens} tokens x {args.repeats} per side, "
        f"llama-cpp-python {llama_cpp.__version__}, load average {os.getloadavg()[0]:.1f}"
    )
    rows = []
    for ctx in CONTEXTS:
        prompt = text_ids(tok, max(ctx, 1))[: max(ctx, 1)]
        seq = ours.new_sequence(capacity=len(prompt) + args.tokens + 8)
        logits = ours.prefill(seq, prompt)
        a, b = [], []

        def ours_side(seq=seq, logits=logits, prompt=prompt, out=a):
            out.append(ours_tps(ours, seq, logits, len(prompt), args.tokens))

        def plain_side(prompt=prompt, out=b):
            out.append(plain_tps(plain, prompt, args.tokens))

        sides = [ours_side, plain_side]
        for r in range(args.repeats):
            for measure in sides if r % 2 == 0 else sides[::-1]:  # who goes first alternates
                measure()
        rows.append((ctx, a, b))
        del seq
    ok = True
    for k, clock in enumerate(("wall", "CPU")):
        print(f"\ntokens/s of {clock} time" + (" (this process only: less sensitive to other load)" if k else ""))
        print(
            f"{'context':>8} | {'ours (median, best)':>20} | {'plain (median, best)':>20} | "
            f"{'ratio (median)':>14} | {'ratio (best)':>12} | {'paired ratio (median)':>21}"
        )
        print("-" * 110)
        for ctx, a, b in rows:
            a_, b_ = [x[k] for x in a], [x[k] for x in b]
            rm, rb = statistics.median(a_) / statistics.median(b_), max(a_) / max(b_)
            rp = statistics.median(x / y for x, y in zip(a_, b_, strict=True))
            ok &= rp >= 0.95 or k == 0
            print(
                f"{ctx:>8} | {statistics.median(a_):>9.1f}, {max(a_):>8.1f} | {statistics.median(b_):>9.1f}, "
                f"{max(b_):>8.1f} | {rm:>14.3f} | {rb:>12.3f} | {rp:>21.3f}"
            )
    print(
        f"\ntarget ours >= 0.95x plain (median of the paired CPU-time ratios): {'PASS' if ok else 'FAIL'}; "
        f"load average now {os.getloadavg()[0]:.1f}"
    )
    ours.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
