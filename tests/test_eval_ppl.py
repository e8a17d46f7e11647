"""`eval ppl`: long-text perplexity per KV policy, on tiny random-weight models (fp32, no real weights).

Library level (`infinichat.eval.ppl.evaluate`) on the canonical-layout tiny model of test_kv_store; the
CLI (`infinichat eval ppl`, in-process) on a tiny GGUF file with its byte-level vocabulary.
"""

from __future__ import annotations

import json
import math
import re

import gguf_util
import numpy as np
import pytest
import torch
from test_kv_store import rand_ids, tiny_engine

from infinichat.cli.main import main
from infinichat.eval.ppl import PolicySpec, evaluate, make_specs, ppl, running_series
from infinichat.kv.store import KVStore

REL = 1e-4  # fp32: chunked and token-by-token evaluation differ only by summation order (~1e-6 seen)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def engine():
    return tiny_engine()


def _reference_ppl(engine, ids: list[int]) -> float:
    """exp(mean NLL) by hand, from one plain forward over the whole text."""
    model = engine.model
    store = KVStore(model.cfg, len(ids), rope=model.rope)
    logits = model(torch.tensor(ids), torch.arange(len(ids)), store, 0, all_logits=True)  # (T, V)
    logp = torch.log_softmax(logits[:-1].double(), dim=-1)
    nll = -logp.gather(1, torch.tensor(ids[1:]).unsqueeze(1))
    return math.exp(nll.mean().item())


def test_full_token_by_token_equals_one_plain_forward(engine):
    ids = rand_ids(150, seed=5)
    res = evaluate(engine, ids, PolicySpec("full", engine.cfg.max_position), chunk=1)
    assert np.isnan(res.nll[0]) and not np.isnan(res.nll[1:]).any()
    assert res.stopped_at is None and res.n_tokens == 150 and res.n_evictions == 0
    assert ppl(res.nll) == pytest.approx(_reference_ppl(engine, ids), rel=REL)


def test_full_in_64_token_chunks_equals_token_by_token(engine):
    ids = rand_ids(300, seed=6)
    spec = PolicySpec("full", engine.cfg.max_position)
    exact, chunked = evaluate(engine, ids, spec, chunk=1), evaluate(engine, ids, spec, chunk=64)
    assert ppl(chunked.nll) == pytest.approx(ppl(exact.nll), rel=REL)
    np.testing.assert_allclose(chunked.nll[1:], exact.nll[1:], rtol=1e-4, atol=1e-4)


def test_full_stops_at_the_trained_context(engine):
    ids = rand_ids(engine.cfg.max_position + 40, seed=7)
    res = evaluate(engine, ids, PolicySpec("full", engine.cfg.max_position), chunk=64)
    assert res.stopped_at == engine.cfg.max_position and res.n_tokens == engine.cfg.max_position


@pytest.mark.parametrize(
    "policy, chunk, n_evictions, n_evicted",
    [
        # budget 40, 203 tokens: full after 5 chunks of 8; each of the 21 later chunks evicts 8 (the last
        # chunk holds 3 tokens and still evicts n_discard = 8)
        ("streaming", 8, 21, 168),
        ("window", 8, 21, 168),
        ("streaming", 1, 163, 163),  # token by token: one eviction of one token per token past 40
    ],
)
def test_sliding_policies_keep_the_budget_at_every_chunk(engine, policy, chunk, n_evictions, n_evicted):
    ids = rand_ids(203, seed=8)
    budget, sinks = 40, 4
    (spec,) = make_specs([policy], budget, sinks, chunk, engine.cfg.max_position)
    lengths, sink_ok = [], []

    def watch(seq, done):
        lengths.append(seq.length)
        if policy == "streaming":
            sink_ok.append(seq.token_ids()[:sinks] == ids[: min(sinks, done)])
        assert seq.positions() == list(range(seq.length))  # contiguous positions, below the budget

    res = evaluate(engine, ids, spec, chunk=chunk, on_chunk=watch)
    assert len(lengths) == math.ceil(len(ids) / chunk)  # one forward call per chunk
    assert max(lengths) == budget == res.max_cache
    assert (res.n_evictions, res.n_evicted) == (n_evictions, n_evicted)
    assert all(sink_ok)
    assert not np.isnan(res.nll[1:]).any()


