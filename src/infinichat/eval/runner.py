"""Run one prompt under one KV policy: a new sequence within the budget, prefill, greedy decode.

Policies come by name from `kv.registry.POLICIES` (`full`, `streaming`, `window`, and whatever the
registry holds: H2O, TOVA, SnapKV, OmniKV), each with its parameters, and are used the same way:

- a policy that drops tokens (`drops_tokens`) gets a sequence whose budget is the run's budget, absolute
  (`--budget`) or a fraction of the prompt (`--budget-frac`); the prompt streams through it (the engine
  prefills in chunks and the policy evicts), or, for a policy of phase "prefill" (SnapKV), the whole
  prompt enters a sequence with room for it and is compressed to the budget after it;
- a policy that keeps every token (`full`, or a selecting policy such as OmniKV) gets room for the whole
  prompt and answer; if it declares a selection-budget field (one of `SELECTION_BUDGET_FIELDS`), the run's
  budget goes there, else the budget does not apply and the policy runs once, whatever the budgets.

Per run we record the answer, prefill and decode time, the tokens kept after prefill and the evictions.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from infinichat.engine.base import Engine
from infinichat.engine.sampling import SamplingParams
from infinichat.errors import InfinichatError
from infinichat.kv.policy import EvictionPolicy
from infinichat.kv.registry import POLICIES, make_policy
from infinichat.kv.sequence import KVSequence

log = logging.getLogger(__name__)

SELECTION_BUDGET_FIELDS = ("budget", "top_k", "k")  # where a non-dropping, selecting policy takes its budget
NO_SINK_POLICIES = ("window",)  # `--n-sink` skips these: they keep no sinks by definition


# ---------------------------------------------------------------------------------------------- policies


def policy_class(name: str) -> type[EvictionPolicy]:
    cls = POLICIES.get(name)
    if cls is None:
        raise InfinichatError(f"unknown policy {name!r} in --policies; accepted: {', '.join(POLICIES)}")
    return cls


def policy_fields(cls: type[EvictionPolicy]) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)] if dataclasses.is_dataclass(cls) else []


def selection_budget_field(cls: type[EvictionPolicy]) -> str | None:
    """The parameter a policy that keeps every token takes its budget in (None: the budget does not apply)."""
    if cls.drops_tokens:
        return None
    names = policy_fields(cls)
    return next((f for f in SELECTION_BUDGET_FIELDS if f in names), None)


def parse_policies(text: str) -> list[str]:
    """'full,streaming' -> names (order kept, duplicates dropped); unknown names are an error listing the
    registry's policies."""
    names: list[str] = []
    for name in (s.strip() for s in text.split(",")):
        if name and name not in names:
            policy_class(name)
            names.append(name)
    if not names:
        raise InfinichatError(f"--policies names no policy; accepted: {', '.join(POLICIES)}")
    return names


def parse_value(text: str) -> Any:
    """A policy parameter's value: int, float, true/false, none, a tuple of ints ("2,14,24": layer lists such as
    omnikv's filter_layers), else the string."""
    low = text.strip().lower()
    parts = [x.strip() for x in low.split(",")]
    if len(parts) > 1 and all(x.lstrip("-").isdigit() for x in parts):
        return tuple(int(x) for x in parts)
    if low in ("true", "false"):
        return low == "true"
    if low == "none":
        return None
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text


def policy_params(names: Sequence[str], items: Sequence[str], n_sink: int | None = None) -> dict[str, dict[str, Any]]:
    """Per-policy parameters from `--param [POLICY.]NAME=VALUE` (repeatable) and `--n-sink`. An unscoped
    parameter goes to every listed policy that has it (and must fit one); a scoped one to that policy."""
    params: dict[str, dict[str, Any]] = {n: {} for n in names}
    fields = {n: policy_fields(policy_class(n)) for n in names}
    if n_sink is not None:
        if n_sink < 0:
            raise InfinichatError(f"--n-sink must be >= 0, got {n_sink}")
        for n in names:
            if "n_sink" in fields[n] and n not in NO_SINK_POLICIES:
                params[n]["n_sink"] = n_sink
    for item in items:
        lhs, sep, value = item.partition("=")
        if not sep or not lhs.strip():
            raise InfinichatError(f"--param {item!r} is not NAME=VALUE or POLICY.NAME=VALUE (e.g. streaming.n_sink=8)")
        scope, dot, key = lhs.strip().rpartition(".")
        targets = [scope] if dot else [n for n in names if key in fields[n]]
        if dot and scope not in params:
            raise InfinichatError(f"--param {item!r}: policy {scope!r} is not in --policies ({', '.join(names)})")
        if not targets or (dot and key not in fields[scope]):
            where = scope if dot else "any of " + ", ".join(names)
            known = sorted({f for n in (targets or names) for f in fields[n]})
            raise InfinichatError(f"--param {item!r}: {where} has no parameter {key!r}; known: {', '.join(known)}")
        for n in targets:
            params[n][key] = parse_value(value)
    for n in names:  # construct each once now (a stand-in selection budget): bad values fail before the model loads
        trial = dict(params[n])
        select = selection_budget_field(policy_class(n))
        if select is not None:
            trial.setdefault(select, 1)
        make_policy(n, **trial)
    return params


