"""ModelConfig: one dataclass for every supported architecture, built from HF config.json or GGUF metadata.

The family's defaults come from its entry in the architecture table (model/arch.py); a checkpoint's own
config overrides the per-checkpoint ones (biases, parallel residual, tied head, RoPE).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from infinichat.errors import ModelLoadError
from infinichat.model.arch import GGUF_ARCHS, HF_ARCHS, ArchSpec

SUPPORTED_HF_ARCHS = tuple(HF_ARCHS)
SUPPORTED_GGUF_ARCHS = tuple(GGUF_ARCHS)


class ModelShape(Protocol):
    """What the engines' callers and the token-level stores read of a model (`engine.cfg`, `store.cfg`):
    `ModelConfig` (the torch engine) and the llama.cpp backend's `LlamaModelInfo` (asked of llama.cpp, so any
    architecture its build runs) both give it."""

    @property
    def vocab_size(self) -> int: ...

    @property
    def max_position(self) -> int: ...

    @property
    def n_layers(self) -> int: ...

    @property
    def n_kv_heads(self) -> int: ...

    @property
    def head_dim(self) -> int: ...


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. kind: none | linear | dynamic | llama3 | longrope (Phi-3's, formerly "su")."""

    kind: str = "none"
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    original_max_position: int = 8192  # llama3 / dynamic / longrope
    short_factor: tuple[float, ...] = ()  # longrope: per-frequency divisors up to original_max_position
    long_factor: tuple[float, ...] = ()  # longrope: the divisors once a call reaches past it
    attention_factor: float = 1.0  # longrope: cos and sin are multiplied by it


