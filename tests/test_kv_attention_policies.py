"""Attention-aware KV policies (H2O, TOVA, SnapKV, OmniKV, brutal offload) on tiny random-weight models.

References: transformers' eager attention (`output_attentions`) for the attention weights our explicit path
computes and for the scores the policies derive from them (recomputed here from scratch); full attention
and perturbed caches for OmniKV's selection. fp32 throughout, tolerance 1e-5.
"""

from __future__ import annotations

import pytest
import torch
from test_kv_store import rand_ids, tiny_engine

from infinichat.engine.sampling import SamplingParams
from infinichat.engine.torch_engine import TorchEngine
from infinichat.errors import InfinichatError
from infinichat.kv import make_policy
from infinichat.kv.store import KVStore
from infinichat.model.attention import ROW_BLOCK, AttentionRequest
from infinichat.model.hf_loader import load_hf_folder
from infinichat.model.transformer import Transformer

transformers = pytest.importorskip("transformers")

TOL = 1e-5
LOGIT_TOL = 1e-4  # logits of ~8 in magnitude after 3 layers: float32 summation order (as test_forward_parity)
V = 211


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """A tiny GQA Llama in transformers (eager attention) and the same weights in our Transformer."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=V,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.3,
    )
    ref = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval().float()
    folder = tmp_path_factory.mktemp("hf") / "llama"
    ref.save_pretrained(folder)
    ours_cfg, weights = load_hf_folder(folder)
    return ref, Transformer(ours_cfg, weights, torch.float32)


def hf_attentions(ref, ids: list[int]) -> list[torch.Tensor]:
    """Each layer's attention probabilities (H, T, T) for one plain forward over `ids`."""
    with torch.no_grad():
        out = ref(torch.tensor([ids]), output_attentions=True)
    return [a[0] for a in out.attentions]


def ids_of(n: int, seed: int = 1) -> list[int]:
    return rand_ids(n, seed=seed, vocab=V)


# ------------------------------------------------------------------ the explicit attention path
def test_explicit_weights_equal_transformers_eager_and_outputs_equal_sdpa(hf):
    ref, ours = hf
    T = ROW_BLOCK + 22  # two row blocks
    ids = ids_of(T)
    want = hf_attentions(ref, ids)
    assert max(a.max().item() for a in want) > 0.2, "attention too flat for the comparison to mean anything"
    L = ours.cfg.n_layers
    got: dict[int, list[torch.Tensor]] = {}
    req = AttentionRequest(
        layers=frozenset(range(L)), rows=T, observe=lambda li, p, r0: got.setdefault(li, []).append(p)
    )
    pos = torch.arange(T)
    logits = ours(torch.tensor(ids), pos, KVStore(ours.cfg, T), 0, all_logits=True, attn=req)
    plain = ours(torch.tensor(ids), pos, KVStore(ours.cfg, T), 0, all_logits=True)
    assert (logits - plain).abs().max().item() <= LOGIT_TOL  # explicit softmax(QK^T)V == SDPA
    for li in range(L):
        assert len(got[li]) == 2
        probs = torch.cat(got[li], dim=1)  # (H, T, T)
        assert (probs - want[li]).abs().max().item() <= TOL

    # a chunk that starts at slot 100, only its last 8 queries (the SnapKV path: SDPA + 8 explicit rows)
    store = KVStore(ours.cfg, T)
    ours(torch.tensor(ids[:100]), pos[:100], store, 0)
    last: dict[int, torch.Tensor] = {}
    req = AttentionRequest(layers=frozenset({0, 2}), rows=8, observe=lambda li, p, r0: last.__setitem__(li, p))
    out = ours(torch.tensor(ids[100:]), pos[100:], store, 100, all_logits=True, attn=req)
    assert (out - plain[100:]).abs().max().item() <= LOGIT_TOL
    assert set(last) == {0, 2}
    for li in (0, 2):
        assert (last[li] - want[li][:, T - 8 :]).abs().max().item() <= TOL

    # one decode step
    store = KVStore(ours.cfg, T)
    ours(torch.tensor(ids[:-1]), pos[:-1], store, 0)
    one: dict[int, torch.Tensor] = {}
    req = AttentionRequest(layers=frozenset({1}), rows=1, observe=lambda li, p, r0: one.__setitem__(li, p))
    out = ours(torch.tensor(ids[-1:]), pos[-1:], store, T - 1, attn=req)
    assert (out - plain[-1]).abs().max().item() <= LOGIT_TOL
    assert (one[1] - want[1][:, -1:]).abs().max().item() <= TOL


