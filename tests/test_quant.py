"""Weight-only int8 / int4 quantization (model/quant.py): the kernels against a dequantized reference, the
quantizers' error bounds, and a quantized model against a float32 model holding the dequantized weights.
Grouped int8's products run natively (native/decode.c's ic_matmul) where the library builds, else over the
dequantized weight; both are checked here."""

from __future__ import annotations

import pytest
import torch

from infinichat import native
from infinichat.errors import InfinichatError
from infinichat.kernels.cpu_native import QUANT_DENSE_MIN_T
from infinichat.kv.cache import KVCache
from infinichat.model import quant
from infinichat.model.config import ModelConfig
from infinichat.model.quant import (
    Int4Linear,
    Int8GroupLinear,
    Int8Linear,
    quantize_int4,
    quantize_int8,
    quantize_int8_group,
)
from infinichat.model.transformer import Transformer


def _rand(*shape, seed=0, scale=0.05):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def _bf16_reference(x: torch.Tensor, w_deq: torch.Tensor) -> torch.Tensor:
    """x (bf16) @ w_deq^T in float64: what the kernels compute before rounding their output to bf16."""
    return x.double() @ w_deq.double().T


# shapes of the default model's matrices (qkv, gate|up, down) and a small one
SHAPES = [(960, 576), (3072, 576), (576, 1536), (64, 96)]


@pytest.mark.parametrize("N,K", SHAPES)
@pytest.mark.parametrize("T", [1, 5])
def test_int8_kernel_equals_dequantized_product(N, K, T):
    w, x = _rand(N, K, seed=N), _rand(T, K, seed=K, scale=1.0).bfloat16()
    lin = Int8Linear(*quantize_int8(w))
    ref = _bf16_reference(x, lin.dense(torch.float32))
    got = lin(x)
    assert got.dtype == torch.bfloat16 and got.shape == (T, N)
    # the kernel accumulates in float32 and rounds to bf16 once: relative error <= 2^-8 plus the sum's rounding
    err = (got.double() - ref).abs()
    assert (err <= ref.abs() * 2**-8 + 1e-4 * ref.abs().max()).all(), f"max err {err.max().item():.2e}"