@dataclass(frozen=True)
class ModelConfig:
    arch: str  # the architecture table's key (model/arch.py): llama, mistral, qwen2, qwen3, gptneox
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rotary_dim: int = 0  # 0 => head_dim (partial rotary for GPT-NeoX)
    max_position: int = 4096  # trained context length
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    qkv_bias: bool = False  # Qwen2, GPT-NeoX
    out_bias: bool = False  # GPT-NeoX attention dense / MLP biases
    mlp_bias: bool = False
    tie_embeddings: bool = False
    norm: str = "rms"  # "rms" | "layer"
    parallel_residual: bool = False  # GPT-NeoX
    act: str = "silu"  # "silu" (gated MLP) | "gelu" (plain MLP)
    qk_norm: bool = False  # per-head RMSNorm of q and k before RoPE (Qwen3)
    embed_scale: float = 1.0  # the embeddings are multiplied by it (Gemma: sqrt(dim))
    post_norms: bool = False  # RMSNorm of the attention and MLP outputs before their residual adds (Gemma 2/3)
    attn_scale: float = 0.0  # the attention scores' scale; 0 => head_dim ** -0.5 (Gemma: query_pre_attn_scalar ** -0.5)
    attn_softcap: float = 0.0  # scores -> c * tanh(scores / c) before the softmax; 0 = none (Gemma 2: 50)
    final_softcap: float = 0.0  # logits -> c * tanh(logits / c); 0 = none (Gemma 2: 30)
    sliding_window: int = 0  # windowed layers see the last `sliding_window` slots (their own included); 0 = none
    sliding_layers: tuple[bool, ...] = ()  # per layer, windowed or not; () = every layer, when sliding_window > 0
    rope_local_theta: float = 0.0  # RoPE base of the windowed layers, unscaled (Gemma 3: 10000); 0 = the global one
    attn_sinks: bool = False  # a learned per-head logit joins each softmax's denominator (gpt-oss); weights `sinks`

    @property
    def rot_dim(self) -> int:
        return self.rotary_dim or self.head_dim

    @property
    def gated_mlp(self) -> bool:
        return self.act != "gelu"

    def layer_window(self, i: int) -> int:
        """Layer i's sliding window in slots, 0 for a global layer."""
        if not self.sliding_window:
            return 0
        return self.sliding_window if not self.sliding_layers or self.sliding_layers[i] else 0

    def local_rope(self, i: int) -> bool:
        """Whether layer i rotates with the local base (`rope_local_theta`: Gemma 3's windowed layers)."""
        return bool(self.rope_local_theta) and self.layer_window(i) > 0

    def with_(self, **changes: Any) -> ModelConfig:
        return replace(self, **changes)

    # ------------------------------------------------------------------ HF config.json
    @classmethod
    def from_hf(cls, cfg: dict[str, Any], source: str = "config.json") -> ModelConfig:
        archs = cfg.get("architectures") or []
        arch_name = archs[0] if archs else cfg.get("model_type", "?")
        spec = HF_ARCHS.get(arch_name)
        if spec is None:
            raise ModelLoadError(
                f"{source}: unsupported architecture {arch_name!r}; supported: {', '.join(SUPPORTED_HF_ARCHS)}"
            )
        if spec.name == "gemma3" and isinstance(cfg.get("text_config"), dict):
            cfg = _gemma3_text_config(cfg)
        cfg, local_theta = _split_layer_rope(cfg, spec, source)
        try:
            n_heads = cfg["num_attention_heads"]
            head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_heads
            neox = spec.layout == "neox"
            if neox:  # GPT-NeoX's config names
                bias = bool(cfg.get("attention_bias", True))
                qkv_bias, out_bias, mlp_bias = bias, bias, spec.mlp_bias
                eps = cfg.get("layer_norm_eps", 1e-5)
                theta = _rope_theta(cfg, cfg.get("rotary_emb_base", 10000.0))
                rotary_dim = int(head_dim * _rope_param(cfg, "partial_rotary_factor", cfg.get("rotary_pct", 1.0)))
                max_position = cfg.get("max_position_embeddings", 2048)
                parallel = bool(cfg.get("use_parallel_residual", spec.parallel_residual))
            else:
                bias = bool(cfg.get("attention_bias", False))
                qkv_bias, out_bias = spec.qkv_bias or bias, bias and not spec.qkv_bias
                mlp_bias = bool(cfg.get("mlp_bias", spec.mlp_bias))
                eps = cfg.get("rms_norm_eps", 1e-6)
                theta = _rope_theta(cfg, 10000.0)
                rotary_dim = int(head_dim * _rope_param(cfg, "partial_rotary_factor", 1.0))  # Phi-4-mini: 0.75
                rotary_dim = 0 if rotary_dim == head_dim else rotary_dim
                max_position = cfg.get("max_position_embeddings", 4096)
                parallel = spec.parallel_residual
            n_layers = cfg["num_hidden_layers"]
            window, sliding = _hf_sliding(cfg, spec, n_layers, source)
            qpas = cfg.get("query_pre_attn_scalar")
            return cls(
                arch=spec.name,
                vocab_size=cfg["vocab_size"],
                dim=cfg["hidden_size"],
                n_layers=n_layers,
                n_heads=n_heads,
                n_kv_heads=(None if neox else cfg.get("num_key_value_heads")) or n_heads,
                head_dim=head_dim,
                ffn_dim=cfg["intermediate_size"],
                norm_eps=eps,
                rope_theta=theta,
                rotary_dim=rotary_dim,
                max_position=max_position,
                rope_scaling=_hf_rope_scaling(cfg, source, spec),
                qkv_bias=qkv_bias,
                out_bias=out_bias,
                mlp_bias=mlp_bias,
                tie_embeddings=bool(cfg.get("tie_word_embeddings", spec.tied_default)),
                norm=spec.norm,
                parallel_residual=parallel,
                act=_act(cfg.get("hidden_activation") or cfg.get("hidden_act") or spec.act, spec, source),
                qk_norm=spec.qk_norm,
                embed_scale=float(cfg["hidden_size"]) ** 0.5 if spec.embed_scale else 1.0,
                post_norms=spec.post_norms,
                attn_scale=float(qpas) ** -0.5 if qpas and qpas != head_dim else 0.0,
                attn_softcap=float(cfg.get("attn_logit_softcapping") or 0.0),
                final_softcap=float(cfg.get("final_logit_softcapping") or 0.0),
                sliding_window=window,
                sliding_layers=sliding,
                rope_local_theta=local_theta,
                attn_sinks=spec.attn_sinks,
            )
        except KeyError as e:
            raise ModelLoadError(f"{source}: missing required field {e.args[0]!r} for {arch_name}") from None

    # ------------------------------------------------------------------ GGUF metadata
    @classmethod
    def from_gguf(cls, fields: dict[str, Any], source: str = "model.gguf") -> ModelConfig:
        arch = fields.get("general.architecture")
        spec = GGUF_ARCHS.get(arch) if isinstance(arch, str) else None
        if spec is None or arch is None:
            raise ModelLoadError(
                f"{source}: unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED_GGUF_ARCHS)}"
            )

        def get(key: str, default: Any = KeyError) -> Any:
            full = f"{arch}.{key}"
            if full in fields:
                return fields[full]
            if default is KeyError:
                raise ModelLoadError(f"{source}: GGUF metadata is missing {full!r}")
            return default

        n_heads = int(get("attention.head_count"))
        dim = int(get("embedding_length"))
        head_dim = int(get("attention.key_length", dim // n_heads))
        tokens = fields.get("tokenizer.ggml.tokens")
        vocab = int(get("vocab_size", len(tokens) if tokens is not None else 0))
        scaling = RopeScaling()
        kind = get("rope.scaling.type", "none")
        if kind not in spec.gguf_rope_scalings:
            raise ModelLoadError(
                f"{source}: rope scaling {kind!r} is not supported in GGUF files; "
                f"supported: {', '.join(spec.gguf_rope_scalings)}"
            )
        if kind == "linear":
            scaling = RopeScaling(kind="linear", factor=float(get("rope.scaling.factor")))
        # longrope (Phi-3): its factors are tensors, `gguf_loader.gguf_rope_scaling` completes the config
        n_layers = int(get("block_count"))
        window = int(get("attention.sliding_window", 0)) if spec.swa_period else 0
        sliding = (
            _gguf_sliding(fields.get(f"{arch}.attention.sliding_window_pattern"), spec, n_layers) if window else ()
        )
        if sliding and not any(sliding):
            window, sliding = 0, ()
        rot = int(get("rope.dimension_count", head_dim))
        layer_norm = spec.norm == "layer"
        eps_key = "attention.layer_norm_epsilon" if layer_norm else "attention.layer_norm_rms_epsilon"
        return cls(
            arch=spec.name,
            vocab_size=vocab,
            dim=dim,
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=int(get("attention.head_count_kv", n_heads)),
            head_dim=head_dim,
            ffn_dim=int(get("feed_forward_length")),
            norm_eps=float(get(eps_key, 1e-5)),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            rotary_dim=rot if spec.layout == "neox" or rot != head_dim else 0,
            max_position=int(get("context_length", 4096)),
            rope_scaling=scaling,
            qkv_bias=spec.qkv_bias,
            out_bias=spec.out_bias,
            mlp_bias=spec.mlp_bias,
            norm=spec.norm,
            parallel_residual=bool(get("use_parallel_residual", spec.parallel_residual)),
            act=spec.act,
            qk_norm=spec.qk_norm,
            embed_scale=float(dim) ** 0.5 if spec.embed_scale else 1.0,
            post_norms=spec.post_norms,
            attn_scale=_gguf_attn_scale(fields, arch, spec, n_layers, dim, n_heads, head_dim),
            attn_softcap=float(get("attn_logit_softcapping", 0.0)),
            final_softcap=float(get("final_logit_softcapping", 0.0)),
            sliding_window=window,
            sliding_layers=sliding,
            # llama.cpp runs Gemma 3's windowed layers at base 10000, unscaled, unless the file says otherwise
            rope_local_theta=float(get("rope.freq_base_swa", 10000.0)) if spec.name == "gemma3" else 0.0,
            attn_sinks=spec.attn_sinks,
        )


def _rope_param(cfg: dict[str, Any], key: str, default: Any) -> Any:
    """transformers 5 moved rope settings into `rope_parameters`; older files keep them at top level."""
    params = cfg.get("rope_parameters") or {}
    if key in params:
        return params[key]
    return cfg.get(key, default)


def _rope_theta(cfg: dict[str, Any], default: float) -> float:
    return float(_rope_param(cfg, "rope_theta", default))


# transformers' Gemma3TextConfig defaults: the multimodal releases' config.json leave most text fields out
_GEMMA3_TEXT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 262_208,
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "num_hidden_layers": 26,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 131_072,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1_000_000.0,
    "rope_local_base_freq": 10_000.0,
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
    "sliding_window_pattern": 6,
}


def _gemma3_text_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """Gemma 3's multimodal checkpoints (Gemma3ForConditionalGeneration: 4B, 12B, 27B): the text model's
    config is `text_config`, with transformers' defaults for what it leaves out; the vision tower is not used."""
    text = {**_GEMMA3_TEXT_DEFAULTS, **cfg["text_config"]}
    text["tie_word_embeddings"] = cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", True))
    text["architectures"] = cfg.get("architectures")
    return text


def _split_layer_rope(cfg: dict[str, Any], spec: ArchSpec, source: str) -> tuple[dict[str, Any], float]:
    """Gemma 3 gives its global and its windowed layers different RoPE: transformers 5 writes `rope_parameters`
    per layer type, older files `rope_theta` + `rope_scaling` (global) and `rope_local_base_freq`. -> (the
    config with the global layers' RoPE where the other readers look, the windowed layers' base; 0 if none)."""
    rp = cfg.get("rope_parameters") or {}
    if isinstance(rp.get("full_attention"), dict):
        local = rp.get("sliding_attention") or {}
        kind = local.get("rope_type") or local.get("type") or "default"
        if kind != "default":
            raise ModelLoadError(
                f"{source}: rope scaling {kind!r} on the sliding-window layers is not supported; supported: default"
            )
        theta = float(local.get("rope_theta", 10000.0)) if spec.name == "gemma3" else 0.0
        return {**cfg, "rope_parameters": rp["full_attention"]}, theta
    if spec.name == "gemma3":
        return cfg, float(cfg.get("rope_local_base_freq", 10000.0))
    return cfg, 0.0


def _hf_sliding(cfg: dict[str, Any], spec: ArchSpec, n_layers: int, source: str) -> tuple[int, tuple[bool, ...]]:
    """(window, per-layer windowed flags; () = all) from `sliding_window`, `layer_types` or the family's period."""
    window = int(cfg.get("sliding_window") or 0)
    used = bool(cfg["use_sliding_window"]) if "use_sliding_window" in cfg else spec.swa_period > 0
    if not window or not used:
        return 0, ()
    types = cfg.get("layer_types")
    if types:
        if len(types) != n_layers:
            raise ModelLoadError(f"{source}: layer_types lists {len(types)} layers, the model has {n_layers}")
        unknown = sorted(set(types) - {"sliding_attention", "full_attention"})
        if unknown:
            raise ModelLoadError(
                f"{source}: layer type {unknown[0]!r} is not supported; supported: sliding_attention, full_attention"
            )
        sliding = tuple(t == "sliding_attention" for t in types)
    else:
        period = int(cfg.get("sliding_window_pattern") or cfg.get("_sliding_window_pattern") or spec.swa_period or 1)
        sliding = tuple((i + 1) % period != 0 for i in range(n_layers)) if period > 1 else ()
    if sliding and not any(sliding):
        return 0, ()
    return window, () if all(sliding) else sliding


def _gguf_sliding(pattern: Any, spec: ArchSpec, n_layers: int) -> tuple[bool, ...]:
    """llama.cpp's `attention.sliding_window_pattern`: a per-layer bool array, or a period n (layer i windowed
    unless (i + 1) % n == 0); absent: the family's period."""
    if isinstance(pattern, list):
        return tuple(bool(p) for p in pattern[:n_layers])
    period = int(pattern or spec.swa_period or 1)
    return tuple((i + 1) % period != 0 for i in range(n_layers)) if period > 1 else ()


def _gguf_attn_scale(
    fields: dict[str, Any], arch: str, spec: ArchSpec, n_layers: int, dim: int, n_heads: int, head_dim: int
) -> float:
    """The attention scale of a GGUF model, 0 for head_dim ** -0.5. Gemma's `query_pre_attn_scalar` is not in
    the metadata: llama.cpp scales the 27B models (46 layers for Gemma 2, 62 for Gemma 3) by (dim / heads)
    ** -0.5 and the others by head_dim ** -0.5; an `attention.scale` key wins."""
    scale = fields.get(f"{arch}.attention.scale")
    if scale:
        return float(scale)
    if spec.name in ("gemma2", "gemma3") and n_layers == {"gemma2": 46, "gemma3": 62}[spec.name]:
        scalar = dim // n_heads
        return float(scalar) ** -0.5 if scalar != head_dim else 0.0
    return 0.0


def _hf_rope_scaling(cfg: dict[str, Any], source: str, spec: ArchSpec) -> RopeScaling:
    rs = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    kind = rs.get("rope_type") or rs.get("type") or "default"
    kind = "longrope" if kind == "su" else kind  # Phi-3's first name for it
    if kind == "default":
        return RopeScaling()
    if kind not in spec.rope_scalings or kind == "none":
        accepted = ", ".join("default" if k == "none" else k for k in spec.rope_scalings)
        raise ModelLoadError(f"{source}: rope scaling {kind!r} is not supported; supported: {accepted}")
    if kind == "longrope":
        return _longrope(cfg, rs, source)
    return RopeScaling(
        kind=kind,
        factor=float(rs.get("factor", 1.0)),
        low_freq_factor=float(rs.get("low_freq_factor", 1.0)),
        high_freq_factor=float(rs.get("high_freq_factor", 4.0)),
        original_max_position=int(
            rs.get("original_max_position_embeddings") or cfg.get("max_position_embeddings", 8192)
        ),
    )


def _longrope(cfg: dict[str, Any], rs: dict[str, Any], source: str) -> RopeScaling:
    """Phi-3's LongRoPE: per-frequency divisors (short up to the original context, long past it) and a cos/sin
    multiplier, sqrt(1 + ln(factor) / ln(original)) unless given, factor = max_position / original."""
    max_pos = int(cfg.get("max_position_embeddings", 4096))
    orig = int(rs.get("original_max_position_embeddings") or cfg.get("original_max_position_embeddings") or max_pos)
    factor = float(rs.get("factor") or max_pos / orig)
    attn = rs.get("attention_factor")
    if attn is None:
        attn = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
    try:
        short, long = tuple(float(f) for f in rs["short_factor"]), tuple(float(f) for f in rs["long_factor"])
    except (KeyError, TypeError):
        raise ModelLoadError(f"{source}: longrope scaling needs the lists short_factor and long_factor") from None
    return RopeScaling(
        kind="longrope",
        factor=factor,
        original_max_position=orig,
        short_factor=short,
        long_factor=long,
        attention_factor=float(attn),
    )


_ACT_NAMES = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}  # the configs' names -> the table's


def _act(act: str, spec: ArchSpec, source: str) -> str:
    act = _ACT_NAMES.get(act, act)
    if act != spec.act:
        raise ModelLoadError(f"{source}: hidden_act {act!r} is not supported for {spec.name}; supported: {spec.act}")
    return act
