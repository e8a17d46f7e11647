"""The KV store and the policies on the 2026 families (issue 18), tiny random-weight models, fp32.

- After a removal the kept keys of every layer equal keys computed fresh at their new positions, each layer
  with its own RoPE (Gemma 3's windowed layers: local base; Phi-3: partial rotary), and the next token's
  logits equal those over a cache made of those fresh keys; positions stay contiguous for every layer type.
- A windowed layer reads only the last W slots of the one shared store; a global layer reads them all.
- Every policy runs on every family within its budget.
"""

from __future__ import annotations

import gguf_archs
import pytest
import torch
from test_kv_store import fresh_keys

from infinichat.engine.sampling import SamplingParams
from infinichat.engine.torch_engine import TorchEngine
from infinichat.errors import InfinichatError
from infinichat.kv import POLICIES
from infinichat.kv.store import KVStore
from infinichat.model.hf_loader import load_hf_folder
from infinichat.model.transformer import Transformer

pytest.importorskip("transformers")

TOL = 2e-5
NAMES = ["gemma2", "gemma3", "phi3-short-swa", "phi3-partial-rotary", "llama3.2", "qwen3"]


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    out = {}
    for name in NAMES:
        folder = tmp_path_factory.mktemp(name)
        gguf_archs.tiny(name).save_pretrained(folder)
        cfg, weights = load_hf_folder(folder)
        out[name] = TorchEngine(Transformer(cfg, weights, torch.float32, kernels="torch"), eos_ids=())
    return out


def _ids(n, seed=1, vocab=gguf_archs.V):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("name", NAMES)
def test_removal_rerotates_every_layer_type_and_the_next_logits_equal_a_fresh_cache(engines, name):
    engine = engines[name]
    model = engine.model
    n, spans = 40, [(3, 9), (20, 27)]
    ids = _ids(n)
    seq = engine.new_sequence(budget=64)
    engine.prefill(seq, ids)
    v_before = seq.store.v_all[:, :, :n].clone()
    seq.remove_spans(spans)
    kept = [i for i in range(n) if not any(s <= i < e for s, e in spans)]
    m = len(kept)
    assert seq.positions() == list(range(m)) and seq.token_ids() == [ids[i] for i in kept]
    # reference: each kept token's K from a forward over the original text with every position moved down by
    # its shift (attention depends on position differences only), its V as computed (V carries no position)
    ref = KVStore(model.cfg, 64, rope=model.rope)
    ref.reserve(m + 1)
    shifted: dict[int, torch.Tensor] = {}
    for slot, old in enumerate(kept):
        d = old - slot
        if d not in shifted:
            shifted[d] = fresh_keys(model, ids, torch.arange(n) - d)
        ref.k_all[:, :, slot] = shifted[d][:, :, old]
        ref.v_all[:, :, slot] = v_before[:, :, old]
    diff = (seq.store.k_all[:, :, :m] - ref.k_all[:, :, :m]).abs().max().item()
    assert diff <= TOL, f"kept keys: {diff:.2e}"
    # layer 0's keys depend on the token alone: they equal a fresh run over the kept text itself
    fresh = fresh_keys(model, [ids[i] for i in kept], torch.arange(m))
    assert (seq.store.k_all[0, :, :m] - fresh[0]).abs().max().item() <= TOL
    got = engine.decode_one(seq, 5)
    want = model(torch.tensor([5]), torch.tensor([m]), ref, m)
    assert (got - want).abs().max().item() <= TOL
    assert seq.positions() == list(range(m + 1))


@pytest.mark.parametrize("name", ["gemma2", "gemma3", "phi3-short-swa"])
def test_windowed_layers_read_only_the_last_window_of_the_shared_store(engines, name):
    """Scrambling K/V older than the window in the windowed layers changes nothing; in a global layer it does."""
    engine = engines[name]
    cfg, model = engine.cfg, engine.model
    n = 30
    seq = engine.new_sequence(budget=64)
    engine.prefill(seq, _ids(n, seed=4))
    store = seq.store
    want = model(torch.tensor([7]), torch.tensor([n]), store, n)
    windowed = [i for i in range(cfg.n_layers) if cfg.layer_window(i)]
    glob = [i for i in range(cfg.n_layers) if not cfg.layer_window(i)]
    assert windowed
    W = cfg.sliding_window
    old = n + 1 - W  # the step at slot n sees slots (n - W, n]: everything below `old` is outside the window
    saved = store.k_all.clone(), store.v_all.clone()
    g = torch.Generator().manual_seed(0)
    for i in windowed:
        store.k_all[i, :, :old] = torch.randn(store.k_all[i, :, :old].shape, generator=g)
        store.v_all[i, :, :old] = torch.randn(store.v_all[i, :, :old].shape, generator=g)
    got = model(torch.tensor([7]), torch.tensor([n]), store, n)
    assert torch.equal(got, want)
    if glob:
        store.k_all[glob[0], :, :old] = torch.randn(store.k_all[glob[0], :, :old].shape, generator=g)
        got = model(torch.tensor([7]), torch.tensor([n]), store, n)
        assert (got - want).abs().max().item() > 1e-3
    store.k_all.copy_(saved[0])
    store.v_all.copy_(saved[1])


_DROPPING = ["streaming", "window", "turns", "recompute", "h2o", "tova", "snapkv"]


@pytest.mark.parametrize("policy", sorted(POLICIES))
@pytest.mark.parametrize("name", NAMES)
def test_every_policy_runs_on_every_family_within_its_budget(engines, name, policy):
    engine = engines[name]
    drops = policy in _DROPPING
    budget = 40 if drops else 160
    kw = {"n_discard": 8} if policy in ("streaming", "window", "turns", "recompute") else {}
    if policy == "omnikv":
        kw = {"filter_layers": (1,), "k": 16}
    rs = engine.cfg.rope_scaling
    if drops and rs.kind == "longrope":  # re-rotation only within the original context (SnapKV's default
        kw["capacity"] = rs.original_max_position  # capacity is the trained context: past it, refused)
    seq = engine.new_sequence(budget=budget, policy=policy, **kw)
    params = SamplingParams(temperature=1.0, seed=0, max_tokens=90)
    steps = list(engine.generate(seq, _ids(20, seed=2), params))
    assert len(steps) == 90
    assert seq.length <= seq.budget
    assert seq.positions() == list(range(seq.length)) if drops else seq.length == 110
    assert torch.isfinite(engine.decode_one(seq, 3)).all()


def test_longrope_shifts_only_within_the_original_context(tmp_path):
    folder = tmp_path / "phi3"
    gguf_archs.tiny("phi3-longrope").save_pretrained(folder)
    cfg, weights = load_hf_folder(folder)  # original context 16
    engine = TorchEngine(Transformer(cfg, weights, torch.float32), eos_ids=())
    seq = engine.new_sequence(budget=16, capacity=16)
    engine.prefill(seq, _ids(12))
    seq.remove_spans([(2, 5)])
    assert seq.positions() == list(range(9))
    big = engine.new_sequence(budget=40)
    engine.prefill(big, _ids(30))
    with pytest.raises(InfinichatError, match=r"LongRoPE RoPE scaling beyond the trained context.*capacity <= 16"):
        big.remove_spans([(2, 5)])
