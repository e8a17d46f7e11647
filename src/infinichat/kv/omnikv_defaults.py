"""Default OmniKV filter layers per model, from `infinichat eval filter-layers` (measured, not guessed).

A model is matched by its shape (architecture, layers, width, heads, KV heads, vocabulary). Any other
model gets the measured layers' relative depths, scaled to its number of layers.
"""

from __future__ import annotations

from infinichat.model.config import ModelConfig

# SmolLM2-135M-Instruct (llama, 30 layers, dim 576, 9 heads / 3 KV heads, vocab 49152), measured with
#   infinichat eval filter-layers --text moby_dick.txt          (float32, 4096 tokens, 64 decode queries,
#                                                               4 sinks, 3 filter layers, first <= 6)
# Mean share of the served layers' attention mass on the picks (each later layer served by the nearest
# filter layer before it), best set per first filter layer:
#   start of the text, k=0.1 (403 tokens): first 0: 0.919 [0,2,14]  1: 0.926 [1,2,14]  2: 0.932 [2,14,24]
#                                          3: 0.935 [3,14,24]  ...  6: 0.935 [6,14,24]   -> [2, 14, 24]
#       k=0.05: [2,14,24] 0.901;  k=0.2: [2,14,28] 0.960 ([2,14,24]: 0.960)
#   a slice from the middle of the text (60k characters), k=0.1: [3,14,24] 0.924 ([2,14,24]: 0.921);
#       k=0.05: [2,3,12] 0.891 ([2,14,24]: 0.879);  k=0.2: [2,14,24] 0.951
# Layers 0-1 are poor filters (their picks cover 0.77-0.83 of the later layers' attention at k=0.1, every
# layer from 2 on 0.88-0.94); layers 14 and 24 come out of every run. Chosen: (2, 14, 24).
SMOLLM2_135M = ("llama", 30, 576, 9, 3, 49152)
MEASURED: dict[tuple, tuple[int, ...]] = {
    SMOLLM2_135M: (2, 14, 24),
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
