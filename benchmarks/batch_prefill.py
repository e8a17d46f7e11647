"""Batched prefill (issue 17, time to first token): B short prompts of different sessions in one forward call
(`Engine.prefill_rows`, what the server's worker runs for prompt chunks that fit `prefill_group` together) against
the same B prompts evaluated one after another (one `Engine.prefill` call each).

    python3 benchmarks/batch_prefill.py [--quant none int4] [--sessions 1 2 4 8] [--tokens 8 40] [--history 0 60]
        [--repeats 3] [--threads 2] [--backend torch|llamacpp]

For each weight format, prompt length T, history length H (the tokens already in each session's cache: 0 = a new
session, > 0 = a later turn, whose chunk attends to the history through a mask) and number of sessions B: B caches
are prepared (the history prefilled, untimed), then B prompts of T tokens each are evaluated, sequentially and
batched, back to back (the order reversed every other repeat); each time is the median over the repeats (the caches
truncated back to H between them). Prints both times and the ratio sequential / batched: a call whose rows are few
is bound by reading the weights (B such prompts in one call cost about one), a call of many rows by arithmetic (B
prompts cost about B). Also prints how far each batched prompt's logits are from its sequential ones (max |diff|:
0 where both take the same kernels; bf16 models compute calls of >= 32 rows in float32, so a batched call of short
prompts can differ from their calls alone by a bf16 rounding). `--backend llamacpp`: the llama.cpp backend on the GGUF
file (its own quantization; `--quant` is ignored), sequential = one `llama_decode` per prompt, batched = one for
all (its logits also depend on where the cells sit in the shared cache; here the batched call puts each prompt's
cells where the sequential calls put them, so the diff is 0 when the kernels agree).
"""

from __future__ import annotations

import argparse
import itertools
import logging
import statistics
import time

import torch

from infinichat.engine.base import Engine
from infinichat.engine.torch_engine import TorchEngine, set_threads
from infinichat.model.loader import default_model_path, load_model
from infinichat.model.tokenizer import Tokenizer

TEXT = (
    "I am client {i}, this is my message. Tell me about the sea, the ships that sail on it, the fish that live "
    "in it and the storms that cross it, in a few words please. Thank you, friend number {i}, and good night."
)


def _engine(args, path, quant: str) -> tuple[Engine, Tokenizer]:
    if args.backend == "llamacpp":
        from infinichat.engine.llamacpp import LlamaCppEngine

        # enough sequence ids for every session, and cells for their histories and prompts
        eng = LlamaCppEngine(path, n_ctx=4096, threads=args.threads, n_seq_max=max(args.sessions), eos_ids=())
        return eng, Tokenizer.from_gguf(path)
    loaded = load_model(path, "bfloat16", quant=quant)
    return TorchEngine(loaded.model, eos_ids=()), loaded.tokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a .gguf file or checkpoint folder (default: the embedded model)")
    ap.add_argument("--quant", nargs="+", default=["none", "int4"], choices=["int4", "int8", "none"])
    ap.add_argument("--sessions", nargs="+", type=int, default=[1, 2, 4, 8])
    ap.add_argument("--tokens", type=int, nargs="+", default=[8, 40], help="prompt tokens per session")
    ap.add_argument("--history", nargs="+", type=int, default=[0, 60], help="tokens already in each cache")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--backend", choices=["torch", "llamacpp"], default="torch")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    set_threads(args.threads if args.backend == "torch" else 1)  # llama.cpp: torch only compares logits
    path = default_model_path() if args.model is None else args.model
    print(f"{args.threads} thread(s), median of {args.repeats} repeats\n")
    print(
        "| weights | prompt tokens | history | sessions | sequential (ms) | batched (ms) | sequential / batched "
        "| max logit diff |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for q in args.quant if args.backend == "torch" else ["gguf"]:
        eng, tok = _engine(args, path, q)
        texts = [tok.encode(TEXT.format(i=i) * 4, parse_special=False) for i in range(max(args.sessions))]
        hist = torch.tensor(tok.encode(TEXT.format(i=99) * 8, parse_special=False))
        eng.prefill(eng.new_sequence(budget=1024), texts[0][:64])  # warm-up (first buffers, packing)
        for T, H, B in itertools.product(args.tokens, args.history, args.sessions):
            prompts = [torch.tensor(t[:T]) for t in texts]
            seqs = [eng.new_sequence(budget=1024) for _ in range(B)]
            if H:
                for s in seqs:
                    eng.prefill(s, hist[:H].tolist())
            seq_t, bat_t, diff = [], [], 0.0
            for rep in range(args.repeats):
                outs: dict[str, list[torch.Tensor]] = {}
                for name in ("seq", "bat") if rep % 2 == 0 else ("bat", "seq"):
                    t = time.perf_counter()
                    if name == "seq":
                        outs[name] = [eng.prefill(s, p.tolist()) for s, p in zip(seqs, prompts, strict=False)]
                    else:
                        outs[name] = eng.prefill_rows(list(zip(seqs, prompts, strict=False)))
                    (seq_t if name == "seq" else bat_t).append(time.perf_counter() - t)
                    for s in seqs:
                        s.truncate(H)
                pairs = zip(outs["seq"], outs["bat"], strict=True)
                diff = max([diff] + [float((a - b).abs().max()) for a, b in pairs])
            s_ms, b_ms = statistics.median(seq_t) * 1e3, statistics.median(bat_t) * 1e3
            label = {"none": "bf16", "gguf": "llama.cpp (GGUF)"}.get(q, q)
            print(f"| {label} | {T} | {H} | {B} | {s_ms:.0f} | {b_ms:.0f} | {s_ms / b_ms:.2f}x | {diff:.3g} |")


if __name__ == "__main__":
    main()
