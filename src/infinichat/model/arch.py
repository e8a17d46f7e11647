"""The architecture table: one `ArchSpec` per family says what the forward needs, as data.

`ModelConfig.from_hf` / `from_gguf` read the entry of a checkpoint's architecture to build the config (the
family's defaults, overridden where the checkpoint's own config says so), the loaders read its tensor-name
layout and its explicit ignore lists (every other unknown tensor is refused: `unused_tensors`), and the
forward reads the resolved `ModelConfig` fields. `features(cfg)` names what a model's forward uses, so that a
kernel set (kernels/) can declare what it supports and be picked by that declaration.

Adding a Llama-like architecture: one entry here (and a name layout in the loaders if its tensors are named
differently).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from infinichat.errors import ModelLoadError


@dataclass(frozen=True)
class ArchSpec:
    """A family's forward, as data. Fields marked "default" may be overridden by a checkpoint's config."""

    name: str  # the table key, ModelConfig.arch
    hf_names: tuple[str, ...]  # config.json `architectures` values
    gguf_names: tuple[str, ...]  # GGUF `general.architecture` values
    norm: str = "rms"  # "rms" | "layer" (LayerNorm with bias)
    norm_offset: float = 0.0  # the norm multiplies by (weight + offset) (Gemma: 1); folded into the weight at load
    # (llama.cpp's converter folds it already: GGUF norm weights are taken as they are)
    act: str = "silu"  # "silu" (gated: silu(gate) * up) | "gelu_tanh" (gated: gelu_tanh(gate) * up) | "gelu" (plain)
    post_norms: bool = False  # RMSNorms after attention and after the MLP too, before each residual add (Gemma 2/3)
    qk_norm: bool = False  # per-head RMSNorm of q and k before RoPE (Qwen3)
    qkv_bias: bool = False  # default
    out_bias: bool = False  # default (attention output projection)
    mlp_bias: bool = False  # default
    embed_scale: bool = False  # embeddings multiplied by sqrt(dim) (Gemma)
    tied_default: bool = False  # tie_word_embeddings when config.json does not say (Gemma: tied)
    # sliding-window layers when the config lists no `layer_types`: every `swa_period`-th layer is global, the
    # others windowed (Gemma 2: 2, Gemma 3: 6); 1: every layer windowed when the config has a window (Mistral,
    # Phi-3); 0: the config's window is not used (Qwen2/3 without `use_sliding_window`, Llama)
    swa_period: int = 0
    attn_sinks: bool = False  # a learned per-head logit in each softmax's denominator (gpt-oss); weights `sinks`
    parallel_residual: bool = False  # default: x + attn(norm1(x)) + mlp(norm2(x)) (GPT-NeoX)
    rope_scalings: tuple[str, ...] = ("none", "linear", "dynamic", "llama3")  # accepted RoPE scaling kinds
    gguf_rope_scalings: tuple[str, ...] = ("none", "linear")
    gguf_permuted_qk: bool = False  # llama.cpp's converter interleaves the Q/K rows (undone at load)
    layout: str = "llama"  # tensor-name layout of the loaders: "llama" | "neox" | "gemma" | "phi3" (fused)
    hf_ignore: tuple[str, ...] = ()  # regexes (full match) of HF tensors known and deliberately not used
    gguf_ignore: tuple[str, ...] = ()  # the same for GGUF tensor names

    @property
    def gated_mlp(self) -> bool:
        return self.act != "gelu"


_ROTARY_CACHE = r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"  # older exports store RoPE's own table

ARCHS: dict[str, ArchSpec] = {
    s.name: s
    for s in (
        ArchSpec(
            name="llama",
            hf_names=("LlamaForCausalLM",),
            gguf_names=("llama",),
            gguf_permuted_qk=True,
            hf_ignore=(_ROTARY_CACHE,),
        ),
        ArchSpec(
            name="mistral",
            hf_names=("MistralForCausalLM",),
            gguf_names=("mistral",),
            gguf_permuted_qk=True,
            swa_period=1,
            hf_ignore=(_ROTARY_CACHE,),
        ),
        ArchSpec(
            name="qwen2",
            hf_names=("Qwen2ForCausalLM",),
            gguf_names=("qwen2",),
            qkv_bias=True,
            hf_ignore=(_ROTARY_CACHE,),
        ),
        ArchSpec(
            name="qwen3",
            hf_names=("Qwen3ForCausalLM",),
            gguf_names=("qwen3",),
            qk_norm=True,
            hf_ignore=(_ROTARY_CACHE,),
        ),
        ArchSpec(
            name="gemma2",
            hf_names=("Gemma2ForCausalLM",),
            gguf_names=("gemma2",),
            norm_offset=1.0,
            act="gelu_tanh",
            post_norms=True,
            embed_scale=True,
            tied_default=True,
            swa_period=2,
            layout="gemma",
        ),
        ArchSpec(
            name="gemma3",
            # the multimodal releases (4B-27B): their text model; the vision tower's tensors are ignored
            hf_names=("Gemma3ForCausalLM", "Gemma3ForConditionalGeneration"),
            gguf_names=("gemma3",),
            norm_offset=1.0,
            act="gelu_tanh",
            post_norms=True,
            qk_norm=True,
            embed_scale=True,
            tied_default=True,
            swa_period=6,
            rope_scalings=("none", "linear"),
            layout="gemma",
            hf_ignore=(r"(model\.)?(vision_tower|multi_modal_projector)\..+",),
        ),
        ArchSpec(
            name="phi3",
            hf_names=("Phi3ForCausalLM",),
            gguf_names=("phi3",),
            swa_period=1,
            rope_scalings=("none", "longrope"),
            gguf_rope_scalings=("none", "longrope"),
            layout="phi3",
        ),
        ArchSpec(
            name="gptneox",
            hf_names=("GPTNeoXForCausalLM",),
            gguf_names=("gptneox",),
            norm="layer",
            act="gelu",
            qkv_bias=True,
            out_bias=True,
            mlp_bias=True,
            parallel_residual=True,
            layout="neox",
            # the causal-mask buffers and RoPE table that older GPT-NeoX exports save with the weights
            hf_ignore=(r"gpt_neox\.layers\.\d+\.attention\.(bias|masked_bias|rotary_emb\.inv_freq)",),
        ),
    )
}
HF_ARCHS = {n: s for s in ARCHS.values() for n in s.hf_names}
GGUF_ARCHS = {n: s for s in ARCHS.values() for n in s.gguf_names}


def spec(name: str) -> ArchSpec:
    """The table entry `name` (a ModelConfig.arch). Converted caches made before the table say "llama" for
    every Llama-family model; their configs carry the resolved fields, so the llama entry reads them."""
    try:
        return ARCHS[name]
    except KeyError:
        raise ModelLoadError(f"unknown architecture {name!r}; supported: {', '.join(ARCHS)}") from None


def features(cfg) -> frozenset[str]:
    """The forward features a model (ModelConfig) uses; kernel sets declare the ones they support."""
    f = {f"norm:{cfg.norm}", f"act:{cfg.act}", f"rope:{cfg.rope_scaling.kind}"}
    if cfg.rope_local_theta:
        f.add("rope:local")
    f |= {name for name, on in _flags(cfg) if on}
    return frozenset(f)


def _flags(cfg) -> Iterable[tuple[str, bool]]:
    return (
        ("qk_norm", cfg.qk_norm),
        ("qkv_bias", cfg.qkv_bias),
        ("out_bias", cfg.out_bias),
        ("mlp_bias", cfg.mlp_bias),
        ("embed_scale", cfg.embed_scale != 1.0),
        ("partial_rotary", cfg.rot_dim != cfg.head_dim),
        ("parallel_residual", cfg.parallel_residual),
        ("tied_head", cfg.tie_embeddings),
        ("post_norms", cfg.post_norms),
        ("attn_scale", cfg.attn_scale != 0.0),
        ("attn_softcap", cfg.attn_softcap != 0.0),
        ("final_softcap", cfg.final_softcap != 0.0),
        ("sliding_window", any(cfg.layer_window(i) for i in range(cfg.n_layers))),
        ("attn_sinks", cfg.attn_sinks),
    )


ALL_FEATURES = frozenset(
    [f"norm:{n}" for n in ("rms", "layer")]
    + [f"act:{a}" for a in ("silu", "gelu_tanh", "gelu")]
    + [f"rope:{k}" for k in ("none", "linear", "dynamic", "llama3", "longrope", "local")]
    + ["qk_norm", "qkv_bias", "out_bias", "mlp_bias", "embed_scale", "partial_rotary", "parallel_residual"]
    + ["tied_head", "post_norms", "attn_scale", "attn_softcap", "final_softcap", "sliding_window", "attn_sinks"]
)


def unused_tensors(names: Iterable[str], used: set[str], ignore: Iterable[str]) -> list[str]:
    """The checkpoint tensors neither used nor on the ignore list (regexes, full match), sorted."""
    pats = [re.compile(p) for p in ignore]
    return sorted(n for n in names if n not in used and not any(p.fullmatch(n) for p in pats))


def refuse_unused(unused: list[str], arch: ArchSpec, source: str) -> None:
    """A clear error naming the tensors the entry does not use (layers folded: `...layers.*.q_norm.weight`)."""
    if not unused:
        return
    kinds: dict[str, list[str]] = {}
    for n in unused:
        kinds.setdefault(re.sub(r"(?<=\.)\d+(?=\.)", "*", n), []).append(n)
    listed = [f"{k} (x{len(ns)})" if len(ns) > 1 else ns[0] for k, ns in list(kinds.items())[:6]]
    more = f" and {len(kinds) - 6} more kinds" if len(kinds) > 6 else ""
    raise ModelLoadError(
        f"{source}: this checkpoint has tensors that the {arch.name} entry does not use: {', '.join(listed)}{more}: "
        "architecture not supported (a variant of it needs its own entry in model/arch.py)"
    )
