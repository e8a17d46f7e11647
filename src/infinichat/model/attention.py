"""Attention requests: what a KV policy asks of one forward call beyond plain causal attention.

`Transformer.forward(..., attn=None)` runs scaled-dot-product attention (SDPA) and computes no weights. A
policy that needs more passes an `AttentionRequest`:

- `layers` / `rows` / `observe`: for these layers, the attention probabilities of the call's last `rows`
  queries are computed explicitly (softmax(QK^T / sqrt(d)) in float32) and handed to `observe(layer, probs,
  row0)`, probs (H, r, S) over the keys the layer attends to. When every row of the call is requested
  (decode, or H2O over a whole prompt chunk), the layer's output is computed from those same
  probabilities, in blocks of ROW_BLOCK rows (one pass, not SDPA plus a second one); when only the last
  rows are (SnapKV's observation window), SDPA computes the output and the explicit product covers just
  those rows.
- `subset`: per layer, the sorted slot indices (n,) the layer attends to instead of every slot (OmniKV's
  selected tokens; they must include the call's own new slots). `observe` may fill it during the
  forward for the layers after the one observed.
- `resident`: per layer, (k, v) buffers on the compute device that mirror the cache's (offloading: the
  cache itself stays in CPU memory); the new rows are written to both and the mirror is read.
- `queries`: called as `queries(layer, q, start)` with every layer's post-RoPE queries (H, T, hd) of the
  call (slots start..), before its attention (Expected Attention's query statistics); computes nothing.
- `transfer`: count in `moved_bytes` the K/V bytes read from the cache's own buffers (not from a
  mirror): what an offloaded layer moves to the compute device. Reads are moved to the query's device.
- `fetch`: for a layer with a `subset` and no mirror, `fetch(layer)` hands over the subset's rows before the
  call's own slots, already on the compute device (kv/offload.py's RowFetcher: gathered from host memory and
  copied ahead of the compute); the call's new rows are appended from the forward's own K/V (`new_kv`), which
  never leave the device.

Layers with nothing requested take the same SDPA path as a forward without a request. A layer whose attention
is not plain (a sliding window, soft-capping, sinks: kernels/attn_variants.py) takes the variant path for its
output and its observed weights, over the same keys (the window counted in slots, as the forward does).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from infinichat.kernels.attn_variants import PLAIN, AttnVariant, variant_attention, variant_probs

ROW_BLOCK = 128  # query rows per explicit block: bounds the (H, rows, S) probabilities in memory

Observer = Callable[[int, torch.Tensor, int], None]


@dataclass
class AttentionRequest:
    layers: frozenset[int] = frozenset()
    rows: int = 1
    observe: Observer | None = None
    queries: Observer | None = None
    subset: dict[int, torch.Tensor] = field(default_factory=dict)
    resident: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    transfer: bool = False
    moved_bytes: int = 0
    fetch: Callable[[int], tuple[torch.Tensor, torch.Tensor]] | None = None


def requested_attention(
    req: AttentionRequest,
    li: int,
    q: torch.Tensor,
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    start: int,
    scale: float,
    var: AttnVariant = PLAIN,
    new_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Layer `li`'s attention under `req`. q (H, T, hd) for slots [start, start+T), whose K/V the caller has
    already written into the cache buffers (Hkv, C, hd); `new_kv`: those new rows (Hkv, T, hd) as the forward
    computed them, on q's device (default: read back from the buffers). Returns (H, T, hd) in q's dtype."""
    _H, T, _ = q.shape
    end = start + T
    if req.queries is not None:
        req.queries(li, q, start)
    k_new, v_new = new_kv if new_kv is not None else (k_buf[:, start:end], v_buf[:, start:end])
    mirror = req.resident.get(li)
    if mirror is not None:
        kb, vb = mirror
        kb[:, start:end] = k_new  # the new rows go to the mirror as well
        vb[:, start:end] = v_new
    else:
        kb, vb = k_buf, v_buf
    idx = req.subset.get(li)
    if idx is None and mirror is None and req.transfer and new_kv is not None:  # an offloaded layer, every slot:
        # the older rows from the cache's memory, the call's own from the forward (a pinned store places them later)
        # (from a pinned store: an asynchronous copy; the host writes those rows only after the call's flush)
        keys = torch.cat((kb[:, :start].to(q.device, q.dtype, non_blocking=True), k_new.to(q.dtype)), dim=1)
        values = torch.cat((vb[:, :start].to(q.device, q.dtype, non_blocking=True), v_new.to(q.dtype)), dim=1)
    elif idx is None:
        keys, values = kb[:, :end], vb[:, :end]  # (Hkv, S, hd) views
    elif mirror is None and req.fetch is not None:  # offloaded: the picked older rows, moved ahead of time
        k_old, v_old = req.fetch(li)  # (Hkv, n - T, hd) on the compute device
        req.moved_bytes += k_old.nbytes + v_old.nbytes
        keys = torch.cat((k_old, k_new.to(k_old.device, k_old.dtype)), dim=1)  # (Hkv, n, hd): idx's order
        values = torch.cat((v_old, v_new.to(v_old.device, v_old.dtype)), dim=1)
    else:
        idx = idx.to(kb.device)
        keys, values = kb.index_select(1, idx), vb.index_select(1, idx)  # (Hkv, n, hd) gathered
    if mirror is None and req.transfer and (idx is None or req.fetch is None):
        req.moved_bytes += keys.nbytes + values.nbytes
    keys, values = keys.to(q.device, q.dtype), values.to(q.device, q.dtype)
    slots = None if idx is None else idx.to(q.device)
    if not var.plain:
        return _variant(req, li, q, keys, values, slots, start, scale, var)
    if li in req.layers:
        return _explicit(req, li, q, keys, values, slots, start, scale)
    return _sdpa(q, keys, values, slots, start, scale)


