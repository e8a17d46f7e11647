"""A model's display label: the file's own name when it is a real name ("SmolLM2-135M-Instruct.Q4_1.gguf" ->
"SmolLM2 135M Instruct"), else the GGUF `general.name`. The metadata name is often a machine-made title
("Smollm2 135M 8k Lc100K Mix1 Ep2") while the file name is what people call the model."""

from __future__ import annotations

import re
from pathlib import Path

_QUANT = re.compile(r"[._-](?:i?q\d[\w]*|bf16|fp16|f16|f32|fp32|int[48])$", re.IGNORECASE)
_GENERIC = re.compile(r"^(?:ggml-)?model(?:[._-].*)?$|^unnamed$|^weights?$", re.IGNORECASE)


def shown(path: str | Path) -> str:
    """A file name as text: bytes of a name that are not UTF-8 (kept by Python as lone surrogates, which no JSON
    answer can encode) become U+FFFD."""
    return str(path).encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def model_label(path: str | Path, meta_name: str | None = None) -> str:
    p = Path(shown(path))
    stem = p.name[: -len(p.suffix)] if p.suffix.lower() == ".gguf" else p.name
    while True:
        cut = _QUANT.sub("", stem)
        if cut == stem:
            break
        stem = cut
    if stem and re.search(r"[A-Za-z]", stem) and not _GENERIC.match(stem):
        return " ".join(re.split(r"[-_ ]+", stem)).strip()
    return (meta_name or "").strip() or p.name


def served_id(label: str) -> str:
    """The model id the API serves (`/v1/models`, the `model` field of responses): the label lower-cased, every
    run of characters other than letters, digits, '.' and '_' made one '-' ("SmolLM2 135M Instruct" ->
    "smollm2-135m-instruct"). It depends on the file name (or `general.name`) only, so it stays stable."""
    slug = re.sub(r"[^a-z0-9._]+", "-", label.lower()).strip("-.")
    return slug or "model"
