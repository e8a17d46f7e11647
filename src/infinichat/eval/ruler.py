"""`eval ruler`: a RULER subset generated here, seeded, at chosen lengths, with RULER's scoring.

Hsieh et al. 2024, "RULER: What's the Real Context Size of Your Long-Context Language Models?",
https://arxiv.org/abs/2404.06654. Tasks (RULER's names):

- `niah_single`: one "special magic number" needle in essay-like filler (needle.py's niah single);
- `niah_multikey`: the asked needle among `n` needles with other keys (needle.py's multikey);
- `niah_multivalue`: one key with `n` values, all asked;
- `niah_multiquery`: `n` keys, each with a value, all asked;
- `vt` (variable tracking): "VAR X = 12345." then a chain "VAR Y = VAR X." ... (`hops`) spread through the
  "The grass is green." filler, in order; asked: every variable holding the value;
- `cwe` (common words extraction): a numbered list of words, 10 of them repeated 20 times (fewer in short
  lists: at most a third of the list), the others 3 times; asked: the 10 most common. Its length is reached within a few
  list entries (the longest list that fits).

Scores (RULER's, per sample): `string_match_all` = the fraction of the references found in the answer (case
insensitive substrings), the task score; `string_match_part` = 1 if any is found. Prompts end with the
question and, in plain text, an answer prefix (the completion style the default model needs). Every sample
is seeded by (seed, task, length, index). Needle depths are spread, not drawn: sample i of n puts the asked
needle (niah_*: the answer needle; multivalue / multiquery: the first needle, the others at seeded sentence
boundaries) at depth (i + 0.5) / n, so a few samples cover the start, the middle and the end of the context
(a random draw can put them all near one end). vt's chain is spread over the whole haystack in order (its
own layout), and cwe has no needles. Results: `ruler.json`, `ruler.md` and one task x length heatmap PNG
per policy run, like `eval passkey` / `eval niah`.
"""

from __future__ import annotations

import itertools
import logging
import random
import string
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infinichat.engine.base import Engine
from infinichat.errors import InfinichatError
from infinichat.eval import haystack, needle
from infinichat.eval.needle import spread_depth
from infinichat.eval.prompt import PromptFormat, encode_text
from infinichat.eval.retrieval import md_table, mean_of, num, pct, slug, write_files
from infinichat.eval.runner import PolicyRun, generate
from infinichat.model.tokenizer import Tokenizer

log = logging.getLogger(__name__)

TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "cwe")
MAX_NEW = {
    "niah_single": 32,
    "niah_multikey": 32,
    "niah_multivalue": 64,
    "niah_multiquery": 64,
    "vt": 40,
    "cwe": 64,
}
N_NEEDLES = 4  # needles of multikey / multivalue / multiquery
HOPS = 4  # variable tracking: assignments after the first
CWE_COMMON, CWE_FREQ, CWE_RARE_FREQ = 10, 20, 3

MULTI_QUESTION = "What are all the special magic numbers for {keys} mentioned in the provided text?"
MULTI_PREFIX = " The special magic numbers for {keys} mentioned in the provided text are"
VT_INSTRUCTION = "Memorize and track the chain(s) of variable assignment hidden in the following text."
VT_QUESTION = "Find all variables that are assigned the value {value} in the text above."
VT_PREFIX = (
    " Answer: According to the chain(s) of variable assignment in the text above, {n} variables are assigned "
    "the value {value}, they are:"
)
CWE_INSTRUCTION = (
    "Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones "
    "that appear most often."
)
CWE_QUESTION = "What are the 10 most common words in the above list?"
CWE_PREFIX = " Answer: The top 10 words that appear most often in the list are:"


@dataclass
class RulerSample:
    task: str
    length: int
    index: int
    ids: list[int]
    refs: list[str]  # every reference the answer should contain
    depth: float | None = None  # where the asked needle was placed (None: vt and cwe, no single needle)

    @property
    def max_new(self) -> int:
        return MAX_NEW[self.task]


