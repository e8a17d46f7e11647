"""The embedded default model end to end: our GGUF conversion + forward against transformers' own GGUF
loading of the same file (it dequantizes with the same `gguf` package, so the weights are identical)."""

from __future__ import annotations

import os

import pytest
import torch

from infinichat.engine.sampling import SamplingParams
from infinichat.engine.torch_engine import TorchEngine
from infinichat.model.loader import default_model_path, load_model

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow

PROMPT = [{"role": "user", "content": "Write a short poem about the sea and the wind."}]


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    return load_model(None, "float32", cache_dir=tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def reference():
    os.environ["HF_HUB_OFFLINE"] = "1"
    path = default_model_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()
    tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model, tok


def test_config_of_default_model(ours):
    cfg = ours.cfg
    assert (cfg.arch, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.max_position) == ("llama", 30, 9, 3, 8192)
    assert cfg.tie_embeddings


def test_greedy_64_tokens_identical_to_transformers(ours, reference):
    ref_model, ref_tok = reference
    text = ours.tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True)
    ids = ours.tokenizer.encode(text, add_bos=ours.tokenizer.add_bos)
    assert ids == ref_tok(text, add_special_tokens=False)["input_ids"]

    engine = TorchEngine(ours.model, ours.tokenizer.eos_ids)
    got = [s.token for s in engine.generate(engine.new_cache(512), ids, SamplingParams(temperature=0, max_tokens=64))]
    with torch.no_grad():
        out = ref_model.generate(
            torch.tensor([ids]), max_new_tokens=64, do_sample=False, eos_token_id=sorted(ours.tokenizer.eos_ids)
        )
    want = out[0, len(ids) :].tolist()
    want = [t for t in want if t not in ours.tokenizer.eos_ids]  # generate() appends the EOS it stopped at
    assert len(got) >= 32, f"the reply is too short to be a meaningful comparison: {got}"
    assert got == want, f"ours: {ours.tokenizer.decode(got)!r}\nreference: {ref_tok.decode(want)!r}"


def test_prefill_logits_close_to_transformers(ours, reference):
    ref_model, _ = reference
    ids = ours.tokenizer.encode("The old sailor looked at the horizon and said that the storm", add_bos=False)
    engine = TorchEngine(ours.model)
    got = engine.prefill(engine.new_cache(64), ids, all_logits=True)
    with torch.no_grad():
        want = ref_model(torch.tensor([ids])).logits[0]
    assert (got - want).abs().max().item() < 1e-3  # 30 layers of fp32 on real weights
