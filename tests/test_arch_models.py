"""The 2026 families (issue 18) against transformers on tiny random-weight models, fp32, 1e-4: Gemma 2 and 3,
Phi-3 / 3.5 (LongRoPE, partial rotary, sliding window), Llama 3.2 and Qwen3; each through a HF folder and
through a llama.cpp-style GGUF file; on both kernel sets; the KV store's removal + re-rotation per layer
type; and the native decode step declining the features it does not implement.
"""

from __future__ import annotations

import math

import gguf_archs
import pytest
import torch

from infinichat.kv.cache import KVCache
from infinichat.model.hf_loader import load_hf_folder
from infinichat.model.loader import load_model
from infinichat.model.transformer import Transformer

transformers = pytest.importorskip("transformers")
from transformers import DynamicCache  # noqa: E402  (after the importorskip of transformers)

TOL = 1e-4
PREFILL, DECODE = 24, 20
HF_NAMES = ["gemma2", "gemma3", "gemma3-6layers", "phi3-longrope", "phi3-short-swa", "phi3-partial-rotary"]
HF_NAMES += ["llama3.2", "qwen3", "mistral-swa"]
GGUF_NAMES = ["gemma2-gguf", "gemma3-6layers", "phi3-longrope", "phi3-short-swa", "llama3.2", "qwen3"]


def _ids(cfg):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, cfg.vocab_size, (PREFILL,), generator=g), torch.randint(
        0, cfg.vocab_size, (DECODE,), generator=g
    )


def _theirs(ref, prompt, follow) -> torch.Tensor:
    """transformers' logits for the prompt (one call) and then each follow-up token (one call each)."""
    with torch.no_grad():
        out = ref(prompt[None], past_key_values=DynamicCache(config=ref.config), use_cache=True)
        want = [out.logits[0]]
        for tok in follow.tolist():
            out = ref(torch.tensor([[tok]]), past_key_values=out.past_key_values, use_cache=True)
            want.append(out.logits[0])
    return torch.cat(want)  # (PREFILL + DECODE, V)


def _ours(model: Transformer, prompt, follow) -> torch.Tensor:
    cfg = model.cfg
    cache = KVCache(cfg, 64, model.dtype, rope=model.rope)
    got = [model(prompt, torch.arange(PREFILL), cache, 0, all_logits=True)]
    for t, tok in enumerate(follow.tolist()):
        pos = PREFILL + t
        got.append(model(torch.tensor([tok]), torch.tensor([pos]), cache, pos)[None])
    return torch.cat(got)


def _hf(name, tmp_path, kernels="auto"):
    ref = gguf_archs.tiny(name)
    folder = tmp_path / name
    ref.save_pretrained(folder)
    cfg, weights = load_hf_folder(folder)
    return ref, Transformer(cfg, weights, torch.float32, kernels=kernels)


def _check(got, want, name):
    assert got.shape == want.shape
    assert want.abs().max() > 0.05, "logits too small for the comparison to mean anything"
    diff = (got - want).abs().max().item()
    assert diff <= TOL, f"{name}: max abs diff {diff:.2e} > {TOL}"


@pytest.mark.parametrize("kernels", ["cpu-native", "torch"])
@pytest.mark.parametrize("name", HF_NAMES)
def test_hf_folder_prefill_and_decode_match_transformers(name, kernels, tmp_path):
    ref, ours = _hf(name, tmp_path, kernels)
    assert ours.kernels.name == kernels
    prompt, follow = _ids(ours.cfg)
    _check(_ours(ours, prompt, follow), _theirs(ref, prompt, follow), name)


def test_the_configs_read_what_the_families_declare(tmp_path):
    """The features the tiny models are meant to exercise are really switched on (else parity proves less)."""
    got = {n: _hf(n, tmp_path)[1].cfg for n in ("gemma2", "gemma3", "phi3-longrope", "phi3-short-swa", "llama3.2")}
    g2, g3 = got["gemma2"], got["gemma3"]
    assert (g2.attn_softcap, g2.final_softcap, g2.sliding_window) == (5.0, 3.0, 8)
    assert g2.sliding_layers == (True, False, True) and g2.attn_scale == pytest.approx(24**-0.5)
    assert g2.post_norms and g2.act == "gelu_tanh" and g2.tie_embeddings and g2.embed_scale == 8.0
    assert g3.qk_norm and g3.rope_local_theta == 10000.0 and g3.rope_theta == 1e6
    assert g3.rope_scaling.kind == "linear" and g3.sliding_layers == (True, False, True)
    assert [g3.local_rope(i) for i in range(3)] == [True, False, True]
    p, ps = got["phi3-longrope"], got["phi3-short-swa"]
    assert p.rope_scaling.kind == "longrope" and p.rope_scaling.original_max_position == 16
    assert ps.sliding_window == 10 and ps.sliding_layers == ()
    assert ps.rope_scaling.attention_factor == pytest.approx(math.sqrt(1 + math.log(4) / math.log(64)))
    assert got["llama3.2"].tie_embeddings and got["llama3.2"].rope_scaling.kind == "llama3"


