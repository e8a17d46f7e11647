"""`eval multiturn`: several questions about one long context, asked in successive turns of one KV sequence
(SCBench-style: Li et al. 2024, "SCBench: A KV Cache-Centric Analysis of Long-Context Methods",
https://arxiv.org/abs/2412.10319).

A conversation: a generated haystack (essay-like filler) holding `turns` facts ("One of the special magic
numbers for {key} is: {value}."), then the questions, one per turn, in a seeded order. The fact asked first
sits at a depth spread over the samples (conversation i of n at (i + 0.5) / n, as `eval ruler`'s needles; the
depth placed is in each record), the others at seeded sentence boundaries. Turn 1 is the
context plus the first question (so a query-aware policy such as SnapKV compresses the context for that
question, as in SCBench's shared-context setting); each later turn appends only its question to the same
sequence, after the previous answers (which stay in the cache, as in a chat). Every question ends with an
answer prefix (completion style, which the default model needs; no chat template). An answer is right when
it holds the asked value as a whole number. A budget fraction is of turn 1's tokens (the context).

A LongBench-format file (`--data FILE.jsonl`: records with `context`, `input`, `answers`) gives real contexts
instead: the records that share one `context` (in file order) are one conversation, one question (`input`) per
turn, at most `turns`. Turn 1 is the dataset's LongBench prompt with the first question (longbench.DATASETS;
the context cut in the middle so that turn 1 fits the length); a later turn appends the part of that prompt
after the context, with its own question ("...Question: {input}\nAnswer:"): a new user message where LongBench
wraps the dataset's prompt in the chat template (the template's turn markers around it), else plain text.
Answers are scored with the dataset's LongBench metric (qa_f1, rouge_l, ...: a score in [0, 1], not right or
wrong), up to its LongBench answer length. Datasets whose prompt has no question (summaries, counting, code) are
refused.

What it shows: the per-turn accuracy of each policy; a policy that compressed for the first question keeps
what that question needed and may have lost what later ones need; a query-agnostic one (KVzip, Expected
Attention) or one that drops nothing (OmniKV) should not degrade with the turn. Results: `multiturn.json`,
`multiturn.md` and a policy x turn heatmap PNG per context length.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infinichat.engine.base import Engine
from infinichat.errors import InfinichatError
from infinichat.eval import haystack, longbench, needle
from infinichat.eval.prompt import encode_text, next_turn_format, prompt_format
from infinichat.eval.retrieval import md_table, mean_of, num, pct, write_files
from infinichat.eval.runner import PolicyRun, continue_in, new_sequence
from infinichat.model.tokenizer import Tokenizer

log = logging.getLogger(__name__)

MAX_NEW = 12  # the default model answers " 12345. ..." within its first tokens after the answer prefix


@dataclass
class Conversation:
    length: int  # tokens of turn 1 (the context and the first question)
    index: int
    turns: list[list[int]]  # the ids each turn appends
    keys: list[str]  # asked in this order (LongBench: the questions)
    values: list[str]  # the expected answer of each turn (LongBench: the first reference)
    answers: list[list[str]] | None = None  # LongBench: every reference of each turn
    dataset: str = "haystack"  # or the LongBench dataset, whose metric scores the answers
    max_new: int = MAX_NEW
    depth: float | None = None  # generated haystack: where turn 1's fact sits (haystack fraction before it)

    def score(self, turn: int, text: str) -> float:
        """Turn `turn` (0-based)'s answer `text`: 1.0 / 0.0 (holds the value) or the LongBench metric."""
        if self.answers is None:
            return float(needle.contains_number(text, self.values[turn]))
        from infinichat.eval.longbench_metrics import score_sample

        metric = longbench.DATASETS[self.dataset].metric
        return score_sample(metric, longbench.postprocess(self.dataset, text), self.answers[turn])


MAX_TURNS = 100  # facts of a generated haystack: its keys are 900 adjective-noun pairs, drawn without repeats


