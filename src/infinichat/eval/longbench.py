"""LongBench-format evaluation (Bai et al. 2023, https://arxiv.org/abs/2308.14508) for users with the data.

A JSONL file, one record per line: `{"input", "context", "answers", "length", "all_classes", "dataset",
"_id", ...}` (the dataset name comes from the record, else `--dataset`, else the file name). Per
dataset: LongBench's prompt template, its maximum answer length and its metric (`DATASETS`). The prompt
is cut in the middle to `max_length` tokens (the first and the last halves kept, as LongBench does),
then wrapped in the chat template, except for the few-shot and code datasets, which LongBench feeds as
plain text. trec / triviaqa / samsum answers keep their first line only.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from infinichat.errors import InfinichatError
from infinichat.eval.prompt import PromptFormat, encode_text
from infinichat.model.tokenizer import Tokenizer

log = logging.getLogger(__name__)

REQUIRED = ("input", "context", "answers")

_QA_PASSAGES = (
    "Answer the question based on the given passages. Only give me the answer and do not output any other "
    "words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given "
    "passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:"
)
_QASPER_RULES = (  # follows "Answer the question" in both places of the qasper prompt
    " as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered "
    'based on the information in the article, write "unanswerable". If the question is a yes/no question, answer '
    '"yes", "no", or "unanswerable". Do not provide any explanation.'
)


@dataclass(frozen=True)
class DatasetSpec:
    prompt: str  # str.format template with {context} and {input}
    max_gen: int  # answer tokens
    metric: str  # a key of longbench_metrics.METRICS
    chat: bool = True  # LongBench wraps the prompt in the chat template
    first_line: bool = False  # the answer is the prediction's first line


DATASETS: dict[str, DatasetSpec] = {
    "narrativeqa": DatasetSpec(
        "You are given a story, which can be either a novel or a movie script, and a question. Answer the "
        "question asconcisely as you can, using a single phrase if possible. Do not provide any explanation."  # sic
        "\n\nStory: {context}\n\nNow, answer the question based on the story asconcisely as you can, using a "
        "single phrase if possible. Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:",
        128,
        "qa_f1",
    ),
    "qasper": DatasetSpec(
        "You are given a scientific article and a question. Answer the question"
        + _QASPER_RULES
        + "\n\nArticle: {context}\n\n Answer the question based on the above article"
        + _QASPER_RULES
        + "\n\nQuestion: {input}\n\nAnswer:",
        128,
        "qa_f1",
    ),
    "multifieldqa_en": DatasetSpec(
        "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question based on "
        "the above text, only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
        64,
        "qa_f1",
    ),
    "hotpotqa": DatasetSpec(_QA_PASSAGES, 32, "qa_f1"),
    "2wikimqa": DatasetSpec(_QA_PASSAGES, 32, "qa_f1"),
    "musique": DatasetSpec(_QA_PASSAGES, 32, "qa_f1"),
    "gov_report": DatasetSpec(
        "You are given a report by a government agency. Write a one-page summary of the report.\n\nReport:\n"
        "{context}\n\nNow, write a one-page summary of the report.\n\nSummary:",
        512,
        "rouge_l",
    ),
    "qmsum": DatasetSpec(
        "You are given a meeting transcript and a query containing a question or instruction. Answer the query "
        "in one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the above meeting "
        "transcript in one or more sentences.\n\nQuery: {input}\nAnswer:",
        512,
        "rouge_l",
    ),
    "multi_news": DatasetSpec(
        "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}\n\n"
        "Now, write a one-page summary of all the news.\n\nSummary:",
        512,
        "rouge_l",
    ),
    "trec": DatasetSpec(
        "Please determine the type of the question below. Here are some examples of questions.\n\n{context}\n{input}",
        64,
        "classification",
        chat=False,
        first_line=True,
    ),
    "triviaqa": DatasetSpec(
        "Answer the question based on the given passage. Only give me the answer and do not output any other "
        "words. The following are some examples.\n\n{context}\n\n{input}",
        32,
        "qa_f1",
        chat=False,
        first_line=True,
    ),
    "samsum": DatasetSpec(
        "Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}\n\n{input}",
        128,
        "rouge_l",
        chat=False,
        first_line=True,
    ),
    "passage_count": DatasetSpec(
        "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please carefully "
        "read these paragraphs and determine how many unique paragraphs there are after removing duplicates. In "
        "other words, how many non-repeating paragraphs are there in total?\n\n{context}\n\nPlease enter the "
        "final count of unique paragraphs after removing duplicates. The output format should only contain the "
        "number, such as 1, 2, 3, and so on.\n\nThe final answer is: ",
        32,
        "count",
    ),
    "passage_retrieval_en": DatasetSpec(
        "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph the "
        "abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\nPlease enter the number "
        'of the paragraph that the abstract is from. The answer format must be like "Paragraph 1", '
        '"Paragraph 2", etc.\n\nThe answer is: ',
        32,
        "retrieval",
    ),
    "lcc": DatasetSpec(
        "Please complete the code given below. \n{context}Next line of code:\n", 64, "code_sim", chat=False
    ),
    "repobench-p": DatasetSpec(
        "Please complete the code given below. \n{context}{input}Next line of code:\n", 64, "code_sim", chat=False
    ),
}


@dataclass
class Record:
    dataset: str
    input: str
    context: str
    answers: list[str]
    all_classes: list[str] = field(default_factory=list)
    length: int | None = None
    id: str = ""
    line: int = 0


def _dataset_of(name: str) -> str:
    if name not in DATASETS:
        raise InfinichatError(f"unknown LongBench dataset {name!r}; accepted: {', '.join(DATASETS)}")
    return name


def jsonl_objects(path: str | Path, limit: int | None = None) -> Iterator[tuple[str, int, dict[str, Any]]]:
    """(where, line number, object) of each non-blank line of a `--data` JSONL file, at most `limit`; a file
    that cannot be read, or a line that is no JSON object, is an error naming the file and the line."""
    try:
        lines = Path(path).read_bytes().decode("utf-8").splitlines()
    except OSError as e:
        raise InfinichatError(f"cannot read --data {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise InfinichatError(f"--data {path} is not UTF-8 (byte {e.start}: {e.reason})") from None
    n = 0
    for no, line in enumerate(lines, 1):
        if limit is not None and n >= limit:
            return
        if not line.strip():
            continue
        where = f"--data {path}, line {no}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise InfinichatError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        except ValueError as e:  # e.g. an integer of more than 4300 digits
            raise InfinichatError(f"{where}: not valid JSON ({e})") from None
        if not isinstance(obj, dict):
            raise InfinichatError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        try:  # a lone surrogate (an escape like \\ud800 without its pair) is no text a tokenizer takes
            json.dumps(obj, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as e:
            raise InfinichatError(
                f"{where}: a lone surrogate ({e.object[e.start : e.end]!r} escaped in the JSON); the text must be "
                "valid Unicode (a \\ud800-\\udfff escape only as half of a pair)"
            ) from None
        n += 1
        yield where, no, obj


def load_jsonl(path: str | Path, dataset: str | None = None, limit: int | None = None) -> list[Record]:
    """The records of a LongBench JSONL file (at most `limit`). The dataset of a record: its `dataset` field,
    else `dataset`, else the file name (`hotpotqa.jsonl`, `hotpotqa_e.jsonl` -> hotpotqa)."""
    stem = Path(path).name.split(".")[0]
    fallback = dataset or (stem[:-2] if stem.endswith("_e") else stem)
    records: list[Record] = []
    for where, no, obj in jsonl_objects(path, limit):
        missing = [k for k in REQUIRED if k not in obj]
        if missing:
            raise InfinichatError(
                f"{where}: missing field(s) {', '.join(missing)}; a record needs {', '.join(REQUIRED)}"
            )
        answers = obj["answers"]
        if isinstance(answers, str):
            answers = [answers]
        if not isinstance(answers, list) or not all(isinstance(a, (str, int, float)) for a in answers):
            raise InfinichatError(f"{where}: 'answers' must be a list of strings")
        if not isinstance(obj["input"], str) or not isinstance(obj["context"], str):
            raise InfinichatError(f"{where}: 'input' and 'context' must be strings")
        name = obj.get("dataset") or fallback
        if not isinstance(name, str) or name not in DATASETS:
            raise InfinichatError(
                f"{where}: unknown LongBench dataset {name!r} (give --dataset NAME); accepted: {', '.join(DATASETS)}"
            )
        classes = obj.get("all_classes") or []
        records.append(
            Record(
                name,
                obj["input"],
                obj["context"],
                [str(a) for a in answers],
                [str(c) for c in classes] if isinstance(classes, list) else [],
                obj.get("length") if isinstance(obj.get("length"), int) else None,
                str(obj.get("_id", "")),
                no,
            )
        )
    if not records:
        raise InfinichatError(f"--data {path} holds no records")
    return records


def truncate_middle(ids: Sequence[int], max_length: int) -> list[int]:
    """`ids` itself when it fits, else its first max_length // 2 and last max_length - max_length // 2."""
    if len(ids) <= max_length:
        return list(ids)
    half = max_length // 2
    return list(ids[:half]) + list(ids[len(ids) - (max_length - half) :])