def check_tasks(names: Sequence[str]) -> list[str]:
    bad = [n for n in names if n not in TASKS]
    if bad:
        raise InfinichatError(f"unknown RULER task {bad[0]!r} in --tasks; accepted: {', '.join(TASKS)}")
    return list(names)


def string_match_all(pred: str, refs: Sequence[str]) -> float:
    low = pred.lower()
    return sum(r.lower() in low for r in refs) / len(refs)


def string_match_part(pred: str, refs: Sequence[str]) -> float:
    low = pred.lower()
    return float(any(r.lower() in low for r in refs))


# ---------------------------------------------------------------------------------------------- generation


def sample(
    tok: Tokenizer, fmt: PromptFormat, task: str, length: int, index: int, n_samples: int, seed: int = 0
) -> RulerSample:
    """One seeded prompt of `task` at `length` tokens: sample `index` of `n_samples`, whose needle sits at
    `spread_depth(index, n_samples)`."""
    rng = random.Random(f"{seed}:ruler:{task}:{length}:{index}")
    depth = spread_depth(index, n_samples)
    if task in ("niah_single", "niah_multikey"):
        variant = "single" if task == "niah_single" else "multikey"
        s = needle.niah_sample(tok, fmt, length, depth, index, seed, variant, N_NEEDLES)
        return RulerSample(task, length, index, s.ids, [s.answer], s.needle_depth)
    if task in ("niah_multivalue", "niah_multiquery"):
        return _multi(tok, fmt, task, length, index, depth, rng)
    if task == "vt":
        return _variable_tracking(tok, fmt, length, index, rng)
    if task == "cwe":
        return _common_words(tok, fmt, length, index, rng)
    raise InfinichatError(f"unknown RULER task {task!r}; accepted: {', '.join(TASKS)}")


def _multi(
    tok: Tokenizer, fmt: PromptFormat, task: str, length: int, index: int, depth: float, rng: random.Random
) -> RulerSample:
    n_keys = 1 if task == "niah_multivalue" else N_NEEDLES
    keys: list[str] = []
    for _ in range(n_keys):
        keys.append(haystack.random_key(rng, set(keys)))
    values: list[str] = []
    for _ in range(N_NEEDLES):
        values.append(haystack.random_number(rng, 5, set(values)))
    pairs = [(keys[i % n_keys], v) for i, v in enumerate(values)]
    asked = ", ".join(keys)
    s = needle.build_prompt(
        tok,
        fmt,
        task="ruler",
        variant=task,
        length=length,
        depth=depth,
        index=index,
        instruction=needle.NIAH_INSTRUCTION,
        question=MULTI_QUESTION.format(keys=asked),
        answer_prefix=MULTI_PREFIX.format(keys=asked),
        needles=[(needle.NIAH_NEEDLE.format(key=k, value=v), v, i == 0) for i, (k, v) in enumerate(pairs)],
        key=asked,
        filler=haystack.essay_filler(rng),
        rng=rng,
    )
    return RulerSample(task, length, index, s.ids, values, s.needle_depth)


def _variable_name(rng: random.Random, taken: set[str]) -> str:
    while True:
        name = "".join(rng.choice(string.ascii_uppercase) for _ in range(5))
        if name not in taken:
            taken.add(name)
            return name


def _variable_tracking(tok: Tokenizer, fmt: PromptFormat, length: int, index: int, rng: random.Random) -> RulerSample:
    taken: set[str] = set()
    names = [_variable_name(rng, taken) for _ in range(HOPS + 1)]
    value = haystack.random_number(rng, 5)
    chain = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in itertools.pairwise(names)]
    s = needle.build_prompt(
        tok,
        fmt,
        task="ruler",
        variant="vt",
        length=length,
        depth=0.0,
        index=index,
        instruction=VT_INSTRUCTION,
        question=VT_QUESTION.format(value=value),
        answer_prefix=VT_PREFIX.format(n=len(names), value=value),
        needles=[(text, value, i == 0) for i, text in enumerate(chain)],
        key=value,
        filler=haystack.passkey_filler(rng),
        rng=rng,
        ordered=True,
    )
    return RulerSample("vt", length, index, s.ids, names)


