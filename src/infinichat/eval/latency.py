"""The efficiency sweep (`infinichat bench latency`): prefill time, per-token decode latency and memory for each
KV policy at each context length, like the OmniKV paper's latency and memory figures.

Each (policy, length) point loads the model, prefills `length` tokens of the passkey filler under the policy
(at its budget: absolute tokens, or a fraction of the context for the policies given one, e.g. H2O at 30%),
then decodes `decode` greedy tokens one forward call each, after `warmup` untimed steps. Recorded per point:

- `prefill_s`: the whole prompt through the policy (chunked prefill, evictions and compression included);
- `decode_ms_median`, `decode_ms_p90`: the timed decode steps, one token each;
- `kv_bytes`: the KV buffers the sequence holds (its store's K and V tensors: preallocated and zeroed, so
  resident), and `kv_used_bytes`: the part that holds cached tokens after the last step;
- `peak_rss_bytes`: the process's resident-memory high-water mark (`VmHWM`, else `ru_maxrss`). It is per
  process lifetime, so each point runs in a fresh process by default (`isolate`); in-process points report
  the high-water mark of every point so far (`rss_scope` says which);
- on a CUDA device, `peak_gpu_bytes`: the device memory torch allocated at most during the point (its counter
  is reset before the prefill; the model's weights count). Timings wait for the device (synchronize).

A policy that keeps every token (full, omnikv) is skipped at context lengths past the model's trained context
unless `past_trained` is set: its positions would run past those the model was trained on. Policies with a bounded
cache (streaming, h2o, snapkv, ...) run at any length.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import random
import resource
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch

from infinichat.errors import InfinichatError
from infinichat.eval.haystack import passkey_filler
from infinichat.eval.prompt import encode_text
from infinichat.eval.runner import PolicyRun, new_sequence, policy_class, selection_budget_field
from infinichat.kv.store import KVStore

log = logging.getLogger(__name__)

JSON_VERSION = 1


@dataclass(frozen=True)
class SweepSettings:
    """What every point of a sweep shares (picklable: it travels to the point's process)."""

    model: str | None
    dtype: str
    quant: str = "none"
    kv_dtype: str = "auto"
    threads: int = 0
    cache_dir: str | None = None
    device: str = "cpu"  # a resolved torch device (cpu, cuda:0): recorded, so results of two devices do not mix
    compile: bool = False
    decode: int = 16
    warmup: int = 2
    past_trained: bool = False
    seed: int = 0


@dataclass(frozen=True)
class Point:
    """One policy run at one context length."""

    run: PolicyRun
    length: int


def quantile(xs: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile of a non-empty sample (q in [0, 1])."""
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def peak_rss_bytes() -> int:
    """The resident-memory high-water mark of this process, in bytes."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if platform.system() == "Darwin" else peak * 1024  # macOS: bytes, Linux: KiB


def context_ids(tok: Any, n: int, seed: int) -> list[int]:
    """Exactly `n` tokens: BOS (if the model adds one), then the passkey filler."""
    ids = [tok.bos_id] if tok.add_bos and tok.bos_id is not None else []
    sentences = passkey_filler(random.Random(seed))
    while len(ids) < n:
        ids.extend(encode_text(tok, " " + next(sentences)))
    return ids[:n]


def base_record(point: Point) -> dict[str, Any]:
    return {"policy": point.run.label, "name": point.run.name, "length": point.length}


def skip_reason(point: Point, trained: int, past_trained: bool) -> str | None:
    """Why a point does not run (None: it runs): a policy that keeps every token, at a context past the trained
    one (the few decoded tokens after a context of exactly the trained length do not count)."""
    cls = policy_class(point.run.name)
    if not past_trained and not cls.drops_tokens and point.length > trained:
        return f"keeps every token, and {point.length} tokens pass the trained context {trained}"
    return None


def measure(engine: Any, tok: Any, point: Point, settings: SweepSettings) -> dict[str, Any]:
    """Prefill and decode one point on a loaded engine; the point's record."""
    trained = engine.cfg.max_position
    steps = settings.warmup + settings.decode
    base = base_record(point)
    reason = skip_reason(point, trained, settings.past_trained)
    if reason is not None:
        return {**base, "skipped": reason}
    ids = context_ids(tok, point.length, settings.seed)
    seq, budget = new_sequence(engine, point.run, len(ids), steps)
    rss_loaded = peak_rss_bytes()
    device = engine.model.device
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    logits = engine.prefill(seq, ids)
    if cuda:
        torch.cuda.synchronize(device)  # the prefill's kernels are done, not just queued
    prefill_s = time.perf_counter() - t0
    kept = seq.length
    times: list[float] = []
    token = int(torch.argmax(logits))
    for i in range(steps):
        t = time.perf_counter()
        logits = engine.decode_one(seq, token)
        token = int(torch.argmax(logits))  # reads the logits: waits for the step's kernels on a CUDA device too
        dt = time.perf_counter() - t
        if i >= settings.warmup:
            times.append(dt)
    store = seq.store
    if not isinstance(store, KVStore):
        raise InfinichatError("bench latency measures the torch engine's KV store; use --backend torch")
    kv_bytes = int(store.nbytes)
    per_token = kv_bytes // max(1, seq.capacity)
    ms = [1000 * t for t in times]
    return {
        **base,
        "budget": budget,
        "prompt_tokens": len(ids),
        "kept_after_prefill": kept,
        "kept_at_end": seq.length,
        "capacity": seq.capacity,
        "n_evicted": seq.n_evicted,
        "prefill_s": round(prefill_s, 4),
        "prefill_tok_s": round(len(ids) / prefill_s, 1) if prefill_s > 0 else None,
        "decode_steps": len(ms),
        "decode_ms": [round(x, 3) for x in ms],
        "decode_ms_median": round(statistics.median(ms), 3) if ms else None,
        "decode_ms_p90": round(quantile(ms, 0.9), 3) if ms else None,
        "kv_bytes": kv_bytes,
        "kv_used_bytes": per_token * seq.length,
        "rss_at_start_bytes": rss_loaded,
        "peak_rss_bytes": peak_rss_bytes(),
        **({"peak_gpu_bytes": int(torch.cuda.max_memory_allocated(device))} if cuda else {}),
    }


def _load(settings: SweepSettings) -> tuple[Any, Any, str]:
    from infinichat.engine.backends import load_engine

    engine, tok, _, name = load_engine(
        "torch",
        settings.model,
        settings.dtype,
        settings.threads,
        settings.cache_dir,
        quant=settings.quant,
        kv_dtype=settings.kv_dtype,
        device=settings.device,
        compile=settings.compile,
    )
    return engine, tok, name


def _point_in_fresh_process(point: Point, settings: SweepSettings) -> dict[str, Any]:
    """The child's work: load the model, measure one point (a fresh process: its VmHWM is this point's)."""
    engine, tok, name = _load(settings)
    return {**measure(engine, tok, point, settings), "model": name, "rss_scope": "point"}


def run_sweep(
    points: Sequence[Point],
    settings: SweepSettings,
    isolate: bool = True,
    on_point: Callable[[dict[str, Any]], None] | None = None,
    worker: Callable[[Point, SweepSettings], dict[str, Any]] | None = None,
) -> tuple[list[dict[str, Any]], str, int]:
    """Every point's record, the model name and its trained context. `isolate`: each point in a fresh process
    (spawned, so that nothing of the parent's memory counts); `worker` (a module-level function) measures a
    point there (default: load the model, `measure`)."""
    records: list[dict[str, Any]] = []
    if isolate:
        with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
            name, trained = pool.submit(_trained_context, settings).result()
        for point in points:
            reason = skip_reason(point, trained, settings.past_trained)
            if reason is not None:
                rec = {**base_record(point), "skipped": reason}
            else:
                try:
                    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
                        rec = pool.submit(worker or _point_in_fresh_process, point, settings).result()
                except BrokenProcessPool:  # killed (out of memory, most likely): the sweep goes on without it
                    rec = {**base_record(point), "skipped": "its process died (out of memory?)"}
            records.append(rec)
            if on_point is not None:
                on_point(rec)
        return records, name, trained
    engine, tok, name = _load(settings)
    for point in points:
        rec = {**measure(engine, tok, point, settings), "model": name, "rss_scope": "process so far"}
        records.append(rec)
        if on_point is not None:
            on_point(rec)
    return records, name, engine.cfg.max_position


def _trained_context(settings: SweepSettings) -> tuple[str, int]:
    engine, _, name = _load(settings)
    return name, int(engine.cfg.max_position)


def make_points(runs_by_policy: Mapping[str, PolicyRun], lengths: Sequence[int], order: Sequence[str]) -> list[Point]:
    return [Point(runs_by_policy[p], n) for n in lengths for p in order]


def build_report(
    records: Sequence[dict[str, Any]],
    settings: SweepSettings,
    model: str,
    trained: int,
    runs: Sequence[PolicyRun],
    lengths: Sequence[int],
    isolate: bool,
) -> dict[str, Any]:
    return {
        "version": JSON_VERSION,
        "task": "latency",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": model,
        "trained_context": trained,
        "settings": asdict(settings),
        "isolate": isolate,
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(settings.device) if settings.device.startswith("cuda") else None,
            "load_avg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        },
        "lengths": list(lengths),
        "policies": [r.to_json() for r in runs],
        "points": list(records),
    }


def device_label(report: dict[str, Any]) -> str:
    """Where the sweep ran: the device (cpu, cuda:0: a report of version 1 before it was recorded ran on the CPU),
    with its name on CUDA, and "compiled" with --compile."""
    s = report["settings"]
    dev = str(s.get("device", "cpu"))
    name = report["machine"].get("gpu")
    return dev + (f" ({name})" if name else "") + (", compiled" if s.get("compile") else "")


def _mb(x: int | None) -> str:
    return "-" if x is None else f"{x / 2**20:.1f}"


def markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    header = [
        "policy",
        "context",
        "budget",
        "kept",
        "prefill s",
        "prefill tok/s",
        "decode ms median",
        "decode ms p90",
        "KV MB",
        "KV used MB",
        "peak RSS MB",
    ]
    gpu = any("peak_gpu_bytes" in p for p in report["points"])
    if gpu:
        header.append("peak GPU MB")
    lines = [
        f"## Latency sweep, {report['model']} ({s['dtype']}"
        + ("" if s["quant"] == "none" else f"+{s['quant']}")
        + f" on {device_label(report)}, {s['threads'] or 'all'} threads, {s['decode']} timed decode steps after "
        f"{s['warmup']} warm-up)\n",
        "| " + " | ".join(header) + " |",
        "|---|" + "---:|" * (len(header) - 1),
    ]
    for p in report["points"]:
        if "skipped" in p:
            lines.append(f"| {p['policy']} | {p['length']} | skipped: {p['skipped']} |" + " |" * (len(header) - 3))
            continue
        row = [
            p["policy"],
            str(p["length"]),
            "-" if p["budget"] is None else str(p["budget"]),
            str(p["kept_after_prefill"]),
            f"{p['prefill_s']:.2f}",
            f"{p['prefill_tok_s']:.0f}" if p["prefill_tok_s"] else "-",
            f"{p['decode_ms_median']:.1f}",
            f"{p['decode_ms_p90']:.1f}",
            _mb(p["kv_bytes"]),
            _mb(p["kv_used_bytes"]),
            _mb(p["peak_rss_bytes"]),
            *([_mb(p.get("peak_gpu_bytes"))] if gpu else []),
        ]
        lines.append("| " + " | ".join(row) + " |")
    scope = "each point in a fresh process" if report["isolate"] else "one process: the high-water mark so far"
    lines.append(f"\nPeak RSS: {scope}. Load average at the end: {report['machine']['load_avg']}.")
    return "\n".join(lines) + "\n"


def _series(report: dict[str, Any], key: str, scale: float = 1.0) -> dict[str, tuple[list[int], list[float]]]:
    out: dict[str, tuple[list[int], list[float]]] = {}
    for p in report["points"]:
        if "skipped" in p or p.get(key) is None:
            continue
        xs, ys = out.setdefault(p["policy"], ([], []))
        xs.append(p["length"])
        ys.append(p[key] * scale)
    return out


MARKERS = "osD^vPX*"  # one per policy: lines that coincide (full and omnikv's KV) stay visible


def _style(i: int) -> dict[str, Any]:
    return {"marker": MARKERS[i % len(MARKERS)], "color": f"C{i % 10}", "markerfacecolor": "none"}


def plot(report: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """`latency.png` (prefill s; decode ms median, p90 dashed) and `memory.png` (KV MB; peak RSS MB) against the
    context length, one line per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def axes_common(ax: Any, ylabel: str) -> None:
        ax.set_xscale("log", base=2)
        ax.set_xticks(report["lengths"], [str(n) for n in report["lengths"]])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(ylabel)
        ax.axvline(report["trained_context"], color="grey", linestyle=":", linewidth=1)
        ax.grid(True, alpha=0.3)

    title = f"{report['model']} ({report['settings']['dtype']}, {device_label(report)})"
    paths = {"latency_png": out_dir / "latency.png", "memory_png": out_dir / "memory.png"}
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5), dpi=110)
    order = {p["label"]: i for i, p in enumerate(report["policies"])}
    for label, (xs, ys) in _series(report, "prefill_s").items():
        a.plot(xs, ys, label=label, **_style(order.get(label, 0)))
    axes_common(a, "prefill (s)")
    a.set_yscale("log")
    a.set_title(f"prefill time, {title}", fontsize=10)
    p90 = _series(report, "decode_ms_p90")
    for label, (xs, ys) in _series(report, "decode_ms_median").items():
        style = _style(order.get(label, 0))
        b.plot(xs, ys, label=f"{label} (median)", **style)
        if label in p90:
            b.plot(*p90[label], linestyle="--", color=style["color"], linewidth=1, label=f"{label} (p90)")
    axes_common(b, "decode latency per token (ms)")
    b.set_title("decode latency (median; p90 dashed)", fontsize=10)
    for ax in (a, b):
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(paths["latency_png"])
    plt.close(fig)

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5), dpi=110)
    for label, (xs, ys) in _series(report, "kv_bytes", 1 / 2**20).items():
        a.plot(xs, ys, label=label, **_style(order.get(label, 0)))
    axes_common(a, "KV buffers held (MB)")
    a.set_title(f"KV memory, {title}", fontsize=10)
    for label, (xs, ys) in _series(report, "peak_rss_bytes", 1 / 2**20).items():
        b.plot(xs, ys, label=label, **_style(order.get(label, 0)))
    axes_common(b, "peak process RSS (MB)")
    b.set_title("peak process memory (VmHWM)", fontsize=10)
    for ax in (a, b):
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(paths["memory_png"])
    plt.close(fig)
    return paths


def write_report(report: dict[str, Any], out_dir: Path, plots: bool = True) -> dict[str, Path]:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = {"json": out_dir / "latency.json", "md": out_dir / "latency.md"}
        paths["json"].write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
        paths["md"].write_text(markdown(report), encoding="utf-8")
        if plots:
            paths.update(plot(report, out_dir))
    except OSError as e:
        raise InfinichatError(f"cannot write the results into {out_dir}: {e.strerror or e}") from None
    return paths


@dataclass
class BudgetPlan:
    """The budget of each policy: `fracs` (policy -> fraction of the context) where given, else `tokens`."""

    tokens: int
    fracs: dict[str, float] = field(default_factory=dict)

    def run_for(self, name: str, params: Mapping[str, Any]) -> PolicyRun:
        cls = policy_class(name)
        if not cls.drops_tokens and selection_budget_field(cls) is None:
            return PolicyRun(name, dict(params))  # keeps everything, no budget applies (full)
        frac = self.fracs.get(name)
        if frac is not None:
            return PolicyRun(name, dict(params), frac=frac)
        return PolicyRun(name, dict(params), tokens=self.tokens)


def parse_fracs(text: str, names: Sequence[str]) -> dict[str, float]:
    """'h2o=0.3,snapkv=0.25' -> {policy: fraction} for the policies among `names` (another registry policy is
    ignored, so the default h2o=0.3 holds whatever --policies lists; an unknown name is an error); each fraction
    in (0, 1]."""
    out: dict[str, float] = {}
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        name, sep, value = item.partition("=")
        try:
            frac = float(value)
        except ValueError:
            frac = -1.0
        if not sep or not 0.0 < frac <= 1.0:
            raise InfinichatError(f"--budget-frac {item!r} is not POLICY=FRACTION with a fraction in (0, 1]")
        policy_class(name.strip())
        if name.strip() in names:
            out[name.strip()] = frac
    return out
