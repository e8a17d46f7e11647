"""DRY and XTC (issue 25): exact penalties on hand-made histories and against a brute-force reference, XTC's
removals, the Sampler's chain and seeding, and parameter validation."""

from __future__ import annotations

import math
import random
from typing import Any

import numpy as np
import pytest
import torch

from infinichat.engine.sampling import (
    DRY_BREAKERS,
    Sampler,
    SamplingParams,
    apply_dry,
    apply_xtc,
    dry_penalties,
)
from infinichat.errors import InfinichatError
from infinichat.session.settings import SessionSettings

DRY: dict[str, Any] = {"dry_multiplier": 0.8, "dry_base": 1.75, "dry_allowed_length": 2}


def _pen(
    history: list[int], breakers: frozenset[int] | set[int] = frozenset(), V: int = 32, **kw: Any
) -> dict[int, float]:
    mask = np.zeros(V, dtype=bool)
    mask[list(breakers)] = True
    ids, pen = dry_penalties(history, SamplingParams(**{**DRY, **kw}), mask)
    return dict(zip(ids.tolist(), pen.tolist(), strict=True))


def _reference(h: list[int], brk: set[int], mult: float, base: float, allowed: int, last_n: int) -> dict[int, float]:
    """DRY written out directly: for every earlier position i, the common suffix of h[:i+1] and h (no breakers)."""
    if last_n > 0:
        h = h[-last_n:]
    n = len(h)
    best: dict[int, int] = {}
    for i in range(n - 1):
        length = 0
        while i - length >= 0 and h[i - length] == h[n - 1 - length] and h[i - length] not in brk:
            length += 1
        nxt = h[i + 1]
        if length >= allowed and nxt not in brk:
            best[nxt] = max(best.get(nxt, 0), length)
    return {t: mult * base ** (length - allowed) for t, length in best.items()}


# --- DRY: hand-made histories -------------------------------------------------------------------------


def test_dry_penalises_the_token_that_would_extend_a_repeat() -> None:
    # "1 2 3" ends the history and was followed by 4 before: 4 would make it a 4-token repeat (L = 3)
    assert _pen([1, 2, 3, 4, 9, 9, 1, 2, 3]) == pytest.approx({4: 0.8 * 1.75**1})
    # two earlier occurrences, matched lengths 3 (-> 4) and 2 (-> 7); each token gets its own length
    assert _pen([1, 2, 3, 4, 5, 2, 3, 7, 8, 1, 2, 3]) == pytest.approx({4: 0.8 * 1.75, 7: 0.8})
    # the same next token after two matches: the longest match counts
    assert _pen([2, 3, 4, 1, 2, 3, 4, 8, 1, 2, 3]) == pytest.approx({4: 0.8 * 1.75})


def test_dry_allowed_length_is_the_threshold() -> None:
    h = [5, 6, 7, 1, 9, 6, 7]  # "6 7" repeats: L = 2 for token 1
    assert _pen(h, dry_allowed_length=2) == pytest.approx({1: 0.8})  # multiplier * base ** 0
    assert _pen(h, dry_allowed_length=3) == {}
    assert _pen(h, dry_allowed_length=1) == pytest.approx({1: 0.8 * 1.75})
    assert _pen([4, 1, 2, 4], dry_allowed_length=1) == pytest.approx({1: 0.8})  # a single-token repeat


def test_dry_sequence_breakers_stop_the_match() -> None:
    h = [1, 2, 3, 4, 9, 1, 2, 3]
    assert _pen(h) == pytest.approx({4: 0.8 * 1.75})
    assert _pen(h, breakers={1}) == pytest.approx({4: 0.8})  # the match stops before 1: L = 2
    assert _pen(h, breakers={2}) == {}  # L = 1 < 2
    assert _pen(h, breakers={3}) == {}  # the last token is a breaker: nothing to extend
    assert _pen(h, breakers={4}) == {}  # a breaker is never penalised as the next token
    assert _pen(h, breakers={9}) == pytest.approx({4: 0.8 * 1.75})  # breakers elsewhere change nothing


