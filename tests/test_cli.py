"""The `infinichat` command end to end, as a user runs it (subprocesses, real default model)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"


def run(args: list[str], cache: Path, stdin: str = "", timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "infinichat", *args, "--cache-dir", str(cache)],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cli-cache")


@pytest.mark.slow
def test_generate_greedy_is_deterministic_and_seeded_sampling_repeats(cache):
    greedy = [run(["generate", "The capital of France is", "-n", "12", "--temperature", "0"], cache) for _ in range(2)]
    assert greedy[0].returncode == 0, greedy[0].stderr
    assert "Paris" in greedy[0].stdout
    assert greedy[0].stdout == greedy[1].stdout
    seeded = [
        run(["generate", "Once upon a time", "-n", "16", "--seed", "7", "--temperature", "1.0"], cache)
        for _ in range(2)
    ]
    assert seeded[0].returncode == 0 and seeded[0].stdout.strip()
    assert seeded[0].stdout == seeded[1].stdout


@pytest.mark.slow
def test_chat_answers_each_turn_and_exits(cache, tmp_path):
    out = run(
        ["chat", "-n", "24", "--temperature", "0", "--data-dir", str(tmp_path)],
        cache,
        stdin="Hello!\nWhat is the capital of France?\n:exit\n",
    )
    assert out.returncode == 0, out.stderr
    replies = out.stdout.split("bot>")[1:]
    assert len(replies) == 2 and all(r.split("you>")[0].strip() for r in replies), out.stdout
    assert "Paris" in replies[1]


@pytest.mark.slow
def test_story_streams_text(cache):
    out = run(["story", "a dragon who is afraid of fire", "-n", "40", "--seed", "1"], cache)
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.split()) >= 15


@pytest.mark.slow
def test_generate_with_a_hugging_face_folder(tmp_path, cache):
    """--model with a checkpoint folder (config.json + safetensors + tokenizer files)."""
    transformers = pytest.importorskip("transformers")
    import torch

    from infinichat.model.loader import default_model_path

    gguf = default_model_path()
    tok = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    folder = tmp_path / "tiny-hf"
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    out = run(["generate", "Hello there", "-n", "5", "--temperature", "0", "--model", str(folder)], cache)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip(), "a random model still produces some text"
