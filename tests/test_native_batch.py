"""The native batched step (decode.c's ic_decode_batch, kernels `decode_batch`): several sequences' one-token steps
in one call that reads the weights once. Each row's arithmetic is the one-token step's, op for op (with AVX-512
VNNI, the same exact integer sums and the same float steps), so a batched row must equal the sequence's step
alone bit for bit, logits, hidden state and the K/V rows written, at the same thread count.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from test_native import _pair, needs_lib

from infinichat import native
from infinichat.kv.cache import KVCache
from infinichat.model.transformer import BatchItem

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LENGTHS = [3, 70, 150, 1, 129]  # one and more key blocks of 64, split over the threads differently
# with AVX-512 VNNI, 3 rows take the 4-token tiles, 5 one 8-token tile, 11 two (the second one partly padding);
# the AVX2 row products take 4 and 2 rows per pass over a weight row, and single rows
ROWS = {2: LENGTHS[1:3], 3: LENGTHS[:3], 5: LENGTHS, 11: LENGTHS * 2 + [40]}


def _caches(qm, seed: int, lengths: list[int] = LENGTHS) -> tuple[list[KVCache], list[int], torch.Tensor]:
    """Sequences of `lengths` prompt tokens (through the PyTorch path), and each one's next token."""
    cfg = qm.cfg
    g = torch.Generator().manual_seed(seed)
    caches = []
    for n in lengths:
        c = KVCache(cfg, 256, torch.bfloat16)
        qm(torch.randint(0, cfg.vocab_size, (n,), generator=g), torch.arange(n), c, 0)
        caches.append(c)
    return caches, list(lengths), torch.randint(0, cfg.vocab_size, (len(lengths),), generator=g)


@contextlib.contextmanager
def _batch_kernels(path: str):
    """The batched step's products: "vnni", the AVX-512 VNNI kernels (tokens in the lanes; skipped on CPUs without
    them), or "avx2", the AVX2 row products every CPU runs (decode.c's ic_batch_vnni(0) forces them here)."""
    lib = native.library()
    assert lib is not None
    if path == "vnni" and not lib.ic_batch_vnni(-1):
        pytest.skip("no AVX-512 VNNI here")
    try:
        if path == "avx2":
            assert lib.ic_batch_vnni(0) == 0
        yield
    finally:
        lib.ic_batch_vnni(-1)


@needs_lib
@pytest.mark.parametrize("path, rows", [("vnni", 3), ("vnni", 5), ("vnni", 11), ("avx2", 2), ("avx2", 5)])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(
    "mode, kw",
    [
        ("int4", {}),
        ("int8", {}),
        ("int8-row", {}),
        ("int8-row", {"qkv_bias": True}),
        ("int4", {"qkv_bias": True, "tie_embeddings": True}),
        ("int4", {"dim": 128, "ffn_dim": 256}),  # 4 groups per row (the tiny default's dim 96 has 3)
        ("int4", {"dim": 160, "ffn_dim": 352}),  # 5 and 11 groups: full 4-group steps and a tail
    ],
)
def test_batched_rows_equal_each_step_alone_bit_for_bit(mode, kw, threads, path, rows):
    qm, _ = _pair(mode, **kw)
    dec = qm.kernels.decoder
    assert dec is not None
    solo, starts, toks = _caches(qm, 7, ROWS[rows])
    batch, _, _ = _caches(qm, 7, ROWS[rows])
    torch.set_num_threads(threads)
    try:
        alone = [dec.decode(int(t), torch.tensor([n]), c, n) for c, n, t in zip(solo, starts, toks, strict=True)]
        with _batch_kernels(path):
            x, logits = dec.decode_batch([int(t) for t in toks], [torch.tensor([n]) for n in starts], batch, starts)
    finally:
        torch.set_num_threads(1)
    for i, (xa, la) in enumerate(alone):
        assert torch.equal(x[i], xa), i
        assert torch.equal(logits[i], la), i
    for cs, cb, n in zip(solo, batch, starts, strict=True):
        for li in range(qm.cfg.n_layers):
            assert torch.equal(cs.k[li][:, : n + 1], cb.k[li][:, : n + 1])
            assert torch.equal(cs.v[li][:, : n + 1], cb.v[li][:, : n + 1])


@needs_lib
def test_forward_batch_takes_the_native_step_and_re_scores_like_forward():
    qm, _ = _pair("int4")
    solo, starts, toks = _caches(qm, 8)
    batch, _, _ = _caches(qm, 8)
    calls = []
    real = qm.kernels.decoder.decode_batch
    qm.kernels.decoder.decode_batch = lambda *a: calls.append(len(a[0])) or real(*a)
    try:
        got = qm.forward_batch(
            [BatchItem(t.view(1), torch.tensor([n]), c, n) for c, n, t in zip(batch, starts, toks, strict=True)]
        )
    finally:
        qm.kernels.decoder.decode_batch = real
    assert calls == [len(starts)]
    want = [qm(t.view(1), torch.tensor([n]), c, n) for c, n, t in zip(solo, starts, toks, strict=True)]
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


@needs_lib
def test_rows_sharing_one_cache_take_the_stacked_path():
    """Two rows in one cache (its own slots each) are not the native step's case: the layer-by-layer forward runs."""
    qm, _ = _pair("int4")
    c = KVCache(qm.cfg, 64, torch.bfloat16)
    qm(torch.arange(5), torch.arange(5), c, 0)
    items = [
        BatchItem(torch.tensor([1]), torch.tensor([5]), c, 5),
        BatchItem(torch.tensor([2]), torch.tensor([6]), c, 6),
    ]
    assert qm.kernels.decode_batch(items) is None
    assert len(qm.forward_batch(items)) == 2


@needs_lib
def test_a_refused_batch_says_why():
    qm, _ = _pair("int4")
    c = KVCache(qm.cfg, 8, torch.bfloat16)
    with pytest.raises(ValueError, match="native batched decode refused"):
        qm.kernels.decoder.decode_batch([qm.cfg.vocab_size + 5], [torch.tensor([0])], [c], [0])


@needs_lib
def test_int4_generations_batched_through_the_engine_equal_each_alone_exactly():
    """The worker's loop (test_batch_decode.drive) over 6 greedy generations of different prompt lengths on an
    int4 model: every token and every step's logits equal the generation run alone, exactly (the native
    batched step), where the PyTorch prompt kernels needed a tolerance."""
    from test_batch_decode import Recorder, drive

    from infinichat.engine.sampling import SamplingParams
    from infinichat.engine.torch_engine import TorchEngine

    qm, _ = _pair("int4")
    eng = TorchEngine(qm, ())
    params = SamplingParams(temperature=0.0, max_tokens=20)
    prompts = [[3 + (5 * i + j) % 250 for j in range(2 + 13 * i)] for i in range(6)]
    with Recorder(eng) as ref:
        alone = []
        for p in prompts:
            s = eng.new_sequence()
            alone.append(([st.token for st in eng.generate(s, p, params)], s))
    seqs = [eng.new_sequence() for _ in prompts]
    with Recorder(eng) as rec:
        toks, sizes = drive(eng, [eng.generate(s, p, params) for s, p in zip(seqs, prompts, strict=True)])
    assert sizes[6] >= 18
    assert toks == [t for t, _ in alone]
    for (_, sa), s in zip(alone, seqs, strict=True):
        assert len(rec.logits[id(s)]) == len(ref.logits[id(sa)]) == 20
        for x, y in zip(rec.logits[id(s)], ref.logits[id(sa)], strict=True):
            assert torch.equal(x, y)