@pytest.mark.parametrize("name", GGUF_NAMES)
def test_gguf_round_trip_matches_transformers(name, tmp_path):
    """A llama.cpp-layout GGUF of the same model, through load_model (conversion + cache): the same logits."""
    ref = gguf_archs.tiny(name)
    path = tmp_path / f"{name}.gguf"
    gguf_archs.write_arch_gguf(path, ref)
    loaded = load_model(path, dtype="float32", cache_dir=tmp_path / "cache", kernels="torch")
    hf_cfg = load_hf_folder(_saved(ref, tmp_path / "hf"))[0]
    _same_forward_fields(loaded.cfg, hf_cfg)
    prompt, follow = _ids(loaded.cfg)
    _check(_ours(loaded.model, prompt, follow), _theirs(ref, prompt, follow), name)


def _saved(ref, folder):
    ref.save_pretrained(folder)
    return folder


def _same_forward_fields(a, b):
    """The GGUF config reads what the HF one does, where both files carry it."""
    for f in ("arch", "n_layers", "n_heads", "n_kv_heads", "head_dim", "rot_dim", "sliding_window", "attn_sinks"):
        assert getattr(a, f) == getattr(b, f), f
    for f in ("post_norms", "qk_norm", "act", "attn_softcap", "final_softcap", "rope_local_theta", "tie_embeddings"):
        assert getattr(a, f) == getattr(b, f), f
    assert [a.layer_window(i) for i in range(a.n_layers)] == [b.layer_window(i) for i in range(b.n_layers)]
    if b.rope_scaling.kind == "longrope":
        ra, rb = a.rope_scaling, b.rope_scaling
        assert ra.kind == "longrope" and ra.original_max_position == rb.original_max_position
        assert ra.attention_factor == pytest.approx(rb.attention_factor)
        assert ra.short_factor == pytest.approx(rb.short_factor) and ra.long_factor == pytest.approx(rb.long_factor)


def test_unexpected_tensors_and_unknown_architectures_are_refused(tmp_path):
    """The strict loaders' clear error: a tensor the entry does not read (GGUF and HF), a family not in the table."""
    from safetensors.torch import load_file, save_file

    from infinichat.errors import ModelLoadError

    ref = gguf_archs.tiny("gemma2-gguf")
    bad = tmp_path / "bad.gguf"
    gguf_archs.write_arch_gguf(bad, ref, add={"blk.0.attn_q_norm.weight": torch.ones(16).numpy()})
    with pytest.raises(ModelLoadError, match=r"gemma2 entry does not use: blk\.0\.attn_q_norm\.weight"):
        load_model(bad, dtype="float32", cache_dir=tmp_path / "c1")
    missing = tmp_path / "missing.gguf"
    gguf_archs.write_arch_gguf(missing, ref, drop=("blk.1.post_ffw_norm.weight",))
    with pytest.raises(ModelLoadError, match=r"missing tensors layers\.1\.post_ffn_norm\.weight"):
        load_model(missing, dtype="float32", cache_dir=tmp_path / "c2")
    folder = _saved(gguf_archs.tiny("phi3-longrope"), tmp_path / "phi3")
    (f,) = folder.glob("*.safetensors")
    save_file({**load_file(str(f)), "model.layers.0.self_attn.q_proj.weight": torch.zeros(64, 64)}, str(f))
    with pytest.raises(ModelLoadError, match=r"phi3 entry does not use: model\.layers\.0\.self_attn\.q_proj"):
        load_hf_folder(folder)
    folder = _saved(ref, tmp_path / "hf")
    text = (folder / "config.json").read_text().replace("Gemma2ForCausalLM", "Gemma4ForCausalLM")
    (folder / "config.json").write_text(text)
    with pytest.raises(ModelLoadError, match=r"unsupported architecture 'Gemma4ForCausalLM'; supported: .*Gemma2"):
        load_hf_folder(folder)


