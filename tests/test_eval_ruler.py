"""`eval ruler`: the generated RULER subset (lengths, seeds, references in the prompt), RULER's scoring, and the
CLI end to end on a tiny random GGUF model (JSON, Markdown, PNG)."""

from __future__ import annotations

import collections
import json
import re
from collections.abc import Callable
from typing import Any

import pytest

from infinichat.cli.main import main
from infinichat.eval import ruler
from infinichat.eval.prompt import prompt_format

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_string_match_all_and_part_are_rulers():
    refs = ["12345", "Harbor", "QXZTA"]
    assert ruler.string_match_all("the numbers are 12345 and harbor", refs) == pytest.approx(2 / 3)
    assert ruler.string_match_part("the numbers are 12345 and harbor", refs) == 1.0
    assert ruler.string_match_all("nothing", refs) == 0.0 == ruler.string_match_part("nothing", refs)
    assert ruler.string_match_all("123456 harbors qxzta", refs) == 1.0  # substrings, case-insensitive (RULER)


@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("task", ruler.TASKS)
def test_samples_hit_the_length_hold_their_references_and_are_seeded(default_tokenizer, task, chat):
    tok = default_tokenizer
    fmt = prompt_format(tok, chat=chat)
    s = ruler.sample(tok, fmt, task, 1500, 0, 2, seed=3)
    assert s.task == task and s.refs
    if task == "cwe":
        assert 1500 - 40 <= len(s.ids) <= 1500  # the longest list that fits
    else:
        assert len(s.ids) == 1500
    text = tok.decode(s.ids)
    assert ruler.sample(tok, fmt, task, 1500, 0, 2, seed=3).ids == s.ids
    assert ruler.sample(tok, fmt, task, 1500, 1, 2, seed=3).ids != s.ids
    question = text[text.rindex("\n\n") :]
    if task.startswith("niah"):
        for v in s.refs:
            assert f"is: {v}." in text and v not in question
        keys = re.findall(r"numbers? for ([a-z, -]+?) mentioned", question)[0].split(", ")
        assert len(keys) == (ruler.N_NEEDLES if task == "niah_multiquery" else 1)
        needles = re.findall(r"One of the special magic numbers for ([a-z-]+) is: (\d+)\.", text)
        assert len(needles) == (1 if task == "niah_single" else ruler.N_NEEDLES)
    elif task == "vt":
        value = re.findall(r"value (\d+)", question)[0]
        chain = re.findall(r"VAR ([A-Z]{5}) = (VAR [A-Z]{5}|\d+)\.", text)
        assert [name for name, _ in chain] == s.refs and chain[0][1] == value  # in order, the value first
        assert all(rhs == f"VAR {s.refs[i]}" for i, (_, rhs) in enumerate(chain[1:]))
    else:
        words = re.findall(r"\d+\. ([a-z]+)", text)
        top = [w for w, _ in collections.Counter(words).most_common(10)]
        counts = collections.Counter(words)
        assert sorted(top) == sorted(s.refs) and min(counts[w] for w in s.refs) > max(
            c for w, c in counts.items() if w not in s.refs
        )


@pytest.mark.parametrize("task", ["niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery"])
def test_needle_depths_are_spread_over_the_samples_not_drawn(default_tokenizer, task):
    tok = default_tokenizer
    fmt = prompt_format(tok, chat=False)
    n = 4
    for seed in (0, 1):
        depths = [ruler.sample(tok, fmt, task, 1200, i, n, seed=seed).depth for i in range(n)]
        # sample i of n at (i + 0.5) / n, to the sentence boundary nearest (filler sentences are ~20 tokens)
        assert depths == pytest.approx([(i + 0.5) / n for i in range(n)], abs=0.03), depths
    text = tok.decode(ruler.sample(tok, fmt, task, 1200, 0, n).ids)
    first = re.search(r"One of the special magic numbers for [a-z-]+ is: \d+\.", text)
    assert first is not None and first.start() < len(text) / 2  # the asked needle really sits early
    assert ruler.spread_depth(0, 3) == pytest.approx(1 / 6) and ruler.spread_depth(2, 3) == pytest.approx(5 / 6)
    assert ruler.sample(tok, fmt, "vt", 1200, 0, n).depth is None


