"""The GPU check of issue 16, as one script (under 8 minutes on an H100/H200-class card).

    python3 benchmarks/gpu_check.py            # on a CUDA device: the full check
    python3 benchmarks/gpu_check.py --smoke    # tiny shapes, any device (CPU included): exercises every code path

1. parity: our logits against transformers' on the same device and weights, float32 and bfloat16, for the
   default model and a random Llama-3-8B-shaped model with 2 layers (prefill of 64 tokens, then 8 decode steps;
   max abs difference over those logits, relative to the logits' scale).
2. speed: decode tok/s (batch 1, greedy, --decode tokens after a short prompt) and prefill tok/s (a
   --prefill-token prompt) against transformers `generate()` on the same device and weights, for the default
   model and a random 1B-shaped model (Llama 3.2 1B's shapes), bfloat16; ratios ours / transformers, with
   the issue's target (decode >= 2x).
3. OmniKV: a random 8B-shaped model with --omni-layers layers, at 32k and 128k tokens of context: decode tok/s
   of full attention, OmniKV (resident) and OmniKV with offload (the later layers' K/V in host memory, the
   picked rows moved per step), and brutal offload; peak GPU memory and the GPU bytes held by the KV cache.
   Targets: OmniKV >= 1.5x full attention's decode at 32k+, offload cuts the GPU KV memory by >= 60%.
4. the test suite's CUDA-marked tests (pytest -m cuda).

Each section prints its figures as it goes; a failing section is reported and the next one runs.
"""

from __future__ import annotations

import argparse
import gc
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from infinichat.engine.sampling import SamplingParams
from infinichat.engine.torch_engine import TorchEngine
from infinichat.model.config import ModelConfig
from infinichat.model.hf_loader import canonical_weights
from infinichat.model.loader import load_model
from infinichat.model.transformer import Transformer

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Shape:
    name: str
    vocab: int
    dim: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    theta: float = 500000.0


LLAMA3_8B = Shape("llama3-8b-shaped", 128256, 4096, 2, 32, 8, 14336)
LLAMA_1B = Shape("llama3.2-1b-shaped", 128256, 2048, 16, 32, 8, 8192)
TINY = Shape("tiny", 512, 128, 2, 4, 2, 256)


def log(msg: str) -> None:
    print(msg, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_hf(shape: Shape, dtype: torch.dtype, device: torch.device, context: int = 8192):
    """A transformers Llama of `shape` with random weights (initialised on `device`), eval mode."""
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.dim,
        intermediate_size=shape.ffn,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=context,
        rope_theta=shape.theta,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(cfg).to(dtype)
    return model.eval()


def ours_from_hf(hf, dtype: torch.dtype, device: torch.device, kernels: str = "auto") -> Transformer:
    """Our model on the same weights, through the strict HF loader path (config.json fields + state_dict)."""
    d = hf.config.to_dict()
    d["architectures"] = ["LlamaForCausalLM"]
    cfg = ModelConfig.from_hf(d, source=f"random {hf.config.model_type}")
    weights = canonical_weights(cfg, dict(hf.state_dict()), "random model")
    return Transformer(cfg, weights, dtype, device=device, kernels=kernels)


def hf_from_ours(model: Transformer, dtype: torch.dtype):
    """A transformers Llama holding our model's (dequantized) weights, on its device."""
    import transformers

    cfg = model.cfg
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
    )
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    sd = {"model.embed_tokens.weight": model.embed, "model.norm.weight": model.norm[0]}
    if not cfg.tie_embeddings:
        sd["lm_head.weight"] = model.lm_head
    for i, L in enumerate(model.layers):
        p = f"model.layers.{i}."
        wqkv, w_in = L["wqkv.weight"], L["w_in.weight"]
        if not isinstance(wqkv, torch.Tensor) or not isinstance(w_in, torch.Tensor):
            raise SystemExit("the transformers twin is built from an unquantized model only")
        wq, wk, wv = wqkv.split((q, kv, kv))
        gate, up = w_in.chunk(2)
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
    with torch.device(model.device):
        hf = transformers.LlamaForCausalLM(hf_cfg).to(dtype)
    hf.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=not cfg.tie_embeddings)
    return hf.eval()


# ---------------------------------------------------------------------------------------------- 1. parity
def parity(ours: Transformer, hf, vocab: int, device: torch.device, n: int = 64, steps: int = 8) -> float:
    """max |ours - transformers| / max |transformers| over a prefill and `steps` decode steps."""
    from transformers import DynamicCache

    ids = torch.randint(0, vocab, (n + steps,), generator=torch.Generator().manual_seed(1))
    engine = TorchEngine(ours)
    seq = engine.new_cache(n + steps + 1)
    got = [engine.prefill(seq, ids[:n].tolist(), all_logits=True).float()]
    with torch.inference_mode():
        cache = DynamicCache(config=hf.config)
        out = hf(ids[None, :n].to(device), past_key_values=cache, use_cache=True)
        want = [out.logits[0].float()]
        for t in range(n, n + steps):
            got.append(engine.decode_one(seq, int(ids[t])).float()[None])
            out = hf(ids[None, t : t + 1].to(device), past_key_values=out.past_key_values, use_cache=True)
            want.append(out.logits[0].float())
    g, w = torch.cat(got).to(device), torch.cat(want)
    return float((g - w).abs().max() / w.abs().max())


