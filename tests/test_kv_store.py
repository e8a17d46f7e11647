"""The KV store on a tiny random-weight model (fp32): re-rotation after removals, truncate, shift,
snapshot/restore and fork. `tiny_model` / `tiny_engine` are shared with the other test_kv_* files."""

from __future__ import annotations

import pytest
import torch

from infinichat.engine.torch_engine import TorchEngine
from infinichat.errors import InfinichatError
from infinichat.kv.store import KVStore
from infinichat.model.config import ModelConfig, RopeScaling
from infinichat.model.transformer import Transformer

TOL = 1e-5


def tiny_model(seed: int = 0, rope_scaling: RopeScaling | None = None, **cfg_changes) -> Transformer:
    """A random Llama-style model in our canonical weight layout (no transformers needed)."""
    base = {
        "arch": "llama",
        "vocab_size": 97,
        "dim": 64,
        "n_layers": 3,
        "n_heads": 4,
        "n_kv_heads": 2,
        "head_dim": 16,
        "ffn_dim": 96,
        "max_position": 512,
        "rope_scaling": rope_scaling or RopeScaling(),
    }
    cfg = ModelConfig(**{**base, **cfg_changes})
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=0.08):
        return torch.randn(*shape, generator=g) * std

    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    w = {
        "embed.weight": rnd(cfg.vocab_size, cfg.dim, std=1.0),
        "norm.weight": 1 + rnd(cfg.dim),
        "lm_head.weight": rnd(cfg.vocab_size, cfg.dim, std=0.3),
    }
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        w[p + "attn_norm.weight"] = 1 + rnd(cfg.dim)
        w[p + "ffn_norm.weight"] = 1 + rnd(cfg.dim)
        w[p + "wqkv.weight"] = rnd(q + 2 * kv, cfg.dim, std=0.1)  # keys of a few units, as in real models
        w[p + "wo.weight"] = rnd(cfg.dim, q)
        w[p + "w_in.weight"] = rnd(2 * cfg.ffn_dim, cfg.dim)
        w[p + "w_out.weight"] = rnd(cfg.dim, cfg.ffn_dim)
    return Transformer(cfg, w, torch.float32)


def tiny_engine(seed: int = 0, **kw) -> TorchEngine:
    return TorchEngine(tiny_model(seed, **kw), eos_ids=())


def rand_ids(n: int, seed: int = 1, vocab: int = 97) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def fresh_keys(model: Transformer, ids: list[int], positions: torch.Tensor) -> torch.Tensor:
    """K of every layer (L, Hkv, n, hd) from one forward over `ids` at `positions`."""
    store = KVStore(model.cfg, len(ids), rope=model.rope)
    model(torch.tensor(ids), positions, store, 0)
    return store.k_all.clone()


@pytest.fixture(scope="module")
def engine():
    return tiny_engine()


# ------------------------------------------------------------------ re-rotation
@pytest.mark.parametrize("spans", [[(10, 25)], [(0, 7)], [(3, 5), (20, 31), (40, 41)], [(30, 60)]])
def test_remove_rerotates_kept_keys_to_their_new_positions(engine, spans):
    """After removing spans, every kept key equals the key computed fresh at its new position. RoPE
    attention depends only on position differences, so a forward over the *original* tokens with all
    positions moved by d computes each layer's keys at p - d: the reference for the slots after a cut."""
    n = 60
    ids = rand_ids(n)
    seq = engine.new_sequence(budget=128)
    engine.prefill(seq, ids)
    k_before, v_before = seq.store.k_all[:, :, :n].clone(), seq.store.v_all[:, :, :n].clone()
    seq.remove_spans(spans)
    removed = sum(e - s for s, e in spans)
    assert seq.length == n - removed
    assert seq.positions() == list(range(n - removed))
    kept = [i for i in range(n) if not any(s <= i < e for s, e in spans)]
    assert seq.token_ids() == [ids[i] for i in kept]
    reference = {0: k_before}
    for slot, old in enumerate(kept):
        d = old - slot  # how far this token moved down
        if d not in reference:
            reference[d] = fresh_keys(engine.model, ids, torch.arange(n) - d)
        diff = (seq.store.k_all[:, :, slot] - reference[d][:, :, old]).abs().max().item()
        assert diff <= TOL, f"slot {slot} (was {old}, moved by {d}): {diff:.2e}"
        assert torch.equal(seq.store.v_all[:, :, slot], v_before[:, :, old])


