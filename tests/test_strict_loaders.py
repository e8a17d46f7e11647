"""Strict loaders: every checkpoint tensor is used or on its architecture entry's ignore list (model/arch.py);
anything else is refused with a ModelLoadError naming the tensors."""

from __future__ import annotations

import gguf_util
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from infinichat.errors import ModelLoadError
from infinichat.model.arch import ARCHS, unused_tensors
from infinichat.model.config import ModelConfig
from infinichat.model.gguf_loader import load_gguf_weights, open_reader
from infinichat.model.gguf_meta import read_gguf_fields
from infinichat.model.hf_loader import load_hf_folder

transformers = pytest.importorskip("transformers")


def _hf_folder(tmp_path, extra: dict[str, torch.Tensor]):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2
    )
    folder = tmp_path / "llama"
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    (f,) = folder.glob("*.safetensors")
    tensors = load_file(str(f))
    save_file({**tensors, **extra}, str(f), metadata={"format": "pt"})
    return folder


def test_hf_checkpoint_with_an_unknown_tensor_is_refused(tmp_path):
    extra = {f"model.layers.{i}.self_attn.q_norm.weight": torch.ones(16) for i in range(2)}
    folder = _hf_folder(tmp_path, extra)
    with pytest.raises(ModelLoadError) as e:
        load_hf_folder(folder)
    msg = str(e.value)
    assert "model.layers.*.self_attn.q_norm.weight (x2)" in msg, msg
    assert "the llama entry does not use" in msg and "architecture not supported" in msg, msg


def test_hf_tensors_on_the_ignore_list_are_accepted(tmp_path):
    folder = _hf_folder(tmp_path, {"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)})
    cfg, weights = load_hf_folder(folder)
    assert cfg.arch == "llama" and "layers.0.wqkv.weight" in weights


def test_gguf_file_with_an_unknown_tensor_is_refused(tmp_path):
    path = tmp_path / "extra.gguf"
    gguf_util.write_gguf(path, gguf_util.RandomLlama(), extra={"blk.1.attn_k_norm.weight": np.ones(16)})
    fields = read_gguf_fields(path)
    cfg = ModelConfig.from_gguf(fields, source=str(path))
    with pytest.raises(ModelLoadError, match=r"llama entry does not use: blk\.1\.attn_k_norm\.weight"):
        load_gguf_weights(path, open_reader(path), cfg)


def test_unused_tensors_matches_ignore_patterns_in_full():
    spec = ARCHS["gptneox"]
    names = ["gpt_neox.layers.3.attention.bias", "gpt_neox.layers.3.attention.bias_extra", "x"]
    assert unused_tensors(names, {"x"}, spec.hf_ignore) == ["gpt_neox.layers.3.attention.bias_extra"]
