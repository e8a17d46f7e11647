"""Engine speed: ours (per dtype and --quant) against transformers' generate() and llama.cpp, in one run.

    python3 benchmarks/engine_speed.py --dtype bfloat16 --quant none int8 int4 --llamacpp

Measures, on the default model (or --model), with --threads threads (default 2):
  decode_short  tokens/s: --tokens greedy tokens after a short prompt
  decode_long   tokens/s: --tokens greedy tokens after a --long-context prompt (default 4000 tokens)
  prefill       tokens/s: a --prompt-tokens prompt (default 2000 tokens of Moby Dick), one call, first token
Decode rates exclude the prompt: ours and llama.cpp time the decode steps themselves; transformers'
generate() is timed as time(prompt + N tokens) - time(prompt + 1 token).
Leave OMP_WAIT_POLICY unset: PASSIVE (threads sleep at every barrier) made every implementation here 2-3x
slower, ours (one OpenMP barrier per op) and llama.cpp's OpenMP threads alike.
Every implementation is measured once per round, in turn (the order reversed every other round, so that no
side is always measured last while the host's speed drifts), for --repeats rounds (a busy machine slows all
of them alike); each rate is the best round. The ratios are given twice: best against best, and the median over
rounds of the ratio within a round (the steadier estimate on a host whose speed drifts).

Implementations:
  infinichat <dtype>[+<quant>]  ours, one per dtype and quantization;
  hf-dense <dtype>    transformers `generate()` on a Llama holding the same dequantized weights (dense matmuls);
  hf-gguf <dtype>     (--hf-gguf) transformers `from_pretrained(gguf_file=...)`: it keeps GGUF weights packed
                      and runs its own dequantizing kernels in float32 whatever the dtype;
  llama.cpp           (--llamacpp) plain llama-cpp-python on the same GGUF file: `Llama(path, n_threads,
                      n_ctx)`, prefill = one `eval` of the prompt, decode = `eval` of each greedy token.
Prints the rates and the ratios ours / reference, with the targets of issue 9. Needs transformers
(and llama-cpp-python for --llamacpp).
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import statistics
import time
from pathlib import Path

import torch
from bench_data import shared_moby

from infinichat.engine.sampling import SamplingParams
from infinichat.engine.torch_engine import TorchEngine, set_threads
from infinichat.model.loader import default_model_path, load_model

SHORT_PROMPT = "Once upon a time, in a small village by the sea,"
MOBY = shared_moby()
METRICS = ("decode_short", "decode_long", "prefill")
# issue 9's targets: (metric, reference, minimum ratio ours / reference)
TARGETS = [
    ("decode_short", "hf-dense", 2.5),
    ("decode_short", "llama.cpp", 0.9),
    ("decode_long", "llama.cpp", 0.9),
    ("prefill", "hf-dense", 1.0),
    ("prefill", "llama.cpp", 5.0),
]


def text_ids(tokenizer, n: int) -> list[int]:
    text = MOBY.read_text(encoding="utf-8")[: 60 * n] if MOBY.exists() else ("The sea was calm that day. " * n)
    ids = tokenizer.encode(text, parse_special=False)
    assert len(ids) >= n, "not enough text for the long prompt"
    return ids[:n]


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


class Ours:
    def __init__(self, model_path, dtype, quant: str):
        self.loaded = load_model(model_path, dtype, quant=quant)
        self.engine = TorchEngine(self.loaded.model, eos_ids=())  # no EOS: always generate N tokens

    def prefill_time(self, ids: list[int]) -> float:
        seq = self.engine.new_cache(len(ids) + 1)
        return timed(lambda: self.engine.prefill(seq, ids))

    def decode_rate(self, ids: list[int], n: int) -> float:
        seq = self.engine.new_cache(len(ids) + n + 1)
        stamps = [
            time.perf_counter() for _ in self.engine.generate(seq, ids, SamplingParams(temperature=0, max_tokens=n))
        ]
        return (n - 1) / (stamps[-1] - stamps[0])  # from the first sampled token (after the prompt) to the last


class LlamaCpp:
    def __init__(self, model_path: Path, threads: int, n_ctx: int):
        from llama_cpp import Llama

        self.llm = Llama(
            model_path=str(model_path),
            n_threads=threads,
            n_threads_batch=threads,
            n_ctx=n_ctx,
            n_batch=512,
            verbose=False,
        )

    def prefill_time(self, ids: list[int]) -> float:
        self.llm.reset()
        return timed(lambda: self.llm.eval(ids))

    def next_token(self) -> int:
        """Greedy choice from the last evaluated token's logits (`Llama.eval` keeps them only with
        logits_all, so they are read from the context, as `Llama.sample` does)."""
        import llama_cpp
        import numpy as np

        ptr = llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(ptr, shape=(self.llm.n_vocab(),))))

    def decode_rate(self, ids: list[int], n: int) -> float:
        llm = self.llm
        llm.reset()
        llm.eval(ids)
        t = time.perf_counter()
        for _ in range(n - 1):
            llm.eval([self.next_token()])
        return (n - 1) / (time.perf_counter() - t)


class Reference:
    """transformers generate(); decode = time(prompt + n) - time(prompt + 1)."""

    def __init__(self, model):
        self.model = model.eval()

    @classmethod
    def from_gguf(cls, model_path: Path, dtype) -> Reference:
        import transformers

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        return cls(
            transformers.AutoModelForCausalLM.from_pretrained(model_path.parent, gguf_file=model_path.name, dtype=dtype)
        )

    @classmethod
    def dense_from(cls, ours: Ours, dtype) -> Reference:
        """A transformers Llama with our (dequantized) weights, unfused back to its own names."""
        import transformers

        cfg, m = ours.loaded.cfg, ours.loaded.model
        if cfg.arch != "llama" or cfg.rope_scaling.kind != "none" or m.quant != "none":
            raise SystemExit("the dense reference is built from an unquantized plain Llama-family model only")
        hf_cfg = transformers.LlamaConfig(
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.dim,
            intermediate_size=cfg.ffn_dim,
            num_hidden_layers=cfg.n_layers,
            num_attention_heads=cfg.n_heads,
            num_key_value_heads=cfg.n_kv_heads,
            head_dim=cfg.head_dim,
            rms_norm_eps=cfg.norm_eps,
            rope_theta=cfg.rope_theta,
            max_position_embeddings=cfg.max_position,
            tie_word_embeddings=cfg.tie_embeddings,
            attention_bias=cfg.qkv_bias,
        )
        q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        sd = {"model.embed_tokens.weight": m.embed, "model.norm.weight": m.norm[0], "lm_head.weight": m.lm_head}
        for i, L in enumerate(m.layers):
            p = f"model.layers.{i}."
            wq, wk, wv = L["wqkv.weight"].split((q, kv, kv))
            gate, up = L["w_in.weight"].chunk(2)
            sd |= {
                p + "self_attn.q_proj.weight": wq,
                p + "self_attn.k_proj.weight": wk,
                p + "self_attn.v_proj.weight": wv,
                p + "self_attn.o_proj.weight": L["wo.weight"],
                p + "mlp.gate_proj.weight": gate,
                p + "mlp.up_proj.weight": up,
                p + "mlp.down_proj.weight": L["w_out.weight"],
                p + "input_layernorm.weight": L["attn_norm.weight"],
                p + "post_attention_layernorm.weight": L["ffn_norm.weight"],
            }
        model = transformers.LlamaForCausalLM(hf_cfg).to(dtype)
        model.load_state_dict({k: v.to(dtype).clone() for k, v in sd.items()}, strict=True)
        return cls(model)

    def last_logits(self, ids: list[int]) -> torch.Tensor:
        with torch.inference_mode():
            return self.model(torch.tensor([ids])).logits[0, -1].float()

    def run(self, ids: list[int], n: int) -> None:
        with torch.inference_mode():
            self.model.generate(
                torch.tensor([ids]),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )

    def prefill_time(self, ids: list[int]) -> float:
        return timed(lambda: self.run(ids, 1))

    def decode_rate(self, ids: list[int], n: int) -> float:
        return (n - 1) / (timed(lambda: self.run(ids, n)) - timed(lambda: self.run(ids, 1)))


def measure_round(impl, short_ids, long_ids, prompt_ids, n, metrics=METRICS) -> dict[str, float]:
    out = dict.fromkeys(METRICS, float("nan"))  # metrics not asked for stay NaN (printed as "-")
    if "decode_short" in metrics:
        out["decode_short"] = impl.decode_rate(short_ids, n)
    if "decode_long" in metrics:
        out["decode_long"] = impl.decode_rate(long_ids, n)
    if "prefill" in metrics:
        out["prefill"] = len(prompt_ids) / impl.prefill_time(prompt_ids)
    gc.collect()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="a .gguf file (default: the embedded model)")
    ap.add_argument("--dtype", nargs="+", default=["bfloat16"], choices=("float32", "bfloat16", "float16"))
    ap.add_argument(
        "--quant",
        nargs="+",
        default=["none"],
        choices=("none", "int8", "int4"),
        help="our weight formats to measure (int8/int4 with bfloat16 only)",
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=128, help="greedy tokens per decode measurement")
    ap.add_argument("--prompt-tokens", type=int, default=2000, help="prefill prompt length")
    ap.add_argument("--long-context", type=int, default=4000, help="prompt length before decode_long")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--metrics",
        nargs="+",
        default=list(METRICS),
        choices=METRICS,
        help="what to measure (default: all); e.g. --metrics prefill --repeats 7 for the prefill ratio alone",
    )
    ap.add_argument("--no-reference", action="store_true", help="no transformers reference")
    ap.add_argument("--hf-gguf", action="store_true", help="also transformers' own GGUF loading (slow)")
    ap.add_argument("--llamacpp", action="store_true", help="also plain llama-cpp-python on the same GGUF file")
    args = ap.parse_args()
    set_threads(args.threads)
    path = args.model or default_model_path()

    impls: dict[str, object] = {}
    for dname in args.dtype:
        dtype = getattr(torch, dname)
        for quant in args.quant:
            if quant != "none" and dtype != torch.bfloat16:
                continue
            impls[f"infinichat {dname}" + ("" if quant == "none" else f"+{quant}")] = Ours(path, dtype, quant)
    first = next(iter(impls.values()))
    tok = first.loaded.tokenizer
    short_ids = tok.encode(SHORT_PROMPT)
    long_ids = text_ids(tok, args.long_context)
    prompt_ids = (
        long_ids[: args.prompt_tokens] if args.prompt_tokens <= args.long_context else text_ids(tok, args.prompt_tokens)
    )
    if not args.no_reference:
        for dname in args.dtype:
            dtype = getattr(torch, dname)
            dense_src = impls.get(f"infinichat {dname}") or Ours(path, dtype, "none")
            ref = impls[f"hf-dense {dname}"] = Reference.dense_from(dense_src, dtype)
            logits = ref.last_logits(short_ids)  # the dense reference really holds our weights
            ours = dense_src.engine.prefill(dense_src.engine.new_cache(64), short_ids)
            print(
                f"{dname}: hf-dense vs ours, last-token logits max abs diff "
                f"{(logits - ours).abs().max().item():.2e} (of max {logits.abs().max().item():.1f})"
            )
            if args.hf_gguf:
                impls[f"hf-gguf {dname}"] = Reference.from_gguf(path, dtype)
    if args.llamacpp:
        impls["llama.cpp"] = LlamaCpp(path, args.threads, max(args.long_context, args.prompt_tokens) + args.tokens + 64)

    for impl in impls.values():  # warm-up
        impl.decode_rate(short_ids, 4)
    best = {name: dict.fromkeys(METRICS, float("nan")) for name in impls}
    rounds: dict[str, list[dict[str, float]]] = {name: [] for name in impls}
    for r in range(args.repeats):
        order = list(impls.items()) if r % 2 == 0 else list(impls.items())[::-1]  # no side always measured last
        for name, impl in order:
            res = measure_round(impl, short_ids, long_ids, prompt_ids, args.tokens, args.metrics)
            rounds[name].append(res)
            best[name] = {m: res[m] if math.isnan(best[name][m]) else max(best[name][m], res[m]) for m in METRICS}
            print(f"round {r + 1}: {name:28s} " + "  ".join(f"{m} {res[m]:7.1f}" for m in METRICS), flush=True)

    load = os.getloadavg()
    print(
        f"\nmodel {path.name}, {args.threads} threads, torch {torch.__version__}, decode {args.tokens} tokens "
        f"(long: after {args.long_context}), prefill {len(prompt_ids)} tokens, best of {args.repeats} rounds, "
        f"load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}\n"
    )
    print(
        f"| implementation | decode short tok/s | decode @{args.long_context} tok/s | prefill {len(prompt_ids)} tok/s |"
    )
    print("|---|---:|---:|---:|")
    for name, b in best.items():
        print(f"| {name} | " + " | ".join("-" if math.isnan(b[m]) else f"{b[m]:.1f}" for m in METRICS) + " |")

    refs = {
        "hf-dense": next((n for n in best if n.startswith("hf-dense bfloat16")), None)
        or next((n for n in best if n.startswith("hf-dense")), None),
        "llama.cpp": "llama.cpp" if "llama.cpp" in best else None,
    }
    ours_names = [n for n in best if n.startswith("infinichat")]
    for how in ("best", "paired"):
        if how == "best":
            print(
                f"\nratios ours / reference, best of the rounds on each side (hf-dense = {refs['hf-dense']}); "
                "target in brackets, * = met\n"
            )
        else:
            print(
                "\nthe same, as the median over rounds of each round's ratio (both sides measured in the same round, "
                "a minute or two apart: the host's slow drifts in speed cancel better)\n"
            )
        print("| implementation | " + " | ".join(f"{m} / {r} [>= {t}]" for m, r, t in TARGETS) + " |")
        print("|---|" + "---:|" * len(TARGETS))
        for name in ours_names:
            cells = []
            for m, r, t in TARGETS:
                ref = refs[r]
                if ref is None or m not in args.metrics:
                    cells.append("-")
                    continue
                if how == "best":
                    ratio = best[name][m] / best[ref][m]
                else:
                    ratio = statistics.median(a[m] / b[m] for a, b in zip(rounds[name], rounds[ref], strict=True))
                cells.append(f"{ratio:.2f}x{' *' if ratio >= t else ''}")
            print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
