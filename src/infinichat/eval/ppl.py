"""Token-by-token perplexity over a long text under a KV policy, as in StreamingLLM
(Xiao et al. 2023, https://arxiv.org/abs/2309.17453, Fig. 3 / Table 1).

The text streams through one `KVSequence` in forward calls of `chunk` tokens (1 = exact token by token);
before each call the sequence evicts through its policy so that the chunk fits the budget, so every
token is predicted from at most `budget` cached tokens. The NLL of token t comes from the logits at t - 1
(token 0 has no prediction). `full` never evicts: its budget is the model's trained context, and its run
stops there ("up to where it can go").
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from infinichat.engine.base import Engine
from infinichat.errors import InfinichatError
from infinichat.kv.registry import POLICIES
from infinichat.kv.sequence import KVSequence

log = logging.getLogger(__name__)

MAX_CHUNK = 64
SERIES_EVERY = 256  # a running-ppl point every this many tokens
SERIES_WINDOW = 1024  # the windowed running ppl averages the NLL of this many tokens
JSON_VERSION = 1
DEFAULT_POLICIES = "full,window,streaming"


@dataclass(frozen=True)
class PolicySpec:
    """One policy to evaluate: its registry name, token budget and policy parameters."""

    name: str
    budget: int
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        sinks = self.params.get("n_sink", 0)
        if self.name == "full":
            return f"full {self.budget}"
        return f"{self.name} {sinks}+{self.budget - sinks}" if sinks else f"{self.name} {self.budget}"


@dataclass
class PolicyResult:
    spec: PolicySpec
    nll: np.ndarray  # (n_tokens,) float64; nll[0] = nan (the first token has no prediction)
    stopped_at: int | None  # `full` only: where the trained context ended the run (None: ran to the end)
    max_cache: int  # the most tokens the cache held after any forward call
    n_evictions: int
    n_evicted: int
    seconds: float

    @property
    def n_tokens(self) -> int:
        return int(self.nll.shape[0])


def ppl_policies() -> list[str]:
    """The policies perplexity can evaluate: those that hold the budget at every chunk of a text ("overflow"
    phase). SnapKV compresses only after a prompt; OmniKV and brutal-offload act only while decoding."""
    return [name for name, cls in POLICIES.items() if cls.phase == "overflow"]


def parse_policies(values: Sequence[str]) -> list[str]:
    """`--policy a,b --policy c` -> [a, b, c] (order kept, duplicates dropped); unknown names are an error."""
    names: list[str] = []
    accepted = ppl_policies()
    for v in values:
        for name in (s.strip() for s in v.split(",")):
            if not name:
                continue
            if name in POLICIES and name not in accepted:
                raise InfinichatError(
                    f"policy {name!r} cannot be evaluated by perplexity: it acts after a prompt or while decoding "
                    f"(phase {POLICIES[name].phase!r}), not at every chunk of a text; accepted: {', '.join(accepted)}"
                )
            if name not in POLICIES:
                raise InfinichatError(f"unknown policy {name!r} in --policy; accepted: {', '.join(accepted)}")
            if name not in names:
                names.append(name)
    if not names:
        raise InfinichatError(f"--policy names no policy; accepted: {', '.join(accepted)}")
    return names


def check_settings(names: Sequence[str], budget: int, sinks: int, chunk: int, discard: int | None) -> None:
    """The checks that need no model (run before loading it)."""
    if not 1 <= chunk <= MAX_CHUNK:
        raise InfinichatError(f"--chunk must be in [1, {MAX_CHUNK}], got {chunk}")
    if sinks < 0:
        raise InfinichatError(f"--sinks must be >= 0, got {sinks}")
    if discard is not None and discard < 1:
        raise InfinichatError(f"--discard must be >= 1, got {discard}")
    for name in names:
        n_sink = sinks if name == "streaming" else 0
        if name != "full" and budget < n_sink + chunk:
            raise InfinichatError(
                f"--budget {budget} is too small for {name}: it must hold the sinks and one chunk "
                f"(>= {n_sink} + {chunk} = {n_sink + chunk})"
            )


def make_specs(
    names: Sequence[str], budget: int, sinks: int, chunk: int, trained_context: int, discard: int | None = None
) -> list[PolicySpec]:
    """Specs for the named policies. `sinks` goes to `streaming` only (window and recompute have none by
    definition); evicting policies drop `discard` tokens at once (default: one chunk's worth), so the
    cache stays between budget - discard and budget. `full` gets the trained context as its budget."""
    check_settings(names, budget, sinks, chunk, discard)
    specs = []
    for name in names:
        if name == "full":
            specs.append(PolicySpec("full", trained_context))
            continue
        if budget > trained_context:
            raise InfinichatError(f"--budget {budget} exceeds the model's trained context {trained_context}")
        n_sink = sinks if name == "streaming" else 0
        specs.append(PolicySpec(name, budget, {"n_sink": n_sink, "n_discard": chunk if discard is None else discard}))
    return specs


def evaluate(
    engine: Engine,
    ids: Sequence[int],
    spec: PolicySpec,
    chunk: int = MAX_CHUNK,
    on_chunk: Callable[[KVSequence, int], None] | None = None,
) -> PolicyResult:
    """Per-token NLL of `ids` under one policy. `on_chunk(seq, n_done)` is called after each forward call
    (progress bars, tests that watch the cache)."""
    if len(ids) < 2:
        raise InfinichatError(f"perplexity needs at least 2 tokens, got {len(ids)}")
    n, budget, stopped_at = len(ids), spec.budget, None
    if spec.name == "full":  # it stops at its budget; no room allocated beyond the text
        if n > spec.budget:
            n, stopped_at = spec.budget, spec.budget
        budget = n
    seq = engine.new_sequence(budget=budget, policy=spec.name, **spec.params)
    target = torch.as_tensor(ids[:n], dtype=torch.long)  # (n,)
    nll = np.full(n, np.nan)
    prev: torch.Tensor | None = None  # (1, V) logits of the last evaluated token
    max_cache = 0
    t0 = time.perf_counter()
    for a in range(0, n, chunk):
        b = min(a + chunk, n)
        logits = engine.prefill(seq, ids[a:b], all_logits=True, chunk=chunk)  # (b - a, V)
        max_cache = max(max_cache, seq.length)
        pred = logits[:-1] if prev is None else torch.cat([prev, logits[:-1]])  # predicts tokens [a or 1, b)
        first = b - pred.shape[0]
        logp = torch.log_softmax(pred.double(), dim=-1)  # (m, V)
        picked = logp.gather(1, target[first:b].unsqueeze(1).to(logp.device))  # (m, 1) on the logits' device
        nll[first:b] = -picked.squeeze(1).cpu().numpy()
        prev = logits[-1:]
        if on_chunk is not None:
            on_chunk(seq, b)
    seconds = time.perf_counter() - t0
    log.info("%s: %d tokens in %.1f s, ppl %.3f", spec.label, n, seconds, ppl(nll))
    return PolicyResult(spec, nll, stopped_at, max_cache, seq.n_evictions, seq.n_evicted, seconds)


def ppl(nll: np.ndarray, start: int = 0, end: int | None = None) -> float | None:
    """exp(mean NLL) over the tokens in [start, end) that have a prediction; None when there are none."""
    vals = nll[start:end]
    vals = vals[~np.isnan(vals)]
    return float(math.exp(vals.mean())) if vals.size else None


def running_series(nll: np.ndarray, every: int = SERIES_EVERY, window: int = SERIES_WINDOW) -> dict[str, list]:
    """Running perplexity at positions every, 2*every, ..., n: `cumulative` over tokens [1, p), `window`
    over the last `window` tokens before p."""
    n = nll.shape[0]
    csum = np.concatenate([[0.0], np.cumsum(np.nan_to_num(nll[1:]))])  # csum[k] = sum of nll[1 : 1 + k]
    points = [*range(every, n, every), n]
    cum, win = [], []
    for p in points:
        k = p - 1  # tokens with a prediction in [1, p)
        lo = max(0, k - window)
        cum.append(math.exp(csum[k] / k) if k else None)
        win.append(math.exp((csum[k] - csum[lo]) / (k - lo)) if k > lo else None)
    return {"position": points, "cumulative_ppl": cum, "window_ppl": win}


def result_json(r: PolicyResult, trained_context: int) -> dict[str, Any]:
    """The documented per-policy record (see README, "Evaluation")."""
    return {
        "policy": r.spec.name,
        "label": r.spec.label,
        "budget": r.spec.budget,
        "params": dict(r.spec.params),
        "tokens": r.n_tokens,
        "stopped_at": r.stopped_at,
        "ppl_trained": ppl(r.nll, 0, trained_context),
        "ppl_beyond": ppl(r.nll, trained_context),
        "ppl_all": ppl(r.nll),
        "max_cache": r.max_cache,
        "n_evictions": r.n_evictions,
        "n_evicted": r.n_evicted,
        "seconds": round(r.seconds, 3),
        "tokens_per_s": round(r.n_tokens / r.seconds, 2) if r.seconds > 0 else None,
        "series": running_series(r.nll),
    }


def build_report(
    results: Sequence[PolicyResult],
    *,
    model: str,
    dtype: str,
    text: str,
    text_tokens: int,
    chunk: int,
    trained_context: int,
    threads: int,
    quant: str = "none",
    kv_dtype: str = "auto",
    device: str = "cpu",
) -> dict[str, Any]:
    """The whole run as one JSON-able dict (the documented fields, README "Evaluation")."""
    return {
        "version": JSON_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": model,
        "dtype": dtype,
        "quant": quant,
        "kv_dtype": kv_dtype,
        "device": device,
        "threads": threads,
        "text": text,
        "text_tokens": text_tokens,
        "tokens": max((r.n_tokens for r in results), default=0),
        "chunk": chunk,
        "trained_context": trained_context,
        "series_every": SERIES_EVERY,
        "series_window": SERIES_WINDOW,
        "policies": [result_json(r, trained_context) for r in results],
    }


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def table_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the result table (shared by the terminal table and the Markdown file)."""
    tc = report["trained_context"]
    header = ["policy", "tokens", f"ppl [0, {tc})", f"ppl [{tc}, end)", "ppl all", "evictions", "max cache", "tok/s"]
    rows = []
    for rec in report["policies"]:
        beyond = _fmt(rec["ppl_beyond"])
        if rec["stopped_at"]:
            beyond = f"- (stops at {rec['stopped_at']})"
        rows.append(
            [
                rec["label"],
                str(rec["tokens"]),
                _fmt(rec["ppl_trained"]),
                beyond,
                _fmt(rec["ppl_all"]),
                str(rec["n_evictions"]),
                str(rec["max_cache"]),
                f"{rec['tokens_per_s'] or 0:.0f}",
            ]
        )
    return header, rows


def markdown_table(report: dict[str, Any]) -> str:
    header, rows = table_rows(report)
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """Write `ppl.json`, `ppl.png` (running ppl) and `ppl.md` (the table) into `out_dir`."""
    import json

    from infinichat.eval.plot import plot_running_ppl

    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = {"json": out_dir / "ppl.json", "png": out_dir / "ppl.png", "md": out_dir / "ppl.md"}
        paths["json"].write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
        paths["md"].write_text(markdown_table(report), encoding="utf-8")
        plot_running_ppl(report, paths["png"])
    except OSError as e:
        raise InfinichatError(f"cannot write the results into {out_dir}: {e.strerror or e}") from None
    return paths