class Spy:
    """Wraps a Transformer and records the attention request of every forward call."""

    def __init__(self, model: Transformer):
        self.model, self.cfg, self.dtype, self.rope = model, model.cfg, model.dtype, model.rope
        self.device = model.device
        self.requests: list[AttentionRequest | None] = []

    def __call__(self, *args, attn=None, **kw):
        self.requests.append(attn)
        return self.model(*args, attn=attn, **kw)


@pytest.mark.parametrize(
    "policy, kw, want",
    [
        ("full", {}, "none"),
        ("streaming", {"n_discard": 8}, "none"),
        ("omnikv", {"filter_layers": (1,), "k": 4}, "decode only"),
        ("snapkv", {"window": 4}, "prompt only"),
        ("h2o", {"layers": (0, 2)}, "all"),
    ],
)
def test_weights_are_computed_only_when_and_where_a_policy_needs_them(policy, kw, want):
    spy = Spy(tiny_engine().model)
    engine = TorchEngine(spy)
    seq = engine.new_sequence(budget=40, policy=policy, **kw)
    list(engine.generate(seq, rand_ids(30), SamplingParams(temperature=0, max_tokens=5)))
    prompt, decode = spy.requests[0], spy.requests[1:]
    if want == "none":
        assert all(r is None for r in spy.requests)  # the plain forward: no request, no weights
    elif want == "decode only":
        assert prompt is None and all(r is not None and r.layers == {1} for r in decode)
    elif want == "prompt only":
        assert prompt.layers == {0, 1, 2} and prompt.rows == 4 and all(r is None for r in decode)
    else:
        assert all(r is not None and r.layers == {0, 2} for r in spy.requests)


# ------------------------------------------------------------------ SnapKV
def pooled_reference(atts: list[torch.Tensor], window: int, kernel: int) -> torch.Tensor:
    """From scratch: per layer and head, the window's attention summed over its queries, max-pooled over
    `kernel` neighbouring slots (clipped at the edges), summed over heads and layers. -> (T - window,)."""
    total = 0
    for a in atts:  # (H, T, T)
        T = a.shape[-1]
        n = T - window
        s = a[:, T - window :, :n].sum(dim=1)  # (H, n)
        half = kernel // 2
        pooled = torch.stack([s[:, max(0, j - half) : j + half + 1].max(dim=1).values for j in range(n)], dim=1)
        total = total + pooled.sum(dim=0)
    return total


@pytest.mark.parametrize("chunk", [None, 27])
def test_snapkv_scores_are_pooled_window_attention_and_it_keeps_the_top_tokens(hf, chunk):
    ref, ours = hf
    engine = TorchEngine(ours)
    P, W, K, budget, sinks = 60, 8, 5, 30, 2
    ids = ids_of(P, seed=4)
    score = pooled_reference(hf_attentions(ref, ids), W, K)  # (P - W,)
    seq = engine.new_sequence(budget=budget, policy="snapkv", window=W, kernel=K, n_sink=sinks)
    assert seq.capacity >= P  # a prefill-phase policy gets room for the prompt
    engine.prefill(seq, ids, chunk=chunk)  # chunk 27: calls of 27, 25 and 8 (the last one holds the window)
    assert seq.length == budget and seq.n_evicted == P - budget
    n_top = budget - sinks - W
    top = (torch.topk(score[sinks:], n_top).indices + sinks).tolist()
    kept = sorted(list(range(sinks)) + top + list(range(P - W, P)))
    assert seq.token_ids() == [ids[i] for i in kept]
    assert seq.positions() == list(range(budget))
    got = seq.scores[: budget - W]
    assert (got - score[kept[: budget - W]]).abs().max().item() <= TOL
    assert torch.isinf(seq.scores[budget - W : budget]).all()  # the window is always kept


