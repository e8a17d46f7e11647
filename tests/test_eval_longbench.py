"""LongBench-format evaluation: the metrics against hand-computed values, the JSONL loader, prompt building
and `eval longbench` end to end on a tiny random GGUF model with a JSONL file written here."""

from __future__ import annotations

import json
import re

import pytest

from infinichat.cli.main import main
from infinichat.errors import InfinichatError
from infinichat.eval import longbench as lb
from infinichat.eval.longbench_metrics import (
    classification,
    code_sim,
    count,
    dataset_score,
    lcs_length,
    normalize_answer,
    qa_f1,
    retrieval,
    rouge_l,
    score_sample,
)

# --------------------------------------------------------------------------------------------------- metrics


def test_normalize_answer():
    assert normalize_answer("  An apple, THE pear;  a-b ") == "apple pear ab"
    assert normalize_answer("The Theory of a Thing.") == "theory of thing"


@pytest.mark.parametrize(
    "pred, ref, want",
    [
        ("The Eiffel Tower, Paris!", "eiffel tower in paris", 6 / 7),  # P = 3/3, R = 3/4
        ("Paris", "Paris", 1.0),
        ("London", "Paris", 0.0),
        ("", "Paris", 0.0),
        ("x b b c", "b b b d", 0.5),  # common {b: 2}: P = 2/4, R = 2/4
    ],
)
def test_qa_f1(pred, ref, want):
    assert qa_f1(pred, ref) == pytest.approx(want)


@pytest.mark.parametrize(
    "pred, ref, want",
    [
        ("the cat sat on the mat", "the cat lay on the mat", 5 / 6),  # LCS "the cat on the mat"
        ("a b c d", "b a d", 4 / 7),  # LCS 2: P = 2/4, R = 2/3, F = 2PR/(P+R) = 4/7
        ("A B", "a b", 1.0),  # lowercased
        ("x y", "a b", 0.0),
    ],
)
def test_rouge_l(pred, ref, want):
    assert rouge_l(pred, ref) == pytest.approx(want)


def test_lcs_length():
    assert lcs_length(list("ABCBDAB"), list("BDCABA")) == 4  # the textbook example (BCBA)
    assert lcs_length([], ["a"]) == 0


def test_classification():
    classes = ["LOC:city", "LOC:other", "LOC", "NUM:count"]
    # "LOC" is found too, but it is only a part of the reference class: dropped
    assert classification("This is a LOC:city question, maybe LOC", "LOC:city", all_classes=classes) == 1.0
    # found: LOC:other, LOC (inside "LOC:other"), NUM:count; none is a part of the reference: 1/3
    assert classification("LOC:other or NUM:count", "NUM:count", all_classes=classes) == pytest.approx(1 / 3)
    assert classification("NUM:count, surely", "NUM:count", all_classes=classes) == 1.0
    assert classification("no idea", "NUM:count", all_classes=classes) == 0.0


def test_retrieval_count_and_code_sim():
    assert retrieval("Paragraph 3, not paragraph 12", "Paragraph 3") == 0.5
    assert retrieval("The answer is Paragraph 7", "Paragraph 7") == 1.0
    assert retrieval("none", "Paragraph 7") == 0.0
    assert count("There are 12 unique paragraphs, not 13", "12") == 0.5
    assert count("12", "12") == 1.0
    # the first line without a code fence or comment is compared; 12 of 13 characters match: 2 * 12 / 26
    assert code_sim("```python\n# comment\nx = foo(a, b)\n", "x = foo(a, c)") == pytest.approx(12 / 13)
    assert code_sim("// only comments", "x = 1") == 0.0


def test_sample_and_dataset_scores():
    assert score_sample("qa_f1", "Paris", ["the city of Paris", "Paris"]) == 1.0
    assert score_sample("qa_f1", "Paris", []) == 0.0
    assert dataset_score([1.0, 0.0, 0.5]) == pytest.approx(50.0)
    assert dataset_score([]) is None


# ---------------------------------------------------------------------------------------------------- loader

