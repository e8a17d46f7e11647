"""Hugging Face checkpoint folders (config.json + one or many .safetensors) -> canonical tensors."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open

from infinichat.errors import ModelLoadError
from infinichat.model.arch import refuse_unused, spec, unused_tensors
from infinichat.model.config import ModelConfig
from infinichat.model.weights import validate

log = logging.getLogger(__name__)


def read_hf_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise ModelLoadError(f"{folder}: no config.json; a model folder needs config.json and .safetensors weights")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path}: not valid JSON ({e})") from None


def _read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        extra = (
            " (PyTorch .bin checkpoints are not supported; convert them to safetensors)"
            if any(folder.glob("*.bin"))
            else ""
        )
        raise ModelLoadError(f"{folder}: no .safetensors weight files{extra}")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                for name in st.keys():  # noqa: SIM118  (safe_open objects are not iterable)
                    tensors[name] = st.get_tensor(name)
        except Exception as e:  # safetensors raises its own SafetensorError on damaged files
            raise ModelLoadError(f"{f}: damaged or truncated safetensors file ({e})") from None
    return tensors


def _llama_map(i: int, cfg: ModelConfig) -> dict[str, tuple[str, str]]:
    """Llama-family names; Gemma's four norms (its `post_attention_layernorm` is the attention output's norm,
    `pre_feedforward_layernorm` the MLP input's) and Phi-3's fused qkv_proj / gate_up_proj by their layouts."""
    hf, p = f"model.layers.{i}.", f"layers.{i}."
    layout = spec(cfg.arch).layout
    m = {
        hf + "input_layernorm.weight": (p + "attn_norm.weight", ""),
        hf + "self_attn.o_proj.weight": (p + "wo.weight", ""),
        hf + "self_attn.o_proj.bias": (p + "wo.bias", ""),
        hf + "mlp.down_proj.weight": (p + "w_out.weight", ""),
        hf + "mlp.down_proj.bias": (p + "w_out.bias", ""),
    }
    if layout == "gemma":
        m[hf + "post_attention_layernorm.weight"] = (p + "post_attn_norm.weight", "")
        m[hf + "pre_feedforward_layernorm.weight"] = (p + "ffn_norm.weight", "")
        m[hf + "post_feedforward_layernorm.weight"] = (p + "post_ffn_norm.weight", "")
    else:
        m[hf + "post_attention_layernorm.weight"] = (p + "ffn_norm.weight", "")
    if layout == "phi3":  # already fused, in our row order: [q | k | v], [gate | up]
        m[hf + "self_attn.qkv_proj.weight"] = (p + "wqkv.weight", "")
        m[hf + "mlp.gate_up_proj.weight"] = (p + "w_in.weight", "")
    else:
        for x in "qkv":
            m[hf + f"self_attn.{x}_proj.weight"] = (p + "wqkv.weight", x)
            m[hf + f"self_attn.{x}_proj.bias"] = (p + "wqkv.bias", x)
        for x in ("gate", "up"):
            m[hf + f"mlp.{x}_proj.weight"] = (p + "w_in.weight", x)
            m[hf + f"mlp.{x}_proj.bias"] = (p + "w_in.bias", x)
    if cfg.attn_sinks:
        m[hf + "self_attn.sinks"] = (p + "sinks", "")
    if cfg.qk_norm:  # only where the entry reads them: elsewhere they are unused tensors, refused
        m[hf + "self_attn.q_norm.weight"] = (p + "q_norm.weight", "")
        m[hf + "self_attn.k_norm.weight"] = (p + "k_norm.weight", "")
    return m


def _neox_map(i: int, cfg: ModelConfig) -> dict[str, tuple[str, str]]:
    hf, p = f"gpt_neox.layers.{i}.", f"layers.{i}."
    m = {}
    for kind in ("weight", "bias"):
        m[hf + f"input_layernorm.{kind}"] = (p + f"attn_norm.{kind}", "")
        m[hf + f"post_attention_layernorm.{kind}"] = (p + f"ffn_norm.{kind}", "")
        m[hf + f"attention.query_key_value.{kind}"] = (p + f"wqkv.{kind}", "neox_qkv")
        m[hf + f"attention.dense.{kind}"] = (p + f"wo.{kind}", "")
        m[hf + f"mlp.dense_h_to_4h.{kind}"] = (p + f"w_in.{kind}", "")
        m[hf + f"mlp.dense_4h_to_h.{kind}"] = (p + f"w_out.{kind}", "")
    return m


def _name_map(cfg: ModelConfig) -> dict[str, tuple[str, str]]:
    if spec(cfg.arch).layout == "neox":
        m = {
            "gpt_neox.embed_in.weight": ("embed.weight", ""),
            "gpt_neox.final_layer_norm.weight": ("norm.weight", ""),
            "gpt_neox.final_layer_norm.bias": ("norm.bias", ""),
            "embed_out.weight": ("lm_head.weight", ""),
        }
        per_layer = _neox_map
    else:
        m = {
            "model.embed_tokens.weight": ("embed.weight", ""),
            "model.norm.weight": ("norm.weight", ""),
            "lm_head.weight": ("lm_head.weight", ""),
        }
        per_layer = _llama_map
    for i in range(cfg.n_layers):
        m.update(per_layer(i, cfg))
    return m


def neox_qkv_to_blocks(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF GPT-NeoX query_key_value rows are per head [q, k, v]; reorder to [all q | all k | all v]."""
    rest = t.shape[1:]
    return t.reshape(n_heads, 3, -1, *rest).transpose(0, 1).reshape(t.shape)