def test_dry_window_and_off_switches() -> None:
    h = [1, 2, 3, 4, 9, 9, 9, 9, 1, 2, 3]
    assert _pen(h, dry_penalty_last_n=-1) == pytest.approx({4: 0.8 * 1.75})
    assert _pen(h, dry_penalty_last_n=len(h)) == pytest.approx({4: 0.8 * 1.75})
    assert _pen(h, dry_penalty_last_n=len(h) - 1) == pytest.approx({4: 0.8})  # the window cuts the first 1
    assert _pen(h, dry_penalty_last_n=7) == {}  # the earlier occurrence is outside the window
    assert _pen(h, dry_penalty_last_n=0) == {}
    assert _pen(h, dry_multiplier=0.0) == {}
    assert _pen([], V=4) == {} and _pen([3], V=4) == {}


def test_dry_overlapping_self_repeat() -> None:
    # a run of one token: position i matches i + 1 tokens; the longest (L = 5) decides the penalty of 7
    assert _pen([7] * 6) == pytest.approx({7: 0.8 * 1.75**3})


def test_dry_penalty_stays_finite_for_very_long_repeats() -> None:
    block = list(range(1, 31))
    ids, pen = dry_penalties(block * 20, SamplingParams(dry_multiplier=5.0, dry_base=3.0), None)
    assert ids.tolist() == [1] and np.isfinite(pen).all() and pen[0] > 1e30
    out = apply_dry(torch.zeros(32), block * 20, SamplingParams(dry_multiplier=5.0, dry_base=3.0), None)
    assert torch.isfinite(out).all() and out[1] < -1e30 and out[0] == 0


@pytest.mark.parametrize("seed", range(40))
def test_dry_matches_the_reference(seed: int) -> None:
    rng = random.Random(seed)
    V = rng.choice([3, 5, 8])  # small vocabularies make many long repeats
    h = [rng.randrange(V) for _ in range(rng.randrange(2, 120))]
    if rng.random() < 0.5:  # paste an earlier span at the end: a long repeat
        a = rng.randrange(len(h))
        h += h[a : a + rng.randrange(1, 30)]
    brk = {t for t in range(V) if rng.random() < 0.25}
    mult, base = rng.choice([0.8, 2.0]), rng.choice([1.0, 1.75, 2.5])
    allowed, last_n = rng.randrange(1, 5), rng.choice([-1, -1, 10, 50])
    got = _pen(h, brk, V, dry_multiplier=mult, dry_base=base, dry_allowed_length=allowed, dry_penalty_last_n=last_n)
    want = _reference(h, brk, mult, base, allowed, last_n)
    assert got.keys() == want.keys()
    for t in want:
        assert got[t] == pytest.approx(want[t], rel=1e-12)


def test_apply_dry_subtracts_the_penalties_and_leaves_the_input() -> None:
    x = torch.linspace(-1, 1, 32)
    before = x.clone()
    h = [1, 2, 3, 4, 9, 1, 2, 3]
    out = apply_dry(x, h, SamplingParams(**DRY), None)
    want = x.clone()
    want[4] -= 0.8 * 1.75
    assert torch.allclose(out, want) and torch.equal(x, before)


# --- XTC ----------------------------------------------------------------------------------------------


def _probs(p: list[float]) -> torch.Tensor:
    return torch.log(torch.tensor(p, dtype=torch.float32))


def test_xtc_removes_the_top_choices_but_the_least_likely_of_them() -> None:
    out = torch.softmax(apply_xtc(_probs([0.4, 0.3, 0.15, 0.1, 0.05]), 0.12), 0)
    assert out[:2].tolist() == [0.0, 0.0]  # 0.4 and 0.3 are removed, 0.15 (the least likely above) stays
    assert out[2:].tolist() == pytest.approx([0.5, 1 / 3, 1 / 6])
    # order does not matter: the same tokens removed when shuffled
    x = _probs([0.1, 0.4, 0.05, 0.3, 0.15])
    assert torch.isinf(apply_xtc(x, 0.12)).nonzero().squeeze(1).tolist() == [1, 3]