# the features of each family the native one-token step (native/decode.c) does not implement: it declines those
# models by declaration (native.DECODE_FEATURES) and the layer-by-layer forward runs
NATIVE_DECLINES = {
    "gemma2": {"act:gelu_tanh", "attn_scale", "attn_softcap", "embed_scale", "final_softcap", "post_norms"}
    | {"sliding_window"},
    "gemma3": {"act:gelu_tanh", "attn_scale", "embed_scale", "post_norms", "qk_norm", "rope:local", "sliding_window"},
    "phi3-longrope": {"rope:longrope"},
    "phi3-short-swa": {"rope:longrope", "sliding_window"},
    "phi3-partial-rotary": {"partial_rotary"},
    "llama3.2": set(),
    "qwen3": {"qk_norm"},
}


@pytest.mark.parametrize("name", list(NATIVE_DECLINES))
def test_quantized_models_take_the_native_step_only_where_it_implements_their_features(name, tmp_path):
    """int8 on cpu-native: the native step where DECODE_FEATURES covers the model (Llama 3.2), else declined
    with the features named; either way the logits stay near the float32 model's (bf16 activations, int8)."""
    from infinichat import native
    from infinichat.model.arch import features

    ref = gguf_archs.tiny(name)
    folder = _saved(ref, tmp_path / name)
    cfg, weights = load_hf_folder(folder)
    q8 = Transformer(cfg, weights, torch.bfloat16, quant="int8", kernels="cpu-native")
    f32 = Transformer(cfg, weights, torch.float32, kernels="torch")
    missing = features(cfg) - native.DECODE_FEATURES
    assert missing == NATIVE_DECLINES[name]
    if native.library() is not None:
        assert (q8.kernels.decoder is not None) == (not missing)
        if not missing:  # and it binds to the model's bf16 cache: the steps below run natively
            assert q8.kernels.decoder.bind(KVCache(cfg, 64, torch.bfloat16, rope=q8.rope)) is not None
        else:
            assert all(f in str(native.unsupported(q8)) for f in missing)
    prompt, follow = _ids(cfg)
    got, want = _ours(q8, prompt, follow), _ours(f32, prompt, follow)
    rel = ((got - want).abs().amax(-1) / want.abs().amax(-1)).mean().item()
    assert rel <= 0.05, f"{name}: mean relative logit error {rel:.3f}"


@pytest.mark.parametrize("name", ["gemma2-gguf", "gemma3-6layers"])
def test_gemma_sentencepiece_vocabulary_ids_equal_transformers(name, tmp_path, monkeypatch):
    """Gemma's vocabulary kind: SentencePiece with byte fallback and no space prefix (llama.cpp writes
    add_space_prefix false for Gemma). A tiny one in a Gemma GGUF; ids equal transformers' reading of the
    same file on the mixed test text and the SentencePiece cases; the model itself loads with it."""
    from test_tokenizer import MIXED_TEXT, SPM_TEXTS

    from infinichat.model.tokenizer import Tokenizer

    monkeypatch.setitem(gguf_archs._SMALL, "vocab_size", gguf_archs.SPM_V)
    ref = gguf_archs.tiny(name)
    path = tmp_path / f"{name}.gguf"
    gguf_archs.write_arch_gguf(path, ref, vocab="spm")
    ours = Tokenizer.from_gguf(path)
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    assert ours.meta.kind == "sentencepiece" and ours.add_bos
    for text in [*SPM_TEXTS, MIXED_TEXT, " leading space", "<start_of_turn>user\nhi<end_of_turn>"]:
        ids = ours.encode(text)
        assert ids == theirs.encode(text, add_special_tokens=False), text
        assert ours.encode(text, add_bos=True) == theirs.encode(text), text
    assert ours.id_to_piece(ours.encode("hello world")[0]) == "he"  # no space prefix: not "▁hello"
    assert ours.id_to_piece(ours.encode(" hello world")[0]).startswith("▁")
    ids = ours.encode("z")
    assert ours.id_to_piece(ids[0]) == "<0x7A>"  # byte fallback
    loaded = load_model(path, dtype="float32", cache_dir=tmp_path / "cache")
    assert loaded.tokenizer.encode(MIXED_TEXT) == ours.encode(MIXED_TEXT)


