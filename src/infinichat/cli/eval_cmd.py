"""`infinichat eval ...`: evaluation commands. `eval ppl`: long-text perplexity per KV policy; passkey, niah and
longbench live in `eval_long`."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from infinichat.errors import InfinichatError

log = logging.getLogger(__name__)


class TokensPerSecond(ProgressColumn):
    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("" if speed is None else f"{speed:.0f} tok/s", style="progress.data.speed")


def read_text(path: str | None, command: str = "eval ppl") -> str:
    if not path:
        raise InfinichatError(f"{command} needs a text to evaluate: --text FILE (a UTF-8 text file)")
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise InfinichatError(f"cannot read --text {path}: {e.strerror or e}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InfinichatError(
            f"--text {path} is not UTF-8 text (byte {e.start}: {e.reason}); convert it to UTF-8"
        ) from None


def _check_args(args: argparse.Namespace) -> None:
    if args.tokens <= 1:
        raise InfinichatError(f"--tokens must be at least 2 (perplexity needs a prediction), got {args.tokens}")
    if args.budget < 1:
        raise InfinichatError(f"--budget must be a positive number of tokens, got {args.budget}")
    if args.threads < 0:
        raise InfinichatError(f"--threads must be a positive number, got {args.threads}")


def ppl(args: argparse.Namespace) -> int:
    from infinichat.cli.commands import load_engine
    from infinichat.engine.torch_engine import physical_cores
    from infinichat.eval import ppl as ev

    _check_args(args)
    names = ev.parse_policies(args.policy or [ev.DEFAULT_POLICIES])
    text = read_text(args.text)
    ev.check_settings(names, args.budget, args.sinks, args.chunk, args.discard)  # before the slow model load
    out_dir = Path(args.out) if args.out else Path("results") / time.strftime("ppl-%Y%m%d-%H%M%S")

    err = Console(stderr=True, highlight=False)
    threads = args.threads or physical_cores()
    tokenizer, name, engine = load_engine(args)  # llamacpp: a context of the trained length
    trained = engine.cfg.max_position
    specs = ev.make_specs(names, args.budget, args.sinks, args.chunk, trained, discard=args.discard)
    ids = tokenizer.encode(text, add_bos=tokenizer.add_bos, parse_special=False)
    if len(ids) < 2:
        raise InfinichatError(f"--text {args.text} holds {len(ids)} token(s); perplexity needs at least 2")
    n_text = len(ids)
    if len(ids) < args.tokens:
        err.print(f"note: {args.text} holds only {len(ids)} tokens; evaluating all {len(ids)} (--tokens {args.tokens})")
    ids = ids[: args.tokens]

    results = []
    columns = (
        TextColumn("{task.description:<22}"),
        BarColumn(),
        MofNCompleteColumn(),
        TokensPerSecond(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=err, transient=False) as progress:
        tasks = [
            progress.add_task(s.label, total=min(len(ids), s.budget) if s.name == "full" else len(ids)) for s in specs
        ]
        for spec, task in zip(specs, tasks, strict=True):

            def step(seq, done: int, task=task) -> None:
                progress.update(task, completed=done)

            results.append(ev.evaluate(engine, ids, spec, args.chunk, on_chunk=step))

    report = ev.build_report(
        results,
        model=name,
        dtype="llama.cpp" if args.backend == "llamacpp" else args.dtype,
        text=str(args.text),
        text_tokens=n_text,
        chunk=args.chunk,
        trained_context=trained,
        threads=threads,
        quant=args.quant,
        kv_dtype=args.kv_dtype,
        device=str(engine.device),
    )
    paths = ev.write_report(report, out_dir)
    _print_table(report)
    console = Console(highlight=False)
    console.print(f"chunk {args.chunk} token(s) per forward call (the budget holds at every chunk boundary)")
    console.print(f"results: {paths['json']}  plot: {paths['png']}  table: {paths['md']}")
    return 0


def _print_table(report: dict) -> None:
    from infinichat.eval.ppl import table_rows

    header, rows = table_rows(report)
    table = Table(title=f"perplexity, {report['model']}, {report['tokens']} tokens of {Path(report['text']).name}")
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i == 0 else "right")
    for r in rows:
        table.add_row(*r)
    Console(highlight=False).print(table)


def filter_layers(args: argparse.Namespace) -> int:
    from infinichat.engine.backends import check_device_options
    from infinichat.engine.torch_engine import set_threads
    from infinichat.eval import filter_layers as fl
    from infinichat.model.loader import load_model

    ks = tuple(fl.parse_k(v) for arg in (args.k or ["0.1,0.05,0.2"]) for v in arg.split(",") if v.strip())
    if args.tokens < 128 or args.queries < 1 or args.sinks < 0 or args.threads < 0:
        raise InfinichatError(
            f"--tokens must be >= 128, --queries >= 1, --sinks and --threads >= 0; got {args.tokens}, "
            f"{args.queries}, {args.sinks}, {args.threads}"
        )
    if args.backend != "torch":
        raise InfinichatError("eval filter-layers runs on the torch backend (it reads every layer's attention)")
    where = check_device_options(args.backend, args.device, args.compile)
    if args.compile:  # on CUDA: the check above refuses it elsewhere
        raise InfinichatError(
            "--compile captures the one-token decode step; eval filter-layers runs one prompt forward call "
            "(with explicit attention rows) and no decode step: leave --compile out"
        )
    text = read_text(args.text, "eval filter-layers")
    out_dir = Path(args.out) if args.out else Path("results") / time.strftime("filter-layers-%Y%m%d-%H%M%S")
    err = Console(stderr=True, highlight=False)
    set_threads(args.threads or None)
    with err.status("loading model...", spinner="dots"):
        loaded = load_model(
            args.model,
            args.dtype,
            Path(args.cache_dir) if args.cache_dir else None,
            show_progress=err.is_terminal,
            quant=args.quant,
            device=where,
        )
    tokens = min(args.tokens, loaded.cfg.max_position)
    ids = loaded.tokenizer.encode(text, add_bos=loaded.tokenizer.add_bos, parse_special=False)[:tokens]
    settings = fl.Settings(
        ks=ks,
        queries=args.queries,
        n_sink=args.sinks,
        n_filters=args.filters,
        max_first=args.max_first,
        tolerance=args.tolerance,
    )
    with err.status(f"attention of {args.queries} queries over {len(ids)} tokens...", spinner="dots"):
        report = fl.analyze(loaded.model, ids, settings)
    report.update(model=loaded.name, text=Path(args.text).name, dtype=args.dtype, quant=args.quant, device=str(where))
    paths = fl.write_report(report, out_dir)
    console = Console(highlight=False)
    console.print(fl.markdown(report))
    console.print(f"results: {paths['json']}  plot: {paths['png']}  table: {paths['md']}")
    return 0


def run(args: argparse.Namespace) -> int:
    from infinichat.cli import eval_long

    return {
        "ppl": ppl,
        "filter-layers": filter_layers,
        "passkey": eval_long.passkey,
        "niah": eval_long.niah,
        "ruler": eval_long.ruler,
        "multiturn": eval_long.multiturn,
        "longbench": eval_long.longbench,
        "infinitebench": eval_long.infinitebench,
    }[args.eval_command](args)
