"""benchmarks/gpu_check.py runs: its dry run (tiny shapes, the CPU) goes through every section but the CUDA-marked
tests (run on a GPU only) and writes its report. The figures of a dry run mean nothing; the code paths do."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_writes_a_report(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    sections = ["parity", "speed", "quant", "compile", "omnikv"]
    cmd = [sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--device", "cpu", "--repeats", "1"]
    cmd += ["--decode", "4", "--out", str(tmp_path), "--sections", *sections]
    run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["meta"]["dry_run"] and report["meta"]["device"] == "cpu"
    assert list(report["sections"]) == sections
    for name, sec in report["sections"].items():
        assert sec["status"] == "ok" and sec["rows"], name
    rows = report["sections"]
    assert {r["dtype"] for r in rows["parity"]["rows"]} == {"float32", "bfloat16"}
    assert all(r["ok"] for r in rows["parity"]["rows"])  # transformers parity on the tiny model
    assert [r["weights"] for r in rows["quant"]["rows"]] == ["bf16", "int8", "int4"]
    assert {r["step"] for r in rows["compile"]["rows"]} == {"layers", "static"}
    assert all(r["rel_diff"] <= 1e-2 for r in rows["compile"]["rows"])  # the static step's logits (bf16)
    runs = {r["run"] for r in rows["omnikv"]["rows"]}
    assert runs == {"full", "omnikv", "omnikv offload", "brutal offload"}
    assert "[omnikv]" in (tmp_path / "report.txt").read_text()


def test_gpu_check_without_cuda_is_one_clear_line():
    import torch

    if torch.cuda.is_available():
        return
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    run = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 2 and "torch sees no CUDA device" in run.stderr and "Traceback" not in run.stderr
