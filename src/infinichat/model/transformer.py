"""The forward pass, written once for every architecture of the table (model/arch.py), device-agnostic.

Positions and the KV cache are explicit arguments: `forward(tokens, positions, cache, start)` writes the
new keys/values into cache slots [start, start+T) and attends over slots [0, start+T). Slot order is the
logical order of the sequence (the KV store keeps it compact), so the causal mask is by slot index while
RoPE uses `positions`, which the store keeps contiguous after removals.

`forward_batch` runs several sequences in one call, each with its own cache, start and positions: the
matrix products run on their stacked rows, attention per sequence. The forward reads the architecture's
resolved description (ModelConfig) and calls the kernel set chosen at load (kernels/) for every op; it
never looks at the CPU, the native library or the device itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from infinichat.errors import DeviceError, InfinichatError
from infinichat.kernels import RopeTables, make_kernels, resolve_device
from infinichat.kernels.attn_variants import PLAIN, AttnVariant
from infinichat.kernels.torch_ops import STEP_MODES
from infinichat.model.arch import features
from infinichat.model.attention import AttentionRequest, requested_attention
from infinichat.model.config import ModelConfig
from infinichat.model.quant import QUANT_SUFFIXES, QuantLinear, cache_tag, check_mode, quantize
from infinichat.model.rope import Rope
from infinichat.model.transfer import to_device

LINEARS = ("wqkv", "wo", "w_in", "w_out")
# A quantized head's RESCORE_TOP best tokens per row get their logits again from the dense bf16 table
# (benchmarks/NOTES.md: the int8 head alone moved 0.8% of the greedy choices; this costs ~k*D reads).
RESCORE_TOP = 8


class LayerCache(Protocol):
    """What the forward needs from a KV cache: `reserve(n)`, which makes it hold n slots (a growing store replaces
    its buffers: kv/store.py), and `layer_kv(li, start, k, v)`, which writes a layer's new rows k, v (Hkv, T, hd)
    at slots [start, start+T) and returns buffers (Hkv, >= start+T, hd) on the model's device holding the layer's
    slots [0, start+T) (a quantized store's dequantized: kv/quantized.py)."""

    def reserve(self, n: int) -> None: ...

    def layer_kv(self, li: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass
class BatchItem:
    """One sequence of a batched forward call: tokens (T,) at positions (T,), written to cache slots
    [start, start+T)."""

    tokens: torch.Tensor
    positions: torch.Tensor
    cache: LayerCache
    start: int


class Transformer:
    """Weights in the canonical layout (see weights.py) plus the forward pass. Not an nn.Module: it has
    no training concerns, and plain tensors keep the per-token path free of module dispatch."""

    def __init__(
        self,
        cfg: ModelConfig,
        weights: dict[str, torch.Tensor],
        dtype: torch.dtype = torch.float32,
        quant: str = "none",
        device: str | torch.device = "cpu",
        kernels: str = "auto",
        step: str = "layers",
    ):
        """`weights`: the canonical dense layout (weights.py), or its quantized form (quant.quantize).
        `device`: auto, cpu, cuda, cuda:N (the weights are moved there); `kernels`: auto, torch, cpu-native.
        `step`: how the torch kernels run one-token steps: layers (the forward below), static (the static-shape
        step, kernels/static_step.py) or compiled (that step under torch.compile / CUDA graphs: --compile)."""
        if step not in STEP_MODES:
            raise InfinichatError(f"unknown decode step {step!r}; accepted: {', '.join(STEP_MODES)}")
        self.step = step
        self.cfg = cfg
        self.dtype = dtype
        self.device = resolve_device(device)
        self.quant = check_mode(quant)
        if self.quant != "none":
            if dtype != torch.bfloat16:
                raise InfinichatError(
                    f"--quant {self.quant} runs with --dtype bfloat16 (the int8/int4 kernels take bfloat16 "
                    f"activations), not {str(dtype).removeprefix('torch.')}"
                )
            if not any(n.endswith((".q8", ".q8g", ".q4")) for n in weights):
                # int8 grouped where the CPU's native products take it, per row for PyTorch's kernels (torch set)
                grouped = kernels != "torch" and cache_tag(self.quant, self.device) == "int8g"
                weights = quantize(weights, self.quant, cfg.tie_embeddings, grouped)
            if self.device.type != "cpu" and any(n.endswith(".q8g") for n in weights):
                raise DeviceError(
                    f"these weights are grouped int8 (the CPU's native layout); on {self.device} --quant int8 "
                    "takes per-row int8 weights: quantize from the dense weights"
                )
        dev = self.device
        head = "embed" if cfg.tie_embeddings else "lm_head"
        # On a GPU a quantized head is not moved there: the dense bf16 table (held anyway for the embedding and
        # the re-scoring) is the better head, a GEMM reading 2 bytes a weight where the int8 one widens to bf16
        # first; all its logits are exact, with no re-scoring.
        skip = {n for n in weights if dev.type != "cpu" and n.startswith(head + ".") and n.endswith(QUANT_SUFFIXES)}
        w = {  # no copy when the dtype and device are already right; quantized tensors keep their dtype
            n: t.to(dev) if n.endswith(QUANT_SUFFIXES) else t.to(dev, dtype).contiguous()
            for n, t in weights.items()
            if n != "rope_freqs" and n not in skip
        }
        self.rope = Rope(cfg, weights.get("rope_freqs"), device=dev)
        qhead = QuantLinear.from_tensors(w, head)
        self.lm_head: torch.Tensor | QuantLinear = qhead or w[head + ".weight"]  # (V, D)
        self.head_exact = w[head + ".weight"] if qhead else None  # (V, D) dense rows for re-scoring
        self.embed = w["embed.weight"]  # (V, D)
        self.norm = (w["norm.weight"], w.get("norm.bias"))
        self.layers: list[dict[str, torch.Tensor | QuantLinear]] = []
        # per layer, (weight, bias) of its attention and MLP norms (never quantized)
        self.layer_norms: list[tuple[tuple[torch.Tensor, torch.Tensor | None], ...]] = [
            tuple((w[f"layers.{i}.{n}.weight"], w.get(f"layers.{i}.{n}.bias")) for n in ("attn_norm", "ffn_norm"))
            for i in range(cfg.n_layers)
        ]
        # Gemma 2/3: per layer, the norms of the attention and MLP outputs (before their residual adds)
        self.post_norms: list[tuple[torch.Tensor, torch.Tensor]] | None = (
            [
                (w[f"layers.{i}.post_attn_norm.weight"], w[f"layers.{i}.post_ffn_norm.weight"])
                for i in range(cfg.n_layers)
            ]
            if cfg.post_norms
            else None
        )
        # per layer, what its attention adds to plain causal softmax: window, soft-cap, sinks (kernels/attn_variants)
        self.layer_attn: list[AttnVariant] = [
            AttnVariant(cfg.layer_window(i), cfg.attn_softcap, w.get(f"layers.{i}.sinks"))
            if cfg.layer_window(i) or cfg.attn_softcap or cfg.attn_sinks
            else PLAIN
            for i in range(cfg.n_layers)
        ]
        for i in range(cfg.n_layers):
            p = f"layers.{i}."
            L: dict = {k[len(p) :]: t for k, t in w.items() if k.startswith(p)}
            for name in LINEARS:
                ql = QuantLinear.from_tensors(w, p + name)
                if ql is not None:
                    L = {k: t for k, t in L.items() if not k.startswith(name + ".") or k == name + ".bias"}
                    L[name + ".weight"] = ql
            self.layers.append(L)
        self.q_size = cfg.n_heads * cfg.head_dim
        self.kv_size = cfg.n_kv_heads * cfg.head_dim
        self.scale = cfg.attn_scale or cfg.head_dim**-0.5
        # Gemma's sqrt(dim), rounded to the model's dtype first, as the reference implementations do (bf16:
        # sqrt(1152) = 33.94 becomes 34.0)
        self.embed_scale = float(torch.tensor(cfg.embed_scale, dtype=dtype))
        self.features = features(cfg)
        self.kernels = make_kernels(kernels, self.device, self.features)
        if step != "layers" and self.kernels.name != "torch":
            raise InfinichatError(
                f"--compile captures the torch kernel set's decode step (the set CUDA runs), not {self.kernels.name}'s "
                "(on the CPU, cpu-native has its own native decode step)"
            )
        self.kernels.bind(self)

    # ------------------------------------------------------------------ pieces
    def _head(self, x: torch.Tensor) -> torch.Tensor:
        """x (T, D) -> logits (T, V) float32. A quantized head's top candidates are re-scored exactly: the
        dense rows in float32, rounded as the dense model's product would be (bf16 for bf16 inputs)."""
        return self._softcap(self._rescore(x, self.kernels.linear(x, self.lm_head).float()))  # (T, V)

    def _softcap(self, logits: torch.Tensor) -> torch.Tensor:
        """Gemma 2's final soft-cap: logits -> c * tanh(logits / c)."""
        c = self.cfg.final_softcap
        return torch.tanh(logits / c) * c if c else logits

    def _rescore(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if self.head_exact is None:
            return logits
        top = logits.topk(RESCORE_TOP, dim=-1).indices  # (T, k)
        rows = self.head_exact[top].float()  # (T, k, D)
        exact = torch.bmm(rows, x.float().unsqueeze(-1)).squeeze(-1)  # (T, k)
        return logits.scatter_(-1, top, exact.to(x.dtype).float())

    def _norm(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.cfg.norm == "layer":
            return self.kernels.layer_norm(x, weight, bias, self.cfg.norm_eps)
        return self.kernels.rms_norm(x, weight, self.cfg.norm_eps)

    def _mlp(self, L: dict, x: torch.Tensor) -> torch.Tensor:
        kern = self.kernels
        h = kern.linear(x, L["w_in.weight"], L.get("w_in.bias"))  # (T, 2F) or (T, F)
        act = self.cfg.act
        h = (
            kern.silu_mul(h) if act == "silu" else kern.gelu_tanh_mul(h) if act == "gelu_tanh" else kern.gelu(h)
        )  # (T, F)
        return kern.linear(h, L["w_out.weight"], L.get("w_out.bias"))  # (T, D)

    def _qk_norm(self, L: dict, qkv: torch.Tensor) -> torch.Tensor:
        """Per-head RMSNorm of the q and k heads of qkv (T, q + 2kv) (Qwen3), before RoPE."""
        T, hd = qkv.shape[0], self.cfg.head_dim
        eps = self.cfg.norm_eps
        q = self.kernels.rms_norm(qkv[:, : self.q_size].reshape(-1, hd), L["q_norm.weight"], eps)  # (T*H, hd)
        k = self.kernels.rms_norm(
            qkv[:, self.q_size : self.q_size + self.kv_size].reshape(-1, hd), L["k_norm.weight"], eps
        )  # (T*Hkv, hd)
        return torch.cat((q.view(T, -1), k.view(T, -1), qkv[:, self.q_size + self.kv_size :]), dim=-1)

    def _attention(
        self,
        L: dict,
        x: torch.Tensor,
        rope: RopeTables,
        seqs: Sequence[BatchItem],
        rows: list[int],
        masks: list[torch.Tensor | None],
        li: int,
        attn: AttentionRequest | None,
    ) -> torch.Tensor:
        """x (N, D): the stacked rows of `seqs` (rows[i] each) -> (N, D)."""
        kern = self.kernels
        qkv = kern.linear(x, L["wqkv.weight"], L.get("wqkv.bias"))  # (N, q + 2kv)
        if self.cfg.qk_norm:
            qkv = self._qk_norm(L, qkv)
        q, k, v = kern.rope_qkv(qkv, rope)  # (H, N, hd), (Hkv, N, hd), (Hkv, N, hd)
        outs = []
        r0, one = 0, len(seqs) == 1  # one sequence: the fast path, no row slicing
        for s, T, mask in zip(seqs, rows, masks, strict=True):
            qs = q if one else q[:, r0 : r0 + T]  # (H, T, hd)
            # the new rows go into the cache; it hands back (Hkv, >= start+T, hd) buffers (a quantized one dequantized)
            ks, vs = (k, v) if one else (k[:, r0 : r0 + T], v[:, r0 : r0 + T])  # (Hkv, T, hd)
            k_buf, v_buf = s.cache.layer_kv(li, s.start, ks, vs)
            var = self.layer_attn[li]
            if attn is not None:  # a policy asked for weights, a token subset or offloading (model/attention.py)
                out = requested_attention(attn, li, qs, k_buf, v_buf, s.start, self.scale, var, (ks, vs))  # (H, T, hd)
                outs.append(out.transpose(0, 1).reshape(T, self.q_size))
            else:
                outs.append(kern.attention(qs, k_buf, v_buf, s.start, mask, var))  # (T, H*hd)
            r0 += T
        out = outs[0] if len(outs) == 1 else torch.cat(outs)  # (N, H*hd)
        return kern.linear(out, L["wo.weight"], L.get("wo.bias"))  # (N, D)

    # ------------------------------------------------------------------ forward
    @torch.inference_mode()
    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        cache: LayerCache,
        start: int,
        all_logits: bool = False,
        attn: AttentionRequest | None = None,
    ) -> torch.Tensor:
        """tokens (T,) int64, positions (T,) int64 -> logits (T, V) if all_logits else (V,), float32.

        Writes K/V of the new tokens into cache slots [start, start+T); attends over [0, start+T), or as
        `attn` asks (attention weights for some layers, per-layer token subsets: model/attention.py).
        """
        cache.reserve(start + tokens.shape[0])  # before anything binds or writes the new slots
        if tokens.shape[0] == 1 and attn is None:  # the kernel set's whole-model step, where it has one
            step = self.kernels.decode_step(tokens, positions, cache, start)
            if step is not None:
                x, logits = step
                logits = self._softcap(self._rescore(x.to(self.dtype)[None], logits[None]))  # (1, V)
                return logits if all_logits else logits[0]
        return self._forward([BatchItem(tokens, positions, cache, start)], all_logits, attn)[0]

    @torch.inference_mode()
    def forward_batch(self, seqs: Sequence[BatchItem], all_logits: bool = False) -> list[torch.Tensor]:
        """Several sequences in one call -> per sequence its logits, (T_i, V) if all_logits else (V,), float32.
        Each sequence has its own cache (or its own slots of one: their spans must not overlap) and start."""
        if not seqs:
            return []
        if len(seqs) == 1:
            s = seqs[0]
            return [self.forward(s.tokens, s.positions, s.cache, s.start, all_logits)]
        for s in seqs:
            s.cache.reserve(s.start + s.tokens.shape[0])
        if not all_logits and all(s.tokens.shape[0] == 1 for s in seqs):  # one token each: a whole-model step
            step = self.kernels.decode_batch(seqs)
            if step is not None:
                x, logits = step  # (B, D), (B, V)
                return list(self._rescore(x.to(self.dtype), logits).unbind(0))
        return self._forward(seqs, all_logits, None)

    def _forward(
        self, seqs: Sequence[BatchItem], all_logits: bool, attn: AttentionRequest | None
    ) -> list[torch.Tensor]:
        if attn is not None and len(seqs) > 1:
            raise ValueError("an attention request applies to a single sequence")
        kern, dev = self.kernels, self.device
        rows = [int(s.tokens.shape[0]) for s in seqs]
        one = len(seqs) == 1
        tokens = seqs[0].tokens if one else torch.cat([s.tokens for s in seqs])  # (N,)
        positions = seqs[0].positions if one else torch.cat([s.positions for s in seqs])  # (N,)
        compute = kern.compute_dtype(tokens.shape[0])
        x = self.embed[to_device(tokens, dev)].to(
            compute
        )  # (N, D): this call's own tensor (the residual adds in place)
        if self.embed_scale != 1.0:
            x *= self.embed_scale
        rope = kern.rope_tables(*self.rope.cos_sin(positions, compute))  # (N, rot) each, in the kernels' form
        local = self.rope.local  # Gemma 3's windowed layers rotate with their own base
        rope_local = kern.rope_tables(*local.cos_sin(positions, compute)) if local is not None else rope
        masks: list[torch.Tensor | None] = []
        for s, T in zip(seqs, rows, strict=True):  # a call from slot 0 uses SDPA's own causal mask
            if T > 1 and s.start > 0:
                i = torch.arange(T, device=dev).unsqueeze(1)
                j = torch.arange(s.start + T, device=dev).unsqueeze(0)
                masks.append(j <= i + s.start)  # (T, start+T) bool
            else:
                masks.append(None)
        x = self.layers_forward(x, rope, rope_local, seqs, rows, masks, attn)  # (N, D)
        if not all_logits:  # each sequence's last row: the model dtype's (packed) product beats upcasting the head
            x = (x[-1:] if one else x[to_device(torch.tensor(rows), dev).cumsum(0) - 1]).to(self.dtype)  # (B, D)
        x = self._norm(x, *self.norm)
        logits = self._head(x)  # (N, V) or (B, V)
        if not all_logits:
            return list(logits.unbind(0))
        return list(logits.split(rows)) if not one else [logits]

    def layers_forward(
        self,
        x: torch.Tensor,
        rope: RopeTables,
        rope_local: RopeTables,
        seqs: Sequence[BatchItem],
        rows: list[int],
        masks: list[torch.Tensor | None],
        attn: AttentionRequest | None = None,
    ) -> torch.Tensor:
        """The decoder layers over the stacked rows x (N, D) of `seqs` (rows[i] each, with their attention masks);
        x is updated in place and returned. The static decode step (kernels/static_step.py) calls this too."""
        for li, (L, (attn_norm, ffn_norm)) in enumerate(zip(self.layers, self.layer_norms, strict=True)):
            h = self._norm(x, *attn_norm)  # (N, D)
            a = self._attention(L, h, rope_local if self.cfg.local_rope(li) else rope, seqs, rows, masks, li, attn)
            if self.cfg.parallel_residual:  # x + attn(norm1(x)) + mlp(norm2(x))
                m = self._mlp(L, self._norm(x, *ffn_norm))
                x += a
                x += m
            elif self.post_norms is not None:  # x + norm3(attn(norm1(x))), then + norm4(mlp(norm2(x))) (Gemma)
                post_attn, post_ffn = self.post_norms[li]
                x += self._norm(a, post_attn, None)
                x += self._norm(self._mlp(L, self._norm(x, *ffn_norm)), post_ffn, None)
            else:
                x += a  # (N, D)
                x += self._mlp(L, self._norm(x, *ffn_norm))
        return x

    __call__ = forward