def test_snapkv_while_decoding_evicts_the_lowest_scored_then_the_oldest_new_token():
    engine = tiny_engine()
    seq = engine.new_sequence(budget=24, policy="snapkv", window=4, n_sink=2)
    engine.prefill(seq, rand_ids(50))
    scored = seq.scores[: 24 - 4].clone()
    order = [i for i in torch.argsort(scored, stable=True).tolist() if i >= 2]  # the sinks stay
    before = seq.token_ids()
    engine.decode_one(seq, 5)  # over budget by one: the lowest-scored prompt token goes
    assert seq.token_ids() == before[: order[0]] + before[order[0] + 1 :] + [5]
    assert torch.isinf(seq.scores[seq.length - 1])  # decoded tokens are not scored


# ------------------------------------------------------------------ H2O and TOVA
def test_h2o_scores_accumulate_every_query_and_it_evicts_the_lowest_outside_the_recent_window(hf):
    ref, ours = hf
    engine = TorchEngine(ours)
    P = 40
    ids = ids_of(P + 1, seed=6)
    seq = engine.new_sequence(budget=P, policy="h2o", n_sink=4)  # n_recent None: (40 - 4) // 2 = 18
    engine.prefill(seq, ids[:P])  # in chunks of 9: (40 - 4 - 18) // 2
    atts = hf_attentions(ref, ids[:P])
    want = sum(a.sum(dim=(0, 1)) for a in atts)  # (P,): over layers, heads and every query
    assert (seq.scores[:P] - want).abs().max().item() <= 1e-4  # sums of ~400 probabilities
    lowest = (torch.topk(want[4 : P - 18], 3, largest=False).indices + 4).sort().values.tolist()
    spans = seq.policy.select(seq, 3)
    assert [s for a, b in spans for s in range(a, b)] == lowest
    # a decode step adds its query's attention (here with room to spare: a bigger budget)
    seq2 = engine.new_sequence(budget=64, policy="h2o")
    engine.prefill(seq2, ids[:P])
    engine.decode_one(seq2, ids[P])
    want = sum(a.sum(dim=(0, 1)) for a in hf_attentions(ref, ids))
    assert (seq2.scores[: P + 1] - want).abs().max().item() <= 1e-4


def test_tova_scores_are_the_last_query_and_it_evicts_the_least_attended(hf):
    ref, ours = hf
    engine = TorchEngine(ours)
    P = 40
    ids = ids_of(P, seed=7)
    seq = engine.new_sequence(budget=P, policy="tova", n_sink=4, chunk=16)
    engine.prefill(seq, ids)
    atts = hf_attentions(ref, ids)
    want = sum(a[:, -1].mean(dim=0) for a in atts) / len(atts)  # (P,): the last query, mean over heads, layers
    assert (seq.scores[:P] - want).abs().max().item() <= TOL
    least = (torch.argmin(want[4:]) + 4).item()
    engine.decode_one(seq, 3)  # over budget by one: the least attended token goes
    assert seq.token_ids() == ids[:least] + ids[least + 1 :] + [3]


# ------------------------------------------------------------------ OmniKV
def omni_engine():
    return tiny_engine(seed=2, n_layers=4)


def decode_logits(engine, seq, tokens):
    return torch.stack([engine.decode_one(seq, t) for t in tokens])


@pytest.mark.parametrize("filters", [(1,), (0, 2)])
def test_omnikv_with_k_the_whole_context_equals_full_attention(filters):
    engine = omni_engine()
    prompt, follow = rand_ids(60, seed=8), rand_ids(8, seed=9)
    full = engine.new_sequence(budget=128)
    engine.prefill(full, prompt)
    omni = engine.new_sequence(budget=128, policy="omnikv", filter_layers=filters, k=1.0)
    engine.prefill(omni, prompt)
    want, got = decode_logits(engine, full, follow), decode_logits(engine, omni, follow)
    assert len(omni.policy.picked[filters[0]]) == 60 + 8  # everything: the gather path, not a shortcut
    assert (got - want).abs().max().item() <= TOL