def check_turns(n_turns: int) -> None:
    if not 1 <= n_turns <= MAX_TURNS:
        raise InfinichatError(f"--turns must be from 1 to {MAX_TURNS}, got {n_turns}")


def conversation(tok: Tokenizer, length: int, index: int, n_samples: int, n_turns: int, seed: int = 0) -> Conversation:
    """A seeded conversation: turn 1 = instruction + haystack with `n_turns` facts + question 1 (`length` tokens).
    Conversation `index` of `n_samples` puts the fact asked first at depth (index + 0.5) / n_samples (spread over
    the samples as in `eval ruler`, not drawn); the other facts go to seeded sentence boundaries."""
    check_turns(n_turns)
    depth = needle.spread_depth(index, n_samples)
    rng = random.Random(f"{seed}:multiturn:{length}:{n_turns}:{index}")
    keys: list[str] = []
    values: list[str] = []
    for _ in range(n_turns):
        keys.append(haystack.random_key(rng, set(keys)))
        values.append(haystack.random_number(rng, 5, set(values)))
    order = list(range(n_turns))
    rng.shuffle(order)
    first = order[0]
    s = needle.build_prompt(
        tok,
        prompt_format(tok, chat=False),
        task="multiturn",
        variant="facts",
        length=length,
        depth=depth,
        index=index,
        instruction=needle.NIAH_INSTRUCTION,
        question=needle.NIAH_QUESTION.format(key=keys[first]),
        answer_prefix=needle.NIAH_ANSWER_PREFIX.format(key=keys[first]),
        needles=[
            (needle.NIAH_NEEDLE.format(key=k, value=v), v, i == first)
            for i, (k, v) in enumerate(zip(keys, values, strict=True))
        ],
        key=keys[first],
        filler=haystack.essay_filler(rng),
        rng=rng,
    )
    later = [
        encode_text(
            tok, "\n\n" + needle.NIAH_QUESTION.format(key=keys[i]) + needle.NIAH_ANSWER_PREFIX.format(key=keys[i])
        )
        for i in order[1:]
    ]
    return Conversation(
        length, index, [s.ids, *later], [keys[i] for i in order], [values[i] for i in order], depth=s.needle_depth
    )


def split_prompt(dataset: str) -> tuple[str, str]:
    """A LongBench prompt template's text before `{context}` and after it (which holds `{input}`)."""
    spec = longbench.DATASETS[dataset]
    head, sep, tail = spec.prompt.partition("{context}")
    if not sep or "{input}" not in tail or "{input}" in head:
        asking = [d for d, x in longbench.DATASETS.items() if "{input}" in x.prompt.partition("{context}")[2]]
        raise InfinichatError(
            f"the LongBench dataset {dataset!r} asks no question after its context, so it has no turns to ask; "
            f"multiturn accepts: {', '.join(asking)}"
        )
    return head, tail


