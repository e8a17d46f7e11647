"""The KV store's buffers grow as tokens arrive (doubling up to the capacity) instead of being allocated whole:
the logits are those of a store allocated whole, on the PyTorch path and on the native decode step (which binds
the buffers' pointers and must rebind after a growth), and a large budget costs memory only once used."""

from __future__ import annotations

import pytest
import torch
from test_native import _pair, needs_lib

from infinichat.kv.store import KVStore
from infinichat.model.config import ModelConfig
from infinichat.model.transformer import Transformer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _model() -> Transformer:
    from test_native import _cfg
    from test_quant import _weights

    cfg = _cfg()
    return Transformer(cfg, _weights(cfg), torch.float32)


def _run(model: Transformer, store: KVStore, ids: torch.Tensor, prompt: int) -> list[torch.Tensor]:
    """A prompt in chunks of 50, then one token at a time; the logits of every call."""
    out = []
    for a in range(0, prompt, 50):
        b = min(a + 50, prompt)
        out.append(model(ids[a:b], torch.arange(a, b), store, a))
    for t in range(prompt, ids.shape[0]):
        out.append(model(ids[t : t + 1], torch.tensor([t]), store, t))
    return out


def test_growing_store_gives_the_logits_of_a_whole_one():
    model = _model()
    ids = torch.randint(0, model.cfg.vocab_size, (300,), generator=torch.Generator().manual_seed(1))
    grown = KVStore(model.cfg, 1000, rope=model.rope, initial=8)
    whole = KVStore(model.cfg, 1000, rope=model.rope, initial=1000)
    assert grown.allocated == 8 and whole.allocated == 1000
    for a, b in zip(_run(model, grown, ids, 120), _run(model, whole, ids, 120), strict=True):
        assert torch.equal(a, b)  # the same sums over the same slots: bit-identical
    assert grown.allocated == 512  # 8 -> 16 -> ... -> 512: the smallest doubling that holds 300 slots
    assert torch.equal(grown.k_all[:, :, :300], whole.k_all[:, :, :300])


def test_growth_stops_at_the_capacity_and_keeps_dtype():
    cfg = ModelConfig(arch="llama", vocab_size=50, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16, ffn_dim=64)
    s = KVStore(cfg, 100, torch.bfloat16, initial=4)
    s.reserve(70)
    assert s.allocated == 100 and s.k_all.dtype == torch.bfloat16 and s.k_all.device == torch.device("cpu")
    assert len(s.k) == 2 and s.k[0].data_ptr() == s.k_all.data_ptr()


def test_large_budget_costs_memory_only_once_used():
    cfg = ModelConfig(arch="llama", vocab_size=50, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16, ffn_dim=64)
    big = KVStore(cfg, 1 << 20, initial=256)
    per_token = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * 4
    assert big.nbytes == 256 * per_token  # not 2**20 tokens' worth


@needs_lib
def test_native_decode_rebinds_after_a_growth():
    qm, _ = _pair("int4")
    assert qm.kernels.decoder is not None
    ids = torch.randint(0, qm.cfg.vocab_size, (140,), generator=torch.Generator().manual_seed(2))
    calls = []
    decode = qm.kernels.decoder.decode
    qm.kernels.decoder.decode = lambda *a, **k: calls.append(1) or decode(*a, **k)  # type: ignore[method-assign]
    grown = KVStore(qm.cfg, 256, torch.bfloat16, rope=qm.rope, initial=4)
    whole = KVStore(qm.cfg, 256, torch.bfloat16, rope=qm.rope, initial=256)
    got, want = _run(qm, grown, ids, 2), _run(qm, whole, ids, 2)
    assert len(calls) == 2 * 138  # every single token went through the native step, on both stores
    assert grown.allocated == 256
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)  # stale pointers would read freed or old buffers and differ
