"""The per-token cost of constrained decoding on our sampler, and the grammar libraries compared (issue 23).

  python3 benchmarks/constrained_decoding.py [--steps 400] [--threads 1] [--libs-path DIR]

With the default model's tokenizer (49152 tokens): `Sampler.sample` (temperature 1) unconstrained, and under a JSON
schema with each grammar library that imports (llguidance, the one infinichat uses; xgrammar and outlines-core if
found, e.g. installed with `pip install --no-deps --target DIR` and given as --libs-path DIR), all on the same
logits in every round, in an order that rotates every round. Each library's constraint produces the same (V,) bool
mask the sampler applies, so the comparison is of the mask computation and the grammar's advance. Logits are
random (scaled so the distributions are peaked); a generation that completes its JSON starts again (a fresh
constraint: its compile time is reported apart). One decode step of the default model at a short context is timed
in the same rounds, for the overhead's share of a token. Prints the median, mean and 90th percentile per step,
the ratio of medians to the unconstrained sample, and the mean extra time per token as a share of the mean
decode step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import numpy as np
import torch

from infinichat.engine.grammar import Grammar, GrammarConstraint
from infinichat.engine.sampling import Sampler, SamplingParams
from infinichat.engine.torch_engine import TorchEngine, set_threads
from infinichat.model.loader import load_model

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "email": {"type": "string", "maxLength": 40},
        "pets": {"type": "array", "items": {"enum": ["cat", "dog", "fish"]}, "maxItems": 4},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}, "zip": {"type": "integer"}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "email", "pets", "address"],
    "additionalProperties": False,
}


class _Bits:
    """A bitmask (one bit per token, int32 words) turned into the sampler's (V,) bool mask."""

    def __init__(self, n_tok: int, vocab: int) -> None:
        self.words = np.zeros((n_tok + 31) // 32, dtype=np.int32)  # (W,)
        self.mask = torch.zeros(vocab, dtype=torch.bool)  # (V,)

    def to_mask(self) -> torch.Tensor:
        flags = np.unpackbits(self.words.view(np.uint8), bitorder="little")
        n = min(self.mask.shape[0], flags.shape[0])
        self.mask[:n] = torch.from_numpy(flags[:n].view(np.bool_))
        return self.mask


class XGrammarConstraint:
    def __init__(self, compiled, xgr, n_tok: int, vocab: int) -> None:
        self.m = xgr.GrammarMatcher(compiled)
        self.bits = _Bits(n_tok, vocab)
        self.xbits = torch.from_numpy(self.bits.words).view(1, -1)  # (1, W) shares memory

    def allowed(self) -> torch.Tensor:
        self.m.fill_next_token_bitmask(self.xbits)
        return self.bits.to_mask()

    def accept(self, token: int) -> None:
        assert self.m.accept_token(token)

    @property
    def done(self) -> bool:
        return bool(self.m.is_terminated())


class OutlinesConstraint:
    def __init__(self, index, oc, n_tok: int, vocab: int) -> None:
        self.g = oc.Guide(index)
        self.bits = _Bits(n_tok, vocab)

    def allowed(self) -> torch.Tensor:
        self.g.write_mask_into(self.bits.words.ctypes.data, self.bits.words.shape[0], 4)
        return self.bits.to_mask()

    def accept(self, token: int) -> None:
        self.g.advance(token)

    @property
    def done(self) -> bool:
        return bool(self.g.is_finished())


def variant(k: int) -> str:
    """The schema with another bound: a schema no compile cache has seen."""
    return json.dumps(SCHEMA).replace('"maxLength": 24', f'"maxLength": {25 + k}')


def factories(tok, V: int) -> dict[str, tuple[Callable[[], object], float, Callable[[int], object]]]:
    """name -> (a new constraint, seconds its setup took (vocabulary preparation + first compile), a compile of
    schema variant k from scratch)."""
    out: dict[str, tuple[Callable[[], object], float, Callable[[int], object]]] = {}
    g = Grammar.json_schema(SCHEMA)
    t = time.perf_counter()
    GrammarConstraint(g, tok, V)
    out["llguidance"] = (
        lambda: GrammarConstraint(g, tok, V),
        time.perf_counter() - t,
        lambda k: GrammarConstraint(Grammar.json_schema(variant(k)), tok, V),
    )
    toks = [tok.token_bytes(i) for i in range(tok.vocab_size)]
    try:
        import xgrammar as xgr

        t = time.perf_counter()
        info = xgr.TokenizerInfo(toks, vocab_type=xgr.VocabType.RAW, vocab_size=V, stop_token_ids=sorted(tok.eos_ids))
        compiled = xgr.GrammarCompiler(info).compile_json_schema(
            json.dumps(SCHEMA), any_whitespace=False, separators=(", ", ": ")
        )
        nocache = xgr.GrammarCompiler(info, cache_enabled=False)
        out["xgrammar"] = (
            lambda: XGrammarConstraint(compiled, xgr, tok.vocab_size, V),
            time.perf_counter() - t,
            lambda k: XGrammarConstraint(
                nocache.compile_json_schema(variant(k), any_whitespace=False, separators=(", ", ": ")),
                xgr,
                tok.vocab_size,
                V,
            ),
        )
    except ImportError:
        print("xgrammar: not installed, skipped")
    try:
        import outlines_core as oc

        t = time.perf_counter()
        vmap: dict[bytes, list[int]] = {}
        for i, b in enumerate(toks):
            if i not in tok.eos_ids and not tok.is_special(i):
                vmap.setdefault(b, []).append(i)
        rx = oc.json_schema.build_regex_from_schema(json.dumps(SCHEMA), r"[ ]?")
        vocab = oc.Vocabulary(tok.eos_id, vmap)
        index = oc.Index(rx, vocab)
        out["outlines-core"] = (
            lambda: OutlinesConstraint(index, oc, tok.vocab_size, V),
            time.perf_counter() - t,
            lambda k: OutlinesConstraint(
                oc.Index(oc.json_schema.build_regex_from_schema(variant(k), r"[ ]?"), vocab), oc, tok.vocab_size, V
            ),
        )
    except ImportError:
        print("outlines-core: not installed, skipped")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--libs-path", default=None, help="a folder with more grammar libraries (pip --target)")
    args = ap.parse_args()
    if args.libs_path:
        sys.path.append(args.libs_path)
    set_threads(args.threads)
    m = load_model(None, "bfloat16")
    tok = m.tokenizer
    V = m.model.cfg.vocab_size
    engine = TorchEngine(m.model, tok.eos_ids)
    seq = engine.new_cache(capacity=args.steps + 64)
    engine.prefill(seq, tok.encode("The weather today is", add_bos=tok.add_bos))
    made = factories(tok, V)
    for name, (_, setup, _) in made.items():
        print(f"{name}: vocabulary + first compile {setup * 1e3:.1f} ms")
    compile_ms = {}
    for name, (_, _, compile_new) in made.items():
        ts = []
        for k in range(3):
            t = time.perf_counter()
            compile_new(k)
            ts.append(time.perf_counter() - t)
        compile_ms[name] = statistics.median(ts) * 1e3
    state: dict[str, tuple[Sampler, object, list[int]]] = {}

    def fresh(name: str, seed: int) -> None:
        c = made[name][0]()
        grammar = Grammar.json_schema(SCHEMA)
        params = SamplingParams(temperature=1.0, seed=seed, grammar=grammar, max_tokens=10**6)
        state[name] = (Sampler(params, V, constraint=c), c, [])  # type: ignore[arg-type]

    plain = Sampler(SamplingParams(temperature=1.0, seed=0, max_tokens=10**6), V)
    for i, name in enumerate(made):
        fresh(name, i)
    times: dict[str, list[float]] = {n: [] for n in ["unconstrained", *made, "decode step"]}
    outputs: dict[str, list[str]] = {n: [] for n in made}
    gen = torch.Generator().manual_seed(0)
    names = list(times)
    last = tok.encode(" sunny")[0]
    for r in range(args.steps):
        logits = torch.randn(V, generator=gen) * 4  # (V,)
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            t = time.perf_counter()
            if name == "unconstrained":
                plain.sample(logits, [])
            elif name == "decode step":
                engine.decode_one(seq, last)
            else:
                sampler, _, out = state[name]
                out.append(sampler.sample(logits, out).token)
            times[name].append(time.perf_counter() - t)
            if name in made and (state[name][1].done or state[name][2][-1] in tok.eos_ids):  # type: ignore[attr-defined]
                outputs[name].append(tok.decode([t for t in state[name][2] if t not in tok.eos_ids]))
                fresh(name, r)
    for name, texts in outputs.items():
        for text in texts:
            json.loads(text)  # every completed output is valid JSON
        print(f"{name}: {len(texts)} complete JSON objects, e.g. {texts[0][:100] if texts else '-'}")
    base = statistics.median(times["unconstrained"])
    print(f"\nmedian per token over {args.steps} rounds (threads {args.threads}, vocabulary {V}):")
    print("(compile: a new schema, no cache; p90: the 90th percentile per token)")
    mbase, mstep = statistics.mean(times["unconstrained"]), statistics.mean(times["decode step"])
    print(
        f"{'':16} {'ms':>8} {'mean ms':>8} {'p90 ms':>8} {'x sample':>9} {'+ms mean':>9} {'% decode':>9}"
        f" {'compile ms':>11}"
    )
    for name, ts in times.items():
        med, mean = statistics.median(ts), statistics.mean(ts)
        p90 = sorted(ts)[int(len(ts) * 0.9)]
        extra = (mean - mbase) * 1e3
        share = f"{(mean - mbase) / mstep * 100:8.1f}%" if name in made else ""
        cm = f"{compile_ms[name]:11.2f}" if name in compile_ms else ""
        print(
            f"{name:16} {med * 1e3:8.3f} {mean * 1e3:8.3f} {p90 * 1e3:8.3f} {med / base:9.2f} {extra:9.3f}"
            f" {share:>9} {cm}"
        )


if __name__ == "__main__":
    main()