def _sdpa(q, keys, values, slots, start, scale) -> torch.Tensor:
    T = q.shape[1]
    mask = None
    if T > 1 and (start > 0 or slots is not None):
        mask = causal_mask(slots if slots is not None else torch.arange(start + T, device=q.device), start, T)
    out = F.scaled_dot_product_attention(
        q.unsqueeze(0),
        keys.unsqueeze(0),
        values.unsqueeze(0),
        attn_mask=mask,
        is_causal=T > 1 and mask is None,
        scale=scale,
        enable_gqa=q.shape[0] != keys.shape[0],
    )  # (1, H, T, hd)
    return out[0]


def causal_mask(slots: torch.Tensor, start: int, T: int) -> torch.Tensor:
    """(T, S) bool: query row i (slot start + i) may attend to key slot `slots[j]` iff slots[j] <= start + i."""
    rows = torch.arange(start, start + T, device=slots.device)
    return slots[None, :] <= rows[:, None]


def attention_probs(
    q: torch.Tensor, keys: torch.Tensor, slots: torch.Tensor, q_slot0: int, scale: float
) -> torch.Tensor:
    """softmax(q k^T * scale) in float32 with the causal mask. q (H, b, hd) for slots q_slot0.., keys
    (Hkv, S, hd) at key slots `slots` (S,). Query head h uses KV head h // (H / Hkv). -> (H, b, S)."""
    H, b, hd = q.shape
    Hkv, S, _ = keys.shape
    qg = q.float().reshape(Hkv, (H // Hkv) * b, hd)  # query heads grouped by their KV head
    scores = torch.matmul(qg, keys.float().transpose(-1, -2)).mul_(scale).view(H, b, S)  # (H, b, S)
    scores.masked_fill_(~causal_mask(slots, q_slot0, b), float("-inf"))
    return torch.softmax(scores, dim=-1)


def _explicit(req, li, q, keys, values, slots, start, scale) -> torch.Tensor:
    H, T, hd = q.shape
    Hkv, S, _ = keys.shape
    R = min(req.rows, T)
    key_slots = slots if slots is not None else torch.arange(S, device=q.device)
    if R < T:  # only the last rows: SDPA for the output, the explicit product for those rows
        out = _sdpa(q, keys, values, slots, start, scale)
        probs = attention_probs(q[:, T - R :], keys, key_slots, start + T - R, scale)  # (H, R, S)
        if req.observe is not None:
            req.observe(li, probs, 0)
        return out
    vf = values.float()
    out = torch.empty_like(q)  # (H, T, hd)
    for r0 in range(0, T, ROW_BLOCK):
        r1 = min(T, r0 + ROW_BLOCK)
        probs = attention_probs(q[:, r0:r1], keys, key_slots, start + r0, scale)  # (H, b, S)
        o = torch.matmul(probs.view(Hkv, -1, S), vf)  # (Hkv, G*b, hd)
        out[:, r0:r1] = o.view(H, r1 - r0, hd).to(q.dtype)
        if req.observe is not None:
            req.observe(li, probs, r0)
    return out


def _variant(req, li, q, keys, values, slots, start, scale, var: AttnVariant) -> torch.Tensor:
    """A windowed / soft-capped / sink layer: its output, and its weights for the observer when requested."""
    T = q.shape[1]
    key_slots = slots if slots is not None else torch.arange(keys.shape[1], device=q.device)
    out = variant_attention(q, keys, values, key_slots, start, scale, var)  # (H, T, hd)
    if li in req.layers and req.observe is not None:
        R = min(req.rows, T)
        for r0 in range(T - R, T, ROW_BLOCK):
            r1 = min(T, r0 + ROW_BLOCK)
            probs = variant_probs(q[:, r0:r1], keys, key_slots, start + r0, scale, var)  # (H, b, S)
            req.observe(li, probs, r0 - (T - R))
    return out