def test_omnikv_later_layers_see_only_the_picked_tokens():
    """Perturb one cached token's K/V in the layers after the filter layer: if it was not picked the
    logits do not move at all; if it was, they do (and in a full-attention layer, they always do)."""
    engine = omni_engine()
    seq = engine.new_sequence(budget=128, policy="omnikv", filter_layers=(1,), k=6, n_sink=2)
    engine.prefill(seq, rand_ids(60, seed=10))
    probe = seq.fork()
    base = engine.decode_one(probe, 7)  # the decode step every perturbation replays
    picked = probe.policy.picked[1]
    assert picked.tolist()[:2] == [0, 1] and picked.tolist()[-1] == 60 and len(picked) == 2 + 6 + 1
    unpicked = next(i for i in range(2, 60) if i not in picked.tolist())
    picked_one = picked[2].item()

    def perturbed(slot: int, layers: slice) -> torch.Tensor:
        other = seq.fork()
        other.store.k_all[layers, :, slot] += 3.0
        other.store.v_all[layers, :, slot] += 3.0
        return engine.decode_one(other, 7)

    assert torch.equal(perturbed(unpicked, slice(2, 4)), base)
    assert (perturbed(picked_one, slice(2, 4)) - base).abs().max().item() > 1e-4
    assert (perturbed(unpicked, slice(0, 1)) - base).abs().max().item() > 1e-4


def test_omnikv_picks_tokens_generated_while_decoding_and_k_as_a_fraction():
    engine = omni_engine()
    seq = engine.new_sequence(budget=128, policy="omnikv", filter_layers=(2,), k=0.25, n_sink=4)
    engine.prefill(seq, rand_ids(44, seed=11))
    decode_logits(engine, seq, [1, 2, 3])
    idx = seq.policy.picked[2].tolist()
    assert idx[:4] == [0, 1, 2, 3] and idx[-3:] == [44, 45, 46] and len(idx) == 4 + 10 + 3  # 25% of 40
    assert idx == sorted(set(idx))


def test_omnikv_offload_moves_only_the_picked_rows_and_changes_nothing():
    engine = omni_engine()
    prompt, follow = rand_ids(60, seed=12), rand_ids(6, seed=13)
    seqs = []
    for offload in (False, True):
        seq = engine.new_sequence(budget=128, policy="omnikv", filter_layers=(1,), k=5, offload=offload, device="cpu")
        engine.prefill(seq, prompt)
        seqs.append(seq)
    a, b = (decode_logits(engine, s, follow) for s in seqs)
    assert torch.equal(a, b)
    req, cfg = seqs[1].policy.last_request, engine.cfg
    assert set(req.resident) == {0, 1}  # before and at the filter layer: device-resident mirrors
    n = len(seqs[1].policy.picked[1]) - 1  # the step's own row is computed on the device: it never moves
    assert req.moved_bytes == 2 * 2 * n * cfg.n_kv_heads * cfg.head_dim * 4  # layers 2, 3; K and V; float32
    assert seqs[0].policy.last_request.moved_bytes == 0
    # an edit of the store (revert three tokens) resyncs the mirrors
    for s in seqs:
        s.truncate(s.length - 3)
    a, b = (decode_logits(engine, s, follow[::-1]) for s in seqs)
    assert torch.equal(a, b)


def test_brutal_offload_equals_full_and_moves_whole_layers():
    engine = omni_engine()
    prompt, follow = rand_ids(50, seed=14), rand_ids(4, seed=15)
    full = engine.new_sequence(budget=128)
    brutal = engine.new_sequence(budget=128, policy="brutal-offload", filter_layers=(1,))
    for s in (full, brutal):
        engine.prefill(s, prompt)
    a, b = decode_logits(engine, full, follow), decode_logits(engine, brutal, follow)
    assert (a - b).abs().max().item() <= TOL
    cfg = engine.cfg
    assert brutal.policy.last_request.moved_bytes == 2 * 2 * 54 * cfg.n_kv_heads * cfg.head_dim * 4


# ------------------------------------------------------------------ every policy, in chat, within budget
TABLE = [  # policy, params, budget
    ("h2o", {}, 48),
    ("h2o", {"n_discard": 8, "n_recent": 4}, 48),
    ("tova", {}, 48),
    ("tova", {"layers": (0, 2), "n_discard": 4}, 48),
    ("snapkv", {"window": 8}, 48),
    ("snapkv", {"window": 4, "kernel": 3, "n_sink": 0}, 40),
    ("omnikv", {"filter_layers": (1,), "k": 8}, 400),
    ("omnikv", {"filter_layers": (0, 1), "k": 0.2, "offload": True}, 400),
    ("brutal-offload", {"filter_layers": (1,)}, 400),
]


