"""InfiniteBench-format evaluation: every task's scorer on a right and a wrong answer, the JSONL loader on the
hand-made fixtures in tests/data/infinitebench/, prompts and truncation, the passkey / kv_retrieval
generators, and `eval infinitebench` end to end on a tiny random GGUF model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from infinichat.cli.main import main
from infinichat.errors import InfinichatError
from infinichat.eval import infinitebench as ib

DATA = Path(__file__).parent / "data" / "infinitebench"


def _one(task: str) -> ib.Record:
    return ib.load_jsonl(DATA / f"{task}.jsonl")[0]


# (task, a right prediction, a wrong prediction): what a model might answer after the open prompt
SCORER_CASES = [
    ("passkey", " 48213.", " 48231"),
    ("passkey", "48213 is the pass key", "The key 4821 3"),  # the FIRST run of digits counts
    ("number_string", " 7730041992", " 773004199"),
    ("kv_retrieval", '"5e4d3c2b-1a0f-4e9d-8c7b-6a5f4e3d2c1b".', "d41c9e2a-7f3b-4b8e-a1c5-6e0d2f9b8c7a"),
    ("longbook_choice_eng", "B", "A. Mara"),
    ("longbook_choice_eng", " The answer is: B. Tobin", " The answer is: C"),
    ("longbook_choice_eng", "I think the option is Tobin", "I think so, A"),
    ("math_find", " 93", " 12, then 93"),
    ("code_debug", "D. head", "A. add"),
    ("code_debug", "The answer is: D", "The answer is: B"),
    ("longdialogue_qa_eng", " Clara, since she apologizes.", " Ben"),
]


@pytest.mark.parametrize("task, right, wrong", SCORER_CASES)
def test_scorer_right_and_wrong(task, right, wrong):
    rec = _one(task)
    assert ib.score(task, right, rec.answers, rec.options) == 1.0
    assert ib.score(task, wrong, rec.answers, rec.options) == 0.0


def test_longbook_qa_is_token_f1():
    rec = _one("longbook_qa_eng")
    assert ib.score("longbook_qa_eng", "Alder Cross", rec.answers) == 1.0  # best over the answers
    # vs "at market in alder cross" (articles dropped): P = 2/2, R = 2/5, F = 4/7 (vs "Alder Cross": 1/2)
    assert ib.score("longbook_qa_eng", "in Alder", rec.answers) == pytest.approx(4 / 7)
    assert ib.score("longbook_qa_eng", "on the roof", rec.answers) == 0.0


def test_every_task_has_a_fixture_and_a_scorer_case():
    assert sorted(p.stem for p in DATA.glob("*.jsonl")) == sorted(ib.TASKS)
    assert {c[0] for c in SCORER_CASES} | {"longbook_qa_eng"} == set(ib.TASKS)


def test_choice_answers_given_as_a_letter():
    assert ib.score("longbook_choice_eng", "B", ["B"], ["Mara", "Tobin", "x", "y"]) == 1.0
    assert ib.score("code_debug", "The answer is: head", ["D"], ["add", "mean", "scale", "head"]) == 1.0


@pytest.mark.parametrize("task", sorted(ib.TASKS))
def test_prompts_follow_the_task(task):
    rec = _one(task)
    open_text, chat_text = ib.prompt_text(rec, "open"), ib.prompt_text(rec, "chat")
    assert rec.context in open_text and rec.context in chat_text
    if ib.TASKS[task].options:
        assert all(f"{letter}. {o}" in open_text for letter, o in zip("ABCD", rec.options, strict=True))
    expected_end = {
        "passkey": "\n\nThe pass key is",
        "number_string": "The sequence of digits is",
        "longbook_choice_eng": "The letter of the correct answer is",
        "code_debug": "The correct option is:",
        "longdialogue_qa_eng": "The name that has been replaced with $$MASK$$ is likely",
        "math_find": "The largest number of the list is: ",
    }
    if task in expected_end:
        assert open_text.endswith(expected_end[task])
    if task == "math_find":
        assert open_text.startswith("What is the largest number in the following list?\n\n")


def test_truncation_keeps_both_ends():
    rec = ib.Record("passkey", "x " * 500, "What is the pass key?", ["1"])

    class Chars:  # a tokenizer stand-in: one id per character
        def encode(self, text, parse_special=False, add_bos=False):
            return [ord(c) for c in text]

    fmt = ib.PromptFormat((), (), False)
    ids, cut = ib.build_prompt(Chars(), rec, 100, "open", fmt, fmt)  # type: ignore[arg-type]
    full = ib.prompt_text(rec)
    assert cut and len(ids) == 100
    assert "".join(map(chr, ids)) == full[:50] + full[-50:]


@pytest.mark.parametrize(
    "line, pattern",
    [
        ("not json", r"line 1: not valid JSON"),
        ('{"context": "c"}', r"line 1: missing field\(s\) answer"),
        ('{"context": 1, "answer": "a"}', r"'context' and 'input' must be strings"),
        ('{"context": "c", "answer": []}', r"'answer' must be a string or a non-empty list"),
    ],
)
def test_bad_records_name_the_line(tmp_path, line, pattern):
    f = tmp_path / "passkey.jsonl"
    f.write_text(line + "\n")
    with pytest.raises(InfinichatError, match=pattern):
        ib.load_jsonl(f)


def test_options_and_task_are_checked(tmp_path):
    f = tmp_path / "code_debug.jsonl"
    f.write_text(json.dumps({"context": "c", "answer": ["f"], "options": ["a", "b"]}) + "\n")
    with pytest.raises(InfinichatError, match="needs 'options', a list of 4 choices"):
        ib.load_jsonl(f)
    f.write_text(json.dumps({"context": "c", "answer": ["zz"], "options": ["a", "b", "c", "d"]}) + "\n")
    with pytest.raises(InfinichatError, match="neither one of the options nor A-D"):
        ib.load_jsonl(f)
    with pytest.raises(InfinichatError, match="names no InfiniteBench task; give --task"):
        ib.load_jsonl(tmp_path / "mystery.jsonl")
    with pytest.raises(InfinichatError, match="unknown InfiniteBench task 'wiki'"):
        ib.load_jsonl(f, task="wiki")


@pytest.mark.parametrize("task", ib.GENERATED)
def test_generated_records_fit_and_score(task, tmp_path):
    def count(s: str) -> int:
        return len(s) // 3  # a stand-in tokenizer: 3 characters a token

    recs = ib.generate(task, 4, 600, count, seed=1)
    assert len(recs) == 4 and len({r.answers[0] for r in recs}) == 4
    for r in recs:
        text = ib.prompt_text(r)
        assert count(text) <= 600 and count(text) > 400
        assert r.answers[0] in r.context
        assert ib.score(task, r.answers[0], r.answers) == 1.0
    assert recs == ib.generate(task, 4, 600, count, seed=1)  # seeded
    path = ib.write_jsonl(recs, tmp_path / f"{task}.jsonl")
    assert ib.load_jsonl(path) == [ib.Record(**{**vars(r), "line": i + 1}) for i, r in enumerate(recs)]
    if task == "kv_retrieval":
        key = recs[0].input.split('"')[1]
        assert json.loads(recs[0].context.removeprefix("JSON data:\n"))[key] == recs[0].answers[0]


def test_cli_infinitebench_scores_and_writes(tiny_gguf_1k, tmp_path, capsys, cli_threads):
    out = tmp_path / "out"
    args = ["eval", "infinitebench", "--policies", "full,streaming", "--budget-frac", "0.5", "--max-length", "200"]
    args += ["--data", str(DATA / "passkey.jsonl"), "--data", str(DATA / "longbook_choice_eng.jsonl")]
    args += ["--generate", "kv_retrieval", "--gen-samples", "2", "--gen-length", "300", "--max-new-tokens", "3"]
    args += ["--out", str(out), "--model", str(tiny_gguf_1k), "--cache-dir", str(tmp_path / "c"), "--threads", "1"]
    rc = main(args)
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    report = json.loads((out / "infinitebench.json").read_text())
    assert report["tasks"] == ["passkey", "longbook_choice_eng", "kv_retrieval"]
    assert len(report["results"]) == 2 * 4
    for r in report["results"]:
        opts = ["Mara", "Tobin", "The miller", "Alder"] if r["task"] == "longbook_choice_eng" else []
        assert r["score"] == ib.score(r["task"], r["prediction"], r["answers"], opts)
        assert r["generated"] <= 3
    assert any(r["truncated"] for r in report["results"] if r["task"] == "passkey")  # 200 tokens of ~1000
    assert set(report["summary"]) == {"full", "streaming 50%"}
    assert len(ib.load_jsonl(out / "kv_retrieval-generated.jsonl")) == 2
    assert "| policy | passkey | longbook_choice_eng | kv_retrieval | mean |" in (out / "infinitebench.md").read_text()


@pytest.mark.parametrize(
    "args, pattern",
    [
        ([], r"needs data: --data FILE.jsonl"),
        (["--generate", "math_find"], r"--generate 'math_find': only passkey, kv_retrieval"),
        (["--task", "wiki"], r"unknown InfiniteBench task 'wiki' in --task"),
        (["--data", "/nonexistent/passkey.jsonl"], r"cannot read --data"),
        (["--generate", "passkey", "--gen-samples", "0"], r"--gen-samples must be from 1 to 10000 and --gen-length"),
        (
            ["--generate", "passkey", "--gen-length", "99999999999"],
            r"--gen-length from 64 to 16777216 tokens, got 5, 99999999999",
        ),
        (["--generate", "passkey", "--gen-samples", "10001"], r"--gen-samples must be from 1 to 10000"),
    ],
)
def test_cli_infinitebench_bad_input(args, pattern, capsys):
    assert main(["eval", "infinitebench", *args]) == 2
    assert pattern and __import__("re").search(pattern, capsys.readouterr().err)


def test_cli_infinitebench_cut_after_a_policy_keeps_it_and_resume_completes_it(
    tiny_gguf_1k, tmp_path, capsys, cli_threads, monkeypatch
):
    from test_eval_ruler import comparable, cut_at

    from infinichat.eval import runner

    def infinitebench(out, *extra: str) -> int:
        args = ["eval", "infinitebench", "--policies", "full,streaming", "--budget-frac", "0.5"]
        args += ["--data", str(DATA / "passkey.jsonl"), "--generate", "kv_retrieval", "--gen-samples", "1"]
        args += ["--gen-length", "300", "--max-length", "200", "--max-new-tokens", "2", "--out", str(out)]
        return main([*args, "--model", str(tiny_gguf_1k), "--cache-dir", str(tmp_path / "c"), "--threads", "1", *extra])

    assert infinitebench(tmp_path / "whole") == 0
    want = comparable(tmp_path / "whole", "infinitebench")
    assert [(r["policy"], r["item"], r["task"]) for r in want[0]] == [
        ("full", 0, "passkey"),
        ("full", 1, "kv_retrieval"),
        ("streaming 50%", 0, "passkey"),
        ("streaming 50%", 1, "kv_retrieval"),
    ]
    cut = tmp_path / "cut"
    cut_at(monkeypatch, runner, "generate", "streaming", lambda: infinitebench(cut))
    records, summary, md = comparable(cut, "infinitebench")
    assert records == want[0][:2] and summary["full"] == want[1]["full"] and summary["streaming 50%"]["samples"] == 0
    assert "| streaming 50% | - | - | - | 0 | - |" in md
    capsys.readouterr()
    assert infinitebench(cut) == 2 and "add --resume to complete it" in capsys.readouterr().err
    assert infinitebench(cut, "--resume") == 0
    assert comparable(cut, "infinitebench") == want
    before = {p.name: p.read_bytes() for p in cut.iterdir()}
    capsys.readouterr()
    assert infinitebench(cut, "--resume", "--prompts", "chat") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'was run with prompts="open", this command has prompts="chat"' in err[0], err
    assert {p.name: p.read_bytes() for p in cut.iterdir()} == before
