"""The native kernels (src/infinichat/native) on and off, alternating, in one process: what each one buys.

    python3 benchmarks/native_ab.py [--rounds 5] [--prompt-tokens 2000] [--decode-tokens 64] [--threads 2]

  prefill   bfloat16 model, a --prompt-tokens prompt of Moby Dick from slot 0: with the prompt row ops and the
            prompt attention (AVX-512 only), with the attention only, and with neither (PyTorch ops, SDPA);
  decode    int4 model, --decode-tokens greedy steps after a short prompt and after 4000 tokens: the native
            step against the PyTorch int4 kernels.
Each round measures every variant once, the order reversed every other round; printed: the rates per round
and the median over rounds of each round's ratio against the PyTorch variant, plus the largest logit
difference between the variants (prefill: the last prompt token; decode: the first step, same cache).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from bench_data import shared_moby

from infinichat.engine.torch_engine import TorchEngine, set_threads
from infinichat.model.loader import load_model

MOBY = shared_moby()


def alternate(variants: dict, apply, measure, rounds: int) -> tuple[dict[str, list[float]], dict]:
    rates: dict[str, list[float]] = {k: [] for k in variants}
    outs = {}
    for r in range(rounds):
        for name in list(variants) if r % 2 == 0 else list(variants)[::-1]:
            apply(variants[name])
            rate, out = measure()
            rates[name].append(rate)
            outs[name] = out
    return rates, outs


def report(title: str, rates: dict[str, list[float]], outs: dict, base: str) -> None:
    print(f"\n{title}")
    for name, v in rates.items():
        line = f"  {name:28s} " + " ".join(f"{x:7.1f}" for x in v)
        if name != base:
            ratio = statistics.median(a / b for a, b in zip(v, rates[base], strict=True))
            diff = (outs[name] - outs[base]).abs().max().item()
            line += f"   median ratio vs {base}: {ratio:.3f}x, max logit diff {diff:.3g}"
        print(line)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prompt-tokens", type=int, default=2000)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--text", type=Path, default=MOBY)
    args = ap.parse_args()
    set_threads(args.threads)
    text = args.text.read_text(encoding="utf-8")

    loaded = load_model(None, torch.bfloat16)
    m, eng = loaded.model, TorchEngine(loaded.model)
    ids = loaded.tokenizer.encode(text[: 12 * args.prompt_tokens], parse_special=False)[: args.prompt_tokens]
    ops, attn = m.kernels.prompt_ops, m.kernels.prompt_attn
    variants = {"row ops + attention": (ops, attn), "attention only": (None, attn), "pytorch": (None, None)}
    if attn is None:
        variants = {"row ops": (ops, None), "pytorch": (None, None)}
    if ops is None:
        raise SystemExit("the native library is not available here; nothing to compare")

    def apply_prompt(v):
        m.kernels.prompt_ops, m.kernels.prompt_attn = v

    def measure_prompt():
        seq = eng.new_cache(len(ids) + 1)
        t0 = time.perf_counter()
        logits = eng.prefill(seq, ids)
        return len(ids) / (time.perf_counter() - t0), logits

    rates, outs = alternate(variants, apply_prompt, measure_prompt, args.rounds)
    report(f"prefill tok/s, bfloat16, {len(ids)} tokens from slot 0, {args.threads} threads", rates, outs, "pytorch")
    m.kernels.prompt_ops, m.kernels.prompt_attn = ops, attn

    q = load_model(None, torch.bfloat16, quant="int4")
    qm, qeng = q.model, TorchEngine(q.model, eos_ids=())
    nd = qm.kernels.decoder
    if nd is None:
        raise SystemExit("the native decode step is not available for this model")
    long_ids = q.tokenizer.encode(text[:40000], parse_special=False)[:4000]
    for label, prompt in (("short prompt", ids[:16]), (f"after {len(long_ids)} tokens", long_ids)):

        def apply_decode(v):
            qm.kernels.decoder = v

        def measure_decode(prompt=prompt):
            seq = qeng.new_cache(len(prompt) + args.decode_tokens + 1)
            logits = qeng.prefill(seq, prompt)
            t0 = time.perf_counter()
            steps = []
            for _ in range(args.decode_tokens):
                logits = qeng.prefill(seq, [int(logits.argmax())])
                steps.append(logits)
            return args.decode_tokens / (time.perf_counter() - t0), steps[0]  # the first step's logits

        rates, outs = alternate({"native step": nd, "pytorch": None}, apply_decode, measure_decode, args.rounds)
        report(f"decode tok/s, int4, {label}", rates, outs, "pytorch")
        qm.kernels.decoder = nd


if __name__ == "__main__":
    main()
