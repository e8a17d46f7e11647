"""`eval filter-layers`: OmniKV filter-layer coverage, checked against from-scratch loops on random
attention, and the CLI on a tiny GGUF (no real weights)."""

from __future__ import annotations

import json
import re

import gguf_util
import pytest
import torch
from test_kv_store import rand_ids, tiny_model

from infinichat.cli.main import main
from infinichat.eval import filter_layers as fl


def random_attention(L: int, Q: int, N: int, seed: int = 0) -> torch.Tensor:
    """(L, Q, N) causal probability rows: query q (slot N - Q + q) sees slots <= its own."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(L, Q, N, generator=g) * 3
    slots = torch.arange(N)
    rows = torch.arange(N - Q, N)
    logits[:, slots[None, :] > rows[:, None]] = float("-inf")
    return torch.softmax(logits, dim=-1)


def test_attention_rows_are_causal_probabilities_of_the_last_queries():
    model = tiny_model(n_layers=3)
    att = fl.attention_rows(model, rand_ids(50), queries=6)  # (L, Q, N)
    assert att.shape == (3, 6, 50)
    assert torch.allclose(att.sum(dim=-1), torch.ones(3, 6), atol=1e-5)
    for q in range(5):  # query q is slot 44 + q: nothing after it
        assert att[:, q, 44 + q + 1 :].abs().max().item() == 0


def test_coverage_equals_a_from_scratch_loop_and_k_everything_covers_all():
    L, Q, N, sinks, k = 4, 5, 40, 2, 6
    att = random_attention(L, Q, N)
    masks = fl.pick_masks(att, k, sinks)
    assert (masks.sum(dim=-1) == sinks + k + Q).all()
    cov = fl.coverage_matrix(att, masks)
    prompt = N - Q
    for c in range(L):
        for later in range(c + 1, L):
            total = 0.0
            for q in range(Q):
                order = sorted(range(sinks, prompt), key=lambda j: -att[c, q, j].item())[:k]
                seen = set(range(sinks)) | set(order) | set(range(prompt, N))
                total += sum(att[later, q, j].item() for j in seen)
            assert cov[c, later].item() == pytest.approx(total / Q, abs=1e-6)
        assert all(v != v for v in cov[c, : c + 1].tolist())  # NaN on and below the diagonal
    everything = fl.coverage_matrix(att, fl.pick_masks(att, 1.0, sinks))
    assert torch.allclose(everything[0, 1:], torch.ones(L - 1, dtype=torch.float64), atol=1e-6)


def test_recommend_finds_the_best_set_and_prefers_a_shallower_first_layer_within_tolerance():
    L = 6
    cov = torch.full((L, L), 0.5, dtype=torch.float64)
    cov[1, 2:] = 0.8
    cov[2, 3:] = torch.tensor([0.904, 0.95, 0.95], dtype=torch.float64)
    cov[3, 4:] = 0.95
    assert fl.served_coverage(cov, (1, 3)) == pytest.approx((0.8 + 0.95 + 0.95) / 3)
    best = fl.best_per_first(cov, 2, max_first=3)  # by hand: (0, 2) 0.826, (1, 2) 0.935, (2, 3) 0.95, (3, 5) 0.95
    assert [f for f, _ in best] == [(0, 2), (1, 2), (2, 3), (3, 5)]
    assert [c for _, c in best] == pytest.approx(
        [(0.5 + 0.904 + 0.95 + 0.95) / 4, (0.904 + 0.95 + 0.95) / 3, 0.95, 0.95]
    )
    assert fl.recommend(cov, 2, max_first=3, tolerance=0.0) == ((2, 3), pytest.approx(0.95))  # tie: shallower
    assert fl.recommend(cov, 2, max_first=3, tolerance=0.02)[0] == (1, 2)  # 0.935 is within 0.02 of 0.95
    assert fl.recommend(cov, 2, max_first=0, tolerance=0.0)[0] == (0, 2)


def test_parse_k():
    assert fl.parse_k("256") == 256 and fl.parse_k("0.1") == 0.1 and fl.parse_k("1.0") == 1.0
    for bad in ("0", "1.5", "-3", "x"):
        with pytest.raises(Exception, match="token count"):
            fl.parse_k(bad)


# ------------------------------------------------------------------ CLI
TEXT = (
    "Call me Ishmael. Some years ago, never mind how long precisely, having little or no money in my "
    "purse, and nothing particular to interest me on shore, I thought I would sail about a little. "
) * 4


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("filter-layers") / "tiny.gguf"
    gguf_util.write_gguf(path, gguf_util.RandomLlama(max_position_embeddings=256))
    return path


def test_cli_writes_json_png_and_table(tiny_gguf, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    n_threads = torch.get_num_threads()
    text = tmp_path / "text.txt"
    text.write_text(TEXT, encoding="utf-8")
    out = tmp_path / "out"
    rc = main(
        [
            "eval",
            "filter-layers",
            "--text",
            str(text),
            "--tokens",
            "200",
            "--queries",
            "8",
            "--k",
            "0.2,16",
            "--filters",
            "1",
            "--out",
            str(out),
            "--model",
            str(tiny_gguf),
            "--cache-dir",
            str(tmp_path / "c"),
            "--threads",
            "1",
            "--device",
            "cpu",
        ]
    )
    torch.set_num_threads(n_threads)
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    report = json.loads((out / "filter_layers.json").read_text())
    assert (out / "filter_layers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "filter_layers.md").read_text()
    assert "| candidate layer |" in md and "float32 on cpu; 200 tokens of text.txt" in md
    assert report["device"] == "cpu" and report["dtype"] == "float32" and report["quant"] == "none"
    L = report["n_layers"]
    assert report["tokens"] == 200 and report["queries"] == 8 and [r["k"] for r in report["results"]] == [0.2, 16]
    assert report["results"][1]["k_tokens"] == 16 and len(report["results"][0]["coverage_of_later_layers"]) == L - 1
    assert len(report["recommended"]) == 1 and 0 <= report["recommended"][0] <= report["max_first"]
    for r in report["results"]:
        assert all(0 <= v <= 1.0001 for v in r["coverage_of_later_layers"])
    assert "Recommended filter layers" in captured.out


@pytest.mark.parametrize(
    "args, pattern",
    [
        ([], r"eval filter-layers needs a text to evaluate: --text FILE"),
        (["--text", "{tmp}/ok.txt", "--k", "2.5"], r"--k '2.5': give a token count"),
        (["--text", "{tmp}/ok.txt", "--tokens", "10"], r"--tokens must be >= 128"),
        (["--text", "{tmp}/ok.txt", "--backend", "llamacpp"], r"filter-layers runs on the torch backend"),
        (["--text", "{tmp}/ok.txt", "--device", "cpu", "--compile"], r"--compile captures the CUDA decode step"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(args, pattern, tmp_path, capsys):
    (tmp_path / "ok.txt").write_text(TEXT, encoding="utf-8")
    rc = main(
        [
            "eval",
            "filter-layers",
            "--model",
            str(tmp_path / "never-loaded.gguf"),
            *[a.format(tmp=tmp_path) for a in args],
        ]
    )
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and re.search(pattern, lines[0]), err


def test_cli_refuses_compile_on_cuda_too(tmp_path, capsys, monkeypatch):
    """On a CUDA device --compile passes the shared check; filter-layers has no decode step for it to capture."""
    import infinichat.kernels

    monkeypatch.setattr(infinichat.kernels, "resolve_device", lambda name: torch.device("cuda", 0))
    (tmp_path / "ok.txt").write_text(TEXT, encoding="utf-8")
    argv = ["eval", "filter-layers", "--text", str(tmp_path / "ok.txt"), "--device", "cuda", "--compile"]
    rc = main([*argv, "--model", str(tmp_path / "never-loaded.gguf")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "filter-layers runs one prompt forward call" in lines[0], lines


@pytest.mark.cuda
def test_attention_rows_on_cuda_equal_the_cpu(tiny_gguf, tmp_path):
    from infinichat.model.loader import load_model

    cpu = load_model(tiny_gguf, "float32", tmp_path, device="cpu")
    gpu = load_model(tiny_gguf, "float32", tmp_path, device="cuda")
    ids = cpu.tokenizer.encode(TEXT, add_bos=True)[:200]
    a, b = fl.attention_rows(cpu.model, ids, 8), fl.attention_rows(gpu.model, ids, 8)
    assert b.device.type == "cpu" and (a - b).abs().max().item() <= 1e-4
