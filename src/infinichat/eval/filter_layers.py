"""Which layers make good OmniKV filter layers? Measure how much of the later layers' attention the top-k
picks of each candidate layer cover, on a real text.

OmniKV (Hao et al., ICLR 2025, https://openreview.net/forum?id=ulCAPXYXfa) lets a filter layer pick the
top-k tokens by its own attention and has the layers after it attend only to those. That works where the
later layers put their attention mass on the same tokens. The measurement emulates decoding at the end
of a long context: the text's first N - Q tokens are the prompt, its last Q tokens are Q decode steps.
For each decode query and layer, the attention probabilities are averaged over heads (one forward call;
only those Q rows are computed explicitly). Candidate layer c picks, per query, as OmniKV does: the first
`n_sink` tokens, every "decoded" token, and the top-k prompt tokens by its attention. Its coverage of a
later layer l is the share of l's attention mass (mean over heads and queries) on c's picks:
`coverage[c][l]`, and its score the mean over all l > c.

Recommended filter layers: for each possible first filter layer (up to `max_first`), the set of
`n_filters` layers that maximizes the mean coverage of the layers it serves (each non-filter layer after
the first filter layer is served by the nearest filter layer before it; exhaustive search). The layers
before the first filter layer attend fully, so a deeper first layer costs speed: the recommendation is the
shallowest first layer whose best set comes within `tolerance` (default 0.005) of the best of all.
"""

from __future__ import annotations

import itertools
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from infinichat.errors import InfinichatError
from infinichat.kv.store import KVStore
from infinichat.model.attention import AttentionRequest
from infinichat.model.transformer import Transformer

log = logging.getLogger(__name__)

JSON_VERSION = 1


@dataclass(frozen=True)
class Settings:
    ks: tuple[int | float, ...] = (0.1, 0.05, 0.2)  # int: tokens, float in (0, 1]: fraction of the prompt
    queries: int = 64  # decode steps emulated (the text's last tokens)
    n_sink: int = 4
    n_filters: int = 3
    max_first: int | None = None  # deepest allowed first filter layer (None: n_layers // 5)
    tolerance: float = 0.005  # coverage a shallower first filter layer may give up


def parse_k(text: str) -> int | float:
    """'256' -> 256 tokens; '0.1' -> a fraction of the prompt."""
    try:
        value: int | float = int(text) if text.strip().isdigit() else float(text)
    except ValueError:
        value = -1
    if (isinstance(value, int) and value >= 1) or (isinstance(value, float) and 0 < value <= 1):
        return value
    raise InfinichatError(f"--k {text!r}: give a token count (an integer >= 1) or a fraction in (0, 1], e.g. 0.1")


def n_pick(k: int | float, n_candidates: int) -> int:
    """Tokens picked out of `n_candidates` for k (an int: a count; a float: a fraction)."""
    want = k if isinstance(k, int) else round(k * n_candidates)
    return max(0, min(n_candidates, want))


def attention_rows(model: Transformer, ids: list[int], queries: int) -> torch.Tensor:
    """(L, Q, N) float32: each layer's attention of the last Q queries over the N tokens, mean over heads."""
    n, L = len(ids), model.cfg.n_layers
    rows = torch.zeros(L, queries, n)  # on the CPU, whatever the model's device

    def observe(layer: int, probs: torch.Tensor, row0: int) -> None:
        rows[layer, row0 : row0 + probs.shape[1]] = probs.mean(dim=0).float().cpu()  # (r, N)

    req = AttentionRequest(layers=frozenset(range(L)), rows=queries, observe=observe)
    model(torch.tensor(ids), torch.arange(n), KVStore(model.cfg, n, rope=model.rope, initial=n), 0, attn=req)
    return rows


