"""Quality of --quant int8 / int4 against bfloat16 on the same text: teacher-forced top-1 agreement and
perplexity (issue 9's targets: agreement >= 98%, perplexity within 2% of bfloat16).

    python3 benchmarks/quant_quality.py [--tokens 4096] [--chunk 512] [--quant int8 int4]

Each model reads the first --tokens tokens of Moby Dick (../shared/data/moby_dick.txt, or --text) in one
sequence, --chunk tokens per forward call. Chunks of 32 tokens or more run in float32 over the dequantized
weights; --chunk 1 runs every token through the decode path (the native step where it builds, else the
int8/int4 kernels; the bfloat16 reference decodes token by token too).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_data import shared_moby

from infinichat.engine.torch_engine import TorchEngine, set_threads
from infinichat.model.loader import load_model

MOBY = shared_moby()


def teacher_forced_logits(loaded, ids: list[int], chunk: int) -> torch.Tensor:
    """Logits (n, V) float32 of every position, the whole text in one sequence."""
    engine = TorchEngine(loaded.model)
    seq = engine.new_cache(len(ids))
    return torch.cat([engine.prefill(seq, ids[a : a + chunk], all_logits=True) for a in range(0, len(ids), chunk)])


def perplexity(logits: torch.Tensor, ids: list[int]) -> float:
    target = torch.tensor(ids[1:])
    return math.exp(F.cross_entropy(logits[:-1], target).item())


def compare(base: torch.Tensor, other: torch.Tensor) -> dict[str, float]:
    """Top-1 agreement and how far the next-token distributions moved (mean KL(base || other))."""
    agree = (base.argmax(-1) == other.argmax(-1)).float().mean().item()
    kl = F.kl_div(other.log_softmax(-1), base.log_softmax(-1), log_target=True, reduction="batchmean").item()
    return {"top1": agree, "kl": kl}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--text", type=Path, default=MOBY)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument(
        "--start",
        default="",
        metavar="TEXT",
        help="begin at the first occurrence of TEXT (e.g. 'Call me Ishmael'; default: the file's start)",
    )
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--quant", nargs="+", default=["int8", "int4"], choices=("int8", "int4"))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    set_threads(args.threads)

    base = load_model(args.model, torch.bfloat16)
    text = args.text.read_text(encoding="utf-8")
    at = text.find(args.start) if args.start else 0
    if at < 0:
        raise SystemExit(f"--start {args.start!r} is not in {args.text}")
    ids = base.tokenizer.encode(text[at : at + 8 * args.tokens], parse_special=False)[: args.tokens]
    ref = teacher_forced_logits(base, ids, args.chunk)
    ppl_ref = perplexity(ref, ids)
    print(f"{len(ids)} tokens of {args.text.name} from character {at}, chunk {args.chunk}\n")
    print("| weights | perplexity | vs bfloat16 | top-1 agreement | mean KL(bf16 || quant) |")
    print("|---|---:|---:|---:|---:|")
    print(f"| bfloat16 | {ppl_ref:.3f} | - | - | - |")
    del base
    for quant in args.quant:
        loaded = load_model(args.model, torch.bfloat16, quant=quant)
        logits = teacher_forced_logits(loaded, ids, args.chunk)
        ppl = perplexity(logits, ids)
        c = compare(ref, logits)
        print(
            f"| bfloat16+{quant} | {ppl:.3f} | {100 * (ppl / ppl_ref - 1):+.2f}% | {100 * c['top1']:.2f}% "
            f"| {c['kl']:.4f} |",
            flush=True,
        )
        del loaded


if __name__ == "__main__":
    main()