def section_parity(args, device: torch.device) -> None:
    for dtype in (torch.float32, torch.bfloat16):
        tol = 1e-4 if dtype == torch.float32 else 3e-2
        name = str(dtype).removeprefix("torch.")
        if not args.smoke:
            ours = load_model(None, dtype, device=device).model
            hf = hf_from_ours(ours, dtype)
            rel = parity(ours, hf, ours.cfg.vocab_size, device)
            log(f"  default model, {name}: max rel diff {rel:.2e} (tolerance {tol:g}) {'ok' if rel <= tol else 'FAIL'}")
            del ours, hf
            free(device)
        shape = TINY if args.smoke else LLAMA3_8B
        hf = random_hf(shape, dtype, device)
        ours = ours_from_hf(hf, dtype, device)
        rel = parity(ours, hf, shape.vocab, device)
        log(
            f"  {shape.name} x{shape.layers} layers, {name}: max rel diff {rel:.2e} (tolerance {tol:g}) "
            f"{'ok' if rel <= tol else 'FAIL'}"
        )
        del ours, hf
        free(device)


# ---------------------------------------------------------------------------------------------- 2. speed
def best_of(fn: Callable[[], float], repeats: int) -> float:
    return min(fn() for _ in range(repeats))


def ours_rates(model: Transformer, prompt: list[int], n: int, prefill_ids: list[int], repeats: int):
    engine, dev = TorchEngine(model, eos_ids=()), model.device

    def decode() -> float:
        seq = engine.new_cache(len(prompt) + n + 1)
        stamps = []
        for _ in engine.generate(seq, prompt, SamplingParams(temperature=0, max_tokens=n)):
            sync(dev)
            stamps.append(time.perf_counter())
        return (stamps[-1] - stamps[0]) / (n - 1)  # seconds per token after the first

    def prefill() -> float:
        seq = engine.new_cache(len(prefill_ids) + 1)
        sync(dev)
        t = time.perf_counter()
        engine.prefill(seq, prefill_ids)
        sync(dev)
        return time.perf_counter() - t

    decode(), prefill()  # warm-up
    return 1 / best_of(decode, repeats), len(prefill_ids) / best_of(prefill, repeats)


def hf_rates(hf, prompt: list[int], n: int, prefill_ids: list[int], repeats: int, device: torch.device):
    def run(ids: list[int], k: int) -> float:
        x = torch.tensor([ids], device=device)
        sync(device)
        t = time.perf_counter()
        with torch.inference_mode():
            hf.generate(x, max_new_tokens=k, min_new_tokens=k, do_sample=False, eos_token_id=None, pad_token_id=0)
        sync(device)
        return time.perf_counter() - t

    run(prompt, 4)  # warm-up
    decode = best_of(lambda: run(prompt, n) - run(prompt, 1), repeats) / (n - 1)
    prefill = best_of(lambda: run(prefill_ids, 1), repeats)
    return 1 / decode, len(prefill_ids) / prefill


def section_speed(args, device: torch.device) -> None:
    dtype = torch.bfloat16
    n, P = (8, 64) if args.smoke else (args.decode, args.prefill)
    g = torch.Generator().manual_seed(2)
    models: list[tuple[str, Callable[[], tuple[Transformer, object]]]] = []
    if not args.smoke:

        def default():
            ours = load_model(None, dtype, device=device).model
            return ours, hf_from_ours(ours, dtype)

        models.append(("default model", default))
    shape = TINY if args.smoke else LLAMA_1B

    def random_model():
        hf = random_hf(shape, dtype, device)
        return ours_from_hf(hf, dtype, device), hf

    models.append((f"{shape.name} (random)", random_model))
    log(f"  batch 1, bf16, decode {n} tokens after 16, prefill {P} tokens; best of {args.repeats}")
    log("  | model | ours decode tok/s | hf decode | ratio [>= 2] | ours prefill tok/s | hf prefill | ratio |")
    log("  |---|---:|---:|---:|---:|---:|---:|")
    for name, build in models:
        ours, hf = build()
        vocab = ours.cfg.vocab_size
        prompt = torch.randint(0, vocab, (16,), generator=g).tolist()
        prefill_ids = torch.randint(0, vocab, (P,), generator=g).tolist()
        od, op = ours_rates(ours, prompt, n, prefill_ids, args.repeats)
        hd, hp = hf_rates(hf, prompt, n, prefill_ids, args.repeats, device)
        log(f"  | {name} | {od:.1f} | {hd:.1f} | {od / hd:.2f}x | {op:.0f} | {hp:.0f} | {op / hp:.2f}x |")
        del ours, hf
        free(device)