@pytest.mark.parametrize("name", ["gemma2", "gemma3", "phi3-short-swa"])
def test_a_batch_of_windowed_soft_capped_sequences_gives_each_its_solo_logits(name, tmp_path):
    """forward_batch (continuous batching) over sequences of different lengths, some past the window: each
    sequence's logits equal its solo run (fp32, 1e-5)."""
    from infinichat.model.transformer import BatchItem

    _, ours = _hf(name, tmp_path, "torch")
    cfg = ours.cfg
    g = torch.Generator().manual_seed(5)
    cached, new = (19, 0, 3, 12), (1, 6, 9, 1)
    ids = [torch.randint(0, cfg.vocab_size, (c + n,), generator=g) for c, n in zip(cached, new, strict=True)]
    solo, batch = [KVCache(cfg, 32, rope=ours.rope) for _ in ids], [KVCache(cfg, 32, rope=ours.rope) for _ in ids]
    for t, c, a, b in zip(ids, cached, solo, batch, strict=True):
        if c:
            ours(t[:c], torch.arange(c), a, 0)
            ours(t[:c], torch.arange(c), b, 0)
    rows = list(zip(ids, cached, new, solo, batch, strict=True))
    want = [ours(t[c:], torch.arange(c, c + n), a, c, all_logits=True) for t, c, n, a, _ in rows]
    items = [BatchItem(t[c:], torch.arange(c, c + n), b, c) for t, c, n, _, b in rows]
    got = ours.forward_batch(items, all_logits=True)
    for i, (a, b) in enumerate(zip(want, got, strict=True)):
        assert (a - b).abs().max().item() <= 1e-5, f"sequence {i}"


def test_gemma3_multimodal_checkpoint_runs_its_text_model(tmp_path):
    """Gemma 3 4B-27B ship as Gemma3ForConditionalGeneration: `text_config` (sparse, older field names here:
    rope_theta / rope_local_base_freq / rope_scaling / sliding_window_pattern, defaults left out) and the
    text weights under `language_model.`; the vision tower's tensors are ignored by name. Text-only logits
    equal transformers' multimodal model's (it reads the same edited config.json)."""
    import json

    text = gguf_archs.configs()["gemma3"]().to_dict()
    vision = transformers.SiglipVisionConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14
    )
    torch.manual_seed(0)
    mm = transformers.Gemma3Config(text_config=text, vision_config=vision.to_dict(), mm_tokens_per_image=4)
    model = transformers.Gemma3ForConditionalGeneration(mm).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.add_(torch.randn(p.shape) * 0.1)
    folder = _saved(model, tmp_path / "gemma3-mm")
    path = folder / "config.json"
    c = json.loads(path.read_text())
    t = c["text_config"]
    for k in ("rope_parameters", "layer_types", "hidden_activation", "rms_norm_eps", "_sliding_window_pattern"):
        t.pop(k, None)
    t |= {"rope_theta": 1e6, "rope_local_base_freq": 10000.0, "rope_scaling": {"rope_type": "linear", "factor": 2.0}}
    t["sliding_window_pattern"] = 2  # layers 0 and 2 windowed, 1 global
    path.write_text(json.dumps(c))
    ref = transformers.Gemma3ForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    ref.config.text_config._attn_implementation = "eager"
    cfg, weights = load_hf_folder(folder)
    assert cfg.arch == "gemma3" and [cfg.layer_window(i) for i in range(3)] == [8, 0, 8]
    assert cfg.tie_embeddings and cfg.rope_local_theta == 10000.0 and cfg.rope_scaling.kind == "linear"
    ours = Transformer(cfg, weights, torch.float32, kernels="torch")
    prompt, follow = _ids(cfg)
    prompt, follow = prompt % 260, follow % 260  # below the image / begin-of-image tokens
    _check(_ours(ours, prompt, follow), _theirs(ref, prompt, follow), "gemma3-multimodal")


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["gemma2", "gemma3", "phi3-short-swa", "llama3.2"])
def test_new_families_on_cuda_match_transformers(name, tmp_path):
    """The torch kernels on a CUDA device (weights, store and attention variants there), fp32, against
    transformers on the CPU. Skipped without a GPU (not run yet: benchmarks/gpu_check.py runs it)."""
    ref = gguf_archs.tiny(name)
    cfg, weights = load_hf_folder(_saved(ref, tmp_path / name))
    ours = Transformer(cfg, weights, torch.float32, device="cuda", kernels="torch")
    prompt, follow = _ids(cfg)
    _check(_ours(ours, prompt, follow).cpu(), _theirs(ref, prompt, follow), name)
