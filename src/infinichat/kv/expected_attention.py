"""Expected Attention: keep the tokens that future queries are expected to attend to. No question needed.

Devoto et al. 2025, "Expected Attention: KV Cache Compression by Estimating Attention from Future Queries
Distribution", https://arxiv.org/abs/2510.00636 (kvpress's `ExpectedAttentionPress`)

The queries of the next tokens are unknown, but their distribution is not: per layer and head, the last
`window` queries of the prompt (un-rotated to their pre-RoPE form) give a mean and a covariance. A future
query at position p is that vector rotated by RoPE to p; averaged over the next `n_future` positions the
rotation is one linear map R, so the future query is ~ N(R mu, R Sigma R^T). For a Gaussian query the
expected exp(q.k / sqrt(d)) is exp(mu'.k / sqrt(d) + k^T Sigma' k / (2 d)): softmax-normalized over the
cached keys this is the expected attention each key receives; times the value's norm (its contribution
to the output) it is the key's score. Heads of a KV group are averaged, KV heads and layers (all by
default) summed into one score per token (the cache here is one token set for all layers and heads).

Phase "prefill", as SnapKV: a prompt streams into the cache past the budget; every prompt forward call
re-scores the slots before its last `window` queries (the window itself is kept); after the prompt the
lowest-scored tokens go down to the budget. No attention weights are computed, only the queries are read.
While decoding, over budget, the lowest-scored token of the last compression goes, then the oldest new one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from infinichat.errors import InfinichatError
from infinichat.kv.scored import ScoredPolicy
from infinichat.kv.store import torch_store
from infinichat.model.attention import AttentionRequest
from infinichat.model.rope import rotate_half

if TYPE_CHECKING:
    from infinichat.kv.sequence import KVSequence


@dataclass
class ExpectedAttentionPolicy(ScoredPolicy):
    name: ClassVar[str] = "expected_attention"
    phase: ClassVar[str] = "prefill"
    new_slot_score: ClassVar[float] = float("inf")

    window: int = 64  # the recent queries whose statistics stand for the future ones
    n_future: int = 512  # the future positions the expected rotation averages over
    covariance: bool = True
    vnorm: bool = True
    chunk: int = 1024

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.window < 2 or self.n_future < 1:
            raise InfinichatError(
                f"expected_attention: window must be >= 2 (a covariance needs two queries) and n_future >= 1, "
                f"got {self.window} and {self.n_future}"
            )

    @property
    def prompt_tail(self) -> int:
        return self.window

    def prefill_chunk(self, seq: KVSequence) -> int:
        return self.chunk  # the prompt may grow past the budget; the engine compresses after it

    def attention_request(self, seq: KVSequence, start: int, n: int, stage: str) -> AttentionRequest | None:
        end = start + n
        seq.scores[start:end] = self.new_slot_score
        if stage == "decode":
            return None
        rows = min(self.window, n)
        n_scored = end - rows  # the slots before the window; the window itself stays (+inf)
        if rows < 2 or n_scored == 0:
            return None
        seq.scores[:n_scored] = 0.0
        positions = seq.store.next_positions(n)[n - rows :]  # (rows,) the window's positions
        last = int(positions[-1])
        future = torch.arange(last + 1, last + 1 + self.n_future)  # (F,)
        layers = self.layer_set(seq)

        def queries(layer: int, q: torch.Tensor, q_start: int) -> None:
            if layer in layers:
                seq.scores[:n_scored] += self.layer_scores(seq, layer, q[:, -rows:], positions, future, end)[:n_scored]

        return AttentionRequest(queries=queries)

    def layer_scores(
        self, seq: KVSequence, layer: int, q: torch.Tensor, positions: torch.Tensor, future: torch.Tensor, end: int
    ) -> torch.Tensor:
        """One layer's score of slots [0, end) (end,): the expected attention of a future query, from the
        window's post-RoPE queries q (H, w, hd) at `positions` (w,), times the values' norms, summed over
        KV heads."""
        store = torch_store(seq.store, self.name)
        inv_freq = store.rope.inv_freq
        H, w, hd = q.shape
        raw = rotate(q.float(), -positions, inv_freq)  # (H, w, hd): pre-RoPE queries
        R = mean_rotation(future, inv_freq, hd).to(raw.device)  # (hd, hd)
        mu = raw.mean(dim=1) @ R.T  # (H, hd)
        keys = store.k[layer][:, :end].float()  # (Hkv, S, hd)
        Hkv, S, _ = keys.shape
        G = H // Hkv
        kq = keys.repeat_interleave(G, dim=0)  # (H, S, hd)
        scale = 1.0 / math.sqrt(hd)
        logits = torch.einsum("hsd,hd->hs", kq, mu) * scale  # (H, S)
        if self.covariance:
            centred = raw - raw.mean(dim=1, keepdim=True)  # (H, w, hd)
            cov = centred.transpose(1, 2) @ centred / (w - 1)  # (H, hd, hd)
            cov = R @ cov @ R.T  # (H, hd, hd)
            logits += torch.einsum("hsd,hde,hse->hs", kq, cov, kq) * (0.5 * scale * scale)
        probs = torch.softmax(logits, dim=-1).view(Hkv, G, S).mean(dim=1)  # (Hkv, S)
        if self.vnorm:
            probs = probs * store.v[layer][:, :end].float().norm(dim=-1)  # (Hkv, S)
        return probs.sum(dim=0).to(seq.scores.device)  # (S,)


def rotate(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """RoPE (half-split layout) of x (..., w, hd) by `positions` (w,) (negative: un-rotate); dims past the
    rotary ones are left alone."""
    angles = positions.double()[:, None] * inv_freq.double()[None, :]  # (w, rot/2)
    emb = torch.cat((angles, angles), dim=-1)  # (w, rot)
    cos, sin = emb.cos().to(x), emb.sin().to(x)
    rot = cos.shape[-1]
    out = x.clone()
    out[..., :rot] = x[..., :rot] * cos + rotate_half(x[..., :rot]) * sin
    return out


def mean_rotation(positions: torch.Tensor, inv_freq: torch.Tensor, hd: int) -> torch.Tensor:
    """The RoPE rotation matrix averaged over `positions` (F,): (hd, hd) float32, R @ x == mean_p rotate(x, p)."""
    angles = positions.double()[:, None] * inv_freq.double()[None, :]  # (F, rot/2)
    c, s = angles.cos().mean(dim=0), angles.sin().mean(dim=0)  # (rot/2,)
    half = c.shape[0]
    i = torch.arange(half)
    R = torch.eye(hd, dtype=torch.float64)
    R[i, i], R[i + half, i + half] = c, c
    R[i, i + half], R[i + half, i] = -s, s
    return R.float()