def test_layer0_keys_after_remove_equal_a_fresh_forward_of_the_kept_tokens(engine):
    """Layer 0 keys depend on the token alone: after a cut they must equal a fresh run over the kept text."""
    ids = rand_ids(50, seed=3)
    seq = engine.new_sequence(budget=64)
    engine.prefill(seq, ids)
    seq.remove(12, 30)
    kept = ids[:12] + ids[30:]
    want = fresh_keys(engine.model, kept, torch.arange(len(kept)))[0]
    assert (seq.store.k_all[0, :, : len(kept)] - want).abs().max().item() <= TOL


def test_shift_moves_positions_and_rotates_keys(engine):
    ids = rand_ids(30, seed=4)
    seq = engine.new_sequence(budget=64)
    engine.prefill(seq, ids)
    seq.shift(10, 7)
    assert seq.positions() == list(range(10)) + list(range(17, 37))
    want = fresh_keys(engine.model, ids, torch.arange(30) + 7)[:, :, 10:30]
    assert (seq.store.k_all[:, :, 10:30] - want).abs().max().item() <= TOL
    seq.shift(10, -7)
    assert seq.positions() == list(range(30))
    with pytest.raises(InfinichatError, match="increasing"):
        seq.shift(10, -1)  # would collide with position 9
    with pytest.raises(InfinichatError, match="below the capacity"):
        seq.shift(0, 64)
    # appending continues after the last position
    engine.decode_one(seq, 5)
    assert seq.positions()[-1] == 30


def test_dynamic_ntk_shift_refused_beyond_trained_context():
    eng = tiny_engine(rope_scaling=RopeScaling("dynamic", 2.0))
    seq = eng.new_sequence(budget=64, capacity=1024)  # capacity > max_position 512: frequencies would vary
    eng.prefill(seq, rand_ids(20))
    with pytest.raises(InfinichatError, match="dynamic-NTK"):
        seq.remove(2, 5)
    ok = eng.new_sequence(budget=64)  # within the trained context dynamic NTK is plain RoPE
    eng.prefill(ok, rand_ids(20))
    ok.remove(2, 5)
    assert ok.positions() == list(range(17))


# ------------------------------------------------------------------ truncate
@pytest.mark.parametrize("n", [0, 1, 17, 40])
def test_truncate_then_append_matches_a_fresh_sequence(engine, n):
    ids, more = rand_ids(40, seed=5), rand_ids(12, seed=6)
    seq = engine.new_sequence(budget=64)
    engine.prefill(seq, ids)
    seq.truncate(n)
    got = engine.prefill(seq, more, all_logits=True)
    got = torch.cat([got, engine.decode_one(seq, 7)[None]])
    fresh = engine.new_sequence(budget=64)
    want = engine.prefill(fresh, ids[:n] + more, all_logits=True)[n:]
    want = torch.cat([want, engine.decode_one(fresh, 7)[None]])
    assert (got - want).abs().max().item() <= TOL
    assert seq.token_ids() == fresh.token_ids() and seq.positions() == fresh.positions()


def test_length_setter_is_a_compatible_truncate(engine):
    seq = engine.new_cache(32)
    engine.prefill(seq, rand_ids(20))
    seq.length = 8
    assert seq.length == 8 and seq.positions() == list(range(8))
    with pytest.raises(InfinichatError, match="append"):
        seq.length = 9