def load_conversations(
    tok: Tokenizer, path: str | Path, length: int, n_turns: int, limit: int, dataset: str | None = None
) -> list[Conversation]:
    """The first `limit` contexts of a LongBench JSONL file as conversations (their questions in file order, at
    most `n_turns`); each context is cut in the middle so that turn 1 is at most `length` tokens."""
    check_turns(n_turns)
    groups: dict[str, list[longbench.Record]] = {}
    for rec in longbench.load_jsonl(path, dataset):
        mine = groups.setdefault(rec.context, [])
        if mine and mine[0].dataset != rec.dataset:
            raise InfinichatError(
                f"--data {path}, line {rec.line}: the context of line {mine[0].line} ({mine[0].dataset}) again, "
                f"but as {rec.dataset}: one context, one dataset"
            )
        if len(mine) < n_turns:
            mine.append(rec)
    convs = []
    for index, recs in enumerate(list(groups.values())[:limit]):
        name = recs[0].dataset
        head, tail = split_prompt(name)
        chat = longbench.DATASETS[name].chat  # LongBench's choice per dataset, as `eval longbench`
        fmt, later_fmt = prompt_format(tok, chat=chat), next_turn_format(tok, chat=chat)
        head_ids = encode_text(tok, head)
        tail_ids = encode_text(tok, tail.format(input=recs[0].input))
        room = length - fmt.overhead - len(head_ids) - len(tail_ids)
        if room < needle.MIN_FILLER:
            raise InfinichatError(
                f"--lengths {length} is too short for the {name} prompt of --data {path}, line {recs[0].line}: "
                f"it needs at least {length - room + needle.MIN_FILLER} tokens"
            )
        context = longbench.truncate_middle(encode_text(tok, recs[0].context), room)
        later_tail = tail.lstrip("\n ") if chat else (tail if tail.startswith("\n") else "\n\n" + tail)
        later = [later_fmt.ids(encode_text(tok, later_tail.format(input=r.input))) for r in recs[1:]]
        convs.append(
            Conversation(
                length,
                index,
                [fmt.ids(head_ids + context + tail_ids), *later],
                [r.input for r in recs],
                [r.answers[0] for r in recs],
                answers=[r.answers for r in recs],
                dataset=name,
                max_new=longbench.DATASETS[name].max_gen,
            )
        )
    return convs


def run_conversation(
    engine: Engine, run: PolicyRun, conv: Conversation, max_new: int, decode_text: Callable[[list[int]], str]
) -> list[dict[str, Any]]:
    """Every turn of `conv` in one sequence under `run`: one record per turn."""
    n_prompt = sum(len(t) for t in conv.turns)
    seq, budget = new_sequence(engine, run, n_prompt, len(conv.turns) * max_new, budget_of=len(conv.turns[0]))
    history: list[int] = []
    records = []
    for k, ids in enumerate(conv.turns):
        gen = continue_in(engine, seq, budget, ids, max_new, decode_text, history)
        history += [*ids, *gen.tokens]
        score = conv.score(k, gen.text)
        rec = {
            "policy": run.label,
            "length": conv.length,
            "sample": conv.index,
            "turn": k + 1,
            "dataset": conv.dataset,
            "key": conv.keys[k],
            "answer": conv.values[k],
            "depth": None if conv.depth is None else round(conv.depth, 4),
            **(
                {"correct": score == 1.0, "any_fact": any(needle.contains_number(gen.text, v) for v in conv.values)}
                if conv.answers is None
                else {"answers": conv.answers[k]}
            ),
            "score": score,
            "cached_after": seq.length,
            **gen.to_json(),
        }
        records.append(rec)
        log.info("%s len %d #%d turn %d: %.2f (%r)", run.label, conv.length, conv.index, k + 1, score, gen.text)
    return records


def summarize(
    records: Sequence[dict[str, Any]], labels: Sequence[str], lengths: Sequence[int], n_turns: int
) -> dict[str, Any]:
    """Per label and length: accuracy per turn, over the later turns (2..), and overall; turn-1 prefill cost."""
    out: dict[str, Any] = {}
    for label in labels:
        by_len: dict[str, Any] = {}
        for n in lengths:
            mine = [r for r in records if r["policy"] == label and r["length"] == n]
            by_turn = {str(t): mean_of([r["score"] for r in mine if r["turn"] == t]) for t in range(1, n_turns + 1)}
            first = [r for r in mine if r["turn"] == 1]
            by_len[str(n)] = {
                "accuracy": mean_of([r["score"] for r in mine]),
                "later_turns": mean_of([r["score"] for r in mine if r["turn"] > 1]),
                # generated haystack: answers holding one of the conversation's values (kept, maybe misattributed)
                "any_fact": mean_of([float(r["any_fact"]) for r in mine if "any_fact" in r]),
                "by_turn": by_turn,
                "kept_after_turn1": mean_of([r["kept"] for r in first]),
                "prefill_s_turn1": mean_of([r["prefill_s"] for r in first]),
            }
        out[label] = {
            "accuracy": mean_of([r["score"] for r in records if r["policy"] == label]),
            "by_length": by_len,
        }
    return out


