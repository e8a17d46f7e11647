"""InfiniteBench-format evaluation (Zhang et al. 2024, https://arxiv.org/abs/2402.13718) for users with the data,
plus generators of its two synthetic retrieval tasks (passkey, kv_retrieval) at a chosen length.

A JSONL file, one record per line, as InfiniteBench publishes it: `{"id", "context", "input", "answer",
"options"}` (`answer` a string or a list; `options` the four choices of longbook_choice_eng and code_debug).
The task comes from `--task`, else the file name (`passkey.jsonl`, `kv_retrieval-4096.jsonl` -> its first
part). The tasks that fit a CPU: passkey, number_string, kv_retrieval, longbook_qa_eng, longbook_choice_eng,
math_find, code_debug, longdialogue_qa_eng.

Prompts (`PROMPT_SETS`): `open`, InfiniteBench's prompts for open models (Yarn-Mistral), fed as plain text;
most end in an answer prefix ("The pass key is"), which is what a small model needs; `chat`, its GPT-4
prompts, inside the model's chat template. The whole prompt is cut in the middle to `max_length` tokens (its
first and last halves kept), as InfiniteBench does. Answer lengths are InfiniteBench's (`TaskSpec.max_new`).

Scorers (`score`), written from InfiniteBench's definitions, each 0 or 1 per sample except longbook_qa_eng
(token F1): passkey and number_string: the first run of digits of the prediction equals the answer;
kv_retrieval: the answer is one of the prediction's words (split at white space and at \\n : " ' . , ? ! { });
math_find: the first number in the prediction equals the answer; longdialogue_qa_eng: the name is one of the
prediction's upper-cased words; longbook_choice_eng / code_debug: the chosen letter (the prediction's first
character, or what follows "answer is:" and similar prefixes, or the first lone A-D word for choice) or the
answer's text right after such a prefix; longbook_qa_eng: the best qa F1 over the answers (LongBench's).
"""

from __future__ import annotations

import json
import random
import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from infinichat.errors import InfinichatError
from infinichat.eval.longbench import jsonl_objects, truncate_middle
from infinichat.eval.longbench_metrics import qa_f1
from infinichat.eval.prompt import PromptFormat, encode_text
from infinichat.model.tokenizer import Tokenizer

LETTERS = "ABCD"
GENERATED = ("passkey", "kv_retrieval")  # the tasks `generate` can write

_RETRIEVE = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. I will quiz "
    "you about the important information there.\n\n{context}\n\n{input}"
)
_DIALOGUE = (
    'Below is a dialogue script where one random occurrence of a character name is replaced with "$$MASK$$", '
    "and you should try to guess who that character is."
)


@dataclass(frozen=True)
class TaskSpec:
    open: str  # the open-model prompt (plain text): str.format with the record's fields
    chat: str  # the GPT-4 prompt (inside the chat template)
    max_new: int  # InfiniteBench's answer tokens
    options: bool = False  # the record carries four options


TASKS: dict[str, TaskSpec] = {
    "passkey": TaskSpec(_RETRIEVE + "\n\nThe pass key is", _RETRIEVE, 6),
    "number_string": TaskSpec(
        _RETRIEVE.replace(" and memorize them", "") + "\n\nThe sequence of digits is",
        _RETRIEVE.replace(" and memorize them", ""),
        12,
    ),
    "kv_retrieval": TaskSpec(
        "Extract the value corresponding to the specified key in the JSON object below.\n\n{context}\n\n{input}",
        "Extract the value corresponding to the specified key in the JSON object below.\n\n{context}\n\n{input}",
        50,
    ),
    "longbook_qa_eng": TaskSpec(
        "Read the book and answer the question. Be very concise in your answer.\n\n{context}\n\nQuestion: "
        "{input}\nAnswer:",
        "Read the book below and answer a question.\n\n{context}\n\nQuestion: {input}\n\nBe very concise.",
        40,
    ),
    "longbook_choice_eng": TaskSpec(
        "Read the book and answer the question.\n\n{context}\n\nQuestion: {input}\nA. {A}\nB. {B}\nC. {C}\nD. {D}"
        "\n\nThe letter of the correct answer is",
        "Read the book and answer the question.\n\n{context}\n\nQuestion: {input}\n\nOnly one of the following "
        "options is correct, tell me the answer using one single letter (A, B, C, or D). Don't say anything "
        "else.\nA. {A}\nB. {B}\nC. {C}\nD. {D}",
        40,
        options=True,
    ),
    "math_find": TaskSpec("{prefix}\n\n{context}\n\n{input}", "{prefix}\n\n{context}\n\n{input}", 3),
    "code_debug": TaskSpec(
        "Following is a Python code where exactly one of the functions/methods has a deliberate error that makes "
        "it crash.\n\n{context}\n\nOptions:\nA. {A}\nB. {B}\nC. {C}\nD. {D}\n\nThe correct option is:",
        "There is ONLY ONE function in the large project that is deliberately made to include an obvious error. "
        "Please find the function that contains the most obvious errors. I will give you four options to narrow "
        "your scope. You can inspect through the options and think. Eventually, tell me the answer using one "
        "single letter (A, B, C, or D).\n\n{context}\n\nWhich funtion has deliberate error?\nA. {A}\nB. {B}\n"  # sic
        "C. {C}\nD. {D}\n\nYou should first find the functions in the options. Repeat their content, inspect "
        "through code, and at last give me your answer for the function that has the deliberate and obvious "
        "error in A, B, C, or D.",
        5,
        options=True,
    ),
    "longdialogue_qa_eng": TaskSpec(
        _DIALOGUE + "\n\n{context}\n\nThe name that has been replaced with $$MASK$$ is likely",
        _DIALOGUE + "\n\nThe dialogue:\n\n---\n\n{context}\n\n---\n\nEnd of dialogue.\n\nWhich character is most "
        'likely "$$MASK$$"? Just say the name used by the scriptwriter (before the colon marks) of one single '
        "character and nothing else.",
        40,
    ),
}
PROMPT_SETS = ("open", "chat")