def pick_masks(att: torch.Tensor, k: int | float, n_sink: int) -> torch.Tensor:
    """(L, Q, N) attention -> (L, Q, N) bool: what each layer, as a filter layer, would have its later layers
    see at each of the Q decode steps (sinks, the top-k prompt tokens, every decoded token)."""
    L, Q, N = att.shape
    prompt = N - Q
    sinks = min(n_sink, prompt)
    kk = n_pick(k, prompt - sinks)
    mask = torch.zeros(L, Q, N, dtype=torch.bool)
    mask[:, :, :sinks] = True
    mask[:, :, prompt:] = True  # decoded tokens (the causal zeros beyond each query add nothing)
    if kk:
        top = torch.topk(att[:, :, sinks:prompt], kk, dim=-1).indices + sinks  # (L, Q, kk)
        mask.scatter_(-1, top, True)
    return mask


def coverage_matrix(att: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """(L, L) float64: [c, l] = mean over queries of layer l's attention mass on layer c's picks (c < l;
    the rest is NaN)."""
    L = att.shape[0]
    cov = torch.full((L, L), float("nan"), dtype=torch.float64)
    for c in range(L):
        covered = (att[c + 1 :] * masks[c]).sum(dim=-1).mean(dim=-1)  # (L - c - 1,)
        cov[c, c + 1 :] = covered.double()
    return cov


def served_coverage(cov: torch.Tensor, filters: tuple[int, ...]) -> float:
    """Mean coverage of the layers after the first filter layer that are not filter layers, each served by
    the nearest filter layer before it (1.0 when there are none)."""
    L = cov.shape[0]
    vals, f = [], filters[0]
    for li in range(filters[0] + 1, L):
        if li in filters:
            f = li
            continue
        vals.append(cov[f, li].item())
    return sum(vals) / len(vals) if vals else 1.0


def best_per_first(cov: torch.Tensor, n_filters: int, max_first: int) -> list[tuple[tuple[int, ...], float]]:
    """For each first filter layer 0..max_first: the best set starting there and its served coverage."""
    L = cov.shape[0]
    out = []
    for first in range(min(max_first, L - n_filters) + 1):
        sets = [(first, *rest) for rest in itertools.combinations(range(first + 1, L), n_filters - 1)]
        scores = [served_coverage(cov, f) for f in sets]
        i = max(range(len(sets)), key=lambda j: (scores[j], [-x for x in sets[j]]))  # ties: shallower
        out.append((sets[i], scores[i]))
    return out


def recommend(
    cov: torch.Tensor, n_filters: int, max_first: int, tolerance: float = 0.005
) -> tuple[tuple[int, ...], float]:
    """The shallowest first layer whose best set is within `tolerance` of the best; that set and its score."""
    per_first = best_per_first(cov, n_filters, max_first)
    top = max(score for _, score in per_first)
    return next((f, score) for f, score in per_first if score >= top - tolerance)


def analyze(model: Transformer, ids: list[int], settings: Settings) -> dict[str, Any]:
    """The whole measurement -> the JSON report (without model/text names; the caller adds them)."""
    L = model.cfg.n_layers
    Q = settings.queries
    if not 1 <= settings.n_filters <= L - 1:
        raise InfinichatError(f"--filters must be in [1, {L - 1}] for a {L}-layer model, got {settings.n_filters}")
    if len(ids) < Q + settings.n_sink + 16:
        raise InfinichatError(
            f"the text gives {len(ids)} tokens; the analysis needs at least {Q + settings.n_sink + 16} "
            f"({Q} decode queries + sinks + a prompt): use a longer --text or fewer --queries"
        )
    max_first = settings.max_first if settings.max_first is not None else max(1, L // 5)
    att = attention_rows(model, ids, Q)
    always = pick_masks(att, 0, settings.n_sink)  # sinks and decoded tokens only: what every pick includes
    per_k = []
    for k in settings.ks:
        cov = coverage_matrix(att, pick_masks(att, k, settings.n_sink))
        later = [torch.nanmean(cov[c, c + 1 :]).item() for c in range(L - 1)]
        per_first = best_per_first(cov, settings.n_filters, max_first)
        filters, score = recommend(cov, settings.n_filters, max_first, settings.tolerance)
        per_k.append(
            {
                "k": k,
                "k_tokens": n_pick(k, len(ids) - Q - min(settings.n_sink, len(ids) - Q)),
                "coverage_of_later_layers": [round(v, 4) for v in later],  # per candidate layer 0..L-2
                "coverage_matrix": [[None if v != v else round(v, 4) for v in row] for row in cov.tolist()],
                "best_per_first_layer": [{"filters": list(f), "coverage": round(c, 4)} for f, c in per_first],
                "recommended": list(filters),
                "recommended_coverage": round(score, 4),
            }
        )
    return {
        "version": JSON_VERSION,
        "tokens": len(ids),
        "queries": Q,
        "n_sink": settings.n_sink,
        "n_filters": settings.n_filters,
        "max_first": max_first,
        "tolerance": settings.tolerance,
        "n_layers": L,
        # per layer: its attention mass on the sinks and decoded tokens alone (the floor of every coverage)
        "always_kept_share": [round(v, 4) for v in (att * always).sum(dim=-1).mean(dim=-1).tolist()],
        "results": per_k,
        "recommended": per_k[0]["recommended"],
        "recommended_for_k": per_k[0]["k"],
    }


# ------------------------------------------------------------------ outputs
def write_report(report: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out_dir / "filter_layers.json",
        "png": out_dir / "filter_layers.png",
        "md": out_dir / "filter_layers.md",
    }
    paths["json"].write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    paths["md"].write_text(markdown(report), encoding="utf-8")
    plot(report, paths["png"])
    return paths


def markdown(report: dict[str, Any]) -> str:
    res = report["results"]
    head = "| candidate layer | " + " | ".join(f"k={r['k']} ({r['k_tokens']} tok)" for r in res) + " |"
    lines = [
        f"# Filter-layer analysis: {report.get('model', '?')}",
        "",
        (
            f"{report.get('dtype', '?')}"
            + ("" if report.get("quant", "none") == "none" else f"+{report['quant']}")
            + f" on {report.get('device', 'cpu')}; "  # a report from before the device was recorded ran on the CPU
            f"{report['tokens']} tokens of {report.get('text', '?')}; the last {report['queries']} act as decode "
            f"steps; {report['n_sink']} sinks. Mean share of the later layers' attention mass on each layer's picks:"
        ),
        "",
        head,
        "|---:|" + "---:|" * len(res),
    ]
    for c in range(report["n_layers"] - 1):
        lines.append(f"| {c} | " + " | ".join(f"{r['coverage_of_later_layers'][c]:.3f}" for r in res) + " |")
    lines += [
        "",
        (
            f"Recommended filter layers (the shallowest first layer <= {report['max_first']} within "
            f"{report['tolerance']} of the best served coverage):"
        ),
        "",
    ]
    for r in res:
        lines.append(f"- k={r['k']}: {r['recommended']} (served layers' mean coverage {r['recommended_coverage']:.3f})")
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = report["results"]
    fig, (ax, hm) = plt.subplots(1, 2, figsize=(13, 5), dpi=110)
    for r in res:
        ys = r["coverage_of_later_layers"]
        ax.plot(range(len(ys)), ys, marker="o", markersize=3, label=f"k={r['k']} ({r['k_tokens']} tokens)")
    for li in report["recommended"]:
        ax.axvline(li, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xlabel("candidate filter layer")
    ax.set_ylabel("mean share of later layers' attention on its picks")
    ax.set_ylim(0, 1.02)
    ax.set_title(
        f"{report.get('model', '')}: recommended {report['recommended']} (k={report['recommended_for_k']})", fontsize=9
    )
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    m = [[float("nan") if v is None else v for v in row] for row in res[0]["coverage_matrix"]]
    im = hm.imshow(m, vmin=0, vmax=1, cmap="viridis", origin="upper")
    hm.set_xlabel("later layer l")
    hm.set_ylabel("filter layer c")
    hm.set_title(f"coverage[c][l], k={res[0]['k']}", fontsize=9)
    fig.colorbar(im, ax=hm, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
