"""Decode speed at a long context by KV dtype (--kv-dtype), measured side by side in one process.

    python3 benchmarks/kv_dtype_decode.py [--context 4000] [--steps 16] [--rounds 6] [--threads 2]
                                          [--quant int8] [--kv bf16,int8,int4]

The default model (--quant int8: its decode runs the native step, which reads bf16 K/V, int8 codes and int4 KIVI
groups with their bf16 residual directly; int8h / int4h: the same with Hadamard-rotated keys) evaluates a
--context-token prompt of Moby Dick (--text; default: shared/data/moby_dick.txt in a folder above this checkout,
which finds /work/shared from /work/main and from /work/wt/*, else the repository's tests/data excerpt, repeated)
once (first dtype's store); the other dtypes' stores are converted from it (kv/quantized.py convert_store: the
same context, quantized). Then each round times --steps greedy decode steps
on every store in turn (the order reversed every other round) and truncates them back to the context. Printed:
ms per token per round, the median over rounds of each round's speed-up against the first dtype, the K/V bytes
per store, and the largest logit difference of the first step against the first dtype; then the same median
ratio for every pair of dtypes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # this checkout's code, wherever it is
from bench_data import EXCERPT, shared_moby

from infinichat.engine.torch_engine import TorchEngine, set_threads
from infinichat.kv.quantized import convert_store
from infinichat.kv.sequence import KVSequence
from infinichat.model.loader import load_model


def default_text() -> Path:
    """The developers' copy of the novel (bench_data.shared_moby), else the repository's excerpt."""
    moby = shared_moby()
    return moby if moby.is_file() else EXCERPT


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", type=int, default=4000)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quant", default="int8", choices=("none", "int8", "int4"))
    ap.add_argument(
        "--kv", default="bf16,int8,int4", help="KV dtypes, the first one the baseline (default bf16,int8,int4)"
    )
    ap.add_argument("--text", type=Path, default=None, help="a UTF-8 text (default: Moby Dick, see above)")
    args = ap.parse_args()
    set_threads(args.threads)
    kvs = [k.strip() for k in args.kv.split(",") if k.strip()]

    loaded = load_model(None, torch.bfloat16, quant=args.quant)
    model = loaded.model
    path = args.text or default_text()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SystemExit(f"cannot read --text {path}: {e}") from None
    if args.text is None and path == EXCERPT:  # the short excerpt, repeated to the context (decode speed does not
        text = "\n\n".join([text] * (12 * args.context // max(1, len(text)) + 1))  # depend on the words)
    ids = loaded.tokenizer.encode(text[: 12 * args.context], parse_special=False)[: args.context]
    if len(ids) < args.context:
        raise SystemExit(f"{path} holds only {len(ids)} tokens; --context {args.context} needs more")
    print(f"text: {path}", flush=True)
    engines = {k: TorchEngine(model, (), kv_dtype=k) for k in kvs}
    t0 = time.perf_counter()
    base_seq = engines[kvs[0]].new_cache(args.context + args.steps + 2)
    tok = int(engines[kvs[0]].prefill(base_seq, ids).argmax())
    print(f"prefill of {len(ids)} tokens ({kvs[0]} KV): {time.perf_counter() - t0:.1f} s", flush=True)
    seqs = {k: base_seq if k == kvs[0] else KVSequence(convert_store(base_seq.store, k)) for k in kvs}
    first = {k: eng.decode_one(seqs[k], tok) for k, eng in engines.items()}  # the same step on every store
    decoder = getattr(model.kernels, "decoder", None)
    native = {k: decoder is not None and decoder.bind(seqs[k].store) is not None for k in kvs}

    ms: dict[str, list[float]] = {k: [] for k in kvs}
    for r in range(args.rounds):
        for k in kvs if r % 2 == 0 else kvs[::-1]:
            eng, seq = engines[k], seqs[k]
            seq.truncate(args.context + 1)
            tok = int(first[k].argmax())
            t0 = time.perf_counter()
            for _ in range(args.steps):
                tok = int(eng.decode_one(seq, tok).argmax())
            ms[k].append(1000 * (time.perf_counter() - t0) / args.steps)

    base = kvs[0]
    print(
        f"\ndecode ms/token at {args.context} tokens of context, default model --quant {args.quant}, "
        f"{args.threads} threads, {args.steps} steps x {args.rounds} rounds (interleaved)"
    )
    for k in kvs:
        line = f"  {k:5s} {'native' if native[k] else 'torch':6s} {seqs[k].store.nbytes / 2**20:7.1f} MiB  "
        line += " ".join(f"{x:7.2f}" for x in ms[k])
        if k != base:
            ratio = statistics.median(b / a for a, b in zip(ms[k], ms[base], strict=True))
            diff = (first[k] - first[base]).abs().max().item() / first[base].abs().max().item()
            line += f"   median speed-up vs {base}: {ratio:.3f}x; first step's logits within {diff:.2%}"
        print(line)
    print("pairwise: median over rounds of (column ms / row ms) = the row's speed-up over the column")
    print("        " + "".join(f"{k:>8s}" for k in kvs))
    for a in kvs:
        ratios = [statistics.median(y / x for x, y in zip(ms[a], ms[b], strict=True)) for b in kvs]
        print(f"  {a:6s}" + "".join(f"{r:7.3f}x" for r in ratios))


if __name__ == "__main__":
    main()