@dataclass
class Record:
    task: str
    context: str
    input: str
    answers: list[str]
    options: list[str] = field(default_factory=list)
    id: str = ""
    line: int = 0

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "context": self.context, "input": self.input, "answer": self.answers}
        if self.options:
            out["options"] = self.options
        return out


def check_task(name: str, flag: str = "--task") -> str:
    if name not in TASKS:
        raise InfinichatError(f"unknown InfiniteBench task {name!r} in {flag}; accepted: {', '.join(TASKS)}")
    return name


def task_of_file(path: Path) -> str | None:
    """`kv_retrieval.jsonl`, `kv_retrieval-4096.jsonl` -> kv_retrieval; None when the name is no task."""
    stem = path.name.split(".")[0].split("-")[0]
    return stem if stem in TASKS else None


def _strings(value: Any) -> list[str] | None:
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return [str(value)]
    if isinstance(value, list) and value and all(isinstance(v, (str, int, float)) for v in value):
        return [str(v) for v in value]
    return None


def load_jsonl(path: str | Path, task: str | None = None, limit: int | None = None) -> list[Record]:
    """The records of an InfiniteBench JSONL file (at most `limit`); each line checked, errors name the line."""
    p = Path(path)
    name = task or task_of_file(p)
    if name is None:
        raise InfinichatError(
            f"--data {path}: the file name names no InfiniteBench task; give --task NAME ({', '.join(TASKS)})"
        )
    spec = TASKS[check_task(name)]
    records: list[Record] = []
    for where, no, obj in jsonl_objects(path, limit):
        missing = [k for k in ("context", "answer") if k not in obj]
        if missing:
            raise InfinichatError(f"{where}: missing field(s) {', '.join(missing)}; a record needs context, answer")
        context, question = obj["context"], obj.get("input", "")
        if not isinstance(context, str) or not isinstance(question, str):
            raise InfinichatError(f"{where}: 'context' and 'input' must be strings")
        answers = _strings(obj["answer"])
        if answers is None:
            raise InfinichatError(f"{where}: 'answer' must be a string or a non-empty list of strings")
        options = _strings(obj.get("options")) or []
        if spec.options:
            if len(options) != 4:
                raise InfinichatError(f"{where}: {name} needs 'options', a list of 4 choices")
            if answers[0] not in options and answers[0] not in LETTERS:
                raise InfinichatError(f"{where}: the answer {answers[0]!r} is neither one of the options nor A-D")
        records.append(Record(name, context, question, answers, options, str(obj.get("id", no - 1)), no))
    if not records:
        raise InfinichatError(f"--data {path} holds no records")
    return records


# ---------------------------------------------------------------------------------------------- prompts


def _math_prefix(question: str) -> str:
    m = re.search(r"The (\w+) number", question)
    if m is None:
        raise InfinichatError(f"math_find: the input {question!r} names no 'The ... number' to look for")
    return f"What is the {m.group(1).lower()} number in the following list?"


def prompt_text(rec: Record, prompts: str = "open") -> str:
    spec = TASKS[rec.task]
    fields: dict[str, str] = {"context": rec.context, "input": rec.input}
    if spec.options:
        fields.update(zip(LETTERS, rec.options, strict=True))
    if rec.task == "math_find":
        fields["prefix"] = _math_prefix(rec.input)
    return (spec.open if prompts == "open" else spec.chat).format(**fields)