def _words(rng: random.Random, n: int) -> list[str]:
    """`n` distinct lowercase words: the filler's word lists, then seeded pronounceable ones."""
    pool = sorted({w for group in haystack.WORD_LISTS for w in group})
    rng.shuffle(pool)
    made = set(pool)
    while len(pool) < n:
        w = "".join(rng.choice("bcdfglmnprstvz") + rng.choice("aeiou") for _ in range(rng.choice((2, 3))))
        if w not in made:
            made.add(w)
            pool.append(w)
    return pool[:n]


def _common_words(tok: Tokenizer, fmt: PromptFormat, length: int, index: int, rng: random.Random) -> RulerSample:
    head = encode_text(tok, CWE_INSTRUCTION + "\n\n")
    tail = encode_text(tok, "\n\nQuestion: " + CWE_QUESTION + ("" if fmt.chat else CWE_PREFIX))
    room = length - fmt.overhead - len(head) - len(tail)
    n_entries = room // len(encode_text(tok, " 123. harbor"))  # about one list entry each
    freq = max(CWE_RARE_FREQ + 1, min(CWE_FREQ, n_entries // (3 * CWE_COMMON)))  # the common words: <= a third
    words = _words(rng, CWE_COMMON + room // CWE_RARE_FREQ)
    shuffle_seed = rng.random()

    def listing(n_rare: int) -> list[int]:
        entries = [w for w in words[:CWE_COMMON] for _ in range(freq)]
        entries += [w for w in words[CWE_COMMON : CWE_COMMON + n_rare] for _ in range(CWE_RARE_FREQ)]
        random.Random(shuffle_seed).shuffle(entries)
        return [t for i, w in enumerate(entries) for t in encode_text(tok, f"{' ' if i else ''}{i + 1}. {w}")]

    lo, hi = 0, room // CWE_RARE_FREQ  # the most rare words whose list fits: bisection
    if len(listing(0)) > room:
        raise InfinichatError(f"--lengths {length} is too short for the cwe task: give at least {2 * length} tokens")
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if len(listing(mid)) <= room else (lo, mid - 1)
    return RulerSample("cwe", length, index, fmt.ids(head + listing(lo) + tail), words[:CWE_COMMON])


# ---------------------------------------------------------------------------------------------- running


def run_samples(
    engine: Engine,
    decode_text: Callable[[Sequence[int]], str],
    runs: Sequence[PolicyRun],
    samples: Sequence[RulerSample],
    max_new: int | None = None,
    on_result: Callable[[PolicyRun, RulerSample, dict[str, Any]], None] | None = None,
    skip: Callable[[PolicyRun, RulerSample], bool] | None = None,
) -> list[dict[str, Any]]:
    """One record per (policy run, sample): the answer and both scores; `skip(run, sample)`: already done."""
    records = []
    for run in runs:
        for s in samples:
            if skip is not None and skip(run, s):
                continue
            gen = generate(engine, run, s.ids, max_new or s.max_new, decode_text)
            rec = {
                "policy": run.label,
                "task": s.task,
                "length": s.length,
                "sample": s.index,
                "refs": s.refs,
                "depth": None if s.depth is None else round(s.depth, 3),
                "score": string_match_all(gen.text, s.refs),
                "score_part": string_match_part(gen.text, s.refs),
                **gen.to_json(),
            }
            records.append(rec)
            log.info("%s %s len %d #%d: %.2f (%r)", run.label, s.task, s.length, s.index, rec["score"], gen.text)
            if on_result is not None:
                on_result(run, s, rec)
    return records


def summarize(
    records: Sequence[dict[str, Any]], labels: Sequence[str], tasks: Sequence[str], lengths: Sequence[int]
) -> dict[str, Any]:
    """Per label: the mean score, and per task x length the mean `string_match_all` / `_part` and costs."""
    out: dict[str, Any] = {}
    for label in labels:
        mine = [r for r in records if r["policy"] == label]
        by_task: dict[str, Any] = {}
        for t in tasks:
            cells = {}
            for n in lengths:
                at = [r for r in mine if r["task"] == t and r["length"] == n]
                cells[str(n)] = {
                    "score": mean_of([r["score"] for r in at]),
                    "score_part": mean_of([r["score_part"] for r in at]),
                    "prefill_s": mean_of([r["prefill_s"] for r in at]),
                    "kept": mean_of([r["kept"] for r in at]),
                }
            by_task[t] = cells
        out[label] = {"score": mean_of([r["score"] for r in mine]), "by_task": by_task}
    return out


def build_report(
    *,
    runs: Sequence[PolicyRun],
    records: Sequence[dict[str, Any]],
    tasks: Sequence[str],
    lengths: Sequence[int],
    **settings: Any,
) -> dict[str, Any]:
    return {
        "version": 1,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "task": "ruler",
        **settings,
        "tasks": list(tasks),
        "lengths": list(lengths),
        "policies": [r.to_json() for r in runs],
        "summary": summarize(records, [r.label for r in runs], tasks, lengths),
        "results": list(records),
    }


def score_rows(report: dict[str, Any], length: int) -> tuple[list[str], list[list[str]]]:
    """Policy x task `string_match_all` (%) at one length, plus the mean over tasks."""
    header = ["policy", *report["tasks"], "mean"]
    rows = []
    for label, s in report["summary"].items():
        cells = [s["by_task"][t][str(length)]["score"] for t in report["tasks"]]
        rows.append([label, *map(pct, cells), pct(mean_of([c for c in cells if c is not None]))])
    return header, rows


def markdown(report: dict[str, Any]) -> str:
    parts = []
    for n in report["lengths"]:
        parts += [
            f"## RULER subset at {n} tokens: string_match_all (%), {report['model']}\n",
            (
                f"{report['samples']} sample(s) per task; greedy; chat template: "
                f"{'yes' if report['chat_template'] else 'no'}.\n"
            ),
            md_table(*score_rows(report, n)),
        ]
    parts.append("\n### string_match_part (%) and cost\n")
    header = ["policy", "task", "length", "match_all", "match_part", "kept tokens", "prefill s"]
    rows = []
    for label, s in report["summary"].items():
        for t in report["tasks"]:
            for n in report["lengths"]:
                c = s["by_task"][t][str(n)]
                rows.append(
                    [
                        label,
                        t,
                        str(n),
                        pct(c["score"]),
                        pct(c["score_part"]),
                        num(c["kept"], ".0f"),
                        num(c["prefill_s"], ".2f"),
                    ]
                )
    parts.append(md_table(header, rows))
    return "\n".join(parts)


def write_report(report: dict[str, Any], out_dir: Path, plots: bool = True) -> dict[str, Any]:
    """`ruler.json`, `ruler.md`, one task x length heatmap PNG per policy run (`plots`); returns the paths."""
    from infinichat.eval.plot import plot_grid

    lengths = [str(n) for n in report["lengths"]]

    def draw() -> list[Path]:
        return [
            plot_grid(
                [[s["by_task"][t][n]["score"] for n in lengths] for t in report["tasks"]],
                report["tasks"],
                lengths,
                "task",
                f"RULER: {label} (string_match_all %)",
                out_dir / f"ruler-heatmap-{slug(label)}.png",
            )
            for label, s in report["summary"].items()
        ]

    return write_files(out_dir, "ruler", report, markdown(report), draw if plots else list)