# where multimodal checkpoints keep their text model (Gemma 3 4B+): as saved by transformers 4.5x and 5, and the
# newer in-memory layout; renamed to the causal-LM names the maps use
_TEXT_PREFIXES = (("language_model.model.", "model."), ("model.language_model.", "model."))
_TEXT_HEADS = {"language_model.lm_head.weight": "lm_head.weight"}


def _text_model_names(raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if not any(n.startswith(p) for n in raw for p, _ in _TEXT_PREFIXES):
        return raw
    out = {}
    for n, t in raw.items():
        for p, new in _TEXT_PREFIXES:
            if n.startswith(p):
                n = new + n[len(p) :]
                break
        out[_TEXT_HEADS.get(n, n)] = t
    return out


def load_hf_folder(folder: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    cfg = ModelConfig.from_hf(read_hf_config(folder), source=str(folder / "config.json"))
    return cfg, canonical_weights(cfg, _read_safetensors(folder), str(folder))


def canonical_weights(cfg: ModelConfig, raw: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """HF-named tensors (a checkpoint's, or a transformers model's state_dict) -> the canonical float32 layout,
    strictly: a tensor neither used nor on the entry's ignore list is a ModelLoadError."""
    raw = _text_model_names(raw)
    names = _name_map(cfg)
    out: dict[str, torch.Tensor] = {}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    arch = spec(cfg.arch)
    used = {n for n in raw if n in names}
    if cfg.tie_embeddings:  # a tied checkpoint may still save its head: the same tensor as the embeddings
        used.discard("lm_head.weight")
        used.discard("embed_out.weight")
        ignore = (*arch.hf_ignore, "lm_head.weight", "embed_out.weight")
    else:
        ignore = arch.hf_ignore
    refuse_unused(unused_tensors(raw, used, ignore), arch, source)
    for hf_name in sorted(used):
        tensor = raw[hf_name]
        name, piece = names[hf_name]
        tensor = tensor.float()
        if piece == "neox_qkv":
            out[name] = neox_qkv_to_blocks(tensor, cfg.n_heads)
        elif piece:
            parts.setdefault(name, {})[piece] = tensor
        else:
            out[name] = tensor
    for name, pieces in parts.items():
        order = ("q", "k", "v") if "wqkv" in name else ("gate", "up")
        missing = [p for p in order if p not in pieces]
        if missing:
            raise ModelLoadError(f"{source}: the {missing[0]} part of {name} is missing")
        out[name] = torch.cat([pieces[p] for p in order], dim=0)
    validate(cfg, out, source)
    return out