def _at_offset(t: torch.Tensor, offset: int) -> torch.Tensor:
    """A copy of t starting `offset` bytes past a 64-byte boundary."""
    size = t.element_size()
    buf = torch.empty(t.numel() + 128 // size, dtype=t.dtype)
    start = ((-buf.data_ptr()) % 64 + offset) // size
    out = buf[start : start + t.numel()].view_as(t)
    out.copy_(t)
    return out


@pytest.mark.parametrize("offset", [8, 24, 40])
def test_int8_kernel_takes_weights_at_any_8_byte_offset(offset):
    """Weights memory-mapped from a cached file start at 8-byte steps; torch._weight_int8pack_mm segfaulted on
    such a head (not 64-byte aligned) for 5+ input rows. Int8Linear copies them onto an aligned start."""
    w, x = _rand(3072, 576, seed=14), _rand(5, 576, seed=15, scale=1.0).bfloat16()
    q, s = quantize_int8(w)
    moved, smoved = _at_offset(q, offset), _at_offset(s, offset)
    assert moved.data_ptr() % 64 == offset and smoved.data_ptr() % 64 == offset
    assert torch.equal(Int8Linear(moved, smoved)(x), Int8Linear(q, s)(x))


@pytest.mark.parametrize("N,K", SHAPES)
@pytest.mark.parametrize("T", [1, 5])
def test_int4_kernel_equals_dequantized_product(N, K, T):
    w, x = _rand(N, K, seed=N), _rand(T, K, seed=K, scale=1.0).bfloat16()
    lin = Int4Linear(*quantize_int4(w))
    ref = _bf16_reference(x, lin.dense(torch.float32))
    err = (lin(x).double() - ref).abs()
    assert (err <= ref.abs() * 2**-8 + 1e-4 * ref.abs().max()).all(), f"max err {err.max().item():.2e}"


HAS_VNNI = native.library() is not None and native._cpu_flags() >= native.VNNI


@pytest.mark.parametrize("N,K", SHAPES)
@pytest.mark.parametrize("T", [1, 5, 16, 37])
@pytest.mark.parametrize("path", ["native-avx2", "native-vnni", "dense"])
def test_int8_group_product_equals_dequantized_product(N, K, T, path):
    """The native products quantize x per block of 32 to int16 and round their float32 sums to bf16 once (AVX2:
    4 tokens per weight read; AVX-512 VNNI, from 16 tokens on: 16 tokens in the lanes, 37 = two full tiles and
    a padded one);
    without the library, a float32 product over the dequantized weight does the same job."""
    if path.startswith("native") and native.library() is None:
        pytest.skip(f"native library: {native.status()}")
    if path == "native-vnni" and not HAS_VNNI:
        pytest.skip("no AVX-512 VNNI here")
    w, x = _rand(N, K, seed=N), _rand(T, K, seed=K, scale=1.0).bfloat16()
    lin = Int8GroupLinear(*quantize_int8_group(w))
    if path == "dense":
        lin._native = None
    else:
        lin._native = native.Matmul(native.library(), lin, vnni=path == "native-vnni")
    ref = _bf16_reference(x, lin.dense(torch.float32))
    got = lin(x)
    assert got.dtype == torch.bfloat16 and got.shape == (T, N)
    assert (lin._native is not None) == path.startswith("native")
    err = (got.double() - ref).abs()
    assert (err <= ref.abs() * 2**-8 + 1e-4 * ref.abs().max()).all(), f"max err {err.max().item():.2e}"


@pytest.mark.skipif(native.library() is None, reason="needs the native library")
def test_native_products_of_every_kind_and_bias():
    """ic_matmul takes the int4 and per-row int8 layouts too (the decode step's row products), with a bias."""
    w, x = _rand(96, 160, seed=11), _rand(21, 160, seed=12, scale=1.0)  # VNNI: a full tile of 16 and 5 more
    bias = _rand(96, seed=13)
    for lin in (Int4Linear(*quantize_int4(w)), Int8Linear(*quantize_int8(w)), Int8GroupLinear(*quantize_int8_group(w))):
        ref = x.double() @ lin.dense(torch.float64).T
        # int8 weights: int16 activations (~2^-16 of each block's largest); int4: the decode step's two int8
        # levels (~2^-15), measured 2e-4 of the largest output here
        tol = (5e-4 if isinstance(lin, Int4Linear) else 1e-4) * ref.abs().max().item()
        for vnni in (False, True) if HAS_VNNI else (False,):
            mm = native.Matmul(native.library(), lin, vnni=vnni)
            err = (mm(x).double() - ref).abs().max().item()
            assert err <= tol, (type(lin).__name__, vnni, err)
            m = native._mat(lin, bias.data_ptr())
            y = torch.empty(21, 96)
            assert native.library().ic_matmul(native.ctypes.byref(m), x.data_ptr(), 21, y.data_ptr(), 1, vnni) == 0
            assert (y.double() - (ref + bias.double())).abs().max().item() <= tol
    with pytest.raises(ValueError, match="input of 64 features for a 96x160 weight"):
        mm(torch.zeros(2, 64))


def test_int4_dense_matches_the_kernels_own_dequantization():
    """Our nibble layout and scale/zero layout decode to exactly what the kernel multiplies by: the kernel
    applied to the identity matrix returns its dequantized weight (rounded to bf16)."""
    w = _rand(960, 576, seed=3)
    lin = Int4Linear(*quantize_int4(w))
    kernel_w = lin(torch.eye(576, dtype=torch.bfloat16)).T  # (N, K) bf16
    assert torch.equal(kernel_w, lin.dense(torch.bfloat16))


def test_quantizers_stay_within_half_a_step():
    w = _rand(192, 256, seed=4)
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and int(q.abs().max()) <= 127
    assert ((Int8Linear(q, s).dense(torch.float32) - w).abs() <= s.float()[:, None] * 0.5 + 1e-6).all()
    nib, sz = quantize_int4(w)
    assert nib.shape == (192, 128) and sz.shape == (192, 256 // quant.GROUP, 2)
    step = sz[..., 0].float().repeat_interleave(quant.GROUP, dim=1)  # (N, K)
    err = (Int4Linear(nib, sz).dense(torch.float32) - w).abs()
    # half a step, plus the bf16 rounding of scale and zero (a few 2^-8 of the group's range)
    assert (err <= step * (0.5 + 15 * 2**-8) + 2**-8 * w.abs().max()).all(), f"{(err / step).max().item():.3f} steps"


def test_int8_group_quantizer_error():
    """Half a step of the group's 256 levels plus the bf16 rounding of scale and zero. For Gaussian weights a
    group of 32 spans ~4 sigma against a row of 256's ~5.8 (both ends of 255 steps vs +-127): steps ~1.45x
    finer than per-row int8's, measured 1.5x smaller mean error; asserted >= 1.3x."""
    w = _rand(192, 256, seed=4)
    q, sz = quantize_int8_group(w)
    assert q.dtype == torch.int8 and sz.shape == (192, 256 // quant.GROUP, 2) and sz.dtype == torch.bfloat16
    step = sz[..., 0].float().repeat_interleave(quant.GROUP, dim=1)  # (N, K)
    err = (Int8GroupLinear(q, sz).dense(torch.float32) - w).abs()
    assert (err <= step * (0.5 + 128 * 2**-8) + 2**-8 * w.abs().max()).all(), f"{(err / step).max().item():.3f}"
    row_err = (Int8Linear(*quantize_int8(w)).dense(torch.float32) - w).abs()
    assert err.mean() * 1.3 <= row_err.mean(), (err.mean().item(), row_err.mean().item())


def _q4_1_levels(N: int, K: int, g: torch.Generator) -> torch.Tensor:
    """(N, K) random 4-bit levels in which every group spans the whole grid, as Q4_1's min/max blocks do."""
    q = torch.randint(0, 16, (N, K), generator=g)
    q[:, :: quant.GROUP] = 0
    q[:, 1 :: quant.GROUP] = 15
    return q


def test_int8_group_holds_a_q4_1_grid():
    """A Q4_1 group (16 levels lo + i*d) lands on every 17th of the 256 levels: exactly where d/17 and the zero
    are representable in bf16, and within a step of them (d/17) otherwise."""
    g = torch.Generator().manual_seed(6)
    N, K = 64, 128
    q = _q4_1_levels(N, K, g)
    s = 2.0 ** torch.randint(-13, -9, (N, K // quant.GROUP, 1), generator=g)  # (N, G, 1) the int8 step
    lo = -128 * s + s * torch.randint(-64, 64, s.shape, generator=g)  # zero = lo + 128 s: a few bits
    w = (q.view(N, -1, quant.GROUP) * 17 * s + lo).view(N, K)  # d = 17 s
    assert torch.equal(Int8GroupLinear(*quantize_int8_group(w)).dense(torch.float32), w)
    # arbitrary steps, groups roughly centred (weights are: the zero is then within a few steps of 0, and its
    # bf16 rounding small against the step)
    d = torch.rand(N, K // quant.GROUP, 1, generator=g) * 0.01 + 0.001
    w = (q.view(N, -1, quant.GROUP) * d - d * (7.5 + torch.randn(d.shape, generator=g))).view(N, K)
    err = (Int8GroupLinear(*quantize_int8_group(w)).dense(torch.float32) - w).abs().view(N, -1, quant.GROUP)
    assert (err <= d / 17).all(), f"{(err / d).max().item():.3f} d"
    row_err = (Int8Linear(*quantize_int8(w)).dense(torch.float32) - w).abs().view(N, -1, quant.GROUP)
    assert err.mean() * 2 <= row_err.mean()  # measured 2.3x: the bf16 rounding of s (~d/17 * 2^-9 per level)


def test_int4_recovers_a_q4_1_grid():
    """Weights already on a 4-bit min/max grid (what a GGUF Q4_1 file holds) come back unchanged when the
    grid's step and offset are representable in bf16."""
    g = torch.Generator().manual_seed(5)
    N, K = 64, 128
    q = _q4_1_levels(N, K, g)
    d = 2.0 ** torch.randint(-9, -5, (N, K // quant.GROUP, 1), generator=g)  # (N, G, 1) powers of two
    m = -8 * d * torch.randint(1, 3, d.shape, generator=g)  # offsets on the same grid
    w = (q.view(N, -1, quant.GROUP) * d + m).view(N, K)
    assert torch.equal(Int4Linear(*quantize_int4(w)).dense(torch.float32), w)


def test_quantize_picks_formats_and_rejects_bad_modes():
    w = {
        "embed.weight": _rand(300, 64),
        "norm.weight": torch.ones(64),
        "layers.0.wqkv.weight": _rand(128, 64),
        "layers.0.w_out.weight": _rand(64, 40),  # K=40: no int4 group
        "layers.0.attn_norm.weight": torch.ones(64),
    }
    flat = quant.quantize(w, "int4", tie_embeddings=True)
    assert "layers.0.wqkv.q4" in flat and "layers.0.w_out.q8" in flat and "embed.q8" in flat
    flat = quant.quantize(w, "int8", tie_embeddings=True, int8_groups=True)
    assert "layers.0.wqkv.q8g" in flat and "layers.0.wqkv.scale_zero" in flat and "layers.0.w_out.q8" in flat
    assert "embed.q8" in flat and "embed.weight" in flat  # the head: per-row int8 next to its dense rows
    flat = quant.quantize(w, "int8", tie_embeddings=True, int8_groups=False)
    assert "layers.0.wqkv.q8" in flat and not any(n.endswith(".q8g") for n in flat)
    assert quant.cache_tag("int4") == "int4"
    assert quant.cache_tag("int8") == ("int8g" if native.library() is not None else "int8")
    assert torch.equal(flat["norm.weight"], w["norm.weight"])
    assert set(quant.quantize(w, "none", True)) == set(w)
    with pytest.raises(InfinichatError, match=r"int3.*none, int8, int4"):
        quant.check_mode("int3")


# ---------------------------------------------------------------------------------------------- whole model
def _cfg(**kw) -> ModelConfig:
    return ModelConfig(
        arch="llama",
        vocab_size=211,
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=16,
        ffn_dim=96,
        max_position=512,
        **kw,
    )


def _weights(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    from infinichat.model.weights import expected_shapes

    g = torch.Generator().manual_seed(7)
    return {
        n: (1 + 0.1 * torch.randn(s, generator=g)) if len(s) == 1 else torch.randn(s, generator=g) * 0.15
        for n, s in expected_shapes(cfg).items()
    }


def _dequantized(model: Transformer) -> dict[str, torch.Tensor]:
    """The quantized model's weights as a dense float32 dict (the reference model's weights)."""
    out = {"norm.weight": model.norm[0].float()}
    head = model.lm_head
    out["embed.weight" if model.cfg.tie_embeddings else "lm_head.weight"] = head.dense(torch.float32)
    if model.embed is not None:
        out["embed.weight"] = model.embed.float()
    for i, L in enumerate(model.layers):
        for n, t in L.items():
            out[f"layers.{i}.{n}"] = t.dense(torch.float32) if isinstance(t, quant.QuantLinear) else t.float()
    return out


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("tied", [True, False])
def test_quantized_model_matches_float32_model_of_its_dequantized_weights(mode, tied):
    cfg = _cfg(tie_embeddings=tied)
    qm = Transformer(cfg, _weights(cfg), torch.bfloat16, quant=mode)
    assert all(isinstance(L["wqkv.weight"], quant.QuantLinear) for L in qm.layers)
    ref = Transformer(cfg, _dequantized(qm), torch.float32)
    n = (
        QUANT_DENSE_MIN_T[qm.kernels.quant_layout] + 8
    )  # a prompt long enough for the float32 path over dequantized weights
    ids = torch.randint(0, cfg.vocab_size, (n + 6,), generator=torch.Generator().manual_seed(8))
    cq, cr = KVCache(cfg, n + 72, torch.bfloat16), KVCache(cfg, n + 72)
    got = qm(ids[:n], torch.arange(n), cq, 0, all_logits=True)
    want = ref(ids[:n], torch.arange(n), cr, 0, all_logits=True)
    # float32 products over the same weights; the K/V cache is bf16 on the quantized side only
    assert (got - want).abs().max().item() <= 0.02 * want.abs().max().item()
    for t in range(n, n + 6):  # decode: the int8/int4 kernels with bf16 activations
        got = qm(ids[t : t + 1], torch.tensor([t]), cq, t)
        want = ref(ids[t : t + 1], torch.tensor([t]), cr, t)
        assert (got - want).abs().max().item() <= 0.05 * want.abs().max().item() + 0.02
        assert got.argmax() == want.argmax() or want.topk(2).values.diff().abs().item() < 0.05
    a = n + 6
    for size, seed in ((20, 10), (40, 11)):  # chunks through the kernels (grouped int8: float32 from 32 on)
        more = torch.randint(0, cfg.vocab_size, (size,), generator=torch.Generator().manual_seed(seed))
        got = qm(more, torch.arange(a, a + size), cq, a, all_logits=True)
        want = ref(more, torch.arange(a, a + size), cr, a, all_logits=True)
        err = (got - want).abs().max().item() / want.abs().max().item()
        assert err <= 0.05 + 0.02 / want.abs().max().item()
        if qm.kernels.quant_layout == "int8g" and size >= qm.kernels.fp32_min:  # float32 activations: measured 0.8-1.0%
            assert err <= 0.02, err  # (int4's bf16 activations: 1.4-2.1% on the same chunk)
        a += size


def test_quant_needs_bfloat16():
    cfg = _cfg()
    with pytest.raises(InfinichatError, match=r"--quant int8 .*bfloat16.*float32"):
        Transformer(cfg, _weights(cfg), torch.float32, quant="int8")
    with pytest.raises(InfinichatError, match=r"int5"):
        Transformer(cfg, _weights(cfg), torch.bfloat16, quant="int5")


def test_quantized_head_rescores_its_top_candidates_exactly():
    """The int8 head ranks the vocabulary; its top candidates get the dense head's logits back, so the
    greedy token is the one a dense head over the same (quantized) layers would pick."""
    from infinichat.model.transformer import RESCORE_TOP

    cfg = _cfg(tie_embeddings=True)
    flat = quant.quantize(_weights(cfg), "int4", tie_embeddings=True)
    rescored = Transformer(cfg, flat, torch.bfloat16, quant="int4")
    dense_head = Transformer(
        cfg,
        {k: v for k, v in flat.items() if not k.startswith("embed.") or k == "embed.weight"},
        torch.bfloat16,
        quant="int4",
    )
    assert isinstance(rescored.lm_head, quant.QuantLinear) and isinstance(dense_head.lm_head, torch.Tensor)
    rescored.kernels.decoder = (
        None  # both through the PyTorch layers (a dense head has no native step): same hidden states
    )
    ids = torch.randint(0, cfg.vocab_size, (12,), generator=torch.Generator().manual_seed(9))
    caches = [KVCache(cfg, 16, torch.bfloat16) for _ in range(2)]
    for t in range(12):
        a, b = (m(ids[t : t + 1], torch.tensor([t]), c, t) for m, c in zip((rescored, dense_head), caches, strict=True))
        top = b.topk(RESCORE_TOP // 2).indices  # well inside the int8 head's candidates
        assert a.argmax() == b.argmax()
        assert ((a[top] - b[top]).abs() <= b[top].abs() * 2**-7).all()  # within one bf16 rounding
