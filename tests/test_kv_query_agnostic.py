"""The query-agnostic policies Expected Attention and KVzip, on a tiny random-weight GQA Llama in transformers
(eager attention: the reference for queries, keys and attention weights; the policies' formulas recomputed
here from scratch), and one needle on the default model each must keep where streaming drops it (slow).
fp32 throughout; scores within 1e-4 relative."""

from __future__ import annotations

import pytest
import torch
from test_kv_attention_policies import hf as hf
from test_kv_attention_policies import ids_of
from test_kv_store import rand_ids, tiny_engine

from infinichat.engine.torch_engine import TorchEngine
from infinichat.errors import InfinichatError
from infinichat.kv import make_policy
from infinichat.kv.expected_attention import mean_rotation, rotate
from infinichat.kv.policy import slots_to_spans
from infinichat.model.rope import Rope

transformers = pytest.importorskip("transformers")
from transformers.models.llama.modeling_llama import rotate_half as hf_rotate_half  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REL = 1e-4


def close(got: torch.Tensor, want: torch.Tensor) -> bool:
    return (got - want).abs().max().item() <= REL * want.abs().max().item()


def hf_rotate(ref, x: torch.Tensor, positions: list[int]) -> torch.Tensor:
    """transformers' RoPE of x (H, n, hd) at `positions` (n,)."""
    cos, sin = ref.model.rotary_emb(x, torch.tensor([positions]))  # (1, n, hd)
    return x * cos[0] + hf_rotate_half(x) * sin[0]


# ------------------------------------------------------------------ Expected Attention
def test_rotation_helpers_match_transformers_rope(hf):
    ref, ours = hf
    hd = ours.cfg.head_dim
    x = torch.randn(4, 5, hd, generator=torch.Generator().manual_seed(0))
    inv = Rope(ours.cfg).inv_freq
    pos = [3, 17, 40, 41, 200]
    assert close(rotate(x, torch.tensor(pos), inv), hf_rotate(ref, x, pos))
    assert close(rotate(rotate(x, torch.tensor(pos), inv), -torch.tensor(pos), inv), x)
    future = list(range(60, 76))
    R = mean_rotation(torch.tensor(future), inv, hd)  # (hd, hd)
    want = torch.stack([hf_rotate(ref, x, [p] * 5) for p in future]).mean(dim=0)  # (4, 5, hd)
    assert close(x @ R.T, want)


