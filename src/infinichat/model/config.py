"""ModelConfig: one dataclass for every supported architecture, built from HF config.json or GGUF metadata.

The family's defaults come from its entry in the architecture table (model/arch.py); a checkpoint's own
config overrides the per-checkpoint ones (biases, parallel residual, tied head, RoPE).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from infinichat.errors import ModelLoadError
from infinichat.model.arch import GGUF_ARCHS, HF_ARCHS, ArchSpec

SUPPORTED_HF_ARCHS = tuple(HF_ARCHS)
SUPPORTED_GGUF_ARCHS = tuple(GGUF_ARCHS)


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. kind: none | linear | dynamic | llama3."""

    kind: str = "none"
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    original_max_position: int = 8192  # llama3 / dynamic


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

    @property
    def rot_dim(self) -> int:
        return self.rotary_dim or self.head_dim

    @property
    def gated_mlp(self) -> bool:
        return self.act == "silu"

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
                rotary_dim = 0
                max_position = cfg.get("max_position_embeddings", 4096)
                parallel = spec.parallel_residual
            return cls(
                arch=spec.name,
                vocab_size=cfg["vocab_size"],
                dim=cfg["hidden_size"],
                n_layers=cfg["num_hidden_layers"],
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
                tie_embeddings=cfg.get("tie_word_embeddings", False),
                norm=spec.norm,
                parallel_residual=parallel,
                act=_act(cfg.get("hidden_act", spec.act), spec, source),
                qk_norm=spec.qk_norm,
                embed_scale=float(cfg["hidden_size"]) ** 0.5 if spec.embed_scale else 1.0,
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
        layer_norm = spec.norm == "layer"
        eps_key = "attention.layer_norm_epsilon" if layer_norm else "attention.layer_norm_rms_epsilon"
        return cls(
            arch=spec.name,
            vocab_size=vocab,
            dim=dim,
            n_layers=int(get("block_count")),
            n_heads=n_heads,
            n_kv_heads=int(get("attention.head_count_kv", n_heads)),
            head_dim=head_dim,
            ffn_dim=int(get("feed_forward_length")),
            norm_eps=float(get(eps_key, 1e-5)),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            rotary_dim=int(get("rope.dimension_count", head_dim)) if spec.layout == "neox" else 0,
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
        )


def _rope_param(cfg: dict[str, Any], key: str, default: Any) -> Any:
    """transformers 5 moved rope settings into `rope_parameters`; older files keep them at top level."""
    params = cfg.get("rope_parameters") or {}
    if key in params:
        return params[key]
    return cfg.get(key, default)


def _rope_theta(cfg: dict[str, Any], default: float) -> float:
    return float(_rope_param(cfg, "rope_theta", default))


def _hf_rope_scaling(cfg: dict[str, Any], source: str, spec: ArchSpec) -> RopeScaling:
    rs = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    kind = rs.get("rope_type") or rs.get("type") or "default"
    if kind == "default":
        return RopeScaling()
    if kind not in spec.rope_scalings or kind == "none":
        accepted = ", ".join("default" if k == "none" else k for k in spec.rope_scalings)
        raise ModelLoadError(f"{source}: rope scaling {kind!r} is not supported; supported: {accepted}")
    return RopeScaling(
        kind=kind,
        factor=float(rs.get("factor", 1.0)),
        low_freq_factor=float(rs.get("low_freq_factor", 1.0)),
        high_freq_factor=float(rs.get("high_freq_factor", 4.0)),
        original_max_position=int(
            rs.get("original_max_position_embeddings") or cfg.get("max_position_embeddings", 8192)
        ),
    )


def _act(act: str, spec: ArchSpec, source: str) -> str:
    if act != spec.act:
        raise ModelLoadError(f"{source}: hidden_act {act!r} is not supported for {spec.name}; supported: {spec.act}")
    return act
