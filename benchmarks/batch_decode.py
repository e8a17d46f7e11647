"""Continuous batching (issue 17): aggregate decode tokens/s of B concurrent sessions, batched against round-robin.

    python3 benchmarks/batch_decode.py [--quant int4 none] [--sessions 1 2 4 8] [--tokens 24] [--repeats 2]
        [--threads 2] [--llamacpp]

For each weight format (`--quant`: int4, and none = bfloat16) and each number of sessions B, B sequences are
prefilled with distinct short prompts (untimed), then each generates `--tokens` greedy tokens:
  batched      the server worker's loop (engine/batch.py): every round, the offered next steps of all B
               generations run in one `decode_rows` call (max_batch 8), then each claims its logits and samples;
  round-robin  the same loop with no batcher (`--max-batch 1`): each generation's step is its own forward call.
  llama.cpp    (--llamacpp) llama-cpp-python's low-level API on the same GGUF file: one context, B sequence ids,
               each round one `llama_decode` of B tokens (one per sequence), greedy choice per sequence;
               and our llama.cpp backend (`--backend llamacpp`, engine/llamacpp.py) batched and round-robin
               through the same loop as ours (column "llamacpp-backend").
Aggregate tokens/s = B * tokens / time of the decode rounds (the prompt excluded). Configurations are measured
in turn, interleaved (batched and round-robin of one B back to back, the order reversed every other round),
for --repeats rounds; each rate is the best round. Prints the table and the ratios batched / round-robin with
issue 17's targets (8 sessions: >= 4x int4, >= 3x bf16), and batched / llama.cpp.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import time
from collections.abc import Iterator

import torch

from infinichat.engine.batch import DecodeBatcher
from infinichat.engine.sampling import SamplingParams
from infinichat.engine.torch_engine import TorchEngine, set_threads
from infinichat.model.loader import default_model_path, load_model

log = logging.getLogger("batch_decode")
TARGETS = {"int4": 4.0, "none": 3.0}  # at 8 sessions: batched / round-robin
PROMPTS = [
    "Once upon a time, in a small village by the sea,",
    "The recipe for a good tomato soup starts with",
    "In 1850 the whaling ship left the harbour and",
    "My favourite programming language is Python because",
    "The mountain path was steep, and the travellers",
    "Dear diary, today I finally understood why",
    "The museum's new exhibition about ancient Egypt",
    "When the train stopped in the middle of the night,",
]


def label(quant: str) -> str:
    return {"none": "bf16"}.get(quant, quant)


def drive(engine, gens: list[Iterator], batcher: DecodeBatcher | None) -> tuple[float, float]:
    """Step the generators as the server worker does (one token each per round); -> (wall, process CPU) seconds
    from the first token of every generation (prompt evaluated) to the last."""
    engine.batcher = batcher
    offers: list[list] = [[] for _ in gens]
    try:
        for i, g in enumerate(gens):  # the prompts and first tokens, untimed
            next(g)
            if batcher is not None:
                offers[i] = batcher.take()
        live = set(range(len(gens)))
        t, c = time.perf_counter(), time.process_time()
        while live:
            if batcher is not None:
                batcher.run(o for i in live for o in offers[i])
            for i in sorted(live):
                try:
                    next(gens[i])
                except StopIteration:
                    live.discard(i)
                if batcher is not None:
                    offers[i] = batcher.take()
            if batcher is not None:
                batcher.clear()
        return time.perf_counter() - t, time.process_time() - c
    finally:
        engine.batcher = None


def ours_rate(engine, prompts: list[list[int]], tokens: int, batched: bool) -> tuple[float, float]:
    """(tokens/s of wall time, tokens/s of process CPU time)."""
    params = SamplingParams(temperature=0.0, max_tokens=tokens + 1)
    seqs = [engine.new_sequence(capacity=len(p) + tokens + 8) for p in prompts]
    gens = [engine.generate(s, p, params) for s, p in zip(seqs, prompts, strict=True)]
    wall, cpu = drive(engine, gens, DecodeBatcher(engine, 8) if batched else None)
    return len(prompts) * tokens / wall, len(prompts) * tokens / cpu


class LlamaCppBatch:
    """B sequences of one llama.cpp context decoded together: one `llama_decode` of B tokens per round."""

    def __init__(self, path, threads: int, n_seq: int, n_ctx: int):
        import llama_cpp
        import numpy as np

        self.lib, self.np = llama_cpp, np
        self._quiet = llama_cpp.llama_log_callback(lambda level, text, user: None)  # kept alive with self
        llama_cpp.llama_log_set(self._quiet, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()
        mp = llama_cpp.llama_model_default_params()
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), mp)
        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = n_ctx, 512, 512, n_seq
        cp.n_threads = cp.n_threads_batch = threads
        if hasattr(cp, "kv_unified"):
            cp.kv_unified = True
        self.ctx = llama_cpp.llama_init_from_model(self.model, cp)
        self.vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        self.batch = llama_cpp.llama_batch_init(512, 0, n_seq)

    def _decode(self, rows: list[tuple[int, int, int, bool]]) -> None:
        """rows: (token, position, seq id, logits wanted)."""
        b = self.batch
        b.n_tokens = len(rows)
        for i, (tok, pos, sid, want) in enumerate(rows):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, want
            b.seq_id[i][0] = sid
        rc = self.lib.llama_decode(self.ctx, b)
        if rc:
            raise RuntimeError(f"llama_decode returned {rc}")

    def _argmax(self, i: int) -> int:
        ptr = self.lib.llama_get_logits_ith(self.ctx, i)
        return int(self.np.argmax(self.np.ctypeslib.as_array(ptr, shape=(self.vocab,))))

    def rate(self, prompts: list[list[int]], tokens: int) -> tuple[float, float]:
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx), True)
        nxt, pos = [], []
        for sid, p in enumerate(prompts):  # one prompt per call: their last logits are read before the next
            self._decode([(t, j, sid, j == len(p) - 1) for j, t in enumerate(p)])
            nxt.append(self._argmax(len(p) - 1))
            pos.append(len(p))
        t, c = time.perf_counter(), time.process_time()
        for _ in range(tokens):
            self._decode([(nxt[s], pos[s], s, True) for s in range(len(prompts))])
            nxt = [self._argmax(s) for s in range(len(prompts))]
            pos = [x + 1 for x in pos]
        n = len(prompts) * tokens
        return n / (time.perf_counter() - t), n / (time.process_time() - c)

    def close(self) -> None:
        self.lib.llama_batch_free(self.batch)
        self.lib.llama_free(self.ctx)
        self.lib.llama_model_free(self.model)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a .gguf file or checkpoint folder (default: the embedded model)")
    ap.add_argument("--quant", nargs="+", default=["int4", "none"], choices=["int4", "int8", "none"])
    ap.add_argument("--sessions", nargs="+", type=int, default=[1, 2, 4, 8])
    ap.add_argument("--tokens", type=int, default=24, help="decode steps per session per measurement")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--llamacpp", action="store_true", help="also llama-cpp-python, B sequences in one context")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if max(args.sessions) > len(PROMPTS) or min(args.sessions) < 1:
        raise SystemExit(f"--sessions must be in [1, {len(PROMPTS)}]")
    set_threads(args.threads)
    path = default_model_path() if args.model is None else args.model
    engines: dict = {}
    for q in args.quant:
        loaded = load_model(path, "bfloat16", quant=q)
        engines[q] = TorchEngine(loaded.model, eos_ids=())  # no EOS: every session decodes all its tokens
        tok = loaded.tokenizer
    prompts = [tok.encode(p, parse_special=False) for p in PROMPTS]
    lcpp = None
    if args.llamacpp:
        try:
            lcpp = LlamaCppBatch(path, args.threads, max(args.sessions), 2048)
            from infinichat.engine.llamacpp import LlamaCppEngine

            engines["llamacpp-backend"] = LlamaCppEngine(path, n_ctx=2048, threads=args.threads, eos_ids=())
        except ImportError:
            print("llama-cpp-python is not installed: no llama.cpp column")

    # (config, mode, B, clock) -> best rate; clock "wall" or "cpu"; ratios per round, per clock
    best: dict[tuple[str, str, int, str], float] = {}
    ratios: dict[tuple[str, int, str], list[float]] = {}

    def keep(key: tuple[str, str, int], rates: tuple[float, float]) -> None:
        for clock, r in zip(("wall", "cpu"), rates, strict=True):
            best[(*key, clock)] = max(best.get((*key, clock), 0.0), r)

    for rep in range(args.repeats):
        for B in args.sessions:
            ps = prompts[:B]
            for q, eng in engines.items():
                modes = [True, False] if rep % 2 == 0 else [False, True]
                got = {}
                for batched in modes:
                    got[batched] = ours_rate(eng, ps, args.tokens, batched)
                    keep((q, "batched" if batched else "round-robin", B), got[batched])
                for i, clock in enumerate(("wall", "cpu")):
                    ratios.setdefault((q, B, clock), []).append(got[True][i] / got[False][i])
                print(
                    f"round {rep + 1} {label(q):5s} B={B}: batched {got[True][0]:7.1f} tok/s "
                    f"({got[True][1]:.1f} per CPU s), round-robin {got[False][0]:7.1f} ({got[False][1]:.1f}), "
                    f"x{got[True][0] / got[False][0]:.2f} wall, x{got[True][1] / got[False][1]:.2f} CPU",
                    flush=True,
                )
            if lcpp is not None:
                r = lcpp.rate(ps, args.tokens)
                keep(("llama.cpp", "batched", B), r)
                print(f"round {rep + 1} llama.cpp B={B}: {r[0]:7.1f} tok/s ({r[1]:.1f} per CPU s)", flush=True)
    if lcpp is not None:
        lcpp.close()

    def median(xs: list[float]) -> float:
        xs = sorted(xs)
        return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2

    for clock, what in (("wall", "tokens/s of wall time"), ("cpu", "tokens per second of process CPU time")):
        print(
            f"\naggregate decode {what} (best of {args.repeats} rounds, {args.tokens} tokens per session, "
            f"{args.threads} threads); ratio = median over rounds of batched / round-robin"
        )
        head = "| sessions |" + "".join(f" {label(q)} batched | {label(q)} round-robin | ratio |" for q in engines)
        if lcpp is not None:
            head += " llama-cpp-python batched |"
        print(head)
        print("|" + "---:|" * (head.count("|") - 1))
        for B in args.sessions:
            row = f"| {B} |"
            for q in engines:
                row += (
                    f" {best[(q, 'batched', B, clock)]:.1f} | {best[(q, 'round-robin', B, clock)]:.1f} |"
                    f" {median(ratios[(q, B, clock)]):.2f} |"
                )
            if lcpp is not None:
                row += f" {best[('llama.cpp', 'batched', B, clock)]:.1f} |"
            print(row)
    if 8 in args.sessions:
        for q in engines:
            want = TARGETS.get(q)
            if want is not None:
                w, c = median(ratios[(q, 8, "wall")]), median(ratios[(q, 8, "cpu")])
                verdict = "met" if w >= want else "MISSED"
                print(
                    f"target {label(q)}: 8 sessions batched >= {want}x round-robin: x{w:.2f} wall ({verdict}), "
                    f"x{c:.2f} CPU"
                )


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