def test_unknown_task_and_short_lengths_are_clear_errors(default_tokenizer):
    from infinichat.errors import InfinichatError

    with pytest.raises(InfinichatError, match="unknown RULER task 'qa' in --tasks; accepted: niah_single"):
        ruler.check_tasks(["vt", "qa"])
    with pytest.raises(InfinichatError, match="too short"):
        ruler.sample(default_tokenizer, prompt_format(default_tokenizer), "niah_multiquery", 60, 0, 1)


def test_cli_ruler_writes_json_markdown_and_heatmaps(tiny_gguf_1k, tmp_path, capsys, cli_threads):
    out = tmp_path / "out"
    args = ["eval", "ruler", "--tasks", "niah_single,vt", "--lengths", "400,500", "--samples", "2"]
    args += ["--policies", "full,kvzip,expected_attention", "--budget-frac", "0.5", "--max-new-tokens", "3"]
    args += ["--out", str(out), "--model", str(tiny_gguf_1k), "--cache-dir", str(tmp_path / "c"), "--threads", "1"]
    rc = main(args)
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    report = json.loads((out / "ruler.json").read_text())
    labels = ["full", "kvzip 50%", "expected_attention 50%"]
    assert [p["label"] for p in report["policies"]] == labels and report["tasks"] == ["niah_single", "vt"]
    assert len(report["results"]) == 3 * 2 * 2 * 2
    for r in report["results"]:
        assert r["prompt_tokens"] == r["length"] and r["generated"] <= 3
        assert r["kept"] <= (r["length"] if r["policy"] == "full" else r["budget"])
        assert 0.0 <= r["score"] <= r["score_part"] <= 1.0
        if r["task"] == "vt":
            assert r["depth"] is None
        else:  # sample 0 of 2 in the first half, sample 1 in the second (filler sentences are coarse at 400 tokens)
            assert (r["depth"] < 0.5) == (r["sample"] == 0), r
    cell = report["summary"]["kvzip 50%"]["by_task"]["vt"]["500"]
    mine = [
        r["score"] for r in report["results"] if r["policy"] == "kvzip 50%" and r["task"] == "vt" and r["length"] == 500
    ]
    assert cell["score"] == pytest.approx(sum(mine) / 2)
    md = (out / "ruler.md").read_text()
    assert "| policy | niah_single | vt | mean |" in md and "## RULER subset at 500 tokens" in md
    for label in ("full", "kvzip-50pct", "expected-attention-50pct"):
        assert (out / f"ruler-heatmap-{label}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "RULER at 400 tokens" in captured.out


def test_cli_ruler_bad_task_is_one_line_and_exit_2(tmp_path, capsys):
    rc = main(["eval", "ruler", "--tasks", "niah,vt", "--model", str(tmp_path / "never-loaded.gguf")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "unknown RULER task 'niah'" in err[0]


# ------------------------------------------------------------------------------ written as it goes, --resume

RESULT_TIMES = ("prefill_s", "decode_s")  # what differs between two runs of the same records


def ruler_cli(out, model, tmp_path, *extra: str) -> int:
    args = ["eval", "ruler", "--tasks", "niah_single,vt", "--lengths", "400", "--samples", "2"]
    args += ["--policies", "full,streaming", "--budget-frac", "0.5", "--max-new-tokens", "2", "--out", str(out)]
    args += ["--model", str(model), "--cache-dir", str(tmp_path / "c"), "--threads", "1", *extra]
    return main(args)


def comparable(out, stem: str) -> tuple[list[dict], dict, str]:
    """(the JSONL records, the JSON report's summaries, the Markdown tables) without timings."""
    lines = [json.loads(x) for x in (out / f"{stem}.jsonl").read_text().splitlines()]
    assert "settings" in lines[0]
    records = [{k: v for k, v in r.items() if k not in RESULT_TIMES} for r in lines[1:]]
    report = json.loads((out / f"{stem}.json").read_text())
    results = [{k: v for k, v in r.items() if k not in RESULT_TIMES} for r in report["results"]]
    assert results == records  # the report holds the journal's records, in order
    return records, untimed(report["summary"]), untimed_markdown((out / f"{stem}.md").read_text())


def untimed(summary: Any) -> Any:
    """`summary` without its timings (keys of prefill / decode times and speeds), at any depth."""
    if not isinstance(summary, dict):
        return summary
    return {k: untimed(v) for k, v in summary.items() if "prefill" not in k and "decode" not in k}


def untimed_markdown(md: str) -> str:
    """`md` with the cells of its timing columns (seconds, tokens per second) masked."""
    out, timed = [], set()
    lines = md.splitlines()
    for i, line in enumerate(lines):
        cells = line.split(" | ")
        if line.startswith("| ") and i + 1 < len(lines) and lines[i + 1].startswith("|---|"):
            timed = {j for j, c in enumerate(cells) if re.search(r"(^| )s( |$)|tok/s|prefill s", c.strip("| "))}
        elif line.startswith("| ") and not line.startswith("|---|"):
            cells = ["t" if j in timed else c for j, c in enumerate(cells)]
        out.append(" | ".join(cells))
    return "\n".join(out)


def cut_at(monkeypatch, module, name: str, policy: str, run_cli) -> Callable:
    """Run `run_cli()` with `module.name` (what runs one prompt or conversation under a policy run) raising for the
    runs of `policy`: a run cut there. Returns the real function (put back)."""
    real = getattr(module, name)

    def dies(engine, run, *a):
        if run.name == policy:
            raise RuntimeError("the machine went away")
        return real(engine, run, *a)

    monkeypatch.setattr(module, name, dies)
    with pytest.raises(RuntimeError, match="went away"):
        run_cli()
    monkeypatch.setattr(module, name, real)
    return real


def test_cli_ruler_cut_after_a_policy_keeps_it_and_resume_completes_it(
    tiny_gguf_1k, tmp_path, capsys, cli_threads, monkeypatch
):
    whole = tmp_path / "whole"
    assert ruler_cli(whole, tiny_gguf_1k, tmp_path) == 0
    want = comparable(whole, "ruler")
    assert len(want[0]) == 2 * 2 * 2

    cut = tmp_path / "cut"
    generate = cut_at(monkeypatch, ruler, "generate", "streaming", lambda: ruler_cli(cut, tiny_gguf_1k, tmp_path))
    records, summary, md = comparable(cut, "ruler")
    assert records == want[0][:4] and {r["policy"] for r in records} == {"full"}  # the first policy, whole
    assert summary["full"] == want[1]["full"] and summary["streaming 50%"]["score"] is None
    assert "| full |" in md and re.search(r"\| streaming 50% \| - \| - \| - \|", md)
    assert not list(cut.glob("*.png")) and not list(cut.glob(".*.tmp"))  # heatmaps at the end; no temp file left

    capsys.readouterr()
    assert ruler_cli(cut, tiny_gguf_1k, tmp_path) == 2  # not without --resume: the records there stay
    assert "already holds 4 record(s)" in capsys.readouterr().err
    seen = []

    def counted(engine, run, ids, *a):
        seen.append(run.label)
        return generate(engine, run, ids, *a)

    monkeypatch.setattr(ruler, "generate", counted)
    assert ruler_cli(cut, tiny_gguf_1k, tmp_path, "--resume") == 0
    assert seen == ["streaming 50%"] * 4  # only what was missing ran
    assert comparable(cut, "ruler") == want
    assert sorted(p.name for p in cut.glob("*.png")) == sorted(p.name for p in whole.glob("*.png"))


def test_cli_ruler_resume_with_other_settings_refuses_and_changes_nothing(tiny_gguf_1k, tmp_path, capsys, cli_threads):
    out = tmp_path / "out"
    assert ruler_cli(out, tiny_gguf_1k, tmp_path) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    for flag, value in (("--seed", "1"), ("--kv-dtype", "int8"), ("--max-new-tokens", "3")):
        extra = [flag, value] if flag != "--max-new-tokens" else []
        args = ["eval", "ruler", "--tasks", "niah_single,vt", "--lengths", "400", "--samples", "2"]
        args += ["--policies", "full,streaming", "--budget-frac", "0.5", "--max-new-tokens"]
        args += [value if flag == "--max-new-tokens" else "2", "--out", str(out), "--resume", *extra]
        rc = main([*args, "--model", str(tiny_gguf_1k), "--cache-dir", str(tmp_path / "c"), "--threads", "1"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and "--resume:" in err[0] and "give the same settings" in err[0], err
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    rc = main(["eval", "ruler", "--resume", "--model", str(tmp_path / "never-loaded.gguf")])
    assert rc == 2 and "--resume needs --out" in capsys.readouterr().err
