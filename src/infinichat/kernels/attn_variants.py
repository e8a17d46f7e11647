"""Attention beyond plain causal softmax(QK^T * scale) V, per layer: sliding windows, score soft-capping and
learned attention sinks. Kept apart from the plain path so that path stays what it was (SDPA, the native
kernels); the kernel sets route a layer here only when its `AttnVariant` is not plain.

- window W (Gemma 2/3 windowed layers, Mistral, Phi-3): the query at slot i sees slots (i - W, i]. Slots, not
  positions: the KV store keeps positions contiguous (a removal shifts the later ones down), so the last W
  slots are the last W positions, and a windowed layer reads only them from the one shared store.
- softcap c (Gemma 2): scores -> c * tanh(scores / c) before the mask and the softmax.
- sinks s (gpt-oss, arXiv:2508.10925): per head h a learned logit s_h joins the softmax's denominator and is
  dropped before V: p_j = exp(x_j) / (exp(s_h) + sum_k exp(x_k)). The weights then sum to less than 1.

`variant_attention` computes these explicitly in float32 (blocks of rows bound the (H, rows, S) scores).
A window alone runs through SDPA: one-token steps slice the last W slots, prompts pass a band mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

ROW_BLOCK = 128  # query rows per explicit block


@dataclass(frozen=True, eq=False)
class AttnVariant:
    window: int = 0  # sliding window in slots (the query's own included); 0 = every earlier slot
    softcap: float = 0.0  # 0 = none
    sinks: torch.Tensor | None = None  # (H,) learned per-head logits, or None

    @property
    def plain(self) -> bool:
        return not self.window and not self.softcap and self.sinks is None

    @property
    def explicit(self) -> bool:
        """Whether SDPA cannot compute it (soft-capping and sinks change the softmax itself)."""
        return bool(self.softcap) or self.sinks is not None

    def first_visible(self, q_slot0: int) -> int:
        """The lowest slot any query row from `q_slot0` on can see."""
        return max(0, q_slot0 - self.window + 1) if self.window else 0


PLAIN = AttnVariant()


def visible(q_slots: torch.Tensor, key_slots: torch.Tensor, window: int) -> torch.Tensor:
    """(T,) query slots, (S,) key slots -> (T, S) bool: causal, and within the window when there is one."""
    ok = key_slots[None, :] <= q_slots[:, None]
    if window:
        ok &= key_slots[None, :] > q_slots[:, None] - window
    return ok


def variant_probs(
    q: torch.Tensor, keys: torch.Tensor, key_slots: torch.Tensor, q_slot0: int, scale: float, var: AttnVariant
) -> torch.Tensor:
    """Attention weights in float32: q (H, b, hd) for slots q_slot0.., keys (Hkv, S, hd) at `key_slots` (S,);
    query head h uses KV head h // (H / Hkv). -> (H, b, S); with sinks each row sums to less than 1."""
    H, b, hd = q.shape
    Hkv, S, _ = keys.shape
    qg = q.float().reshape(Hkv, (H // Hkv) * b, hd)  # query heads grouped by their KV head
    scores = torch.matmul(qg, keys.float().transpose(-1, -2)).mul_(scale).view(H, b, S)  # (H, b, S)
    if var.softcap:
        scores = torch.tanh(scores / var.softcap) * var.softcap
    q_slots = torch.arange(q_slot0, q_slot0 + b, device=q.device)
    scores.masked_fill_(~visible(q_slots, key_slots.to(q.device), var.window), float("-inf"))
    if var.sinks is None:
        return torch.softmax(scores, dim=-1)
    sink = var.sinks.float().to(q.device).view(H, 1, 1).expand(H, b, 1)  # (H, b, 1)
    return torch.softmax(torch.cat((scores, sink), dim=-1), dim=-1)[..., :S]  # the sink's share dropped


def variant_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    key_slots: torch.Tensor,
    q_slot0: int,
    scale: float,
    var: AttnVariant,
) -> torch.Tensor:
    """q (H, T, hd) for slots q_slot0.., keys/values (Hkv, S, hd) at `key_slots` -> (H, T, hd) in q's dtype."""
    H, T, hd = q.shape
    Hkv, S, _ = keys.shape
    if not var.explicit:  # a window alone: SDPA with the band mask
        mask = visible(torch.arange(q_slot0, q_slot0 + T, device=q.device), key_slots.to(q.device), var.window)
        out = F.scaled_dot_product_attention(
            q.unsqueeze(0),
            keys.to(q.dtype).unsqueeze(0),
            values.to(q.dtype).unsqueeze(0),
            attn_mask=mask,
            scale=scale,
            enable_gqa=Hkv != H,
        )  # (1, H, T, hd)
        return out[0]
    vf = values.float()
    out = torch.empty_like(q)  # (H, T, hd)
    for r0 in range(0, T, ROW_BLOCK):
        r1 = min(T, r0 + ROW_BLOCK)
        probs = variant_probs(q[:, r0:r1], keys, key_slots, q_slot0 + r0, scale, var)  # (H, b, S)
        o = torch.matmul(probs.view(Hkv, -1, S), vf)  # (Hkv, G*b, hd)
        out[:, r0:r1] = o.view(H, r1 - r0, hd).to(q.dtype)
    return out


def buffer_attention(
    q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, start: int, scale: float, var: AttnVariant
) -> torch.Tensor:
    """The kernel sets' entry: q (H, T, hd) for slots [start, start+T) over the cache buffers (Hkv, C, hd),
    whose rows up to start+T are written. Only the slots some row can see are read. -> (T, H*hd)."""
    H, T, hd = q.shape
    end = start + T
    lo = var.first_visible(start)
    keys, values = k_buf[:, lo:end], v_buf[:, lo:end]  # (Hkv, S', hd) views
    if T == 1 and not var.explicit:  # one query, window only: its visible keys are exactly these
        out = F.scaled_dot_product_attention(
            q.unsqueeze(0),
            keys.to(q.dtype).unsqueeze(0),
            values.to(q.dtype).unsqueeze(0),
            scale=scale,
            enable_gqa=keys.shape[0] != H,
        )[0]  # (H, 1, hd)
    else:
        slots = torch.arange(lo, end, device=q.device)
        out = variant_attention(q, keys, values, slots, start, scale, var)  # (H, T, hd)
    return out.transpose(0, 1).reshape(T, H * hd)