def build_prompt(
    tok: Tokenizer, rec: Record, max_length: int, chat_fmt: PromptFormat, plain_fmt: PromptFormat
) -> tuple[list[int], bool]:
    """(prompt ids, whether it was truncated): the dataset's prompt, cut in the middle, in its format."""
    spec = DATASETS[rec.dataset]
    text = spec.prompt.format(context=rec.context, input=rec.input)
    ids = encode_text(tok, text)
    cut = truncate_middle(ids, max_length)
    fmt = chat_fmt if spec.chat else plain_fmt
    return fmt.ids(cut), len(cut) < len(ids)


def postprocess(dataset: str, prediction: str) -> str:
    return prediction.lstrip("\n").split("\n")[0] if DATASETS[dataset].first_line else prediction


def records_summary(
    records: Sequence[dict[str, Any]], labels: Sequence[str], datasets: Sequence[str]
) -> dict[str, Any]:
    """Score per label x dataset (LongBench's 100 x mean of best-over-references) and the mean of those."""
    from infinichat.eval.longbench_metrics import dataset_score

    out: dict[str, Any] = {}
    for label in labels:
        scores = {
            d: dataset_score([r["score"] for r in records if r["policy"] == label and r["dataset"] == d])
            for d in datasets
        }
        vals = [v for v in scores.values() if v is not None]
        mine = [r for r in records if r["policy"] == label]
        out[label] = {
            "by_dataset": scores,
            "mean": sum(vals) / len(vals) if vals else None,
            "prefill_s": sum(r["prefill_s"] for r in mine),
            "decode_s": sum(r["decode_s"] for r in mine),
            "kept": sum(r["kept"] for r in mine) / len(mine) if mine else None,
        }
    return out


def markdown(report: dict[str, Any]) -> str:
    ds = report["datasets"]
    header = ["policy", *ds, "mean", "kept (mean)", "prefill s", "decode s"]
    lines = [
        f"## LongBench, {report['model']} (scores x100; prompts cut to {report['max_length']} tokens)\n",
        "| " + " | ".join(header) + " |",
        "|---|" + "---:|" * (len(header) - 1),
    ]
    for label, s in report["summary"].items():
        cells = ["-" if s["by_dataset"][d] is None else f"{s['by_dataset'][d]:.2f}" for d in ds]
        mean = "-" if s["mean"] is None else f"{s['mean']:.2f}"
        kept = "-" if s["kept"] is None else f"{s['kept']:.0f}"
        row = [label, *cells, mean, kept, f"{s['prefill_s']:.1f}", f"{s['decode_s']:.1f}"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"