@dataclass(frozen=True)
class PolicyRun:
    """One policy at one budget: absolute `tokens`, or `frac` of the prompt, or neither (budget-free)."""

    name: str
    params: Mapping[str, Any] = field(default_factory=dict)
    tokens: int | None = None
    frac: float | None = None

    @property
    def label(self) -> str:
        """'streaming 25%', 'streaming 512', 'full'; parameters given on the command line follow."""
        label = self.name
        if self.tokens is not None:
            label = f"{self.name} {self.tokens}"
        elif self.frac is not None:
            label = f"{self.name} {self.frac * 100:g}%"
        return " ".join([label, *(f"{k}={v}" for k, v in self.params.items())])

    def budget_for(self, n_prompt: int) -> int | None:
        if self.tokens is not None:
            return self.tokens
        if self.frac is not None:
            return max(1, round(self.frac * n_prompt))
        return None

    def to_json(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "policy": self.name,
            "budget_tokens": self.tokens,
            "budget_frac": self.frac,
            "params": dict(self.params),
        }


def check_budgets(tokens: Sequence[int] | None, fracs: Sequence[float] | None) -> None:
    for b in tokens or ():
        if b < 1:
            raise InfinichatError(f"--budget must be a positive number of tokens, got {b}")
    for f in fracs or ():
        if not 0.0 < f <= 1.0:
            raise InfinichatError(f"--budget-frac must be in (0, 1] (a fraction of the prompt), got {f:g}")


def make_runs(
    names: Sequence[str],
    params: Mapping[str, Mapping[str, Any]],
    tokens: Sequence[int] | None = None,
    fracs: Sequence[float] | None = None,
) -> list[PolicyRun]:
    """Every policy at every budget; a budget-free policy (`full`) once."""
    check_budgets(tokens, fracs)
    runs = []
    for name in names:
        cls = policy_class(name)
        p = dict(params.get(name, {}))
        if not cls.drops_tokens and selection_budget_field(cls) is None:
            runs.append(PolicyRun(name, p))
            continue
        runs += [PolicyRun(name, p, tokens=b) for b in tokens or ()]
        runs += [PolicyRun(name, p, frac=f) for f in fracs or ()]
    return runs


# ---------------------------------------------------------------------------------------------- one run


@dataclass
class Generation:
    """What one prompt under one policy produced, and what it cost."""

    text: str
    tokens: list[int]
    prompt_tokens: int
    budget: int | None  # the budget the run applied (None: budget-free)
    kept: int  # cached tokens after the prefill
    n_evictions: int  # evictions during the prefill and the decode
    n_evicted: int
    prefill_s: float
    decode_s: float

    def to_json(self) -> dict[str, Any]:
        return {
            "output": self.text,
            "generated": len(self.tokens),
            "prompt_tokens": self.prompt_tokens,
            "budget": self.budget,
            "kept": self.kept,
            "n_evictions": self.n_evictions,
            "n_evicted": self.n_evicted,
            "prefill_s": round(self.prefill_s, 4),
            "decode_s": round(self.decode_s, 4),
        }


def new_sequence(
    engine: Engine, run: PolicyRun, n_prompt: int, max_new: int, budget_of: int | None = None
) -> tuple[KVSequence, int | None]:
    """The run's KV sequence for a prompt of `n_prompt` tokens and up to `max_new` generated ones, and the
    budget it applies (None: budget-free); a budget fraction is of `budget_of` tokens (default: the prompt)."""
    cls = policy_class(run.name)
    room = n_prompt + max_new
    budget = run.budget_for(n_prompt if budget_of is None else budget_of)
    params = dict(run.params)
    if cls.drops_tokens:
        budget = budget if budget is not None else room
        # a prefill-phase policy (SnapKV) takes the whole prompt before compressing it to the budget, plus the
        # scratch room of its scoring pass (KVzip)
        policy = make_policy(run.name, **params)
        capacity = room + policy.scratch_slots() if cls.phase == "prefill" else None
        seq = engine.new_sequence(budget=min(budget, room), policy=policy, capacity=capacity)
        return seq, budget
    select_field = selection_budget_field(cls)
    if select_field is not None and budget is not None:
        params.setdefault(select_field, budget)
    return engine.new_sequence(budget=room, policy=run.name, **params), budget if select_field else None


def generate(
    engine: Engine, run: PolicyRun, ids: Sequence[int], max_new: int, decode_text: Callable[[list[int]], str]
) -> Generation:
    """Greedy decoding of up to `max_new` tokens after `ids` under `run` (stops at EOS)."""
    seq, budget = new_sequence(engine, run, len(ids), max_new)
    return continue_in(engine, seq, budget, ids, max_new, decode_text)


def continue_in(
    engine: Engine,
    seq: KVSequence,
    budget: int | None,
    ids: Sequence[int],
    max_new: int,
    decode_text: Callable[[list[int]], str],
    history: Sequence[int] = (),
) -> Generation:
    """Greedy decoding of up to `max_new` tokens after appending `ids` to `seq` (which holds `history`: a
    later turn of one session); the evictions counted are this call's."""
    n_evictions, n_evicted = seq.n_evictions, seq.n_evicted
    t0 = time.perf_counter()
    logits = engine.prefill(seq, ids)
    t1 = time.perf_counter()
    kept = seq.length
    params = SamplingParams(temperature=0.0, max_tokens=max_new)
    out = [s.token for s in engine.generate(seq, [], params, history=[*history, *ids], logits=logits)]
    t2 = time.perf_counter()
    return Generation(
        decode_text(out),
        out,
        len(ids),
        budget,
        kept,
        seq.n_evictions - n_evictions,
        seq.n_evicted - n_evicted,
        t1 - t0,
        t2 - t1,
    )