@pytest.mark.parametrize("pinned", [True, False], ids=["pinned", "sinks"])
@pytest.mark.parametrize("policy, params, budget", TABLE, ids=[f"{p}-{i}" for i, (p, _, _) in enumerate(TABLE)])
def test_chat_turns_stay_in_budget_and_keep_pinned_and_sinks(policy, params, budget, pinned):
    engine = tiny_engine()
    seq = engine.new_sequence(budget=budget, policy=policy, **params)
    drops = seq.policy.drops_tokens
    head = rand_ids(6, seed=16)
    if pinned:
        seq.create_segment("system")
    engine.prefill(seq, head)
    n_sink = params.get("n_sink", 4)
    lengths = []
    for turn in range(2):
        seq.create_segment("user")
        sampling = SamplingParams(temperature=1.0, seed=turn, max_tokens=30)
        steps = list(
            engine.generate(
                seq, rand_ids(70, seed=17 + turn), sampling, should_stop=lambda: lengths.append(seq.length) and False
            )
        )
        assert len(steps) == 30
        assert seq.token_ids()[: 6 if pinned else n_sink] == head[: 6 if pinned else n_sink]
    if drops:
        assert max(lengths) <= budget and seq.n_evicted > 0
    else:
        assert seq.length == 6 + 2 * (70 + 30) and seq.n_evicted == 0
    if pinned:
        assert seq.segments.pinned_spans() == [(0, 6)]
    assert seq.positions() == list(range(seq.length))


@pytest.mark.parametrize("policy", ["h2o", "tova", "snapkv"])
def test_a_pinned_segment_is_never_chosen(policy):
    engine = tiny_engine()
    seq = engine.new_sequence(budget=32, policy=policy, n_sink=0)
    seq.create_segment("system")
    engine.prefill(seq, rand_ids(12, seed=18))
    seq.create_segment("user")
    engine.prefill(seq, rand_ids(20, seed=19))
    seq.scores[:12] = -1.0  # the pinned tokens look least important of all
    spans = seq.policy.select(seq, 10)
    assert sum(e - s for s, e in spans) >= 10 and all(s >= 12 for s, _ in spans)
    with pytest.raises(InfinichatError, match="evictable"):
        seq.policy.select(seq, 21)


# ------------------------------------------------------------------ bad settings
@pytest.mark.parametrize(
    "policy, params, match",
    [
        ("omnikv", {"k": 0}, "k must be a token count"),
        ("omnikv", {"k": 1.5}, "k must be a token count"),
        ("omnikv", {"k": True}, "k must be a token count"),
        ("omnikv", {"filter_layers": ()}, "one or more layer numbers"),
        ("omnikv", {"filter_layers": "ab"}, "must be layer numbers"),
        ("snapkv", {"kernel": 4}, "kernel an odd number"),
        ("h2o", {"n_recent": -1}, "n_recent must be >= 0"),
        ("tova", {"layers": ()}, "at least one layer"),
        ("omnikv", {"n_discard": 8}, "bad parameters for the omnikv policy"),
    ],
)
def test_bad_settings_are_clear_errors(policy, params, match):
    with pytest.raises(InfinichatError, match=match):
        make_policy(policy, **params)


def test_settings_that_do_not_fit_the_model_or_budget_are_clear_errors():
    engine = tiny_engine()
    for policy, params in [("omnikv", {"filter_layers": (5,)}), ("h2o", {"layers": (3,)})]:
        seq = engine.new_sequence(budget=64, policy=policy, **params)
        with pytest.raises(InfinichatError, match=r"do not exist; this model has layers 0\.\.2"):
            list(engine.generate(seq, rand_ids(10), SamplingParams(temperature=0, max_tokens=2)))
    seq = engine.new_sequence(budget=20, policy="omnikv", filter_layers=(1,))
    with pytest.raises(InfinichatError, match="keeps every token"):
        engine.prefill(seq, rand_ids(21))