# ------------------------------------------------------------------ snapshot / restore / fork
def _filled(engine, n=33):
    seq = engine.new_sequence(budget=48, policy="streaming", n_discard=8)
    seq.create_segment("system")
    engine.prefill(seq, rand_ids(6, seed=7))
    seq.create_segment("user", "u1")
    engine.prefill(seq, rand_ids(n, seed=8))
    seq.close_segment()
    seq.remove(10, 14)
    return seq


def _same_state(a, b):
    n = a.length
    assert n == b.length
    assert torch.equal(a.store.k_all[:, :, :n], b.store.k_all[:, :, :n])
    assert torch.equal(a.store.v_all[:, :, :n], b.store.v_all[:, :, :n])
    assert a.token_ids() == b.token_ids() and a.positions() == b.positions()
    assert a.segment_tags() == b.segment_tags()
    assert a.segments.to_json() == b.segments.to_json()


def test_snapshot_restore_is_bit_exact(engine, tmp_path):
    seq = _filled(engine)
    data = seq.snapshot()
    other = engine.new_sequence(budget=48, policy="streaming", n_discard=8)
    other.restore(data)
    _same_state(seq, other)
    assert torch.equal(engine.decode_one(seq, 3), engine.decode_one(other, 3))
    assert other.snapshot() == seq.snapshot()
    # through a file
    path = tmp_path / "seq.kv"
    seq.save(path)
    third = engine.new_sequence(budget=48)
    third.load(path)
    _same_state(seq, third)


def test_snapshot_in_bfloat16_is_bit_exact():
    model = tiny_model()
    model16 = Transformer(model.cfg, {"embed.weight": model.embed, **_weights_of(model)}, torch.bfloat16)
    eng = TorchEngine(model16)
    seq = eng.new_sequence(budget=40)
    eng.prefill(seq, rand_ids(30))
    seq.remove(3, 9)
    other = eng.new_sequence(budget=40)
    other.restore(seq.snapshot())
    _same_state(seq, other)


def _weights_of(model: Transformer) -> dict[str, torch.Tensor]:
    w = {"norm.weight": model.norm[0], "lm_head.weight": model.lm_head}
    for i, L in enumerate(model.layers):
        w.update({f"layers.{i}.{k}": t for k, t in L.items()})
    return w


def test_bad_snapshots_are_refused(engine):
    seq = _filled(engine)
    data = seq.snapshot()
    target = engine.new_sequence(budget=48)
    with pytest.raises(InfinichatError, match="not an infinichat KV snapshot"):
        target.restore(b"hello world")
    with pytest.raises(InfinichatError, match="truncated"):
        target.restore(data[:-5])
    with pytest.raises(InfinichatError, match="budget"):
        engine.new_sequence(budget=16).restore(data)
    with pytest.raises(InfinichatError, match="another model"):
        tiny_engine(n_layers=2).new_sequence(budget=48).restore(data)
    with pytest.raises(InfinichatError, match="cannot read"):
        target.load("/nonexistent/seq.kv")
    for at in (len(data) // 2, len(data) - 3):  # one flipped bit in the K/V, then in the positions
        flipped = bytearray(data)
        flipped[at] ^= 0x10
        with pytest.raises(InfinichatError, match="checksum"):
            target.restore(bytes(flipped))
    assert target.length == 0  # nothing half-restored


def test_fork_is_independent(engine):
    seq = _filled(engine)
    child = seq.fork()
    _same_state(seq, child)
    assert child.store.k_all.data_ptr() != seq.store.k_all.data_ptr()
    assert child.store.v_all.untyped_storage().data_ptr() != seq.store.v_all.untyped_storage().data_ptr()
    parent_before = seq.snapshot()
    child.store.k_all.add_(1.0)
    engine.prefill(child, rand_ids(5, seed=9))
    child.revert_to(child.segments.segments[1].id)
    child.segments.segments[0].name = "changed"
    assert seq.snapshot() == parent_before
