"""`infinichat bench latency` on a tiny random GGUF model at two short lengths: valid JSON, Markdown and PNG
plots, one fresh process per point; the KV bytes against the store's shape; the skip rule; bad input."""

from __future__ import annotations

import json

import pytest

from infinichat.cli.main import main
from infinichat.errors import InfinichatError
from infinichat.eval import latency as lat
from infinichat.kernels import resolve_device

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_quantile():
    assert lat.quantile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert lat.quantile([1.0, 2.0, 3.0, 4.0], 0.9) == pytest.approx(3.7)
    assert lat.quantile([5.0], 0.9) == 5.0


def test_parse_fracs():
    assert lat.parse_fracs("h2o=0.3, snapkv=0.25", ["h2o", "snapkv"]) == {"h2o": 0.3, "snapkv": 0.25}
    assert lat.parse_fracs("h2o=0.3", ["full", "streaming"]) == {}  # a policy not swept: ignored
    with pytest.raises(InfinichatError, match="not POLICY=FRACTION"):
        lat.parse_fracs("h2o=1.5", ["h2o"])
    with pytest.raises(InfinichatError, match="unknown policy 'h2x'"):
        lat.parse_fracs("h2x=0.3", ["h2o"])


def test_budgets_and_skips():
    plan = lat.BudgetPlan(512, {"h2o": 0.3})
    assert plan.run_for("full", {}).label == "full"
    assert plan.run_for("streaming", {}).tokens == 512
    assert plan.run_for("omnikv", {}).tokens == 512  # selected tokens (k)
    assert plan.run_for("h2o", {}).frac == 0.3
    full, stream = plan.run_for("full", {}), plan.run_for("streaming", {})
    assert lat.skip_reason(lat.Point(full, 8192), 8192, False) is None
    assert "pass the trained context 8192" in (lat.skip_reason(lat.Point(full, 8193), 8192, False) or "")
    assert lat.skip_reason(lat.Point(full, 9000), 8192, True) is None
    assert lat.skip_reason(lat.Point(stream, 32768), 8192, False) is None