@pytest.mark.parametrize("covariance, vnorm", [(True, True), (False, False)])
def test_expected_attention_scores_equal_the_formula_from_scratch(hf, covariance, vnorm):
    """From transformers' pre-RoPE queries (q_proj of the normed hidden states) of the window, its post-RoPE
    keys and values: the Gaussian expected attention of a query rotated to each future position (the rotation
    matrices built one by one and averaged), softmax over the keys, mean over each KV group, x |v|."""
    ref, ours = hf
    P, W, F, budget, sinks = 60, 8, 16, 30, 2
    ids = ids_of(P, seed=21)
    with torch.no_grad():
        out = ref(torch.tensor([ids]), use_cache=True, output_hidden_states=True)
    cfg = ours.cfg
    H, Hkv, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    eye = torch.eye(hd)[None]  # (1, hd, hd): columns rotated -> the rotation matrix (transposed)
    R = torch.stack([hf_rotate(ref, eye, [p] * hd)[0].T for p in range(P, P + F)]).mean(dim=0)  # (hd, hd)
    want = torch.zeros(P - W)
    for li, layer in enumerate(ref.model.layers):
        with torch.no_grad():
            x = layer.input_layernorm(out.hidden_states[li][0])  # (P, D)
            q = layer.self_attn.q_proj(x).view(P, H, hd).transpose(0, 1)[:, P - W :]  # (H, W, hd) pre-RoPE
        keys = out.past_key_values.layers[li].keys[0]  # (Hkv, P, hd) post-RoPE
        values = out.past_key_values.layers[li].values[0]
        mu = R @ q.mean(dim=1)[..., None]  # (H, hd, 1)
        cov = torch.stack([torch.cov(q[h].T) for h in range(H)])  # (H, hd, hd)
        cov = R @ cov @ R.T
        kq = keys.repeat_interleave(H // Hkv, dim=0)  # (H, P, hd)
        z = (kq @ mu)[..., 0] / hd**0.5  # (H, P)
        if covariance:
            z = z + torch.einsum("hpd,hde,hpe->hp", kq, cov, kq) / (2 * hd)
        a = torch.softmax(z, dim=-1).view(Hkv, H // Hkv, P).mean(dim=1)  # (Hkv, P)
        if vnorm:
            a = a * values.norm(dim=-1)
        want += a.sum(dim=0)[: P - W]

    engine = TorchEngine(ours)
    seq = engine.new_sequence(
        budget=budget,
        policy="expected_attention",
        window=W,
        n_future=F,
        n_sink=sinks,
        covariance=covariance,
        vnorm=vnorm,
    )
    engine.prefill(seq, ids)
    assert seq.length == budget and seq.n_evicted == P - budget
    top = (torch.topk(want[sinks:], budget - sinks - W).indices + sinks).tolist()
    kept = sorted(list(range(sinks)) + top + list(range(P - W, P)))
    assert seq.token_ids() == [ids[i] for i in kept]
    assert seq.positions() == list(range(budget))
    assert close(seq.scores[: budget - W], want[kept[: budget - W]])
    assert torch.isinf(seq.scores[budget - W : budget]).all()  # the window is kept


def test_expected_attention_reads_queries_and_computes_no_weights():
    engine = tiny_engine()
    seq = engine.new_sequence(budget=20, policy="expected_attention", window=4)
    req = seq.policy.attention_request(seq, 0, 30, "prompt_end")
    assert req is not None and req.layers == frozenset() and req.queries is not None
    assert seq.policy.attention_request(seq, 30, 1, "decode") is None


# ------------------------------------------------------------------ KVzip
@pytest.mark.parametrize("repeat_chunk", [64, 16])
def test_kvzip_scores_are_the_attention_of_the_reconstruction(hf, repeat_chunk):
    """Reference: transformers over context + prefix + each repeated chunk; a context token's score is the
    max attention any repeating query (any head, any chunk) gives it, per layer, summed over layers."""
    ref, ours = hf
    P, budget, sinks, recent = 40, 20, 4, 4
    prefix = [5, 6]
    ids = ids_of(P, seed=22)
    best = torch.zeros(ours.cfg.n_layers, P)
    for a in range(0, P, repeat_chunk):
        probe = prefix + ids[a : a + repeat_chunk]
        with torch.no_grad():
            atts = ref(torch.tensor([ids + probe]), output_attentions=True).attentions
        for li, att in enumerate(atts):
            best[li] = torch.maximum(best[li], att[0][:, P:, :P].amax(dim=(0, 1)))  # over heads and queries
    want = best.sum(dim=0)  # (P,)

    engine = TorchEngine(ours)
    seq = engine.new_sequence(
        budget=budget, policy="kvzip", prefix=tuple(prefix), repeat_chunk=repeat_chunk, n_recent=recent, n_sink=sinks
    )
    engine.prefill(seq, ids)
    top = (torch.topk(want[sinks : P - recent], budget - sinks - recent).indices + sinks).tolist()
    kept = sorted(list(range(sinks)) + top + list(range(P - recent, P)))
    assert seq.token_ids() == [ids[i] for i in kept]
    assert seq.positions() == list(range(budget))
    assert close(seq.scores[:budget], want[kept])
    # the scratch calls left no trace: the next step equals the same tokens cut from a plain full cache
    plain = engine.new_sequence(budget=P + 1)
    engine.prefill(plain, ids)
    plain.remove_spans(slots_to_spans(torch.tensor(sorted(set(range(P)) - set(kept)))))
    seq.budget += 1  # room for the step without an eviction
    assert close(engine.decode_one(seq, 7), engine.decode_one(plain, 7))


def test_kvzip_runs_its_pass_only_over_budget_and_only_on_unscored_tokens():
    engine = tiny_engine()
    seq = engine.new_sequence(budget=48, policy="kvzip", repeat_chunk=64)
    calls: list[int] = []
    probe = seq.policy.probe_calls

    def counting(s):
        for ids, req in probe(s):
            calls.append(ids.shape[0])
            yield ids, req

    seq.policy.probe_calls = counting  # type: ignore[method-assign]
    engine.prefill(seq, rand_ids(30))
    assert calls == [] and torch.isinf(seq.scores[:30]).all()  # under budget: no pass, nothing scored
    engine.prefill(seq, rand_ids(40, seed=2))
    assert calls == [64, 6] and seq.length == 48  # 70 unscored tokens in chunks of 64
    assert torch.isfinite(seq.scores[:48]).all()
    calls.clear()
    engine.prefill(seq, rand_ids(10, seed=3))
    assert calls == [10] and seq.length == 48  # the next prompt: only its own 10 tokens


@pytest.mark.parametrize(
    "policy, params, match",
    [
        ("expected_attention", {"window": 1}, "window must be >= 2"),
        ("expected_attention", {"n_future": 0}, "n_future >= 1"),
        ("kvzip", {"repeat_chunk": 0}, "repeat_chunk must be >= 1"),
        ("kvzip", {"prefix": "ab"}, "prefix must be token ids"),
    ],
)
def test_bad_settings_are_clear_errors(policy, params, match):
    with pytest.raises(InfinichatError, match=match):
        make_policy(policy, **params)


def test_kvzip_without_scratch_room_is_a_clear_error():
    engine = tiny_engine()
    seq = engine.new_sequence(budget=20, policy="kvzip", capacity=40)
    with pytest.raises(InfinichatError, match="no scratch room"):
        engine.prefill(seq, rand_ids(40))


# ------------------------------------------------------------------ the default model (slow)
@pytest.mark.slow
@pytest.mark.parametrize("policy, budget, depth", [("kvzip", 256, 0.3), ("expected_attention", 512, 0.6)])
def test_default_model_keeps_a_passkey_that_streaming_drops(policy, budget, depth):
    """A 1k-token passkey prompt (plain text, greedy): full attention finds it, streaming at the same budget
    loses it, the query-agnostic policy keeps it."""
    from infinichat.eval import needle, runner
    from infinichat.eval.prompt import prompt_format
    from infinichat.model.loader import load_model

    loaded = load_model(None, "float32")
    engine = TorchEngine(loaded.model, loaded.tokenizer.eos_ids)
    s = needle.passkey_sample(loaded.tokenizer, prompt_format(loaded.tokenizer, chat=False), 1024, depth, 0, 0)

    def answer(name: str) -> str:
        return runner.generate(engine, runner.PolicyRun(name, tokens=budget), s.ids, 12, loaded.tokenizer.decode).text

    assert not needle.contains_number(answer("streaming"), s.answer)
    got = answer(policy)
    assert needle.contains_number(got, s.answer), (s.answer, got)