RECORDS = [
    {
        "input": "Where is the tower?",
        "context": "Passage 1:\nThe tower stands in Paris. " * 30,
        "answers": ["Paris"],
        "length": 200,
        "dataset": "hotpotqa",
        "all_classes": None,
        "_id": "a1",
    },
    {
        "input": "What is the capital of Peru?",
        "context": "Question: Who wrote Hamlet?\nType: Human being\n" * 10,
        "answers": ["LOC:city"],
        "length": 90,
        "dataset": "trec",
        "all_classes": ["LOC:city", "HUM:ind"],
        "_id": "b2",
    },
]


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_load_jsonl(tmp_path):
    f = _write(tmp_path / "mixed.jsonl", [json.dumps(RECORDS[0]), "", json.dumps(RECORDS[1])])
    recs = lb.load_jsonl(f)
    assert [(r.dataset, r.id, r.line) for r in recs] == [("hotpotqa", "a1", 1), ("trec", "b2", 3)]
    assert recs[1].all_classes == ["LOC:city", "HUM:ind"] and recs[0].all_classes == []
    assert len(lb.load_jsonl(f, limit=1)) == 1
    bare = {k: v for k, v in RECORDS[0].items() if k != "dataset"}
    assert lb.load_jsonl(_write(tmp_path / "musique.jsonl", [json.dumps(bare)]))[0].dataset == "musique"
    assert lb.load_jsonl(_write(tmp_path / "qasper_e.jsonl", [json.dumps(bare)]))[0].dataset == "qasper"
    assert lb.load_jsonl(_write(tmp_path / "x.jsonl", [json.dumps(bare)]), dataset="lcc")[0].dataset == "lcc"


@pytest.mark.parametrize(
    "line, pattern",
    [
        ("{not json", r"line 2: not valid JSON"),
        ("[1, 2]", r"line 2: expected a JSON object, got list"),
        ('{"input": "q", "context": "c"}', r"line 2: missing field\(s\) answers"),
        (
            '{"input": "q", "context": "c", "answers": "x", "dataset": "nope"}',
            r"line 2: unknown LongBench dataset 'nope'",
        ),
        ('{"input": 3, "context": "c", "answers": ["x"]}', r"line 2: 'input' and 'context' must be strings"),
        # a list as the dataset (was: TypeError unhashable type)
        ('{"input": "q", "context": "c", "answers": "x", "dataset": ["hotpotqa"]}', r"line 2: unknown LongBench"),
        # an integer of 5000 digits (was: ValueError from json.loads)
        pytest.param(
            '{"input": "q", "context": "c", "answers": "x", "length": 1' + "0" * 5000 + "}",
            r"line 2: not valid JSON",
            id="5000-digit-int",
        ),
        # lone surrogates (were accepted; the tokenizer then failed with a TypeError after the model loaded)
        ('{"input": "q\\ud800", "context": "c", "answers": "x"}', r"line 2: a lone surrogate \('\\ud800' escaped"),
        ('{"input": "q", "context": "c", "answers": ["\\udfff"]}', r"line 2: a lone surrogate"),
    ],
)
def test_malformed_lines_name_the_line(tmp_path, line, pattern):
    f = _write(tmp_path / "hotpotqa.jsonl", [json.dumps(RECORDS[0]), line])
    with pytest.raises(InfinichatError, match=pattern):
        lb.load_jsonl(f)


def test_a_surrogate_pair_is_text(tmp_path):
    f = _write(tmp_path / "hotpotqa.jsonl", [json.dumps({**RECORDS[0], "input": "\U0001f600"})])  # \ud83d\ude00
    assert lb.load_jsonl(f)[0].input == "\U0001f600"


def test_truncate_middle():
    ids = list(range(10))
    assert lb.truncate_middle(ids, 4) == [0, 1, 8, 9]
    assert lb.truncate_middle(ids, 5) == [0, 1, 7, 8, 9]
    assert lb.truncate_middle(ids, 10) == ids


def test_every_dataset_has_a_usable_spec():
    for name, spec in lb.DATASETS.items():
        text = spec.prompt.format(context="CTX", input="INP")
        assert "CTX" in text and spec.max_gen > 0, name
        assert ("INP" in text) == (name not in ("gov_report", "multi_news", "passage_count", "lcc")), name
    assert lb.postprocess("trec", "\nLOC:city\nmore") == "LOC:city"
    assert lb.postprocess("hotpotqa", "a\nb") == "a\nb"


