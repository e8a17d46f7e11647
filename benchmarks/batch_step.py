"""Cost of the native batched decode step (decode.c's ic_decode_batch) against the one-token step, per call.

    python3 benchmarks/batch_step.py [--quant int4] [--rows 1 2 4 8] [--calls 10] [--rounds 3] [--threads 1]
                                     [--avx2]

The default model (--quant int4 or int8: the native step) prefills 8 sequences of 20-69 random tokens
(untimed); then each round times, in process CPU milliseconds per call (min over rounds; CPU time, so a host
shared with other work mostly inflates wall time, not this): one one-token step (`NativeDecoder.decode`), and
one batched step of B rows (`decode_batch`) for each --rows B. Prints the table and, per B, B one-token steps /
one batched step (the speed-up batching can give the decode matrix work; the engine's loop adds its own
per-row costs). `--avx2` forces the batched step's AVX2 row products (what CPUs without AVX-512 VNNI run).
"""

from __future__ import annotations

import argparse
import time

import torch

from infinichat import native
from infinichat.engine.torch_engine import set_threads
from infinichat.kv.cache import KVCache
from infinichat.model.loader import default_model_path, load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quant", default="int4", choices=["int4", "int8"])
    ap.add_argument("--rows", nargs="+", type=int, default=[1, 2, 4, 8])
    ap.add_argument("--calls", type=int, default=10, help="calls per measurement")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--avx2", action="store_true", help="force the AVX2 row products in the batched step")
    args = ap.parse_args()
    if not 1 <= min(args.rows) <= max(args.rows) <= 8:
        raise SystemExit("--rows must be in [1, 8]")
    set_threads(args.threads)
    model = load_model(default_model_path(), "bfloat16", quant=args.quant).model
    dec = model.kernels.decoder
    lib = native.library()
    if dec is None or lib is None:
        raise SystemExit(f"the native step is not available here: {native.status()}")
    vnni = lib.ic_batch_vnni(0 if args.avx2 else -1)
    g = torch.Generator().manual_seed(0)
    caches, starts = [], []
    for b in range(8):
        n = 20 + 7 * b
        c = KVCache(model.cfg, 512, torch.bfloat16)
        model(torch.randint(0, model.cfg.vocab_size, (n,), generator=g), torch.arange(n), c, 0)
        caches.append(c)
        starts.append(n)
    toks = [int(t) for t in torch.randint(0, model.cfg.vocab_size, (8,), generator=g)]

    def solo() -> None:
        dec.decode(toks[0], torch.tensor([starts[0]]), caches[0], starts[0])

    def batch(k: int) -> None:
        dec.decode_batch(toks[:k], [torch.tensor([s]) for s in starts[:k]], caches[:k], starts[:k])

    best: dict[str, float] = {}
    for _ in range(args.rounds):
        for name, fn in [("one-token", solo), *((f"B={k}", lambda k=k: batch(k)) for k in args.rows)]:
            t = time.process_time()
            for _ in range(args.calls):
                fn()
            best[name] = min(best.get(name, float("inf")), (time.process_time() - t) / args.calls * 1e3)
    lib.ic_batch_vnni(-1)
    print(
        f"{args.quant}, {args.threads} thread(s), batched products: {'AVX-512 VNNI' if vnni else 'AVX2'}; "
        f"CPU ms per call, best of {args.rounds} rounds of {args.calls}"
    )
    print("| step | CPU ms | B one-token steps / this |\n|---|---:|---:|")
    print(f"| one-token | {best['one-token']:.2f} | |")
    for k in args.rows:
        print(f"| batched, B={k} | {best[f'B={k}']:.2f} | {k * best['one-token'] / best[f'B={k}']:.2f} |")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