def test_running_series_is_cumulative_and_windowed():
    nll = np.array([np.nan] + [1.0] * 299 + [3.0] * 300)
    s = running_series(nll, every=100, window=50)
    assert s["position"] == [100, 200, 300, 400, 500, 600]
    assert s["cumulative_ppl"][2] == pytest.approx(math.e) and s["window_ppl"][2] == pytest.approx(math.e)
    assert s["window_ppl"][-1] == pytest.approx(math.exp(3.0))
    assert s["cumulative_ppl"][-1] == pytest.approx(math.exp((299 + 900) / 599))


# ----------------------------------------------------------------------------------------------- CLI

TEXT = (
    "Call me Ishmael. Some years ago, never mind how long precisely, having little or no money in my "
    "purse, and nothing particular to interest me on shore, I thought I would sail about a little and "
    "see the watery part of the world. "
) * 3


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval-ppl")
    path = tmp / "tiny.gguf"
    gguf_util.write_gguf(path, gguf_util.RandomLlama(max_position_embeddings=256))
    return path


def test_cli_writes_json_png_and_table(tiny_gguf, tmp_path, capsys, cli_threads):
    text = tmp_path / "text.txt"
    text.write_text(TEXT, encoding="utf-8")
    out = tmp_path / "out"
    rc = main(
        [
            "eval",
            "ppl",
            "--text",
            str(text),
            "--policy",
            "full,window",
            "--policy",
            "streaming,recompute",
            "--budget",
            "64",
            "--sinks",
            "4",
            "--chunk",
            "16",
            "--tokens",
            "400",
            "--out",
            str(out),
            "--model",
            str(tiny_gguf),
            "--cache-dir",
            str(tmp_path / "cache"),
            "--threads",
            "1",
        ]
    )
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    report = json.loads((out / "ppl.json").read_text())
    assert (out / "ppl.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| policy |" in (out / "ppl.md").read_text()
    for key in (
        "version",
        "created",
        "model",
        "dtype",
        "threads",
        "text",
        "text_tokens",
        "tokens",
        "chunk",
        "trained_context",
        "series_every",
        "series_window",
        "policies",
    ):
        assert key in report, key
    assert report["trained_context"] == 256 and report["chunk"] == 16 and report["tokens"] == 400
    assert [p["policy"] for p in report["policies"]] == ["full", "window", "streaming", "recompute"]
    for rec in report["policies"]:
        for key in (
            "label",
            "budget",
            "params",
            "tokens",
            "stopped_at",
            "ppl_trained",
            "ppl_beyond",
            "ppl_all",
            "max_cache",
            "n_evictions",
            "n_evicted",
            "seconds",
            "tokens_per_s",
            "series",
        ):
            assert key in rec, key
        s = rec["series"]
        assert len(s["position"]) == len(s["cumulative_ppl"]) == len(s["window_ppl"])
        assert s["position"][-1] == rec["tokens"]
        assert rec["max_cache"] <= rec["budget"]
    full, window, streaming, _ = report["policies"]
    assert full["stopped_at"] == 256 and full["tokens"] == 256 and full["ppl_beyond"] is None
    assert streaming["label"] == "streaming 4+60" and streaming["params"] == {"n_sink": 4, "n_discard": 16}
    assert streaming["tokens"] == 400 and streaming["ppl_beyond"] is not None and streaming["n_evictions"] > 0
    assert window["params"]["n_sink"] == 0
    assert "streaming 4+60" in captured.out and "ppl all" in captured.out


def test_cli_says_when_the_text_is_shorter_than_asked(tiny_gguf, tmp_path, capsys, cli_threads):
    text = tmp_path / "short.txt"
    text.write_text("Call me Ishmael.", encoding="utf-8")
    rc = main(
        [
            "eval",
            "ppl",
            "--text",
            str(text),
            "--policy",
            "streaming",
            "--budget",
            "32",
            "--chunk",
            "8",
            "--tokens",
            "1000",
            "--out",
            str(tmp_path / "o"),
            "--model",
            str(tiny_gguf),
            "--cache-dir",
            str(tmp_path / "cache"),
            "--threads",
            "1",
        ]
    )
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert re.search(r"holds only \d+ tokens; evaluating all", captured.err)
    report = json.loads((tmp_path / "o" / "ppl.json").read_text())
    assert report["tokens"] == report["text_tokens"] < 1000


BAD = {
    "no --text": ([], r"--text FILE"),
    "missing file": (["--text", "{tmp}/nope.txt"], r"cannot read --text .*nope\.txt"),
    "not UTF-8": (["--text", "{tmp}/latin1.txt"], r"not UTF-8"),
    "budget below sinks + chunk": (["--text", "{tmp}/ok.txt", "--budget", "60"], r"--budget 60 is too small"),
    "unknown policy": (["--text", "{tmp}/ok.txt", "--policy", "streaming,h3o"], r"unknown policy 'h3o'.*accepted"),
    "decode-only policy": (["--text", "{tmp}/ok.txt", "--policy", "omnikv"], r"'omnikv' cannot be evaluated by perp"),
    "tokens <= 1": (["--text", "{tmp}/ok.txt", "--tokens", "1"], r"--tokens must be at least 2"),
    "chunk above 64": (["--text", "{tmp}/ok.txt", "--chunk", "65"], r"--chunk must be in \[1, 64\]"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_cli_bad_input_is_one_line_and_exit_2(case, tmp_path, capsys):
    (tmp_path / "latin1.txt").write_bytes("Ahab's p\xeaquod".encode("latin-1"))
    (tmp_path / "ok.txt").write_text(TEXT, encoding="utf-8")
    args, pattern = BAD[case]
    rc = main(["eval", "ppl", "--model", str(tmp_path / "never-loaded.gguf"), *[a.format(tmp=tmp_path) for a in args]])
    err = capsys.readouterr().err
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("infinichat: error: "), err
    assert re.search(pattern, lines[0]), lines[0]


@pytest.mark.parametrize("kv_dtype", ["int8", "int4", "int4h"])
def test_cli_kv_dtype_reaches_the_store_and_the_report(kv_dtype, tiny_gguf, tmp_path, capsys, cli_threads):
    """--kv-dtype int8 / int4 / int4h: the run's perplexities stay within 3% of the float32 KV run's on this tiny
    model (streaming: removals with re-rotation on the quantized store), and the JSON says which it used."""
    text = tmp_path / "text.txt"
    text.write_text(TEXT, encoding="utf-8")
    ppl = {}
    for kv in ("auto", kv_dtype):
        out = tmp_path / kv
        args = ["eval", "ppl", "--text", str(text), "--policy", "full,streaming", "--budget", "64", "--chunk", "16"]
        args += ["--tokens", "300", "--out", str(out), "--model", str(tiny_gguf), "--cache-dir", str(tmp_path / "c")]
        assert main([*args, "--threads", "1", "--kv-dtype", kv]) == 0
        report = json.loads((out / "ppl.json").read_text())
        assert report["kv_dtype"] == kv
        ppl[kv] = [p["ppl_all"] for p in report["policies"]]
    assert ppl[kv_dtype] != ppl["auto"]  # the quantized store did run
    for a, b in zip(ppl[kv_dtype], ppl["auto"], strict=True):
        assert a == pytest.approx(b, rel=0.03)
