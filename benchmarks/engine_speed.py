"""Engine speed: ours against transformers' generate() on the same weights and dtype, in one run.

    python benchmarks/engine_speed.py [--dtype bfloat16 float32] [--threads 2] [--repeats 3]

Measures, on the default model (or --model):
  decode tokens/s: 128 greedy tokens after a short prompt, and after a 2000-token prompt
  prefill tokens/s: a 2000-token prompt
Decode time = time(prompt + N tokens) - time(prompt + 1 token), so the prefill is not counted in it.
Each figure is the best of --repeats runs, taken in the same process one after the other.

Two references, both transformers `generate()` with the same dtype:
  hf-dense: a transformers Llama model holding the same dequantized weights as ours (dense matmuls);
  hf-gguf:  `from_pretrained(gguf_file=...)`; transformers >= 5.2x keeps GGUF weights packed and runs
            its own dequantizing kernels in float32 whatever the dtype asked for.
Prints a table with the ratios ours / reference. Needs `pip install transformers accelerate`.
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
    def __init__(self, model):
        self.model = model.eval()

    @classmethod
    def from_gguf(cls, model_path: Path, dtype) -> "Reference":
        import transformers

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        return cls(transformers.AutoModelForCausalLM.from_pretrained(
            model_path.parent, gguf_file=model_path.name, dtype=dtype
        ))

    @classmethod
    def dense_from(cls, ours: Ours, dtype) -> "Reference":
        """A transformers Llama with our (dequantized) weights, unfused back to its own names."""
        import transformers

        cfg, m = ours.loaded.cfg, ours.loaded.model
        if cfg.arch != "llama" or cfg.rope_scaling.kind != "none":
            raise SystemExit("the dense reference is built for plain Llama-family models only")
        hf_cfg = transformers.LlamaConfig(
            vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim,
            num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
            head_dim=cfg.head_dim, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
            max_position_embeddings=cfg.max_position, tie_word_embeddings=cfg.tie_embeddings,
            attention_bias=cfg.qkv_bias,
        )
        q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        sd = {"model.embed_tokens.weight": m.embed, "model.norm.weight": m.norm[0], "lm_head.weight": m.lm_head}
        for i, L in enumerate(m.layers):
            p = f"model.layers.{i}."
            wq, wk, wv = L["wqkv.weight"].split((q, kv, kv))
            gate, up = L["w_in.weight"].chunk(2)
            sd |= {
                p + "self_attn.q_proj.weight": wq, p + "self_attn.k_proj.weight": wk,
                p + "self_attn.v_proj.weight": wv, p + "self_attn.o_proj.weight": L["wo.weight"],
                p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up,
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
            impls["hf-dense"] = Reference.dense_from(ours, dtype)
            impls["hf-gguf"] = Reference.from_gguf(path, dtype)
        for impl in impls.values():  # warm-up
            impl.run(short_ids, 4)
        if "hf-dense" in impls:  # the dense reference really holds our weights
            ref_logits = impls["hf-dense"].last_logits(short_ids)
            our_logits = ours.engine.prefill(ours.engine.new_cache(64), short_ids)
            print(f"{dname}: hf-dense vs ours, last-token logits max abs diff "
                  f"{(ref_logits - our_logits).abs().max().item():.2e} (of max {ref_logits.abs().max().item():.1f})")
        res = {name: measure(impl, short_ids, long_ids, args.tokens, args.repeats) for name, impl in impls.items()}
        rows.append((dname, res))

    print(f"\nmodel {path.name}, {args.threads} threads, torch {torch.__version__}, "
          f"decode {args.tokens} tokens, long prompt {args.prompt_tokens} tokens, best of {args.repeats}\n")
    refs = [name for name in rows[0][1] if name != "infinichat"]
    print("| dtype | metric | infinichat tok/s | " + " | ".join(f"{r} tok/s | ours/{r}" for r in refs) + " |")
    print("|---|---|---:|" + "---:|---:|" * len(refs))
    for dname, res in rows:
        for metric in ("decode_short", "decode_2k", "prefill_2k"):
            ours = res["infinichat"][metric]
            cells = [f"{res[r][metric]:.1f} | {ours / res[r][metric]:.2f}x" for r in refs]
            print(f"| {dname} | {metric} | {ours:.1f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
