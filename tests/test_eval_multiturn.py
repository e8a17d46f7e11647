"""`eval multiturn`: the generated conversation (turn 1 = context + first question, then one question per turn),
the turns in one KV sequence under a policy, and the CLI end to end on a tiny random GGUF model."""

from __future__ import annotations

import json
import re

import pytest
from test_kv_store import rand_ids, tiny_engine

from infinichat.cli.main import main
from infinichat.eval import multiturn
from infinichat.eval.runner import PolicyRun

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_conversation_holds_every_fact_and_asks_each_once(default_tokenizer):
    tok = default_tokenizer
    c = multiturn.conversation(tok, 1200, 0, 4, seed=1)
    assert len(c.turns) == 4 and len(c.turns[0]) == 1200
    context = tok.decode(c.turns[0])
    facts = dict(re.findall(r"One of the special magic numbers for ([a-z-]+) is: (\d+)\.", context))
    assert facts == dict(zip(c.keys, c.values, strict=True))
    for k, ids in zip(c.keys, c.turns, strict=True):
        q = tok.decode(ids)[-200:]
        assert q.endswith(f"The special magic number for {k} mentioned in the provided text is")
    later = tok.decode(c.turns[1])
    assert later.startswith("\n\nWhat is the special magic number for " + c.keys[1]) and "One of" not in later
    assert multiturn.conversation(tok, 1200, 0, 4, seed=1).turns == c.turns
    assert multiturn.conversation(tok, 1200, 1, 4, seed=1).turns != c.turns


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


def test_cli_multiturn_writes_json_markdown_and_a_heatmap(tiny_gguf_1k, tmp_path, capsys, cli_threads):
    out = tmp_path / "out"
    args = ["eval", "multiturn", "--lengths", "700", "--turns", "3", "--samples", "2", "--policies", "full,snapkv"]
    args += ["--budget-frac", "0.5", "--max-new-tokens", "3", "--out", str(out), "--model", str(tiny_gguf_1k)]
    args += ["--cache-dir", str(tmp_path / "c"), "--threads", "1"]
    rc = main(args)
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    report = json.loads((out / "multiturn.json").read_text())
    assert [p["label"] for p in report["policies"]] == ["full", "snapkv 50%"] and report["turns"] == 3
    assert len(report["results"]) == 2 * 2 * 3
    for r in report["results"]:
        assert isinstance(r["correct"], bool) and r["generated"] <= 3
        if r["policy"] == "snapkv 50%":
            assert r["budget"] == 350 and r["cached_after"] <= 350
    s = report["summary"]["snapkv 50%"]["by_length"]["700"]
    assert set(s["by_turn"]) == {"1", "2", "3"}
    md = (out / "multiturn.md").read_text()
    assert "| policy | turn 1 | turn 2 | turn 3 | turns 2+ | mean |" in md
    assert (out / "multiturn-700.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "multi-turn accuracy" in captured.out


def test_cli_multiturn_bad_turns_is_one_line_and_exit_2(tmp_path, capsys):
    rc = main(["eval", "multiturn", "--turns", "0", "--model", str(tmp_path / "never-loaded.gguf")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--turns must be >= 1, got 0" in err[0]
