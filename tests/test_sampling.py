"""Sampling: the pure filters and penalties checked exactly, the seeded Sampler checked statistically."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from infinichat.engine.sampling import (
    SampledToken,
    Sampler,
    SamplingParams,
    apply_min_p,
    apply_penalties,
    apply_top_k,
    apply_top_p,
)
from infinichat.errors import InfinichatError

V = 1000


def _logits(seed: int, n: int = V, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g) * scale  # (n,)


def _kept(x: torch.Tensor) -> set[int]:
    return set(torch.nonzero(torch.isfinite(x)).squeeze(1).tolist())


def _from_probs(probs: list[float]) -> torch.Tensor:
    return torch.log(torch.tensor(probs, dtype=torch.float32))


# --- reproducibility ---------------------------------------------------------------------------------


def _run(seed: int | None, steps: int = 200, **kw: object) -> list[int]:
    sampler = Sampler(SamplingParams(seed=seed, temperature=1.0, **kw), V)
    history: list[int] = [1, 2, 3]
    for step in range(steps):
        history.append(sampler.sample(_logits(step % 7, scale=1.0), history).token)
    return history[3:]


def test_same_seed_same_tokens() -> None:
    first = _run(1234)
    assert first == _run(1234)
    assert len(set(first)) > 50  # a flat-ish distribution: the sequence really is random


def test_different_seeds_differ() -> None:
    assert _run(1) != _run(2)
    assert _run(1, top_k=50, top_p=0.9) != _run(2, top_k=50, top_p=0.9)


def test_seed_none_draws_a_random_seed() -> None:
    a, b = Sampler(SamplingParams(), V), Sampler(SamplingParams(), V)
    assert isinstance(a.seed, int) and a.seed != b.seed
    assert Sampler(SamplingParams(seed=7), V).seed == 7


# --- top_k -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 5, 40, V - 1])
def test_top_k_keeps_exactly_the_k_highest(k: int) -> None:
    x = _logits(0)
    before = x.clone()
    out = apply_top_k(x, k)
    assert _kept(out) == set(torch.argsort(x, descending=True)[:k].tolist())
    kept = torch.isfinite(out)
    assert torch.equal(out[kept], x[kept])  # survivors are untouched
    assert torch.equal(x, before)  # the input is not modified


def test_top_k_off_and_ties() -> None:
    x = torch.tensor([1.0, 3.0, 3.0, 2.0])
    assert torch.equal(apply_top_k(x, 0), x)
    assert torch.equal(apply_top_k(x, 4), x)
    assert torch.equal(apply_top_k(x, 10), x)
    assert _kept(apply_top_k(x, 1)) == {1, 2}  # both tied for first are kept
    assert _kept(apply_top_k(x, 2)) == {1, 2}
    assert _kept(apply_top_k(x, 3)) == {1, 2, 3}


# --- top_p -------------------------------------------------------------------------------------------


def _top_p_reference(x: torch.Tensor, p: float) -> set[int]:
    """Smallest prefix of the tokens sorted by probability whose mass >= p, plus ties of its last one."""
    logits = x.double().numpy()
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")
    csum = np.cumsum(probs[order])
    n = int(np.searchsorted(csum, p)) + 1  # first prefix length with mass >= p
    n = min(n, len(order))
    cut = logits[order[n - 1]]
    return set(np.nonzero(logits >= cut)[0].tolist())


def test_top_p_examples() -> None:
    x = _from_probs([0.05, 0.5, 0.15, 0.3])
    assert _kept(apply_top_p(x, 0.75)) == {1, 3}  # 0.5 + 0.3 = 0.8 >= 0.75; 0.5 alone is not
    assert _kept(apply_top_p(x, 0.85)) == {1, 2, 3}
    assert _kept(apply_top_p(x, 0.96)) == {0, 1, 2, 3}
    assert _kept(apply_top_p(x, 0.01)) == {1}  # always at least one token
    assert _kept(apply_top_p(x, 0.5 - 1e-4)) == {1}
    assert torch.equal(apply_top_p(x, 1.0), x)


def test_top_p_ties_at_the_cut_are_all_kept() -> None:
    x = _from_probs([0.2, 0.4, 0.2, 0.2])
    assert _kept(apply_top_p(x, 0.3)) == {1}
    assert _kept(apply_top_p(x, 0.5)) == {0, 1, 2, 3}  # which 0.2 would we drop? none


@settings(max_examples=200, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(1, 3000),
    scale=st.floats(0.1, 8.0),
    p=st.floats(0.001, 0.999),
)
def test_top_p_matches_reference(seed: int, n: int, scale: float, p: float) -> None:
    x = _logits(seed, n, scale)
    probs = torch.softmax(x.double(), 0).sort(descending=True).values.cumsum(0)
    assume(bool((probs - p).abs().min() > 1e-6))  # float32 logsumexp: stay off exact boundaries
    out = apply_top_p(x, p)
    kept = _kept(out)
    assert kept == _top_p_reference(x, p)
    mass = float(torch.softmax(x.double(), 0)[sorted(kept)].sum())
    assert mass >= p - 1e-6


def test_top_p_widens_past_the_tokens_near_the_best() -> None:
    x = torch.cat([torch.zeros(10), torch.full((5000,), -15.0)])  # the tail holds ~1.5e-4 of the mass
    assert _kept(apply_top_p(x, 0.99)) == set(range(10))
    assert _kept(apply_top_p(x, 0.9999)) == set(range(5010))  # needs tokens 15 nats below the best
    far = torch.tensor([0.0, -30.0, -30.0, -math.inf])
    assert _kept(apply_top_p(far, 0.999)) == {0}
    flat = _logits(3, 5000, 0.01)
    assert _kept(apply_top_p(flat, 0.9)) == _top_p_reference(flat, 0.9)


# --- min_p -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("min_p", [0.01, 0.1, 0.5, 0.99])
def test_min_p_keeps_tokens_with_p_at_least_min_p_times_p_max(min_p: float) -> None:
    x = _logits(5)
    probs = torch.softmax(x.double(), 0)
    ratio = probs / probs.max()
    assert bool((ratio - min_p).abs().min() > 1e-6)
    expected = set(torch.nonzero(ratio >= min_p).squeeze(1).tolist())
    assert _kept(apply_min_p(x, min_p)) == expected
    assert int(torch.argmax(x)) in expected


def test_min_p_examples() -> None:
    x = _from_probs([0.5, 0.26, 0.24])
    assert _kept(apply_min_p(x, 0.5)) == {0, 1}
    assert _kept(apply_min_p(x, 0.45)) == {0, 1, 2}
    assert _kept(apply_min_p(x, 1.0)) == {0}
    assert torch.equal(apply_min_p(x, 0.0), x)


# --- penalties ---------------------------------------------------------------------------------------


def test_repetition_penalty_exact() -> None:
    x = torch.tensor([2.0, -1.0, 0.5, -3.0, 4.0, 1.0])
    history = [4, 0, 0, 1, 0, 2, 3, 1]  # window of 6: [0, 1, 0, 2, 3, 1]; token 4 is outside it
    out = apply_penalties(x, history, SamplingParams(repetition_penalty=2.0, repeat_last_n=6))
    expected = torch.tensor([1.0, -2.0, 0.25, -6.0, 4.0, 1.0])  # once per id, however often it occurs
    assert torch.equal(out, expected)
    assert torch.equal(x, torch.tensor([2.0, -1.0, 0.5, -3.0, 4.0, 1.0]))  # input untouched


def test_presence_and_frequency_exact() -> None:
    x = torch.tensor([2.0, -1.0, 0.5, -3.0, 4.0, 1.0])
    history = [4, 0, 0, 1, 0, 2]
    p = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25, repeat_last_n=-1)
    out = apply_penalties(x, history, p)
    counts = torch.tensor([3.0, 1.0, 1.0, 0.0, 1.0, 0.0])
    expected = x - 0.25 * counts - 0.5 * (counts > 0).float()
    assert torch.allclose(out, expected, atol=1e-6, rtol=0)
    # repetition first, then presence / frequency (llama.cpp order)
    p2 = SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25, repeat_last_n=-1)
    rep = torch.tensor([1.0, -2.0, 0.25, -3.0, 2.0, 1.0])
    assert torch.allclose(apply_penalties(x, history, p2), rep - 0.25 * counts - 0.5 * (counts > 0).float())


def test_penalty_window_settings() -> None:
    x = torch.tensor([2.0, 2.0, 2.0])
    history = torch.tensor([0, 1, 2, 2])
    off = apply_penalties(x, history, SamplingParams(repetition_penalty=2.0, repeat_last_n=0))
    assert torch.equal(off, x)
    last1 = apply_penalties(x, history, SamplingParams(repetition_penalty=2.0, repeat_last_n=1))
    assert torch.equal(last1, torch.tensor([2.0, 2.0, 1.0]))
    whole = apply_penalties(x, history, SamplingParams(repetition_penalty=2.0, repeat_last_n=-1))
    assert torch.equal(whole, torch.tensor([1.0, 1.0, 1.0]))
    empty = apply_penalties(x, [], SamplingParams(repetition_penalty=2.0))
    assert torch.equal(empty, x)


def test_sampler_applies_penalties() -> None:
    x = torch.tensor([5.0, 4.9, 0.0, 0.0])
    s = Sampler(SamplingParams(temperature=0, repetition_penalty=1.5), 4)
    assert s.sample(x, []).token == 0
    assert s.sample(x, [0]).token == 1


# --- greedy, logprobs --------------------------------------------------------------------------------


def test_temperature_zero_is_argmax_with_temperature_one_logprobs() -> None:
    s = Sampler(SamplingParams(temperature=0, top_logprobs=5, top_k=3, seed=0), V)
    for seed in range(5):
        x = _logits(seed)
        out = s.sample(x, [])
        logp = torch.log_softmax(x.double(), 0)
        assert out.token == int(torch.argmax(x))
        assert out.logprob == pytest.approx(float(logp[out.token]), abs=1e-5)
        best = torch.topk(logp, 5)
        assert [t for t, _ in out.top] == best.indices.tolist()
        assert [v for _, v in out.top] == pytest.approx(best.values.tolist(), abs=1e-5)


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"top_k": 40},
        {"top_p": 0.8},
        {"min_p": 0.05},
        {"top_k": 50, "top_p": 0.9, "min_p": 0.02, "temperature": 1.3},
        {"repetition_penalty": 1.3, "presence_penalty": 0.4, "frequency_penalty": 0.2, "top_k": 20},
    ],
)
def test_logprob_and_top_match_the_processed_distribution(kw: dict[str, float]) -> None:
    params = SamplingParams(seed=3, top_logprobs=20, **kw)
    s = Sampler(params, V)
    history = [int(t) for t in _logits(99).argsort()[:30]]
    for step in range(20):
        x = _logits(step)
        out = s.sample(x, history)
        proc = apply_penalties(x, history, params)
        proc = apply_min_p(apply_top_p(apply_top_k(proc, params.top_k), params.top_p), params.min_p)
        logp = torch.log_softmax(proc.double() / params.temperature, 0)
        assert math.isfinite(logp[out.token])  # never a filtered-out token
        assert out.logprob == pytest.approx(float(logp[out.token]), abs=1e-4)
        n_top = min(20, int(torch.isfinite(logp).sum()))
        best = torch.topk(logp, n_top)
        assert [t for t, _ in out.top] == best.indices.tolist()
        assert [v for _, v in out.top] == pytest.approx(best.values.tolist(), abs=1e-4)
        history.append(out.token)


def test_no_top_when_top_logprobs_is_zero_and_bf16_logits_work() -> None:
    s = Sampler(SamplingParams(seed=0), V)
    out = s.sample(_logits(1).bfloat16(), [])
    assert isinstance(out, SampledToken) and out.top == [] and out.logprob <= 0.0


def test_sampler_keeps_ties_at_the_top_k_cut() -> None:
    x = torch.full((50,), -5.0)
    x[[3, 17, 30]] = 2.0
    s = Sampler(SamplingParams(seed=0, top_k=1, temperature=1.0), 50)
    assert {s.sample(x, []).token for _ in range(300)} == {3, 17, 30}


def test_sampler_rejects_wrong_shape() -> None:
    with pytest.raises(ValueError, match=r"shape \(1000,\)"):
        Sampler(SamplingParams(), V).sample(torch.zeros(1, V), [])


# --- empirical distribution --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [
        {"temperature": 1.0},
        {"temperature": 0.7, "top_k": 6, "top_p": 0.95, "min_p": 0.02},
        {"temperature": 1.5, "repetition_penalty": 1.4, "presence_penalty": 0.3, "frequency_penalty": 0.1},
    ],
)
def test_sample_frequencies_match_the_processed_distribution(kw: dict[str, float]) -> None:
    n_vocab, n = 12, 20_000
    x = torch.tensor([2.0, 1.5, 1.4, 1.0, 0.5, 0.2, 0.0, -0.3, -1.0, -1.5, -2.5, -4.0])
    history = [0, 0, 3, 7]
    params = SamplingParams(seed=2024, **kw)
    proc = apply_penalties(x, history, params)
    proc = apply_min_p(apply_top_p(apply_top_k(proc, params.top_k), params.top_p), params.min_p)
    expected = torch.softmax(proc.double() / params.temperature, 0).numpy()
    s = Sampler(params, n_vocab)
    counts = np.bincount([s.sample(x, history).token for _ in range(n)], minlength=n_vocab)
    allowed = expected > 0
    assert counts[~allowed].sum() == 0  # filtered tokens never drawn
    chi2 = float((((counts - n * expected) ** 2)[allowed] / (n * expected[allowed])).sum())
    dof = int(allowed.sum()) - 1
    assert chi2 < dof + 6 * math.sqrt(2 * dof), (chi2, dof)  # ~ p < 1e-4 for these dofs


# --- validate ----------------------------------------------------------------------------------------


def test_defaults_validate() -> None:
    SamplingParams().validate()
    SamplingParams(temperature=0, top_k=40, top_p=0.5, min_p=1.0, seed=0, stop=["\n"], top_logprobs=20).validate()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("temperature", float("inf")),
        ("temperature", "hot"),
        ("top_k", -1),
        ("top_k", 2.5),
        ("top_k", True),
        ("top_p", 0.0),
        ("top_p", 1.01),
        ("top_p", -0.5),
        ("min_p", -0.01),
        ("min_p", 1.5),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
        ("repeat_last_n", -2),
        ("presence_penalty", 2.5),
        ("frequency_penalty", -3.0),
        ("seed", -1),
        ("seed", 1.5),
        ("max_tokens", 0),
        ("stop", ("ok", "")),
        ("stop", ("ok", 3)),
        ("top_logprobs", 21),
        ("top_logprobs", -1),
    ],
)
def test_validate_names_the_bad_field(field: str, value: object) -> None:
    params = SamplingParams(**{field: value})
    with pytest.raises(InfinichatError) as err:
        params.validate()
    msg = str(err.value)
    assert field in msg and repr(value) in msg and "expected" in msg
    with pytest.raises(InfinichatError):
        Sampler(params, V)


def test_stop_accepts_a_list_or_a_single_string() -> None:
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    assert SamplingParams(stop="\n").stop == ("\n",)


@pytest.mark.parametrize("kw", [{}, {"top_p": 0.9}, {"top_k": 3, "min_p": 0.1}])
def test_sampler_refuses_logits_without_any_mass(kw: dict[str, float]) -> None:
    s = Sampler(SamplingParams(seed=0, **kw), 8)
    with pytest.raises(ValueError, match="-inf or NaN"):
        s.sample(torch.full((8,), -math.inf), [])
    with pytest.raises(ValueError, match="-inf or NaN"):
        s.sample(torch.full((8,), math.nan), [])


def test_sampler_never_picks_masked_logits() -> None:
    x = torch.full((64,), -math.inf)
    x[[5, 9]] = torch.tensor([1.0, 0.5])
    for kw in ({}, {"top_p": 0.99}, {"min_p": 0.01}, {"top_k": 10}):
        s = Sampler(SamplingParams(seed=1, **kw), 64)
        assert {s.sample(x, []).token for _ in range(100)} == {5, 9}


@pytest.mark.parametrize("top_k", [0, 1, 5, 40])
@pytest.mark.parametrize("top_p", [1.0, 0.9, 0.5, 0.05])
@pytest.mark.parametrize("min_p", [0.0, 0.05, 0.5])
def test_masked_filters_keep_the_candidate_paths_tokens(top_k, top_p, min_p):
    """A GPU filters by masking the whole vocabulary (no set sized on the host, so no sync); the tokens it
    keeps are the ones the CPU's shrinking candidate sets keep, ties and all (logits rounded to make ties)."""
    from infinichat.engine import sampling as sm

    p = SamplingParams(temperature=1.0, top_k=top_k, top_p=top_p, min_p=min_p)
    g = torch.Generator().manual_seed(top_k * 100 + int(top_p * 10) + int(min_p * 100))
    for trial in range(20):
        x = (torch.randn(300, generator=g) * (1 + trial % 4)).round(decimals=1)  # (V,) with ties
        x[torch.randint(0, 300, (10,), generator=g)] = -math.inf  # a logit bias / grammar's masked tokens
        cand, ids = x.clone(), torch.arange(300)
        for fn, on in (
            (lambda c: sm._top_k_keep(c, top_k), 0 < top_k < cand.shape[0]),
            (lambda c: sm._top_p_keep(c, top_p), top_p < 1.0),
            (lambda c: sm._min_p_keep(c, min_p), min_p > 0.0),
        ):
            if on:
                keep = fn(cand)
                cand, ids = cand[keep], ids[keep]
        kept = set(ids[cand > -math.inf].tolist())
        masked = sm._masked_filters_(x.clone(), p)
        assert set(torch.nonzero(masked > -math.inf).flatten().tolist()) == kept, (trial, x)
        assert torch.equal(masked[sorted(kept)], x[sorted(kept)])  # the kept logits are untouched
