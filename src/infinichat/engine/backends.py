"""Building an engine for a `--backend` name: the one place the server and the CLI construct engines."""

from __future__ import annotations

from pathlib import Path

from infinichat.errors import InfinichatError

BACKENDS = ("torch", "llamacpp")


def load_engine(backend: str, model: str | None, dtype: str, threads: int = 0, cache_dir: str | None = None,
                show_progress: bool = False):
    """(engine, tokenizer, model id, model name). `model` None = the embedded default model."""
    if backend == "llamacpp":
        raise InfinichatError("--backend llamacpp is not available in this build; accepted: torch")
    if backend != "torch":
        raise InfinichatError(f"unknown backend {backend!r}; accepted: {', '.join(BACKENDS)}")
    from infinichat.engine.torch_engine import TorchEngine, set_threads
    from infinichat.model.loader import load_model

    if threads < 0:
        raise InfinichatError(f"--threads must be a positive number, got {threads}")
    set_threads(threads or None)
    loaded = load_model(model, dtype, Path(cache_dir) if cache_dir else None, show_progress=show_progress)
    return TorchEngine(loaded.model, loaded.tokenizer.eos_ids), loaded.tokenizer, loaded.file_hash, loaded.name
