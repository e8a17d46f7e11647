"""A simple preallocated KV cache: one buffer for all layers, a view per layer."""

from __future__ import annotations

import torch

from infinichat.model.config import ModelConfig


class KVCache:
    """K/V buffers (n_layers, Hkv, capacity, hd); `length` slots are in use."""

    def __init__(self, cfg: ModelConfig, capacity: int, dtype: torch.dtype = torch.float32):
        shape = (cfg.n_layers, cfg.n_kv_heads, capacity, cfg.head_dim)
        self.k_all = torch.zeros(shape, dtype=dtype)  # (L, Hkv, C, hd)
        self.v_all = torch.zeros(shape, dtype=dtype)  # (L, Hkv, C, hd)
        self.k = list(self.k_all.unbind(0))
        self.v = list(self.v_all.unbind(0))
        self.capacity = capacity
        self.length = 0

    @property
    def nbytes(self) -> int:
        return self.k_all.nbytes + self.v_all.nbytes