def test_xtc_needs_two_tokens_above_the_threshold() -> None:
    x = _probs([0.6, 0.2, 0.1, 0.1])
    assert torch.equal(apply_xtc(x, 0.3), x)  # only one above: nothing removed
    assert torch.equal(apply_xtc(x, 0.7), x)  # none above
    assert torch.isinf(apply_xtc(x, 0.2)).tolist() == [True, False, False, False]
    ties = _probs([0.3, 0.3, 0.2, 0.2])
    assert torch.isinf(apply_xtc(ties, 0.2)).tolist() == [True, True, False, False]  # the tied least likely stay


def test_sampler_xtc_probability_one_never_picks_a_removed_token() -> None:
    x = _probs([0.4, 0.3, 0.15, 0.1, 0.05])
    s = Sampler(SamplingParams(seed=5, temperature=1.0, xtc_probability=1.0, xtc_threshold=0.12), 5)
    assert {s.sample(x, []).token for _ in range(300)} == {2, 3, 4}
    off = Sampler(SamplingParams(seed=5, temperature=1.0, xtc_probability=1.0, xtc_threshold=0.6), 5)  # > 0.5: off
    assert {off.sample(x, []).token for _ in range(300)} == {0, 1, 2, 3, 4}


def test_sampler_xtc_fires_with_its_probability() -> None:
    x = _probs([0.5, 0.3, 0.1, 0.1])
    n, pr = 20_000, 0.3
    s = Sampler(SamplingParams(seed=11, temperature=1.0, xtc_probability=pr, xtc_threshold=0.25), 4)
    counts = np.bincount([s.sample(x, []).token for _ in range(n)], minlength=4)
    # fired: token 1 (0.3) renormalised with 2, 3 -> 0.6, 0.2, 0.2; not fired: the original distribution
    expected = (1 - pr) * np.array([0.5, 0.3, 0.1, 0.1]) + pr * np.array([0.0, 0.6, 0.2, 0.2])
    chi2 = float(((counts - n * expected) ** 2 / (n * expected)).sum())
    assert chi2 < 3 + 6 * math.sqrt(6), (counts, expected)


def test_xtc_off_leaves_the_seeded_stream_unchanged() -> None:
    def run(**kw: Any) -> list[int]:
        s = Sampler(SamplingParams(seed=3, temperature=1.0, **kw), 50)
        g = torch.Generator().manual_seed(0)
        return [s.sample(torch.randn(50, generator=g), []).token for _ in range(100)]

    assert run() == run(xtc_probability=0.0) == run(xtc_probability=0.9, xtc_threshold=0.55)


# --- the Sampler: DRY in the chain, seeding -----------------------------------------------------------


def test_sampler_dry_turns_the_greedy_choice_away_from_a_repeat() -> None:
    x = torch.zeros(10)
    x[4], x[5] = 1.0, 0.1
    h = [1, 2, 3, 4, 9, 1, 2, 3]
    mask = np.zeros(10, dtype=bool)
    assert Sampler(SamplingParams(temperature=0), 10).sample(x, h).token == 4
    assert Sampler(SamplingParams(temperature=0, **DRY), 10, mask).sample(x, h).token == 5
    mask[1] = True  # with 1 a breaker the match is 2 long: penalty 0.8 (1.4 without), 4 stays ahead of 5
    assert Sampler(SamplingParams(temperature=0, **DRY), 10, mask).sample(x, h).token == 4


def test_sampler_needs_the_breaker_mask_when_dry_has_breakers() -> None:
    with pytest.raises(ValueError, match="breakers"):
        Sampler(SamplingParams(**DRY), 10)
    Sampler(SamplingParams(**DRY, dry_sequence_breakers=()), 10)  # no breakers: no mask needed
    Sampler(SamplingParams(), 10)  # DRY off