# ------------------------------------------------------------------------------------------------------- CLI


def test_cli_longbench_scores_and_writes(tiny_gguf_1k, tmp_path, capsys, cli_threads):
    f = _write(tmp_path / "lb.jsonl", [json.dumps(r) for r in RECORDS])
    out = tmp_path / "out"
    rc = main(
        [
            "eval",
            "longbench",
            "--data",
            str(f),
            "--policies",
            "full,streaming",
            "--budget-frac",
            "0.5",
            "--max-length",
            "300",
            "--max-new-tokens",
            "3",
            "--out",
            str(out),
            "--model",
            str(tiny_gguf_1k),
            "--cache-dir",
            str(tmp_path / "cache"),
            "--threads",
            "1",
        ]
    )
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    report = json.loads((out / "longbench.json").read_text())
    assert report["datasets"] == ["hotpotqa", "trec"] and len(report["results"]) == 4
    hot = [r for r in report["results"] if r["dataset"] == "hotpotqa"]
    assert all(r["truncated"] for r in hot)  # ~900 prompt tokens cut to 300 (+ the template)
    for r in report["results"]:
        assert r["score"] == pytest.approx(
            score_sample(lb.DATASETS[r["dataset"]].metric, r["prediction"], r["answers"], ["LOC:city", "HUM:ind"])
        )
        assert r["generated"] <= 3
    assert set(report["summary"]) == {"full", "streaming 50%"}
    assert "| policy | hotpotqa | trec | mean |" in (out / "longbench.md").read_text()


@pytest.mark.parametrize(
    "args, pattern",
    [
        ([], r"needs LongBench-format data: --data FILE"),
        (["--data", "{tmp}/nope.jsonl"], r"cannot read --data .*nope\.jsonl"),
        (["--data", "{tmp}/bad.jsonl"], r"--data .*bad\.jsonl, line 2: not valid JSON"),
        (["--data", "{tmp}/bad.jsonl", "--dataset", "wiki"], r"unknown --dataset 'wiki'; accepted: narrativeqa"),
    ],
)
def test_cli_longbench_bad_input(args, pattern, tmp_path, capsys):
    _write(tmp_path / "bad.jsonl", [json.dumps(RECORDS[0]), '{"input": '])
    rc = main(
        ["eval", "longbench", *[a.format(tmp=tmp_path) for a in args], "--model", str(tmp_path / "never-loaded.gguf")]
    )
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and re.search(pattern, lines[0]), err


def test_cli_longbench_cut_after_a_policy_keeps_it_and_resume_completes_it(
    tiny_gguf_1k, tmp_path, capsys, cli_threads, monkeypatch
):
    from test_eval_ruler import comparable, cut_at

    from infinichat.eval import runner

    data = _write(tmp_path / "lb.jsonl", [json.dumps(r) for r in RECORDS])

    def longbench(out, *extra: str) -> int:
        args = ["eval", "longbench", "--data", str(data), "--policies", "full,streaming", "--budget-frac", "0.5"]
        args += ["--max-length", "300", "--max-new-tokens", "2", "--out", str(out), "--model", str(tiny_gguf_1k)]
        return main([*args, "--cache-dir", str(tmp_path / "cache"), "--threads", "1", *extra])

    assert longbench(tmp_path / "whole") == 0
    want = comparable(tmp_path / "whole", "longbench")
    assert len(want[0]) == 2 * len(RECORDS)
    cut = tmp_path / "cut"
    cut_at(monkeypatch, runner, "generate", "streaming", lambda: longbench(cut))
    records, summary, _ = comparable(cut, "longbench")
    assert records == want[0][: len(RECORDS)] and summary["full"] == want[1]["full"]
    assert summary["streaming 50%"]["mean"] is None
    assert longbench(cut, "--resume") == 0
    assert comparable(cut, "longbench") == want
    capsys.readouterr()
    assert longbench(cut, "--resume", "--max-length", "250") == 2
    assert "was run with max_length=300, this command has max_length=250" in capsys.readouterr().err