def test_sweep_writes_json_markdown_and_png(tiny_gguf_1k, tmp_path, capsys, cli_threads):
    out = tmp_path / "sweep"
    args = ["bench", "latency", "--policies", "full,streaming", "--lengths", "128,256", "--budget", "64"]
    args += ["--decode", "3", "--warmup", "1", "--dtype", "float32", "--threads", "1", "--out", str(out)]
    rc = main([*args, "--model", str(tiny_gguf_1k), "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    report = json.loads((out / "latency.json").read_text())
    assert report["lengths"] == [128, 256] and report["isolate"] is True and "partial" not in report
    assert report["settings"]["device"] == "cpu" and report["settings"]["compile"] is False
    assert report["machine"]["gpu"] is None
    points = report["points"]
    assert [(p["policy"], p["length"]) for p in points] == [
        (label, n) for n in (128, 256) for label in ("full", "streaming 64")
    ]
    for p in points:
        assert p["rss_scope"] == "point" and p["decode_steps"] == 3 and len(p["decode_ms"]) == 3
        assert p["decode_ms_median"] == pytest.approx(sorted(p["decode_ms"])[1], abs=1e-3)
        assert 0 < p["decode_ms_median"] <= p["decode_ms_p90"] <= max(p["decode_ms"])
        assert p["prefill_s"] > 0 and p["peak_rss_bytes"] >= p["rss_at_start_bytes"] > 0
        # K and V: layers x kv heads x capacity x head dim, float32 (the tiny model: 2 layers, 2 kv heads, hd 16)
        assert p["kv_bytes"] == 2 * 2 * 2 * p["capacity"] * 16 * 4
        assert p["kv_used_bytes"] <= p["kv_bytes"]
        assert "peak_gpu_bytes" not in p  # a CUDA device's counter only
    by = {(p["policy"], p["length"]): p for p in points}
    assert by[("full", 256)]["kept_after_prefill"] == 256
    assert by[("streaming 64", 256)]["kept_after_prefill"] <= 64 and by[("streaming 64", 256)]["capacity"] == 64
    for name in ("latency.png", "memory.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    md = (out / "latency.md").read_text()
    assert "| streaming 64 | 256 | 64 |" in md and "each point in a fresh process" in md
    assert "(float32 on cpu, 1 threads," in md and "peak GPU MB" not in md


def test_sweep_in_process_and_skips(tiny_gguf_1k, tmp_path, capsys, cli_threads):
    out = tmp_path / "sweep"
    args = ["bench", "latency", "--policies", "full,h2o", "--lengths", "512,1100", "--budget", "128"]
    args += ["--decode", "2", "--dtype", "float32", "--threads", "1", "--no-isolate", "--out", str(out)]
    assert main([*args, "--model", str(tiny_gguf_1k), "--cache-dir", str(tmp_path / "cache")]) == 0
    report = json.loads((out / "latency.json").read_text())
    assert report["settings"]["device"] == str(resolve_device("auto"))  # the default, resolved: cpu here
    points = report["points"]
    skipped = [p for p in points if "skipped" in p]
    assert [(p["policy"], p["length"]) for p in skipped] == [("full", 1100)]  # trained context 1024
    assert all(p["rss_scope"] == "process so far" for p in points if "skipped" not in p)
    h2o = [p for p in points if p["policy"] == "h2o 30%"]
    assert [p["budget"] for p in h2o] == [round(0.3 * 512), round(0.3 * 1100)]  # past the trained context: bounded
    capsys.readouterr()


def _die(point, settings):  # runs in the point's process: as if the kernel killed it for memory
    import os

    os._exit(9)


def test_a_point_whose_process_dies_is_recorded_and_the_sweep_goes_on(tiny_gguf_1k, tmp_path):
    settings = lat.SweepSettings(model=str(tiny_gguf_1k), dtype="float32", threads=1, cache_dir=str(tmp_path / "c"))
    points = [lat.Point(lat.BudgetPlan(64).run_for("streaming", {}), n) for n in (128, 256)]
    records, _, trained = lat.run_sweep(points, settings, isolate=True, worker=_die)
    assert trained == 1024
    assert [r["skipped"] for r in records] == ["its process died (out of memory?)"] * 2


@pytest.mark.parametrize(
    "extra, pattern",
    [
        (["--lengths", "8"], r"--lengths must be at least 16"),
        (["--decode", "0"], r"--decode must be >= 1"),
        (["--policies", "fast"], r"unknown policy 'fast'"),
        (["--budget-frac", "h2o=2"], r"not POLICY=FRACTION"),
        (["--backend", "llamacpp"], r"runs on the torch backend"),
        (["--device", "tpu"], r"unknown --device 'tpu'; accepted: auto, cpu, cuda, cuda:N"),
    ],
)
def test_bad_input(extra, pattern, capsys):
    assert main(["bench", "latency", *extra]) == 2
    assert __import__("re").search(pattern, capsys.readouterr().err)


@pytest.mark.cuda
def test_sweep_on_cuda_records_the_device_and_its_peak_memory(tiny_gguf_1k, tmp_path, capsys, cli_threads):
    out = tmp_path / "sweep"
    args = ["bench", "latency", "--policies", "full,streaming", "--lengths", "256", "--budget", "64"]
    args += ["--decode", "3", "--dtype", "bfloat16", "--no-isolate", "--out", str(out)]
    rc = main([*args, "--model", str(tiny_gguf_1k), "--cache-dir", str(tmp_path / "c"), "--device", "cuda"])
    assert rc == 0, capsys.readouterr().err
    report = json.loads((out / "latency.json").read_text())
    assert report["settings"]["device"] == "cuda:0" and report["machine"]["gpu"]
    for p in report["points"]:
        assert p["peak_gpu_bytes"] >= p["kv_bytes"] > 0 and p["decode_ms_median"] > 0
    md = (out / "latency.md").read_text()
    assert "on cuda:0 (" in md and "peak GPU MB" in md
