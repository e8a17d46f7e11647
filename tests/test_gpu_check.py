"""benchmarks/gpu_check.py runs: its dry run (tiny shapes, the CPU) goes through every section and writes its
report, on the packages the GPU machine has and no others. The figures of a dry run mean nothing; the code
paths and the imports do: one import of a package that machine lacks, at the top of a module the script or a
CUDA-marked test touches, would cost the one GPU session its section (or every CUDA test)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
# what the GPU machine holds (README, GPU): these distributions and what they require, nothing else
GPU_MACHINE = ("torch", "transformers", "safetensors", "tokenizers", "numpy", "pytest")
BLOCKER = """import os, sys
for name in os.environ.get("GPU_BLOCK", "").split(","):
    if name and name not in sys.modules:  # what the interpreter's start-up imported stays
        sys.modules[name] = None  # import raises ModuleNotFoundError; importlib.util.find_spec says absent
"""


def requirement_closure(names) -> set[str]:
    """The installed distributions `names` and, recursively, what they require (extras left out)."""
    seen: set[str] = set()
    todo = [canonicalize_name(n) for n in names]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        try:
            reqs = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        seen.add(name)
        for r in map(Requirement, reqs):
            if r.marker is None or "extra" not in str(r.marker):
                todo.append(canonicalize_name(r.name))
    return seen


def modules_the_gpu_machine_lacks() -> list[str]:
    """Top-level modules installed here that the GPU machine lacks: all but those of its packages and their
    requirements, less infinichat's own dependencies (but jinja2 and pygments, hard requirements of torch and
    pytest), whatever the versions here pull (transformers pulls rich through typer on this machine, not
    necessarily there)."""
    deps = {canonicalize_name(Requirement(d).name) for d in _pyproject()["project"]["dependencies"]}
    machine = {canonicalize_name(n) for n in (*GPU_MACHINE, "jinja2", "pygments")}
    there = requirement_closure(GPU_MACHINE) - (deps - machine)
    owners = metadata.packages_distributions()
    return sorted(
        m
        for m, dists in owners.items()
        if m.isidentifier()
        and not m.startswith("__")
        and m != "infinichat"
        and not any(canonicalize_name(d) in there for d in dists)
    )


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_the_blocked_packages_are_the_ones_the_gpu_machine_lacks():
    blocked = modules_the_gpu_machine_lacks()
    for name in ("gguf", "rich", "matplotlib", "fastapi", "uvicorn", "llguidance", "greenlet", "nh3", "markdown_it"):
        assert name in blocked, name
    for name in ("torch", "transformers", "numpy", "safetensors", "tokenizers", "jinja2", "pytest", "pygments"):
        assert name not in blocked, name


def test_gpu_check_dry_run_writes_a_report(tmp_path):
    """Every section, the CUDA-marked tests' collection included, with infinichat's other dependencies absent."""
    block = tmp_path / "block"
    block.mkdir()
    (block / "sitecustomize.py").write_text(BLOCKER)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(block), str(REPO / "src")]),  # the CUDA tests' pytest inherits it
        "GPU_BLOCK": ",".join(modules_the_gpu_machine_lacks()),
        "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1",  # the plugins of blocked packages (hypothesis, ...) are not there
    }
    out = tmp_path / "out"
    sections = ["parity", "speed", "quant", "compile", "omnikv", "tests"]
    cmd = [sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--device", "cpu", "--repeats", "1"]
    cmd += ["--decode", "4", "--out", str(out), "--sections", *sections]
    run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["meta"]["dry_run"] and report["meta"]["device"] == "cpu"
    assert list(report["sections"]) == sections
    tests = report["sections"].pop("tests")
    assert tests["status"] == "ok" and tests["pytest_exit"] == 0, tests  # every CUDA test collected (skipped here)
    assert not any(ln.strip().startswith("ERROR") for ln in tests["pytest_tail"]), tests
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
    assert "[omnikv]" in (out / "report.txt").read_text()


def test_gpu_check_without_cuda_is_one_clear_line():
    import torch

    if torch.cuda.is_available():
        return
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    run = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 2 and "torch sees no CUDA device" in run.stderr and "Traceback" not in run.stderr


def test_a_cuda_test_run_cut_short_still_reports_the_tests_it_got_through(monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    assert spec is not None and spec.loader is not None
    gc = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", gc)  # its dataclasses look their module up there
    spec.loader.exec_module(gc)
    partial = b"tests/test_device.py::test_a PASSED [ 50%]\ntests/test_gpu_paths.py::test_b FAILED [ 75%]\n"

    def run(cmd, **kw):
        assert "-m" in cmd and "cuda" in cmd and "--continue-on-collection-errors" in cmd
        raise subprocess.TimeoutExpired(cmd, kw["timeout"], output=partial, stderr=b"")

    monkeypatch.setattr(gc.subprocess, "run", run)
    gc.R.current = {}
    gc.section_tests(None, None, 75.0)
    assert gc.R.current["pytest_exit"] == "timeout"
    assert gc.R.current["pytest_tail"][:2] == [
        "tests/test_device.py::test_a PASSED [ 50%]",
        "tests/test_gpu_paths.py::test_b FAILED [ 75%]",
    ]