def build_report(
    *, runs: Sequence[PolicyRun], records: Sequence[dict[str, Any]], lengths: Sequence[int], turns: int, **settings: Any
) -> dict[str, Any]:
    return {
        "version": 1,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "task": "multiturn",
        **settings,
        "turns": turns,
        "lengths": list(lengths),
        "policies": [r.to_json() for r in runs],
        "summary": summarize(records, [r.label for r in runs], lengths, turns),
        "results": list(records),
    }


def turn_rows(report: dict[str, Any], length: int) -> tuple[list[str], list[list[str]]]:
    """Policy x turn accuracy (%; LongBench: the metric x100) at one context length, the later turns' mean and
    the overall mean."""
    turns = range(1, report["turns"] + 1)
    facts = not report.get("data")  # the generated haystack: also the answers naming any of its facts
    header = ["policy", *[f"turn {t}" for t in turns], "turns 2+", "mean", *(["any fact"] if facts else [])]
    rows = []
    for label, s in report["summary"].items():
        c = s["by_length"][str(length)]
        row = [label, *[pct(c["by_turn"][str(t)]) for t in turns], pct(c["later_turns"]), pct(c["accuracy"])]
        rows.append(row + ([pct(c.get("any_fact"))] if facts else []))
    return header, rows


def markdown(report: dict[str, Any]) -> str:
    parts = []
    for n in report["lengths"]:
        if report.get("data"):
            parts += [
                (
                    f"## multi-turn LongBench ({', '.join(report['datasets'])}), turn 1 <= {n} tokens: score (x100) "
                    f"per turn, {report['model']}\n"
                ),
                (
                    f"{report['samples']} context(s) of --data {report['data']}, up to {report['turns']} questions "
                    f"each; greedy, {report['max_new_tokens']} new tokens per answer; plain text; LongBench's metric "
                    "per dataset.\n"
                ),
                md_table(*turn_rows(report, n)),
            ]
            continue
        parts += [
            f"## multi-turn retrieval, {n}-token context: accuracy (%) per turn, {report['model']}\n",
            (
                f"{report['samples']} conversation(s) of {report['turns']} questions; greedy, "
                f"{report['max_new_tokens']} new tokens per answer; plain text with answer prefixes. any fact: the "
                "answers holding one of the context's values, the asked one or another (kept, maybe misattributed).\n"
            ),
            md_table(*turn_rows(report, n)),
        ]
    parts.append("\n### cost of turn 1\n")
    header = ["policy", "length", "kept tokens after turn 1", "turn-1 prefill s"]
    rows = [
        [
            label,
            str(n),
            num(s["by_length"][str(n)]["kept_after_turn1"], ".0f"),
            num(s["by_length"][str(n)]["prefill_s_turn1"], ".2f"),
        ]
        for label, s in report["summary"].items()
        for n in report["lengths"]
    ]
    parts.append(md_table(header, rows))
    return "\n".join(parts)


def write_report(report: dict[str, Any], out_dir: Path, plots: bool = True) -> dict[str, Any]:
    """`multiturn.json`, `multiturn.md`, a policy x turn heatmap PNG per length (`plots`); returns the paths."""
    from infinichat.eval.plot import plot_grid

    labels = list(report["summary"])
    turns = [str(t) for t in range(1, report["turns"] + 1)]

    def draw() -> list[Path]:
        return [
            plot_grid(
                [[report["summary"][lb]["by_length"][str(n)]["by_turn"][t] for t in turns] for lb in labels],
                labels,
                turns,
                "policy",
                f"multi-turn, {n}-token context (accuracy %)",
                out_dir / f"multiturn-{n}.png",
                "turn",
            )
            for n in report["lengths"]
        ]

    return write_files(out_dir, "multiturn", report, markdown(report), draw if plots else list)
