"""Rotary position embeddings (half-split / GPT-NeoX layout) with linear, dynamic-NTK, llama3 and LongRoPE
scaling, and a second, local table for the windowed layers of models that rotate them differently (Gemma 3).

Positions are explicit: cos/sin are computed for the positions of the tokens being evaluated, so the KV
store can re-rotate keys after a removal (R(p - d) = R(-d) R(p)) with the same frequencies.
"""

from __future__ import annotations

import math

import torch

from infinichat.model.config import ModelConfig, RopeScaling


def base_inv_freq(cfg: ModelConfig, theta: float | None = None) -> torch.Tensor:
    d = cfg.rot_dim
    theta = cfg.rope_theta if theta is None else theta
    return 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))  # (d/2,)


def inv_freq_for(cfg: ModelConfig, seq_len: int = 0) -> torch.Tensor:
    """Inverse frequencies (rot_dim/2,) float32. `seq_len` (max position + 1) matters only for dynamic NTK."""
    rs = cfg.rope_scaling
    if rs.kind == "none":
        return base_inv_freq(cfg)
    if rs.kind == "linear":
        return base_inv_freq(cfg) / rs.factor
    if rs.kind == "dynamic":
        n = max(seq_len, cfg.max_position)
        d = cfg.rot_dim
        theta = cfg.rope_theta * ((rs.factor * n / cfg.max_position) - (rs.factor - 1)) ** (d / (d - 2))
        return base_inv_freq(cfg, theta)
    if rs.kind == "longrope":  # Phi-3: the long divisors once the call reaches past the original context
        factors = rs.long_factor if seq_len > rs.original_max_position else rs.short_factor
        if len(factors) != cfg.rot_dim // 2:
            raise ValueError(f"longrope has {len(factors)} factors for {cfg.rot_dim // 2} frequencies")
        d = cfg.rot_dim
        exps = torch.arange(0, d, 2, dtype=torch.int64).float() / d
        return 1.0 / (torch.tensor(factors, dtype=torch.float32) * cfg.rope_theta**exps)
    if rs.kind == "llama3":
        inv = base_inv_freq(cfg)
        low_wavelen = rs.original_max_position / rs.low_freq_factor
        high_wavelen = rs.original_max_position / rs.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / rs.factor, inv)
        smooth = (rs.original_max_position / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)
        blended = (1 - smooth) * scaled / rs.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, blended, scaled)
    raise ValueError(f"unknown rope scaling {rs.kind!r}")


class Rope:
    """Holds the static inverse frequencies; gives (cos, sin) for explicit positions.

    Without dynamic NTK the angles depend on the position only, so cos/sin come from a table computed
    once per dtype (grown on demand) and indexed by position: the same float32 arithmetic, element for
    element, as computing them per call, without the half-dozen small ops per forward call."""

    def __init__(self, cfg: ModelConfig, freq_factors: torch.Tensor | None = None, device: torch.device | str = "cpu"):
        """`device`: where cos_sin's tables live (the model's device); the inverse frequencies stay on the CPU.
        A config with `rope_local_theta` gets `local`, the Rope of its windowed layers (base rope_local_theta,
        unscaled); `layer_rope(i)` is layer i's."""
        self.cfg = cfg
        self.device = torch.device(device)
        rs = cfg.rope_scaling
        # the frequencies depend on the call's length: dynamic NTK, LongRoPE (short / long divisors)
        self.dynamic = rs.kind == "dynamic" or rs.kind == "longrope"
        self.mscale = rs.attention_factor if rs.kind == "longrope" else 1.0  # cos and sin are multiplied by it
        self.local: Rope | None = None
        if cfg.rope_local_theta:
            local_cfg = cfg.with_(rope_theta=cfg.rope_local_theta, rope_scaling=RopeScaling(), rope_local_theta=0.0)
            self.local = Rope(local_cfg, device=device)
        inv = inv_freq_for(cfg)
        if freq_factors is not None:  # GGUF `rope_freqs.weight` (Llama 3.1 stores its scaling this way)
            inv = inv / freq_factors.float()
        self.inv_freq = inv.cpu()
        self._tables: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}  # dtype -> cos, sin (n, rot)

    def layer_rope(self, i: int) -> Rope:
        """The Rope layer i rotates with: `local` for Gemma 3's windowed layers, else this one."""
        return self.local if self.local is not None and self.cfg.local_rope(i) else self

    def _compute(self, positions: torch.Tensor, inv: torch.Tensor, dtype: torch.dtype):
        freqs = positions.cpu().float()[:, None] * inv[None, :]  # (T, d/2), on the CPU
        emb = torch.cat((freqs, freqs), dim=-1)  # (T, d)
        cos, sin = emb.cos(), emb.sin()
        if self.mscale != 1.0:
            cos, sin = cos * self.mscale, sin * self.mscale
        return cos.to(self.device, dtype), sin.to(self.device, dtype)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (T,) int (on the CPU, as the KV store keeps them) -> cos, sin (T, rot_dim) in `dtype`
        (computed in float32) on the rope's device."""
        if self.dynamic:
            return self._compute(positions, inv_freq_for(self.cfg, int(positions.max()) + 1), dtype)
        if positions.shape[0] == 0:  # e.g. re-rotating an empty span
            return self._compute(positions, self.inv_freq, dtype)
        lo, hi = (int(positions[0]),) * 2 if positions.shape[0] == 1 else map(int, torch.aminmax(positions))
        if lo < 0:  # negative positions (a shift reference, tests): computed directly
            return self._compute(positions, self.inv_freq, dtype)
        table = self._tables.get(dtype)
        if table is None or table[0].shape[0] <= hi:
            n = max(hi + 1, 2 * table[0].shape[0] if table else 1024)
            table = self._compute(torch.arange(n), self.inv_freq, dtype)
            self._tables[dtype] = table
        if positions.shape[0] == 1:  # decode: a view, no gather
            return table[0][hi : hi + 1], table[1][hi : hi + 1]
        idx = positions.to(self.device)
        return table[0][idx], table[1][idx]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """(..., rot) -> the sin with its first half negated, for `rotate`."""
    h = sin.shape[-1] // 2
    return torch.cat((-sin[..., :h], sin[..., h:]), dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """Full-width RoPE, bit for bit `apply_rope(x, cos, sin)` with sin_signed = signed_sin(sin): rotate_half(x) * sin
    is roll(x) * sin_signed (the sign moves between exact factors), and one roll is cheaper than negate + cat."""
    return x * cos + torch.roll(x, x.shape[-1] // 2, dims=-1) * sin_signed


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (..., T, head_dim); cos/sin (T, rot_dim). Rotates the first rot_dim dims (partial rotary)."""
    d = cos.shape[-1]
    if d == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    rot, rest = x[..., :d], x[..., d:]
    return torch.cat((rot * cos + rotate_half(rot) * sin, rest), dim=-1)
