"""`eval passkey` / `eval niah`: every policy run x length x depth x sample, scored, summarized, written.

A sample is correct when the exact number (the passkey, the asked needle's value) appears in the greedy
output as a whole number. Accuracy is averaged over samples per (policy run, length, depth), and over
depths per (policy run, length). Results: `<task>.json` (settings, every sample, the summaries),
`<task>.md` (tables) and `<task>-heatmap-<policy>.png` (depth x length) per policy run.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from infinichat.engine.base import Engine
from infinichat.errors import InfinichatError
from infinichat.eval.journal import write_text_atomic
from infinichat.eval.needle import NeedleSample, contains_number
from infinichat.eval.runner import Generation, PolicyRun, generate

log = logging.getLogger(__name__)

JSON_VERSION = 1


def run_samples(
    engine: Engine,
    decode_text: Callable[[Sequence[int]], str],
    runs: Sequence[PolicyRun],
    samples: Sequence[NeedleSample],
    max_new: int,
    on_result: Callable[[PolicyRun, NeedleSample, dict[str, Any]], None] | None = None,
    skip: Callable[[PolicyRun, NeedleSample], bool] | None = None,
) -> list[dict[str, Any]]:
    """One record per (policy run, sample), in that order; `skip(run, sample)`: already done."""
    records = []
    for run in runs:
        for s in samples:
            if skip is not None and skip(run, s):
                continue
            gen: Generation = generate(engine, run, s.ids, max_new, decode_text)
            rec = {
                "policy": run.label,
                "length": s.length,
                "depth": s.depth,
                "sample": s.index,
                "answer": s.answer,
                "key": s.key,
                "correct": contains_number(gen.text, s.answer),
                "distractor_answered": any(contains_number(gen.text, v) for v in s.distractors),
                "needle_slot": s.needle_span[0],
                "needle_depth": round(s.needle_depth, 4),
                **gen.to_json(),
            }
            records.append(rec)
            log.info(
                "%s len %d depth %g #%d: %s (%r; prefill %.1f s, kept %d)",
                run.label,
                s.length,
                s.depth,
                s.index,
                "right" if rec["correct"] else "wrong",
                gen.text,
                gen.prefill_s,
                gen.kept,
            )
            if on_result is not None:
                on_result(run, s, rec)
    return records


def mean_of(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def summarize(
    records: Sequence[dict[str, Any]], labels: Sequence[str], lengths: Sequence[int], depths: Sequence[float]
) -> dict[str, Any]:
    """Accuracy per label x length x depth and per label x length (mean over depths), plus costs."""
    out: dict[str, Any] = {}
    for label in labels:
        mine = [r for r in records if r["policy"] == label]
        by_len: dict[str, Any] = {}
        for n in lengths:
            at_n = [r for r in mine if r["length"] == n]
            cells = {f"{d:g}": mean_of([float(r["correct"]) for r in at_n if r["depth"] == d]) for d in depths}
            gen = sum(r["generated"] for r in at_n)
            dec = sum(r["decode_s"] for r in at_n)
            by_len[str(n)] = {
                "accuracy": mean_of([v for v in cells.values() if v is not None]),
                "by_depth": cells,
                "prefill_s": mean_of([r["prefill_s"] for r in at_n]),
                "prefill_tok_s": (
                    sum(r["prompt_tokens"] for r in at_n) / sum(r["prefill_s"] for r in at_n)
                    if at_n and sum(r["prefill_s"] for r in at_n) > 0
                    else None
                ),
                "decode_tok_s": gen / dec if dec > 0 else None,
                "kept": mean_of([r["kept"] for r in at_n]),
                "n_evictions": mean_of([r["n_evictions"] for r in at_n]),
                "distractor_rate": mean_of([float(r["distractor_answered"]) for r in at_n]),
            }
        out[label] = {"accuracy": mean_of([float(r["correct"]) for r in mine]), "by_length": by_len}
    return out


def build_report(
    *,
    task: str,
    variant: str,
    runs: Sequence[PolicyRun],
    records: Sequence[dict[str, Any]],
    lengths: Sequence[int],
    depths: Sequence[float],
    samples: int,
    seed: int,
    max_new: int,
    model: str,
    dtype: str,
    threads: int,
    chat_template: bool,
    haystack: str | None = None,
    n_keys: int | None = None,
) -> dict[str, Any]:
    labels = [r.label for r in runs]
    return {
        "version": JSON_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "task": task,
        "variant": variant,
        "model": model,
        "dtype": dtype,
        "threads": threads,
        "chat_template": chat_template,
        "haystack": haystack,
        "n_keys": n_keys,
        "seed": seed,
        "samples": samples,
        "max_new_tokens": max_new,
        "lengths": list(lengths),
        "depths": list(depths),
        "policies": [r.to_json() for r in runs],
        "summary": summarize(records, labels, lengths, depths),
        "results": list(records),
    }


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}"


def num(x: float | None, fmt: str = ".1f") -> str:
    return "-" if x is None else format(x, fmt)


def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


def accuracy_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Policy x length accuracy (%, mean over depths and samples), plus the policy's mean."""
    header = ["policy", *[str(n) for n in report["lengths"]], "mean"]
    rows = []
    for label, s in report["summary"].items():
        cells = [pct(s["by_length"][str(n)]["accuracy"]) for n in report["lengths"]]
        rows.append([label, *cells, pct(s["accuracy"])])
    return header, rows


