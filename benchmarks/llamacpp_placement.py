"""Does the llama.cpp backend give the same logits for the same tokens wherever its cells sit in the shared cache?

The backend keeps every session in one unified llama.cpp KV cache. This script evaluates one chat prompt and four
decode steps in a fresh sequence, in the same batch shapes each time, with another sequence of `pad` tokens
holding the cells before it, and prints the largest logit difference per step against `pad` = 0; then the same
with 2 threads and with the prompt split into two llama_decode calls. (It explains why tests/test_session.py's
seeded retry runs on a context of its own: a seeded draw changes with any such difference.)

    python benchmarks/llamacpp_placement.py [--flash-attn]

Measured (default model, 1 thread, no flash attention): pads 1, 7, 33 -> 0.53-1.09 apart in a logit; pads 16
and 256 -> bit-identical; 2 threads and a split prompt -> bit-identical. With --flash-attn every line is
bit-identical here.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from infinichat.engine.llamacpp import LlamaCppEngine
from infinichat.model.loader import default_model_path
from infinichat.model.tokenizer import Tokenizer

PROMPT = (
    "<|im_start|>system\nYou are a terse assistant.<|im_end|>\n<|im_start|>user\ntell me something<|im_end|>\n"
    "<|im_start|>assistant\n"
)
STEPS = (504, 970, 339, 963)  # four decode steps (token ids the default model samples here)


def logits(engine: LlamaCppEngine, tok: Tokenizer, pad: int, split: int = 0) -> torch.Tensor:
    """(5, V): the prompt's last logits and those of four decode steps, after `pad` cells of another sequence."""
    ids = tok.encode(PROMPT)
    other = engine.new_sequence(budget=512) if pad else None
    if other is not None:
        engine.prefill(other, torch.tensor(tok.encode("hello")[:1] * pad))
    seq = engine.new_sequence(budget=512)
    pieces = [ids[:split], ids[split:]] if split else [ids]
    out = [engine.prefill(seq, torch.tensor(p)) for p in pieces][-1]
    rows = [out.float()] + [engine.prefill(seq, torch.tensor([t])).float() for t in STEPS]
    del seq, other
    return torch.stack(rows)  # (5, V)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--flash-attn", action="store_true", help="llama.cpp's flash attention kernel")
    args = ap.parse_args()
    tok = Tokenizer.from_gguf(default_model_path())

    def engine(threads: int) -> LlamaCppEngine:
        return LlamaCppEngine(None, n_ctx=1024, threads=threads, flash_attn=args.flash_attn)

    one = engine(1)
    base = logits(one, tok, 0)

    def show(what: str, got: torch.Tensor) -> None:
        d = (got - base).abs().max(dim=1).values
        print(f"{what:36s} max |dlogit| per step: " + " ".join(f"{x:.2e}" for x in d.tolist()), flush=True)

    for pad in (0, 1, 7, 16, 33, 256):
        show(f"another sequence holds {pad} cells", logits(one, tok, pad))
    show("the prompt in two llama_decode calls", logits(one, tok, 0, split=10))
    one.close()
    two = engine(2)
    show("2 threads", logits(two, tok, 0))
    two.close()


if __name__ == "__main__":
    main()