# ---------------------------------------------------------------------------------------------- 3. OmniKV
def gpu_bytes(device: torch.device) -> int:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def kv_gpu_bytes(seq, device: torch.device) -> int:
    """Bytes of K/V this sequence holds on the compute device: its store if it lives there, else the policy's
    mirrors (kv/offload.py)."""
    store = seq.store
    if store.k_all.device == device:
        return store.nbytes
    mirrors = getattr(seq.policy, "_mirrors", None)
    return mirrors.nbytes if mirrors is not None else 0


def section_omnikv(args, device: torch.device) -> None:
    dtype = torch.bfloat16
    shape = TINY if args.smoke else Shape("llama3-8b-shaped", 128256, 4096, args.omni_layers, 32, 8, 14336)
    contexts = [256, 512] if args.smoke else [32768, 131072]
    hf = random_hf(shape, dtype, device, context=max(contexts) + 1024)
    model = ours_from_hf(hf, dtype, device)
    del hf
    free(device)
    engine = TorchEngine(model, eos_ids=())
    filters = (1,) if shape.layers > 2 else (0,)
    steps = 8 if args.smoke else args.omni_decode
    log(f"  {shape.name}, {shape.layers} layers, bf16, filter layers {filters}, k = 10%, {steps} decode steps")
    log("  | context | run | decode tok/s | vs full | peak GPU MiB | GPU KV MiB |")
    log("  |---:|---|---:|---:|---:|---:|")
    g = torch.Generator().manual_seed(3)
    for ctx in contexts:
        ids = torch.randint(0, shape.vocab, (ctx,), generator=g).tolist()
        runs: list[tuple[str, str, dict[str, Any]]] = [
            ("full", "full", {}),
            ("omnikv", "omnikv", {"filter_layers": filters, "k": 0.1}),
            ("omnikv offload", "omnikv", {"filter_layers": filters, "k": 0.1, "offload": True}),
            ("brutal offload", "brutal-offload", {"filter_layers": filters}),
        ]
        base = None
        for label, policy, params in runs:
            free(device)
            reset_peak(device)
            try:
                seq = engine.new_sequence(budget=ctx + steps + 8, capacity=ctx + steps + 8, policy=policy, **params)
                logits = engine.prefill(seq, ids)
                tok = int(logits.argmax())
                engine.decode_one(seq, tok)  # warm-up step
                sync(device)
                t = time.perf_counter()
                for _ in range(steps):
                    tok = int(engine.decode_one(seq, tok).argmax())
                sync(device)
                rate = steps / (time.perf_counter() - t)
                base = rate if label == "full" else base
                ratio = f"{rate / base:.2f}x" if base else "-"
                log(
                    f"  | {ctx} | {label} | {rate:.1f} | {ratio} | {gpu_bytes(device) / 2**20:.0f} | "
                    f"{kv_gpu_bytes(seq, device) / 2**20:.0f} |"
                )
                del seq
            except torch.OutOfMemoryError:
                log(f"  | {ctx} | {label} | out of GPU memory | | | |")


# ---------------------------------------------------------------------------------------------- 4. CUDA tests
def section_tests(args, device: torch.device) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-m",
            "cuda",
            "-rs",
            "tests/test_device.py",
            "tests/test_arch_models.py",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    tail = proc.stdout.strip().splitlines()[-8:]
    log("\n".join("  " + ln for ln in tail))
    log(f"  pytest exit code {proc.returncode}")


SECTIONS = {"parity": section_parity, "speed": section_speed, "omnikv": section_omnikv, "tests": section_tests}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on any device (CPU included): code paths only")
    ap.add_argument("--device", default=None, help="default: cuda (the full check), or cuda / cpu with --smoke")
    ap.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    ap.add_argument("--decode", type=int, default=64, help="decode tokens of the speed section (default 64)")
    ap.add_argument("--prefill", type=int, default=2048, help="prompt tokens of the speed section (default 2048)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--omni-layers", type=int, default=4, help="layers of the OmniKV model (default 4)")
    ap.add_argument("--omni-decode", type=int, default=32, help="decode steps per OmniKV run (default 32)")
    args = ap.parse_args()
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() or not args.smoke else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(
            f"gpu_check: --device {args.device}: torch sees no CUDA device; run with --smoke on a CPU", file=sys.stderr
        )
        return 2
    device = torch.device(args.device)
    torch.set_num_threads(min(4, torch.get_num_threads()))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    log(f"gpu_check on {device} ({name}), torch {torch.__version__}{', smoke shapes' if args.smoke else ''}")
    t0 = time.perf_counter()
    failed = []
    for sec in args.sections:
        log(f"\n[{sec}] ({time.perf_counter() - t0:.0f} s)")
        try:
            SECTIONS[sec](args, device)
        except Exception:  # report, go on with the next section
            failed.append(sec)
            log(traceback.format_exc())
        free(device)
    log(f"\ndone in {time.perf_counter() - t0:.0f} s; failed sections: {', '.join(failed) or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