def markdown(report: dict[str, Any]) -> str:
    task = report["task"] + ("" if report["task"] == "passkey" else f" ({report['variant']})")
    parts = [
        f"## {task}: accuracy (%), {report['model']}\n",
        (
            f"Mean over depths {', '.join(f'{d:g}' for d in report['depths'])} and {report['samples']} sample(s) each; "
            f"greedy, {report['max_new_tokens']} new tokens; "
            f"chat template: {'yes' if report['chat_template'] else 'no'}.\n"
        ),
        md_table(*accuracy_rows(report)),
        "\n### accuracy (%) by depth\n",
    ]
    header = ["policy", "length", *[f"{d:g}" for d in report["depths"]], "mean"]
    rows = []
    for label, s in report["summary"].items():
        for n in report["lengths"]:
            cell = s["by_length"][str(n)]
            rows.append(
                [label, str(n), *[pct(cell["by_depth"][f"{d:g}"]) for d in report["depths"]], pct(cell["accuracy"])]
            )
    parts.append(md_table(header, rows))
    parts.append("\n### cost\n")
    header = ["policy", "length", "kept tokens", "evictions", "prefill s", "prefill tok/s", "decode tok/s"]
    rows = []
    for label, s in report["summary"].items():
        for n in report["lengths"]:
            c = s["by_length"][str(n)]
            rows.append(
                [
                    label,
                    str(n),
                    num(c["kept"], ".0f"),
                    num(c["n_evictions"], ".1f"),
                    num(c["prefill_s"], ".2f"),
                    num(c["prefill_tok_s"], ".0f"),
                    num(c["decode_tok_s"], ".1f"),
                ]
            )
    parts.append(md_table(header, rows))
    return "\n".join(parts)


def slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", label.replace("%", "pct")).strip("-").lower()


def write_report(report: dict[str, Any], out_dir: Path, plots: bool = True) -> dict[str, Any]:
    """`<task>.json`, `<task>.md`, one heatmap PNG per policy run (`plots`); returns the paths."""
    from infinichat.eval.plot import plot_accuracy_heatmap

    task = report["task"]

    def draw() -> list[Path]:
        return [
            plot_accuracy_heatmap(report, label, out_dir / f"{task}-heatmap-{slug(label)}.png")
            for label in report["summary"]
        ]

    return write_files(out_dir, task, report, markdown(report), draw if plots else list)


def write_files(
    out_dir: Path, stem: str, report: dict[str, Any], md: str, plots: Callable[[], list[Path]]
) -> dict[str, Any]:
    """`<stem>.json`, `<stem>.md` (each through a temporary file and a rename: a reader, or a run cut meanwhile,
    never sees half a file) and the PNG files `plots()` draws into `out_dir`; returns the paths. A failed write is
    one clear error."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        paths: dict[str, Any] = {"json": out_dir / f"{stem}.json", "md": out_dir / f"{stem}.md"}
        write_text_atomic(paths["json"], json.dumps(report, indent=1) + "\n")
        write_text_atomic(paths["md"], md)
        paths["png"] = plots()
    except OSError as e:
        raise InfinichatError(f"cannot write the results into {out_dir}: {e.strerror or e}") from None
    return paths
