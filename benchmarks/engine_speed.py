"""Engine speed: ours against transformers' generate() on the same weights and dtype, in one run.

    python benchmarks/engine_speed.py [--dtype bfloat16 float32] [--threads 2] [--repeats 3]

Measures, on the default model (or --model):
  decode tokens/s: 128 greedy tokens after a short prompt, and after a 2000-token prompt
  prefill tokens/s: a 2000-token prompt
Decode time = time(prompt + N tokens) - time(prompt + 1 token), so the prefill is not counted in it.
Each figure is the best of --repeats runs; ours and the reference alternate so both see the same noise.
Prints a table with the ratios (ours / transformers). Needs `pip install transformers accelerate`.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from infinichat.engine.sampling import SamplingParams
from infinichat.engine.torch_engine import TorchEngine, set_threads
from infinichat.model.loader import default_model_path, load_model

SHORT_PROMPT = "Once upon a time, in a small village by the sea,"
MOBY = Path(__file__).resolve().parents[2] / "shared" / "data" / "moby_dick.txt"


def long_prompt_ids(tokenizer, n: int) -> list[int]:
    text = MOBY.read_text(encoding="utf-8")[:200_000] if MOBY.exists() else ("The sea was calm that day. " * 2000)
    ids = tokenizer.encode(text, parse_special=False)
    assert len(ids) >= n, "not enough text for the long prompt"
    return ids[:n]


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


class Ours:
    def __init__(self, model_path, dtype):
        self.loaded = load_model(model_path, dtype)
        self.engine = TorchEngine(self.loaded.model, eos_ids=())  # no EOS: always generate N tokens

    def run(self, ids: list[int], n: int) -> None:
        cache = self.engine.new_cache(len(ids) + n + 1)
        for _ in self.engine.generate(cache, ids, SamplingParams(temperature=0, max_tokens=n)):
            pass


class Reference:
    def __init__(self, model_path: Path, dtype):
        import transformers

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            model_path.parent, gguf_file=model_path.name, dtype=dtype
        ).eval()

    def run(self, ids: list[int], n: int) -> None:
        with torch.inference_mode():
            self.model.generate(
                torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                eos_token_id=None, pad_token_id=0,
            )


def measure(impl, short_ids, long_ids, n, repeats) -> dict[str, float]:
    best = {"decode_short": 0.0, "decode_2k": 0.0, "prefill_2k": 0.0}
    for _ in range(repeats):
        t1 = timed(lambda: impl.run(short_ids, 1))
        tn = timed(lambda: impl.run(short_ids, n))
        best["decode_short"] = max(best["decode_short"], (n - 1) / (tn - t1))
        p1 = timed(lambda: impl.run(long_ids, 1))
        best["prefill_2k"] = max(best["prefill_2k"], len(long_ids) / p1)
        pn = timed(lambda: impl.run(long_ids, n))
        best["decode_2k"] = max(best["decode_2k"], (n - 1) / (pn - p1))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="a .gguf file (default: the embedded model)")
    ap.add_argument("--dtype", nargs="+", default=["bfloat16"], choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-reference", action="store_true", help="measure only ours")
    args = ap.parse_args()
    set_threads(args.threads)
    path = args.model or default_model_path()

    rows = []
    for dname in args.dtype:
        dtype = getattr(torch, dname)
        ours = Ours(path, dtype)
        tok = ours.loaded.tokenizer
        short_ids = tok.encode(SHORT_PROMPT)
        long_ids = long_prompt_ids(tok, args.prompt_tokens)
        impls = {"infinichat": ours}
        if not args.no_reference:
            impls["transformers"] = Reference(path, dtype)
        for impl in impls.values():  # warm-up
            impl.run(short_ids, 4)
        res = {name: measure(impl, short_ids, long_ids, args.tokens, args.repeats) for name, impl in impls.items()}
        rows.append((dname, res))

    print(f"\nmodel {path.name}, {args.threads} threads, torch {torch.__version__}, "
          f"decode {args.tokens} tokens, long prompt {args.prompt_tokens} tokens, best of {args.repeats}\n")
    print(f"| dtype | metric | infinichat tok/s | transformers tok/s | ratio |")
    print("|---|---|---:|---:|---:|")
    for dname, res in rows:
        for metric in ("decode_short", "decode_2k", "prefill_2k"):
            ours = res["infinichat"][metric]
            ref = res.get("transformers", {}).get(metric)
            ref_s = f"{ref:.1f}" if ref else "-"
            ratio = f"{ours / ref:.2f}x" if ref else "-"
            print(f"| {dname} | {metric} | {ours:.1f} | {ref_s} | {ratio} |")


if __name__ == "__main__":
    main()