def test_dry_and_xtc_are_seeded_reproducible() -> None:
    mask = np.zeros(40, dtype=bool)
    mask[0] = True

    def run(seed: int) -> list[int]:
        p = SamplingParams(seed=seed, temperature=1.0, xtc_probability=0.5, xtc_threshold=0.05, **DRY)
        s = Sampler(p, 40, mask)
        g = torch.Generator().manual_seed(1)
        h = [1, 2, 3]
        for _ in range(200):
            h.append(s.sample(torch.randn(40, generator=g) * 2, h).token)
        return h

    assert run(7) == run(7)
    assert run(7) != run(8)


# --- validation, settings -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("dry_multiplier", -0.1),
        ("dry_multiplier", float("inf")),
        ("dry_multiplier", "x"),
        ("dry_base", 0.9),
        ("dry_base", float("nan")),
        ("dry_allowed_length", 0),
        ("dry_allowed_length", 1.5),
        ("dry_penalty_last_n", -2),
        ("dry_sequence_breakers", ("\n", "")),
        ("dry_sequence_breakers", ("\n", 3)),
        ("dry_sequence_breakers", ("x",) * 33),
        ("dry_sequence_breakers", ("y" * 65,)),
        ("dry_sequence_breakers", "abc"),
        ("xtc_probability", 1.5),
        ("xtc_probability", -0.1),
        ("xtc_threshold", 1.1),
        ("xtc_threshold", -0.2),
    ],
)
def test_validate_names_the_bad_dry_or_xtc_field(field: str, value: object) -> None:
    bad: dict[str, Any] = {field: value}
    params = SamplingParams(**bad)
    with pytest.raises(InfinichatError) as err:
        params.validate()
    msg = str(err.value)
    assert field in msg and "expected" in msg
    with pytest.raises(InfinichatError):
        SessionSettings().updated({field: value})


def test_session_settings_carry_dry_and_xtc() -> None:
    s = SessionSettings().updated(
        {"dry_multiplier": 0.8, "dry_sequence_breakers": ["\n", "*"], "xtc_probability": 0.5, "xtc_threshold": 0.1}
    )
    p = s.sampling()
    assert (p.dry_multiplier, p.dry_sequence_breakers, p.xtc_probability, p.xtc_threshold) == (
        0.8,
        ("\n", "*"),
        0.5,
        0.1,
    )
    assert SessionSettings.from_json(s.to_json()) == s  # JSON lists come back as the same tuple
    as_list: Any = ["a"]  # what JSON gives
    assert SamplingParams(dry_sequence_breakers=as_list).dry_sequence_breakers == ("a",)
    assert SessionSettings().sampling().dry_sequence_breakers == DRY_BREAKERS


def test_tokens_containing_marks_every_token_with_a_breaker(default_tokenizer: Any) -> None:
    tok = default_tokenizer
    mask = tok.tokens_containing(DRY_BREAKERS)
    assert mask.shape == (tok.vocab_size,) and mask is tok.tokens_containing(DRY_BREAKERS)  # computed once
    for text in ("\n", ":", '"', "*", "\n\n", '."'):
        assert all(mask[i] for i in tok.encode(text)), text
    rng = random.Random(0)
    for i in rng.sample(range(tok.vocab_size), 2000):
        assert mask[i] == any(b.encode() in tok.token_bytes(i) for b in DRY_BREAKERS)
    assert not mask[tok.encode(" hello")].any()


@pytest.mark.parametrize(
    ("flags", "field"),
    [
        (["--dry-base", "0.5"], "dry_base"),
        (["--dry-allowed-length", "0"], "dry_allowed_length"),
        (["--dry-sequence-breaker", ""], "dry_sequence_breakers"),
        (["--xtc-probability", "2"], "xtc_probability"),
        (["--xtc-threshold", "-1"], "xtc_threshold"),
    ],
)
def test_cli_bad_dry_or_xtc_flag_is_exit_2(flags: list[str], field: str, capsys: Any, tmp_path: Any) -> None:
    from infinichat.cli.main import main

    assert main(["chat", "--data-dir", str(tmp_path), *flags]) == 2  # refused before the model loads
    err = capsys.readouterr().err
    assert field in err and "expected" in err
