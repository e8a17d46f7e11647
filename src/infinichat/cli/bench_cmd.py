"""`infinichat bench latency`: the efficiency sweep (eval/latency.py) from the command line."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from infinichat.errors import InfinichatError


def add_parser(sub: argparse._SubParsersAction, add_model_args: Any) -> None:
    bench = sub.add_parser("bench", help="efficiency benchmarks: the latency-vs-context sweep")
    bench_sub = bench.add_subparsers(dest="bench_command", metavar="BENCH", required=True)
    p = bench_sub.add_parser(
        "latency",
        help="prefill time, decode latency (median, p90), KV and peak memory per KV policy x context length "
        "(JSON + Markdown + PNG plots)",
    )
    g = p.add_argument_group("sweep")
    g.add_argument(
        "--policies",
        default="full,streaming,h2o,snapkv,omnikv",
        metavar="NAMES",
        help="comma-separated KV policies from the registry (default full,streaming,h2o,snapkv,omnikv)",
    )
    g.add_argument(
        "--lengths",
        default="2048,4096,8192",
        metavar="N,N...",
        help="context lengths in tokens (default 2048,4096,8192); take longer ones where memory allows",
    )
    g.add_argument(
        "--budget",
        type=int,
        default=2048,
        metavar="N",
        help="tokens kept (streaming, snapkv, ...) or selected (omnikv's k) (default 2048, as the OmniKV paper)",
    )
    g.add_argument(
        "--budget-frac",
        default="h2o=0.3",
        metavar="POLICY=F[,...]",
        help="policies whose budget is a fraction of the context instead (default h2o=0.3, the paper's baseline)",
    )
    g.add_argument("--decode", type=int, default=16, metavar="N", help="timed decode steps per point (default 16)")
    g.add_argument("--warmup", type=int, default=2, metavar="N", help="untimed decode steps first (default 2)")
    g.add_argument(
        "--n-sink", type=int, default=None, metavar="N", help="attention sinks of every policy that has them"
    )
    g.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="[POLICY.]NAME=VALUE",
        help="a policy parameter, e.g. streaming.n_discard=64 (repeatable)",
    )
    g.add_argument(
        "--past-trained",
        action="store_true",
        help="also run the policies that keep every token (full, omnikv) at lengths past the trained context",
    )
    g.add_argument(
        "--no-isolate",
        action="store_true",
        help="measure every point in this process (faster; the peak RSS is then the high-water mark so far) "
        "instead of one fresh process per point",
    )
    g.add_argument("--seed", type=int, default=0, help="seed of the filler text (default 0)")
    g.add_argument(
        "--out", metavar="DIR", help="where latency.{json,md} and the PNGs go (default results/latency-<time>/)"
    )
    add_model_args(p, ctx=False)


def latency(args: argparse.Namespace) -> int:
    from infinichat.cli.eval_long import parse_list
    from infinichat.engine.backends import check_device_options
    from infinichat.eval import latency as lat
    from infinichat.eval import runner

    if args.backend != "torch":
        raise InfinichatError("bench latency runs on the torch backend (the KV policies are ours); drop --backend")
    where = check_device_options(args.backend, args.device, args.compile)  # before the points' processes start
    if args.decode < 1 or args.warmup < 0 or args.threads < 0:
        raise InfinichatError(
            f"--decode must be >= 1, --warmup and --threads >= 0; got {args.decode}, {args.warmup}, {args.threads}"
        )
    if args.budget < 1:
        raise InfinichatError(f"--budget must be a positive number of tokens, got {args.budget}")
    lengths = parse_list("--lengths", args.lengths, int, "an integer")
    if any(n < 16 for n in lengths):
        raise InfinichatError(f"--lengths must be at least 16 tokens each, got {lengths}")
    names = runner.parse_policies(args.policies)
    params = runner.policy_params(names, args.param, args.n_sink)
    plan = lat.BudgetPlan(args.budget, lat.parse_fracs(args.budget_frac or "", names))
    runs = {n: plan.run_for(n, params[n]) for n in names}
    settings = lat.SweepSettings(
        model=args.model,
        dtype=args.dtype,
        quant=args.quant,
        kv_dtype=args.kv_dtype,
        threads=args.threads,
        cache_dir=args.cache_dir,
        device=str(where),  # auto resolved here: each point's process runs on it, and the report says which
        compile=args.compile,
        decode=args.decode,
        warmup=args.warmup,
        past_trained=args.past_trained,
        seed=args.seed,
    )
    out_dir = Path(args.out) if args.out else Path("results") / time.strftime("latency-%Y%m%d-%H%M%S")
    points = lat.make_points(runs, lengths, names)
    err = Console(stderr=True, highlight=False)

    done: list[dict[str, Any]] = []

    def show(rec: dict[str, Any]) -> None:
        done.append(rec)  # the report so far is rewritten after every point: a long sweep cut short keeps its points
        partial = lat.build_report(done, settings, rec.get("model", "?"), 0, list(runs.values()), lengths, isolate)
        partial["partial"] = True
        lat.write_report(partial, out_dir, plots=False)
        if "skipped" in rec:
            err.print(f"{rec['policy']:>16} {rec['length']:>7}: skipped ({rec['skipped']})")
        else:
            err.print(
                f"{rec['policy']:>16} {rec['length']:>7}: prefill {rec['prefill_s']:.2f} s, decode "
                f"{rec['decode_ms_median']:.1f} ms (p90 {rec['decode_ms_p90']:.1f}), "
                f"KV {rec['kv_bytes'] / 2**20:.1f} MB, "
                f"peak RSS {rec['peak_rss_bytes'] / 2**20:.0f} MB"
            )

    isolate = not args.no_isolate
    records, model, trained = lat.run_sweep(points, settings, isolate=isolate, on_point=show)
    report = lat.build_report(records, settings, model, trained, list(runs.values()), lengths, isolate)
    paths = lat.write_report(report, out_dir)
    console = Console(highlight=False)
    console.print(lat.markdown(report))
    console.print(
        f"results: {paths['json']}  table: {paths['md']}  plots: {paths['latency_png']} {paths['memory_png']}"
    )
    return 0


def run(args: argparse.Namespace) -> int:
    return {"latency": latency}[args.bench_command](args)
