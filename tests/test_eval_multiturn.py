"""`eval multiturn`: the generated conversation (turn 1 = context + first question, then one question per turn),
the turns in one KV sequence under a policy, and the CLI end to end on a tiny random GGUF model."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from test_kv_store import rand_ids, tiny_engine

from infinichat.cli.main import main
from infinichat.errors import InfinichatError
from infinichat.eval import multiturn
from infinichat.eval.runner import PolicyRun

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_conversation_holds_every_fact_and_asks_each_once(default_tokenizer):
    tok = default_tokenizer
    c = multiturn.conversation(tok, 1200, 0, 2, 4, seed=1)
    assert len(c.turns) == 4 and len(c.turns[0]) == 1200
    context = tok.decode(c.turns[0])
    facts = dict(re.findall(r"One of the special magic numbers for ([a-z-]+) is: (\d+)\.", context))
    assert facts == dict(zip(c.keys, c.values, strict=True))
    for k, ids in zip(c.keys, c.turns, strict=True):
        q = tok.decode(ids)[-200:]
        assert q.endswith(f"The special magic number for {k} mentioned in the provided text is")
    later = tok.decode(c.turns[1])
    assert later.startswith("\n\nWhat is the special magic number for " + c.keys[1]) and "One of" not in later
    assert multiturn.conversation(tok, 1200, 0, 2, 4, seed=1).turns == c.turns
    assert multiturn.conversation(tok, 1200, 1, 2, 4, seed=1).turns != c.turns


@pytest.mark.parametrize("run", [PolicyRun("full"), PolicyRun("streaming", frac=0.5), PolicyRun("snapkv", frac=0.5)])
def test_the_turns_share_one_sequence(run):
    engine = tiny_engine()
    turns = [rand_ids(120, seed=1), rand_ids(15, seed=2), rand_ids(15, seed=3)]
    conv = multiturn.Conversation(120, 0, turns, ["a", "b", "c"], ["11111", "22222", "33333"])
    recs = multiturn.run_conversation(engine, run, conv, 4, str)
    assert [r["turn"] for r in recs] == [1, 2, 3] and all(r["generated"] == 4 for r in recs)
    if run.name == "full":  # everything stays: every turn's ids and every answer token (fed back)
        assert [r["cached_after"] for r in recs] == [124, 143, 162]
        assert recs[0]["n_evictions"] == 0 and recs[1]["kept"] == 124 + 15
    else:  # a budget of half of turn 1 (60 tokens) holds through all turns
        assert all(r["budget"] == 60 and r["cached_after"] <= 60 for r in recs)
        assert recs[0]["n_evicted"] > 0 and recs[1]["n_evicted"] > 0  # later turns evict again


def run_multiturn_cli(first: list[str], model, tmp_path, capsys) -> tuple[Path, dict, str]:
    """`eval multiturn` with `first` + full,snapkv at 50%, 3 new tokens, on `model`: (out dir, multiturn.json,
    what it printed)."""
    out = tmp_path / "out"
    args = ["eval", "multiturn", *first, "--policies", "full,snapkv", "--budget-frac", "0.5", "--max-new-tokens", "3"]
    args += ["--out", str(out), "--model", str(model), "--cache-dir", str(tmp_path / "c"), "--threads", "1"]
    rc = main(args)
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    return out, json.loads((out / "multiturn.json").read_text()), captured.out


def test_cli_multiturn_writes_json_markdown_and_a_heatmap(tiny_gguf_1k, tmp_path, capsys, cli_threads):
    first = ["--lengths", "700", "--turns", "3", "--samples", "2"]
    out, report, printed = run_multiturn_cli(first, tiny_gguf_1k, tmp_path, capsys)
    assert [p["label"] for p in report["policies"]] == ["full", "snapkv 50%"] and report["turns"] == 3
    assert len(report["results"]) == 2 * 2 * 3
    for r in report["results"]:
        assert isinstance(r["correct"], bool) and r["score"] == float(r["correct"]) and r["generated"] <= 3
        if r["policy"] == "snapkv 50%":
            assert r["budget"] == 350 and r["cached_after"] <= 350
    s = report["summary"]["snapkv 50%"]["by_length"]["700"]
    assert set(s["by_turn"]) == {"1", "2", "3"}
    md = (out / "multiturn.md").read_text()
    assert "| policy | turn 1 | turn 2 | turn 3 | turns 2+ | mean | any fact |" in md
    for label, summary in report["summary"].items():  # any fact: answers with any of the conversation's values
        mine = [r for r in report["results"] if r["policy"] == label]
        assert all(r["any_fact"] >= r["correct"] for r in mine)
        assert summary["by_length"]["700"]["any_fact"] == pytest.approx(sum(r["any_fact"] for r in mine) / len(mine))
    assert (out / "multiturn-700.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "multi-turn accuracy" in printed


@pytest.mark.parametrize("turns", ["0", "-3", "901", "1000000000"])
def test_cli_multiturn_bad_turns_is_one_line_and_exit_2(tmp_path, capsys, turns):
    """--turns past the 900 keys a haystack can draw looped forever (after the model loaded): refused first."""
    rc = main(["eval", "multiturn", "--turns", turns, "--model", str(tmp_path / "never-loaded.gguf")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and f"--turns must be from 1 to 100, got {turns}" in err[0]


def test_the_keys_running_out_is_an_error_not_a_loop():
    import random

    from infinichat.eval import haystack

    rng = random.Random(0)
    taken: set[str] = set()
    for _ in range(900):
        taken.add(haystack.random_key(rng, taken))
    with pytest.raises(ValueError, match="all 900 keys are taken"):
        haystack.random_key(rng, taken)


# ------------------------------------------------------------------------------ LongBench-format contexts (--data)

LONGBENCH = Path(__file__).parent / "data" / "longbench_multiturn.jsonl"  # hotpotqa: 2 contexts, 3 + 2 questions


def test_longbench_records_of_one_context_become_the_turns_of_one_conversation(default_tokenizer):
    tok = default_tokenizer
    convs = multiturn.load_conversations(tok, LONGBENCH, 1000, 4, 5)
    assert [len(c.turns) for c in convs] == [3, 2] and [c.dataset for c in convs] == ["hotpotqa"] * 2
    c = convs[0]
    assert c.keys[1] == "Who designed the Harbor Bridge?" and c.answers == [["1932"], ["Karel Novak"], ["Brno"]]
    # hotpotqa is a chat in LongBench: turn 1 is one user message, each later turn closes the answer and is the
    # next user message
    first = tok.decode(c.turns[0])
    assert "<|im_start|>user\nAnswer the question based on the given passages." in first and "in 1932" in first
    assert first.endswith(
        "Question: In which year was the Harbor Bridge opened?\nAnswer:<|im_end|>\n<|im_start|>assistant\n"
    )
    later = tok.decode(c.turns[1])
    assert later.startswith("<|im_end|>\n<|im_start|>user\nAnswer the question based on the given passages.")
    assert later.endswith("Question: Who designed the Harbor Bridge?\nAnswer:<|im_end|>\n<|im_start|>assistant\n")
    assert "Passage" not in later
    assert c.max_new == 32  # hotpotqa's LongBench answer length
    # the dataset's metric (qa_f1), best over the references
    assert convs[1].score(0, "Sella.") == 1.0 and convs[1].score(0, "none") == 0.0
    assert 0.0 < c.score(1, "the engineer Karel Novak") < 1.0
    # --turns caps the questions of a context, --samples the contexts
    assert [len(x.turns) for x in multiturn.load_conversations(tok, LONGBENCH, 1000, 2, 1)] == [2]


def test_a_long_longbench_context_is_cut_in_the_middle_to_the_length(default_tokenizer):
    tok = default_tokenizer
    c = multiturn.load_conversations(tok, LONGBENCH, 140, 3, 1)[0]
    assert len(c.turns[0]) <= 140
    text = tok.decode(c.turns[0])
    assert "Passage 1:\nThe Harbor Bridge" in text and "built eleven bridges" in text  # both ends kept
    assert "opened in 1932" not in text  # the middle went
    with pytest.raises(InfinichatError, match="--lengths 60 is too short for the hotpotqa prompt"):
        multiturn.load_conversations(tok, LONGBENCH, 60, 3, 1)


def test_longbench_datasets_without_a_question_and_bad_files_are_clear_errors(default_tokenizer, tmp_path):
    with pytest.raises(InfinichatError, match=r"'gov_report' asks no question .* multiturn accepts: narrativeqa"):
        multiturn.split_prompt("gov_report")
    bad = tmp_path / "x.jsonl"
    bad.write_text('{"input": "q", "context": "c"}\n')
    with pytest.raises(InfinichatError, match="line 1: missing field"):
        multiturn.load_conversations(default_tokenizer, bad, 1000, 3, 1, "hotpotqa")
    bad.write_text(
        '{"input": "q", "context": "c", "answers": ["a"], "dataset": "hotpotqa"}\n'
        '{"input": "r", "context": "c", "answers": ["b"], "dataset": "musique"}\n'
    )
    with pytest.raises(InfinichatError, match=r"line 2: the context of line 1 \(hotpotqa\) again, but as musique"):
        multiturn.load_conversations(default_tokenizer, bad, 1000, 3, 1)


def test_cli_multiturn_on_longbench_data(tiny_gguf_1k, tmp_path, capsys, cli_threads):
    first = ["--data", str(LONGBENCH), "--lengths", "300"]
    out, report, _ = run_multiturn_cli(first, tiny_gguf_1k, tmp_path, capsys)
    assert report["data"] == str(LONGBENCH) and report["datasets"] == ["hotpotqa"] and report["samples"] == 2
    assert len(report["results"]) == 2 * (3 + 2)
    for r in report["results"]:
        assert r["dataset"] == "hotpotqa" and r["answers"] and 0.0 <= r["score"] <= 1.0 and r["generated"] <= 3
        if r["policy"] == "snapkv 50%":
            first = next(x for x in report["results"] if x["sample"] == r["sample"] and x["turn"] == 1)
            assert r["budget"] == round(first["prompt_tokens"] / 2) and r["cached_after"] <= r["budget"]
    s = report["summary"]["full"]["by_length"]["300"]
    mine = [r["score"] for r in report["results"] if r["policy"] == "full" and r["turn"] == 3]
    assert len(mine) == 1 and s["by_turn"]["3"] == pytest.approx(mine[0])  # only one context has a third question
    md = (out / "multiturn.md").read_text()
    assert "## multi-turn LongBench (hotpotqa), turn 1 <= 300 tokens" in md
    assert "| policy | turn 1 | turn 2 | turn 3 | turns 2+ | mean |" in md


def test_cli_multiturn_longbench_dataset_without_questions_is_one_line_and_exit_2(tmp_path, capsys):
    data = tmp_path / "gov_report.jsonl"
    data.write_text('{"input": "", "context": "a report", "answers": ["a summary"]}\n')
    rc = main(["eval", "multiturn", "--data", str(data), "--model", str(tmp_path / "never-loaded.gguf")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "'gov_report' asks no question" in err[0]


def test_any_fact_counts_an_answer_naming_another_fact_of_the_context():
    turns = [rand_ids(60, seed=1), rand_ids(10, seed=2), rand_ids(10, seed=3)]
    conv = multiturn.Conversation(60, 0, turns, ["a", "b", "c"], ["11111", "22222", "33333"])
    recs = multiturn.run_conversation(tiny_engine(), PolicyRun("full"), conv, 2, lambda ids: " 22222.")
    assert [(r["correct"], r["any_fact"], r["score"]) for r in recs] == [
        (False, True, 0.0),
        (True, True, 1.0),
        (False, True, 0.0),
    ]
    s = multiturn.summarize(recs, ["full"], [60], 3)["full"]["by_length"]["60"]
    assert s["any_fact"] == 1.0 and s["accuracy"] == pytest.approx(1 / 3)


def test_the_first_fact_depth_is_spread_over_the_conversations_not_drawn(default_tokenizer):
    tok = default_tokenizer
    n = 4
    for seed in (0, 1):
        convs = [multiturn.conversation(tok, 1200, i, n, 3, seed=seed) for i in range(n)]
        # conversation i of n at (i + 0.5) / n, to the sentence boundary nearest (filler sentences are ~20 tokens)
        assert [c.depth for c in convs] == pytest.approx([(i + 0.5) / n for i in range(n)], abs=0.03)
    c = multiturn.conversation(tok, 1200, 0, n, 3, seed=0)
    context = tok.decode(c.turns[0])
    first = context.index(f"One of the special magic numbers for {c.keys[0]} is: {c.values[0]}.")
    assert first < len(context) / 4  # the fact asked first really sits early
    turns = [rand_ids(60, seed=1), rand_ids(10, seed=2)]
    conv = multiturn.Conversation(60, 0, turns, ["a", "b"], ["11111", "22222"], depth=0.123456)
    recs = multiturn.run_conversation(tiny_engine(), PolicyRun("full"), conv, 1, str)
    assert [r["depth"] for r in recs] == [0.1235] * 2  # recorded with each turn


# ------------------------------------------------------------------------------ written as it goes, --resume


def multiturn_cli(out, model, tmp_path, *extra: str) -> int:
    args = ["eval", "multiturn", "--lengths", "500", "--turns", "2", "--samples", "2", "--policies", "full,snapkv"]
    args += ["--budget-frac", "0.5", "--max-new-tokens", "2", "--out", str(out), "--model", str(model)]
    return main([*args, "--cache-dir", str(tmp_path / "c"), "--threads", "1", *extra])


def test_cli_multiturn_cut_after_a_policy_keeps_it_and_resume_completes_it(
    tiny_gguf_1k, tmp_path, capsys, cli_threads, monkeypatch
):
    from test_eval_ruler import comparable, cut_at

    whole = tmp_path / "whole"
    assert multiturn_cli(whole, tiny_gguf_1k, tmp_path) == 0
    want = comparable(whole, "multiturn")
    assert len(want[0]) == 2 * 2 * 2
    assert sorted({(r["sample"], r["depth"] < 0.5) for r in want[0]}) == [(0, True), (1, False)]

    cut = tmp_path / "cut"
    run_conversation = cut_at(
        monkeypatch, multiturn, "run_conversation", "snapkv", lambda: multiturn_cli(cut, tiny_gguf_1k, tmp_path)
    )
    records, summary, md = comparable(cut, "multiturn")
    assert records == want[0][:4] and {r["policy"] for r in records} == {"full"}
    assert summary["full"] == want[1]["full"] and summary["snapkv 50%"]["accuracy"] is None
    assert "| full |" in md and "| snapkv 50% | - | - | - | - | - |" in md

    seen = []

    def counted(engine, run, conv, *a):
        seen.append((run.label, conv.index))
        return run_conversation(engine, run, conv, *a)

    monkeypatch.setattr(multiturn, "run_conversation", counted)
    assert multiturn_cli(cut, tiny_gguf_1k, tmp_path, "--resume") == 0
    assert seen == [("snapkv 50%", 0), ("snapkv 50%", 1)]
    assert comparable(cut, "multiturn") == want
    assert (cut / "multiturn-500.png").is_file()

    # a run cut while writing a conversation's turns: the turns written, then half a line
    lines = (cut / "multiturn.jsonl").read_text().splitlines(keepends=True)
    (cut / "multiturn.jsonl").write_text("".join(lines[:-1]) + lines[-1][:20])
    seen.clear()
    assert multiturn_cli(cut, tiny_gguf_1k, tmp_path, "--resume") == 0
    assert seen == [("snapkv 50%", 1)]  # that conversation again, whole
    assert comparable(cut, "multiturn") == want

    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in cut.iterdir()}
    assert multiturn_cli(cut, tiny_gguf_1k, tmp_path, "--resume", "--turns", "3") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "was run with turns=2, this command has turns=3" in err[0], err
    assert {p.name: p.read_bytes() for p in cut.iterdir()} == before