def build_prompt(
    tok: Tokenizer, rec: Record, max_length: int, prompts: str, chat_fmt: PromptFormat, plain_fmt: PromptFormat
) -> tuple[list[int], bool]:
    """(prompt ids, whether it was cut): the task's prompt, cut in the middle to `max_length` tokens, as plain
    text (`open` prompts) or inside the chat template (`chat`)."""
    ids = encode_text(tok, prompt_text(rec, prompts))
    cut = truncate_middle(ids, max_length)
    fmt = plain_fmt if prompts == "open" else chat_fmt
    return fmt.ids(cut), len(cut) < len(ids)


# ---------------------------------------------------------------------------------------------- scorers

_SPLIT = re.compile(r"[\s:\"'.,?!{}]+")
_CHOICE_PREFIXES = ("answer is:", "answer:", "answer is", "option is")
_DEBUG_PREFIXES = ("answer is:", "is:", "answer:")


def first_int(prediction: str) -> str:
    m = re.search(r"\d+", prediction)
    return m.group(0) if m else ""


def _labels(rec_answers: Sequence[str], options: Sequence[str]) -> tuple[str, str]:
    """(the answer's text, its letter) of a multiple-choice record (the answer may be given as either)."""
    ans = rec_answers[0]
    if ans in LETTERS and len(ans) == 1 and ans not in options:
        return (options[LETTERS.index(ans)] if options else ans), ans
    return ans, LETTERS[options.index(ans)] if ans in options else ""


def _after_prefix(pred: str, prefixes: Sequence[str]) -> str | None:
    """What follows the first of `prefixes` found in `pred` (in the order given), None when none is."""
    for prefix in prefixes:
        i = pred.find(prefix)
        if i != -1:
            return pred[i + len(prefix) + 1 :]
    return None


def score_choice(prediction: str, answers: Sequence[str], options: Sequence[str]) -> float:
    text, letter = _labels(answers, options)
    pred = prediction.strip()
    if pred[:1] in LETTERS and pred[:1]:
        return float(pred[0] == letter)
    pred = " ".join(re.sub(r"[\n\"'.,?!{}]", " ", pred).split())
    rest = _after_prefix(pred, _CHOICE_PREFIXES)
    if rest is not None:
        return float(bool(rest) and rest.startswith((letter, text)))
    word = next((w for w in pred.split() if w in LETTERS), None)
    return float(word == letter)


def score_code_debug(prediction: str, answers: Sequence[str], options: Sequence[str]) -> float:
    text, letter = _labels(answers, options)
    if prediction[:2] in (f"{letter}.", f"{letter}:"):
        return 1.0
    pred = prediction.strip()
    for junk in ("Option", "option"):
        pred = pred.replace(junk, " ")
    pred = " ".join(re.sub(r"[\n`'\"*-]", " ", pred).split())
    rest = _after_prefix(pred, _DEBUG_PREFIXES)
    return float(rest is not None and bool(rest) and rest.startswith((letter, text)))


def score_math_find(prediction: str, answer: str) -> float:
    m = re.search(r"\d+\.\d+|\d+", prediction)
    if m is None:
        return 0.0
    try:
        return float(float(m.group(0)) == float(answer))
    except ValueError:
        return 0.0


def score(task: str, prediction: str, answers: Sequence[str], options: Sequence[str] = ()) -> float:
    """One prediction's score in [0, 1] under `task`'s InfiniteBench scorer."""
    if task in ("passkey", "number_string"):
        return float(first_int(prediction) == answers[0])
    if task == "kv_retrieval":
        return float(answers[0] in _SPLIT.split(prediction))
    if task == "longdialogue_qa_eng":
        return float(answers[0].upper() in (w.upper() for w in _SPLIT.split(prediction)))
    if task == "math_find":
        return score_math_find(prediction, answers[0])
    if task == "longbook_choice_eng":
        return score_choice(prediction, answers, options)
    if task == "code_debug":
        return score_code_debug(prediction, answers, options)
    if task == "longbook_qa_eng":
        return max((qa_f1(prediction, a) for a in answers), default=0.0)
    raise InfinichatError(f"unknown InfiniteBench task {task!r}; accepted: {', '.join(TASKS)}")


# ---------------------------------------------------------------------------------------------- generated data

_NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"
_PASSKEY = "The pass key is {key}. Remember it. {key} is the pass key.\n"


def _fit(build: Callable[[int], str], count_tokens: Callable[[str], int], target: int) -> int:
    """The largest n (>= 1) with count_tokens(build(n)) <= target (build's length grows with n)."""
    lo, hi = 1, 2
    while count_tokens(build(hi)) <= target:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if count_tokens(build(mid)) <= target else (lo, mid)
    return lo


