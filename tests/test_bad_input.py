"""Bad model files, folders and flags through the real CLI: one clear line on stderr, exit code 2.

Each case runs `python -m infinichat generate hi --model PATH -n 1 --cache-dir TMP` as a subprocess and
expects: exit code 2; stderr exactly one non-empty line `infinichat: error: ...` that names the file,
says what was wrong and (where there is a choice) what is supported; no traceback. The subprocesses
run a few at a time from one module fixture, as each pays the interpreter and torch start-up.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import gguf_util
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGUFReader
from gguf import GGMLQuantizationType as Q

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Case:
    path: Path  # what --model gets
    wrong: str  # regex (case-insensitive) for what the message must say was wrong
    supported: str | None = None  # regex for what the message must say is accepted


def _make_cases(tmp: Path) -> dict[str, Case]:
    good = tmp / "tiny.gguf"
    gguf_util.write_gguf(good, gguf_util.RandomLlama())
    blob = good.read_bytes()
    data_offset = GGUFReader(good).data_offset
    assert len(blob) > data_offset + 1000 and data_offset > 1000  # both cuts below land where they should

    def file(name: str, content: bytes) -> Path:
        p = tmp / name
        p.write_bytes(content)
        return p

    def folder(name: str, config: str | None) -> Path:
        p = tmp / name
        p.mkdir()
        if config is not None:
            (p / "config.json").write_text(config)
        return p

    mamba = tmp / "mamba.gguf"
    gguf_util.write_gguf(mamba, gguf_util.RandomLlama(), arch="mamba")
    iq4 = tmp / "iq4_nl.gguf"
    rows, cols = 64, 96  # blk.0.ffn_down.weight: (dim, ffn_dim)
    block, size = GGML_QUANT_SIZES[Q.IQ4_NL]
    raw = np.random.default_rng(0).integers(0, 256, (rows, cols // block * size), dtype=np.uint8)
    gguf_util.write_gguf(iq4, gguf_util.RandomLlama(), raw={"blk.0.ffn_down.weight": (raw, Q.IQ4_NL)})
    extra = tmp / "extra-tensor.gguf"  # a Qwen3-style q_norm the llama entry does not read
    gguf_util.write_gguf(extra, gguf_util.RandomLlama(), extra={"blk.0.attn_q_norm.weight": np.ones(16)})
    llama_config = (
        '{"architectures": ["LlamaForCausalLM"], "vocab_size": 271, "hidden_size": 64, '
        '"intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4}'
    )

    return {
        "missing file": Case(tmp / "nope.gguf", r"no such file", r"\.gguf"),
        "empty file": Case(file("empty.gguf", b""), r"empty"),
        "truncated metadata": Case(file("cut-meta.gguf", blob[:1000]), r"truncat"),
        "truncated tensor data": Case(
            file("cut-data.gguf", blob[: data_offset + (len(blob) - data_offset) // 2]), r"truncat|damaged"
        ),
        "random bytes": Case(
            file("random.gguf", np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes()),
            r"not a GGUF file",
        ),
        "unsupported architecture": Case(mamba, r"architecture 'mamba'", r"supported: .*llama"),
        "unsupported tensor type": Case(iq4, r"IQ4_NL", r"supported: .*Q4_0"),
        "unknown tensor": Case(extra, r"blk\.0\.attn_q_norm\.weight", r"llama entry does not use"),
        "empty folder": Case(folder("empty-folder", None), r"no config\.json", r"safetensors"),
        "folder without weights": Case(folder("no-weights", llama_config), r"no \.safetensors"),
        "unsupported HF architecture": Case(
            folder("mamba-hf", '{"architectures": ["MambaForCausalLM"]}'),
            r"architecture 'MambaForCausalLM'",
            r"supported: .*LlamaForCausalLM",
        ),
        "config is not JSON": Case(folder("bad-json", "{architectures: llama"), r"not valid JSON"),
        "unknown suffix": Case(file("model.bin", blob), r"unsupported model file", r"\.gguf"),
    }


# Flags are tried on the good tiny file. The sampling flags are validated only after the model has loaded,
# so those runs also show that the file the bad ones are cut from is fine.
FLAGS = {  # flag arguments -> regex for the flag named in the message
    "negative temperature": (["--temperature", "-1"], r"temperature"),
    "unknown dtype": (["--dtype", "int3"], r"--dtype"),
    "top-p above 1": (["--top-p", "2"], r"top[-_]p"),
    "unknown quant": (["--quant", "int3"], r"--quant"),
    "quant without bfloat16": (["--quant", "int8", "--dtype", "float32"], r"--quant int8 .*bfloat16"),
}


def _run(model: Path, cache: Path, extra: Sequence[str] = ()) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "NO_COLOR": "1", "COLUMNS": "250"}
    cmd = [
        sys.executable,
        "-m",
        "infinichat",
        "generate",
        "hi",
        "--model",
        str(model),
        "-n",
        "1",
        "--cache-dir",
        str(cache),
        "--threads",
        "1",
        *extra,
    ]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad-input")
    cases = _make_cases(tmp)
    assert sorted(cases) == sorted(CASE_NAMES)
    jobs = {name: (case.path, []) for name, case in cases.items()}
    jobs.update({name: (tmp / "tiny.gguf", args) for name, (args, _) in FLAGS.items()})
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {
            name: pool.submit(_run, path, tmp / f"cache-{i}", args)
            for i, (name, (path, args)) in enumerate(jobs.items())
        }
        return cases, {name: f.result() for name, f in futures.items()}


CASE_NAMES = [
    "missing file",
    "empty file",
    "truncated metadata",
    "truncated tensor data",
    "random bytes",
    "unsupported architecture",
    "unsupported tensor type",
    "unknown tensor",
    "empty folder",
    "folder without weights",
    "unsupported HF architecture",
    "config is not JSON",
    "unknown suffix",
]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_bad_model_gives_one_clear_line(name, results):
    cases, runs = results
    case, run = cases[name], runs[name]
    assert "Traceback" not in run.stderr, f"{name}: traceback\n{run.stderr}"
    assert run.returncode == 2, f"{name}: exit code {run.returncode}\nstderr: {run.stderr}"
    lines = run.stderr.splitlines()
    assert len(lines) == 1 and lines[0].strip(), f"{name}: expected one line on stderr, got {lines!r}"
    line = lines[0]
    assert line.startswith("infinichat: error: "), line
    assert str(case.path) in line, f"{name}: the message does not name the file: {line}"
    assert re.search(case.wrong, line, re.IGNORECASE), f"{name}: does not say what was wrong ({case.wrong}): {line}"
    if case.supported:
        assert re.search(case.supported, line, re.IGNORECASE), f"{name}: does not say what is supported: {line}"


@pytest.mark.parametrize("name", list(FLAGS))
def test_bad_flag_names_the_flag(name, results):
    _, runs = results
    run, (args, flag) = runs[name], FLAGS[name]
    assert "Traceback" not in run.stderr, f"{name}: traceback\n{run.stderr}"
    assert run.returncode == 2, f"{name}: exit code {run.returncode}\nstderr: {run.stderr}"
    assert re.search(flag, run.stderr), f"{name}: the message does not name the flag {args[0]}: {run.stderr}"
    assert re.search(re.escape(args[1]), run.stderr), f"{name}: the message does not show the bad value: {run.stderr}"
