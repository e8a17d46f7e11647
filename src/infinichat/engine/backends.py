"""Building an engine for a `--backend` name: the one place the server and the CLI construct engines."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from infinichat.errors import InfinichatError

if TYPE_CHECKING:
    import torch

BACKENDS = ("torch", "llamacpp")


def check_device_options(backend: str, device: str, compile: bool = False) -> torch.device:
    """`--device` and `--compile` of a command that runs a model, checked before anything loads (every command
    shares these lines): the torch.device (auto resolved), or one clear error: a device this machine lacks
    (DeviceError), a device or --compile for a backend that does not take it, --compile off CUDA."""
    from infinichat.kernels import resolve_device

    where = resolve_device(device)  # --device cuda without CUDA: one clear line
    if backend == "llamacpp" and device not in ("auto", "cpu"):
        raise InfinichatError(f"--device {device} applies to the torch backend; llama.cpp runs on the CPU here")
    if compile and where.type != "cuda":
        raise InfinichatError(
            f"--compile captures the CUDA decode step (CUDA graphs); on {where} the cpu-native kernels' own "
            "decode step runs: leave --compile out"
        )
    if compile and backend != "torch":
        raise InfinichatError("--compile applies to the torch backend")
    return where


def load_engine(
    backend: str,
    model: str | None,
    dtype: str,
    threads: int = 0,
    cache_dir: str | None = None,
    show_progress: bool = False,
    quant: str = "none",
    n_ctx: int | None = None,
    device: str = "auto",
    kernels: str = "auto",
    kv_dtype: str = "auto",
    on_progress=None,
    compile: bool = False,
):
    """(engine, tokenizer, model id, model name). `model` None = the embedded default model. The model id
    (the file's SHA-256) keys caches of evaluated KV, together with the engine type and KV dtype.
    llamacpp: a context of `n_ctx` tokens (default: the trained context). torch: the model, its KV stores
    and its sampling on `device` (auto, cpu, cuda, cuda:N; auto = CUDA when torch sees one), its KV stores in
    `kv_dtype` (auto = the model's dtype, bf16, f16, f32, int8, int4, int8h, int4h: kv/quantized.py).
    `on_progress(stage, done, total)`: the loading stages (model/loader.py). `compile` (--compile): one-token
    steps through the static-shape step under torch.compile (CUDA graphs on CUDA: kernels/static_step.py)."""
    if backend not in BACKENDS:
        raise InfinichatError(f"unknown backend {backend!r}; accepted: {', '.join(BACKENDS)}")
    if not isinstance(threads, int) or threads < 0:
        raise InfinichatError(f"--threads must be a positive number, got {threads}")
    from infinichat.engine.threads import starting_count
    from infinichat.engine.torch_engine import TorchEngine, configure_threads, physical_cores, set_threads
    from infinichat.kv.quantized import check_kv_dtype
    from infinichat.model.loader import default_cache_dir, file_sha256, load_model

    cache = Path(cache_dir) if cache_dir else None
    check_kv_dtype(kv_dtype)
    where = check_device_options(backend, device, compile)  # first: one clear line before any loading
    if backend == "llamacpp":
        if quant != "none":
            raise InfinichatError("--quant applies to the torch backend; llama.cpp runs the GGUF file's own types")
        if kv_dtype != "auto":
            raise InfinichatError(
                f"--kv-dtype {kv_dtype} applies to the torch backend; llama.cpp keeps its own KV types"
            )
        from infinichat.engine.llamacpp import gguf_path, load_llamacpp

        set_threads(1)  # torch only samples here; its threads would compete with llama.cpp's for the cores
        tok, name, engine = load_llamacpp(model, n_ctx=n_ctx, threads=threads or None)
        return engine, tok, file_sha256(gguf_path(model), cache or default_cache_dir()), name
    start = None if threads else starting_count(physical_cores())  # the default: what the idle CPUs allow
    set_threads(threads or start)  # loading (conversion, quantization, packing) runs at that count too
    loaded = load_model(
        model,
        dtype,
        cache,
        show_progress=show_progress,
        quant=quant,
        device=where,
        kernels=kernels,
        on_progress=on_progress,
        step="compiled" if compile else "layers",
    )
    model_id = loaded.file_hash if quant == "none" else f"{loaded.file_hash}:{quant}"
    torch_engine = TorchEngine(loaded.model, loaded.tokenizer.eos_ids, kv_dtype=kv_dtype)
    configure_threads(torch_engine, threads or None, start)  # the default: the decode steps' thread count adapts
    return torch_engine, loaded.tokenizer, model_id, loaded.name