def generate(
    task: str,
    n: int,
    target_tokens: int,
    count_tokens: Callable[[str], int],
    seed: int = 0,
    depths: Sequence[float] | None = None,
) -> list[Record]:
    """`n` InfiniteBench-format records of `task` (passkey, kv_retrieval) whose open prompt holds at most
    `target_tokens` tokens, built as InfiniteBench builds them: passkey, the "grass is green" noise around
    "The pass key is {key}. Remember it. {key} is the pass key." at evenly spread depths; kv_retrieval, a JSON
    object of random UUID keys and values, one of them asked for (at evenly spread positions)."""
    if task not in GENERATED:
        raise InfinichatError(f"cannot generate {task!r}; generated tasks: {', '.join(GENERATED)}")
    if n < 1 or target_tokens < 64:
        raise InfinichatError(f"generate needs n >= 1 and at least 64 tokens, got n={n}, {target_tokens} tokens")
    rng = random.Random(f"{seed}:{task}:{target_tokens}")
    spots = list(depths) if depths else [(i + 0.5) / n for i in range(n)]
    records: list[Record] = []
    if task == "passkey":

        def passkey_text(k: int) -> str:
            return prompt_text(Record("passkey", _NOISE * k + _PASSKEY, "What is the pass key?", ["0"]))

        noise = _fit(passkey_text, count_tokens, target_tokens - 8)
        for i in range(n):
            key = f"{rng.randrange(10**5):05d}"
            before = round(spots[i % len(spots)] * noise)
            context = _NOISE * before + _PASSKEY.format(key=key) + _NOISE * (noise - before)
            records.append(Record("passkey", context, "What is the pass key?", [key], id=str(i)))
        return records

    def kv_text(k: int) -> str:
        pair = f'"{uuid.UUID(int=0)}": "{uuid.UUID(int=0)}", '
        context = "JSON data:\n{" + (pair * k)[:-2] + "}"
        question = f'Key: "{uuid.UUID(int=0)}"\nThe value associated with the specified key is: '
        return prompt_text(Record("kv_retrieval", context, question, ["x"]))

    pairs = _fit(kv_text, count_tokens, target_tokens - 16)  # random UUIDs tokenize a little longer
    for i in range(n):
        kv = [
            (str(uuid.UUID(int=rng.getrandbits(128), version=4)), str(uuid.UUID(int=rng.getrandbits(128), version=4)))
            for _ in range(pairs)
        ]
        asked = min(pairs - 1, int(spots[i % len(spots)] * pairs))
        context = "JSON data:\n{" + ", ".join(f'"{k}": "{v}"' for k, v in kv) + "}"
        question = f'Key: "{kv[asked][0]}"\nThe value associated with the specified key is: '
        records.append(Record("kv_retrieval", context, question, [kv[asked][1]], id=str(i)))
    return records


def write_jsonl(records: Sequence[Record], path: Path) -> Path:
    path.write_text("".join(json.dumps(r.to_json(), ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------- report


def summary(results: Sequence[dict[str, Any]], labels: Sequence[str], tasks: Sequence[str]) -> dict[str, Any]:
    """Score x100 per label x task, the mean of those, and the costs."""
    out: dict[str, Any] = {}
    for label in labels:
        by_task: dict[str, float | None] = {}
        for t in tasks:
            scores = [r["score"] for r in results if r["policy"] == label and r["task"] == t]
            by_task[t] = 100.0 * sum(scores) / len(scores) if scores else None
        vals = [v for v in by_task.values() if v is not None]
        mine = [r for r in results if r["policy"] == label]
        out[label] = {
            "by_task": by_task,
            "mean": sum(vals) / len(vals) if vals else None,
            "samples": len(mine),
            "prefill_s": sum(r["prefill_s"] for r in mine),
            "decode_s": sum(r["decode_s"] for r in mine),
            "kept": sum(r["kept"] for r in mine) / len(mine) if mine else None,
        }
    return out


def markdown(report: dict[str, Any]) -> str:
    tasks = report["tasks"]
    header = ["policy", *tasks, "mean", "samples", "kept (mean)", "prefill s", "decode s"]
    lines = [
        (
            f"## InfiniteBench, {report['model']} (scores x100; {report['prompts']} prompts, cut to "
            f"{report['max_length']} tokens)\n"
        ),
        "| " + " | ".join(header) + " |",
        "|---|" + "---:|" * (len(header) - 1),
    ]
    for label, s in report["summary"].items():
        cells = ["-" if s["by_task"][t] is None else f"{s['by_task'][t]:.1f}" for t in tasks]
        mean = "-" if s["mean"] is None else f"{s['mean']:.1f}"
        kept = "-" if s["kept"] is None else f"{s['kept']:.0f}"
        row = [label, *cells, mean, str(s["samples"]), kept, f"{s['prefill_s']:.1f}", f"{s['decode_s']:.1f}"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"
