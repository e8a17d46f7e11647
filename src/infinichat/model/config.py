"""ModelConfig: one dataclass for every supported architecture, built from HF config.json or GGUF metadata.

Adding a variant = one entry in `_HF_ARCHS` / `_GGUF_ARCHS` (plus a weight-name map in `weights.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from infinichat.errors import ModelLoadError

SUPPORTED_HF_ARCHS = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "GPTNeoXForCausalLM",
)
SUPPORTED_GGUF_ARCHS = ("llama", "mistral", "qwen2", "gptneox")


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
    arch: str  # "llama" (Llama 2/3, Mistral, Qwen2, SmolLM, TinyLlama) | "gptneox" (Pythia)
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
        if arch_name not in SUPPORTED_HF_ARCHS:
            raise ModelLoadError(
                f"{source}: unsupported architecture {arch_name!r}; supported: {', '.join(SUPPORTED_HF_ARCHS)}"
            )
        try:
            if arch_name == "GPTNeoXForCausalLM":
                n_heads = cfg["num_attention_heads"]
                head_dim = cfg["hidden_size"] // n_heads
                return cls(
                    arch="gptneox",
                    vocab_size=cfg["vocab_size"],
                    dim=cfg["hidden_size"],
                    n_layers=cfg["num_hidden_layers"],
                    n_heads=n_heads,
                    n_kv_heads=n_heads,
                    head_dim=head_dim,
                    ffn_dim=cfg["intermediate_size"],
                    norm_eps=cfg.get("layer_norm_eps", 1e-5),
                    rope_theta=_rope_theta(cfg, cfg.get("rotary_emb_base", 10000.0)),
                    rotary_dim=int(head_dim * _rope_param(cfg, "partial_rotary_factor", cfg.get("rotary_pct", 1.0))),
                    max_position=cfg.get("max_position_embeddings", 2048),
                    rope_scaling=_hf_rope_scaling(cfg, source),
                    qkv_bias=cfg.get("attention_bias", True),
                    out_bias=cfg.get("attention_bias", True),
                    mlp_bias=True,
                    tie_embeddings=cfg.get("tie_word_embeddings", False),
                    norm="layer",
                    parallel_residual=cfg.get("use_parallel_residual", True),
                    act=_neox_act(cfg.get("hidden_act", "gelu"), source),
                )
            n_heads = cfg["num_attention_heads"]
            head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_heads
            act = cfg.get("hidden_act", "silu")
            if act != "silu":
                raise ModelLoadError(f"{source}: hidden_act {act!r} is not supported for {arch_name}; supported: silu")
            return cls(
                arch="llama",
                vocab_size=cfg["vocab_size"],
                dim=cfg["hidden_size"],
                n_layers=cfg["num_hidden_layers"],
                n_heads=n_heads,
                n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
                head_dim=head_dim,
                ffn_dim=cfg["intermediate_size"],
                norm_eps=cfg.get("rms_norm_eps", 1e-6),
                rope_theta=_rope_theta(cfg, 10000.0),
                max_position=cfg.get("max_position_embeddings", 4096),
                rope_scaling=_hf_rope_scaling(cfg, source),
                qkv_bias=arch_name == "Qwen2ForCausalLM" or bool(cfg.get("attention_bias", False)),
                out_bias=bool(cfg.get("attention_bias", False)) and arch_name != "Qwen2ForCausalLM",
                mlp_bias=bool(cfg.get("mlp_bias", False)),
                tie_embeddings=cfg.get("tie_word_embeddings", False),
            )
        except KeyError as e:
            raise ModelLoadError(f"{source}: missing required field {e.args[0]!r} for {arch_name}") from None

    # ------------------------------------------------------------------ GGUF metadata
    @classmethod
    def from_gguf(cls, fields: dict[str, Any], source: str = "model.gguf") -> ModelConfig:
        arch = fields.get("general.architecture")
        if arch not in SUPPORTED_GGUF_ARCHS:
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
        if kind not in ("none", "linear"):
            raise ModelLoadError(
                f"{source}: rope scaling {kind!r} is not supported in GGUF files; supported: none, linear"
            )
        if kind == "linear":
            scaling = RopeScaling(kind="linear", factor=float(get("rope.scaling.factor")))
        common: dict[str, Any] = {
            "vocab_size": vocab,
            "dim": dim,
            "n_layers": int(get("block_count")),
            "n_heads": n_heads,
            "n_kv_heads": int(get("attention.head_count_kv", n_heads)),
            "head_dim": head_dim,
            "ffn_dim": int(get("feed_forward_length")),
            "rope_theta": float(get("rope.freq_base", 10000.0)),
            "max_position": int(get("context_length", 4096)),
            "rope_scaling": scaling,
        }
        if arch == "gptneox":
            return cls(
                arch="gptneox",
                norm_eps=float(get("attention.layer_norm_epsilon", 1e-5)),
                rotary_dim=int(get("rope.dimension_count", head_dim)),
                qkv_bias=True,
                out_bias=True,
                mlp_bias=True,
                norm="layer",
                parallel_residual=bool(get("use_parallel_residual", True)),
                act="gelu",
                **common,
            )
        return cls(
            arch="llama",
            norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            qkv_bias=arch == "qwen2",
            **common,
        )


def _rope_param(cfg: dict[str, Any], key: str, default: Any) -> Any:
    """transformers 5 moved rope settings into `rope_parameters`; older files keep them at top level."""
    params = cfg.get("rope_parameters") or {}
    if key in params:
        return params[key]
    return cfg.get(key, default)


def _rope_theta(cfg: dict[str, Any], default: float) -> float:
    return float(_rope_param(cfg, "rope_theta", default))


def _hf_rope_scaling(cfg: dict[str, Any], source: str) -> RopeScaling:
    rs = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    kind = rs.get("rope_type") or rs.get("type") or "default"
    if kind == "default":
        return RopeScaling()
    if kind not in ("linear", "dynamic", "llama3"):
        raise ModelLoadError(
            f"{source}: rope scaling {kind!r} is not supported; supported: default, linear, dynamic, llama3"
        )
    return RopeScaling(
        kind=kind,
        factor=float(rs.get("factor", 1.0)),
        low_freq_factor=float(rs.get("low_freq_factor", 1.0)),
        high_freq_factor=float(rs.get("high_freq_factor", 4.0)),
        original_max_position=int(
            rs.get("original_max_position_embeddings") or cfg.get("max_position_embeddings", 8192)
        ),
    )


def _neox_act(act: str, source: str) -> str:
    if act not in ("gelu",):
        raise ModelLoadError(f"{source}: hidden_act {act!r} is not supported for GPT-NeoX; supported: gelu")
    return act
