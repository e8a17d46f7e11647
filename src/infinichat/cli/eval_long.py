"""`infinichat eval passkey|niah|ruler|longbench|infinitebench`: long-context retrieval, RULER, LongBench and
InfiniteBench under KV policies."""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from infinichat.errors import InfinichatError
from infinichat.eval.journal import NUMBER

log = logging.getLogger(__name__)

# greedy answer tokens: the default model answers the passkey in ~8 tokens; for niah it first restates the
# question ("The special magic number for quiet-river mentioned in the provided text is 24126.", ~22 tokens)
DEFAULT_MAX_NEW = {"passkey": 12, "niah": 32}


def parse_list(flag: str, text: str, conv: Callable[[str], Any], what: str) -> list:
    """'1024,2048' -> [1024, 2048] (duplicates dropped, order kept); a bad item names the flag."""
    items = []
    for part in (p.strip() for p in str(text).split(",")):
        if not part:
            continue
        try:
            value = conv(part)
        except ValueError:
            raise InfinichatError(f"{flag}: {part!r} is not {what}; give a comma-separated list") from None
        if value not in items:
            items.append(value)
    if not items:
        raise InfinichatError(f"{flag} is empty; give a comma-separated list, each {what}")
    return items


def _policy_runs(args: argparse.Namespace):
    """The policy runs of the command line (checked before the model loads)."""
    from infinichat.eval import runner

    names = runner.parse_policies(args.policies)
    params = runner.policy_params(names, args.param, args.n_sink)
    tokens = parse_list("--budget", args.budget, int, "an integer") if args.budget else None
    fracs = None
    if tokens is None:
        fracs = parse_list("--budget-frac", args.budget_frac or "0.25", float, "a number")
    return runner.make_runs(names, params, tokens, fracs)


def _check_common(args: argparse.Namespace) -> None:
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise InfinichatError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.threads < 0:
        raise InfinichatError(f"--threads must be a positive number, got {args.threads}")


def _load(args: argparse.Namespace):
    """(tokenizer, model name, engine, threads, compute label) through the CLI's shared loader, so --backend
    and --quant apply here as in every other command."""
    from infinichat.cli.commands import load_engine
    from infinichat.engine.torch_engine import physical_cores

    tok, name, engine = load_engine(args)
    if args.backend == "llamacpp":
        compute = "llama.cpp"
    else:
        compute = args.dtype if args.quant == "none" else f"{args.dtype}+{args.quant}"
        if args.kv_dtype != "auto":
            compute += f", KV {args.kv_dtype}"
        if engine.device.type != "cpu":  # recorded with the run (--resume elsewhere is refused)
            compute += f" on {engine.device}"
    return tok, name, engine, args.threads or physical_cores(), compute


def _decoder(tok):
    """Generated ids -> text, special tokens left out (how every long-context eval reads an answer)."""
    return lambda ids: tok.decode(ids, skip_special=True)


def _out_dir(args: argparse.Namespace, task: str) -> Path:
    if getattr(args, "resume", False) and not args.out:
        raise InfinichatError("--resume needs --out: the folder of the run to complete")
    return Path(args.out) if args.out else Path("results") / time.strftime(f"{task}-%Y%m%d-%H%M%S")


def _journal(
    args: argparse.Namespace, out_dir: Path, stem: str, key_fields: tuple[str, ...], fields: dict, **settings: Any
):
    """The run's results file (`<stem>.jsonl`), opened before the model loads: new, or with --resume the one in
    `out_dir`, whose recorded settings must be this command's (the model, how it computes, decoding, and
    `settings`: what else makes the records) and whose records must hold `fields` (what the reports read)."""
    from infinichat.eval.journal import GENERATION, Journal

    model = args.model
    if model is not None and Path(model).exists():
        model = str(Path(model).resolve())
    common = {
        "model": model,
        "backend": args.backend,
        "dtype": args.dtype,
        "quant": args.quant,
        "kv_dtype": args.kv_dtype,
        "max_new_tokens": args.max_new_tokens,
        "seed": args.seed,
    }
    if hasattr(args, "no_chat_template"):
        common["chat_template"] = not args.no_chat_template
    resume = getattr(args, "resume", False)
    return Journal.open(out_dir, stem, {**common, **settings}, key_fields, resume, {**GENERATION, **fields})


def _print_paths(paths: dict, heatmaps: str) -> None:
    """The one line that says where a report's files went."""
    records = paths["json"].with_suffix(".jsonl")
    Console(highlight=False).print(
        f"results: {paths['json']}  tables: {paths['md']}  heatmaps: {heatmaps}  records: {records}"
    )


def _progress(err: Console) -> Progress:
    return Progress(
        TextColumn("{task.description:<34}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[acc]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=err,
        transient=False,
    )


def _write_files(out_dir: Path, stem: str, report: dict, md: str) -> None:
    """`<stem>.json` and `<stem>.md` into `out_dir`, each through a temporary file and a rename."""
    from infinichat.eval.journal import write_text_atomic

    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out_dir / f"{stem}.json", json.dumps(report, indent=1) + "\n")
        write_text_atomic(out_dir / f"{stem}.md", md)
    except OSError as e:
        raise InfinichatError(f"cannot write the results into {out_dir}: {e.strerror or e}") from None


def _print_scores(out_dir: Path, stem: str, report: dict, title: str, columns: list[str], key: str, fmt: str) -> int:
    """Print the summary (per policy: a score per column under `key`, and the mean) as a table, and where the
    files went. Returns the exit code."""

    def show(v: float | None) -> str:
        return "-" if v is None else format(v, fmt)

    rows = [[label, *[show(s[key][c]) for c in columns], show(s["mean"])] for label, s in report["summary"].items()]
    _print_table(title, ["policy", *columns, "mean"], rows)
    Console(highlight=False).print(
        f"results: {out_dir / f'{stem}.json'}  table: {out_dir / f'{stem}.md'}  records: {out_dir / f'{stem}.jsonl'}"
    )
    return 0


def _each_item(err: Console, journal, runs, items: list, group: Callable, one: Callable, write: Callable) -> dict:
    """Every policy run x item (LongBench / InfiniteBench records, in order): `one(run, item)` scores it into a
    result record, appended to the journal with the item's place (`item`) at once; `write()` writes the tables
    (and returns the report) first, after each finished group (`group(item)`: its dataset / task) of a run and
    last. Items already in the journal are skipped (--resume). Returns the last report."""
    journal.begin()
    write()
    with _progress(err) as progress:
        for run in runs:
            bar = progress.add_task(run.label, total=len(items), acc="")
            for i, item in enumerate(items):
                if not journal.has(run.label, i):
                    rec = {"policy": run.label, "item": i, **one(run, item)}
                    journal.append([rec])
                    if i + 1 == len(items) or group(items[i + 1]) != group(item):
                        write()
                    progress.update(bar, acc=f"{group(item)} {100 * rec['score']:.0f}")
                progress.update(bar, advance=1)
    return write()


def _data_report(task: str, args: argparse.Namespace, name: str, compute: str, threads: int, engine) -> dict:
    """The head of a LongBench / InfiniteBench report: what ran, on which files."""
    return {
        "version": 1,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "task": task,
        "model": name,
        "dtype": compute,
        "threads": threads,
        "data": [str(p) for p in args.data],
        "limit": args.limit,
        "max_length": args.max_length or f"{engine.cfg.max_position} - answer tokens - 64",
    }


def _print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    table = Table(title=title)
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i == 0 else "right")
    for r in rows:
        table.add_row(*r)
    Console(highlight=False).print(table)


# ------------------------------------------------------------------------------------------- passkey / niah


def _check_lengths_samples(args: argparse.Namespace) -> list[int]:
    from infinichat.eval import needle

    lengths = parse_list("--lengths", args.lengths, int, "an integer")
    needle.check_lengths(lengths)
    needle.check_samples(args.samples)
    return lengths


def _retrieval(args: argparse.Namespace, task: str) -> int:
    from infinichat.eval import haystack, needle, retrieval
    from infinichat.eval.prompt import prompt_format

    _check_common(args)
    lengths = _check_lengths_samples(args)
    depths = parse_list("--depths", args.depths, float, "a number")
    needle.check_depths(depths)
    variant = getattr(args, "variant", "single")
    n_keys: int = getattr(args, "n_keys", 4)  # niah's --n-keys (passkey has none)
    sentences = None
    if task == "niah":
        needle.check_variant(variant)
        if variant == "multikey":
            needle.check_n_keys(n_keys)  # before the model loads (past 900 the key draw looped forever)
        if args.haystack:
            sentences = haystack.read_sentences(args.haystack)
    runs = _policy_runs(args)
    max_new = args.max_new_tokens or DEFAULT_MAX_NEW[task]
    out_dir = _out_dir(args, task)
    haystack_file = getattr(args, "haystack", None)
    journal = _journal(
        args,
        out_dir,
        task,
        ("policy", "length", "depth", "sample"),
        {"policy": str, "length": int, "depth": NUMBER, "correct": bool, "distractor_answered": bool},
        lengths=lengths,
        depths=depths,
        samples=args.samples,
        variant=variant,
        n_keys=n_keys if variant == "multikey" else None,
        haystack=None if haystack_file is None else str(Path(haystack_file).resolve()),
    )

    err = Console(stderr=True, highlight=False)
    tok, name, engine, threads, compute = _load(args)
    fmt = prompt_format(tok, chat=not args.no_chat_template)
    too_long = [n for n in lengths if n + max_new > engine.cfg.max_position]
    if too_long:
        err.print(
            f"note: lengths {too_long} (+ {max_new} new tokens) exceed the model's trained context "
            f"{engine.cfg.max_position}; full attention goes past the positions it was trained on"
        )
    samples = []
    for n in lengths:
        for d in depths:
            for i in range(args.samples):
                if task == "passkey":
                    samples.append(needle.passkey_sample(tok, fmt, n, d, i, args.seed))
                else:
                    samples.append(needle.niah_sample(tok, fmt, n, d, i, args.seed, variant, n_keys, sentences))

    plan = [(r.label, s.length, s.depth, s.index) for r in runs for s in samples]

    def write(plots: bool) -> dict:
        report = retrieval.build_report(
            task=task,
            variant=variant,
            runs=runs,
            records=journal.ordered(plan),
            lengths=lengths,
            depths=depths,
            samples=args.samples,
            seed=args.seed,
            max_new=max_new,
            model=name,
            dtype=compute,
            threads=threads,
            chat_template=fmt.chat,
            haystack=haystack_file,
            n_keys=n_keys if variant == "multikey" else None,
        )
        return {"report": report, **retrieval.write_report(report, out_dir, plots=plots)}

    decode = _decoder(tok)
    cells = Counter(k[:2] for k in plan if journal.has(*k))  # (policy, length): samples done
    per_cell = len(depths) * args.samples
    journal.begin()
    write(plots=False)
    with _progress(err) as progress:
        bars = {r.label: progress.add_task(r.label, total=len(samples), acc="") for r in runs}
        for k in plan:
            progress.update(bars[k[0]], advance=journal.has(*k))

        def step(run, sample, rec) -> None:
            journal.append([rec])
            cells[(run.label, sample.length)] += 1
            if cells[(run.label, sample.length)] == per_cell:  # a finished cell: the tables again
                write(plots=False)
            mine = [x["correct"] for x in journal.records if x["policy"] == run.label]
            acc = f"acc {100 * sum(mine) / len(mine):.0f}%  len {sample.length}"
            progress.update(bars[run.label], advance=1, acc=acc)

        def done(run, sample) -> bool:
            return journal.has(run.label, sample.length, sample.depth, sample.index)

        retrieval.run_samples(engine, decode, runs, samples, max_new, on_result=step, skip=done)

    paths = write(plots=True)
    header, rows = retrieval.accuracy_rows(paths["report"])
    _print_table(f"{task} accuracy (%), mean over depths, {name}", header, rows)
    _print_paths(paths, f"{out_dir}/{task}-heatmap-*.png")
    return 0


def passkey(args: argparse.Namespace) -> int:
    return _retrieval(args, "passkey")


def niah(args: argparse.Namespace) -> int:
    return _retrieval(args, "niah")


# ------------------------------------------------------------------------------------------------ ruler


def ruler(args: argparse.Namespace) -> int:
    from infinichat.eval import ruler as rl
    from infinichat.eval.prompt import prompt_format

    _check_common(args)
    tasks = rl.check_tasks(parse_list("--tasks", args.tasks, str, "a task name"))
    lengths = _check_lengths_samples(args)
    runs = _policy_runs(args)
    out_dir = _out_dir(args, "ruler")
    journal = _journal(
        args,
        out_dir,
        "ruler",
        ("policy", "task", "length", "sample"),
        {"policy": str, "task": str, "length": int, "score": NUMBER, "score_part": NUMBER},
        lengths=lengths,
        samples=args.samples,
    )

    err = Console(stderr=True, highlight=False)
    tok, name, engine, threads, compute = _load(args)
    fmt = prompt_format(tok, chat=not args.no_chat_template)
    samples = [
        rl.sample(tok, fmt, t, n, i, args.samples, args.seed)
        for t in tasks
        for n in lengths
        for i in range(args.samples)
    ]
    plan = [(r.label, s.task, s.length, s.index) for r in runs for s in samples]

    def write(plots: bool) -> dict:
        report = rl.build_report(
            runs=runs,
            records=journal.ordered(plan),
            tasks=tasks,
            lengths=lengths,
            model=name,
            dtype=compute,
            threads=threads,
            chat_template=fmt.chat,
            seed=args.seed,
            samples=args.samples,
            max_new_tokens=args.max_new_tokens or "per task",
        )
        return {"report": report, **rl.write_report(report, out_dir, plots=plots)}

    decode = _decoder(tok)
    cells = Counter((k[0], k[1], k[2]) for k in plan if journal.has(*k))  # (policy, task, length): samples done
    journal.begin()
    write(plots=False)
    with _progress(err) as progress:
        bars = {r.label: progress.add_task(r.label, total=len(samples), completed=0, acc="") for r in runs}
        for k in plan:
            progress.update(bars[k[0]], advance=journal.has(*k))

        def step(run, sample, rec) -> None:
            journal.append([rec])
            cell = (run.label, sample.task, sample.length)
            cells[cell] += 1
            if cells[cell] == args.samples:  # a finished cell: the tables again
                write(plots=False)
            mine = [x["score"] for x in journal.records if x["policy"] == run.label]
            progress.update(bars[run.label], advance=1, acc=f"score {100 * sum(mine) / len(mine):.0f}%  {sample.task}")

        def done(run, sample) -> bool:
            return journal.has(run.label, sample.task, sample.length, sample.index)

        rl.run_samples(engine, decode, runs, samples, args.max_new_tokens, on_result=step, skip=done)

    paths = write(plots=True)
    for n in lengths:
        _print_table(f"RULER at {n} tokens: string_match_all (%), {name}", *rl.score_rows(paths["report"], n))
    _print_paths(paths, f"{out_dir}/ruler-heatmap-*.png")
    return 0


# ------------------------------------------------------------------------------------------------ multiturn


def multiturn(args: argparse.Namespace) -> int:
    from infinichat.eval import multiturn as mt

    _check_common(args)
    lengths = _check_lengths_samples(args)
    mt.check_turns(args.turns)  # before the model loads (past 900 the keys ran out: the draw looped forever)
    runs = _policy_runs(args)
    out_dir = _out_dir(args, "multiturn")
    if args.data is not None:  # the file's records are checked before the model loads
        from infinichat.eval import longbench as lb

        for d in sorted({r.dataset for r in lb.load_jsonl(args.data, args.dataset)}):
            mt.split_prompt(d)
    journal = _journal(
        args,
        out_dir,
        "multiturn",
        ("policy", "length", "sample"),  # a conversation's turns: written together, skipped together
        {"policy": str, "length": int, "turn": int, "score": NUMBER},
        lengths=lengths,
        samples=args.samples,
        turns=args.turns,
        data=None if args.data is None else str(Path(args.data).resolve()),
        dataset=args.dataset,
    )

    err = Console(stderr=True, highlight=False)
    tok, name, engine, threads, compute = _load(args)
    if args.data is None:
        convs = [
            mt.conversation(tok, n, i, args.samples, args.turns, args.seed)
            for n in lengths
            for i in range(args.samples)
        ]
        source: dict = {"seed": args.seed}
    else:
        convs = [
            c for n in lengths for c in mt.load_conversations(tok, args.data, n, args.turns, args.samples, args.dataset)
        ]
        source = {"data": str(args.data), "datasets": sorted({c.dataset for c in convs})}
    max_new = args.max_new_tokens or (mt.MAX_NEW if args.data is None else "per dataset")
    plan = [(r.label, c.length, c.index) for r in runs for c in convs]
    turns_of = {(c.length, c.index): len(c.turns) for c in convs}
    # a conversation whose turns were not all written (a cut in the middle of their lines) runs again
    whole = Counter(journal.key(r) for r in journal.records)
    journal.discard([k for k in plan if 0 < whole[k] < turns_of[k[1:]]])

    def write(plots: bool) -> dict:
        report = mt.build_report(
            runs=runs,
            records=journal.ordered(plan),
            lengths=lengths,
            turns=max(len(c.turns) for c in convs),  # --data: the most questions of one context
            model=name,
            dtype=compute,
            threads=threads,
            **source,
            samples=args.samples if args.data is None else len(convs) // len(lengths),
            max_new_tokens=max_new,
        )
        return {"report": report, **mt.write_report(report, out_dir, plots=plots)}

    decode = _decoder(tok)
    journal.begin()
    write(plots=False)
    with _progress(err) as progress:
        for run in runs:
            bar = progress.add_task(run.label, total=len(convs), acc="")
            for conv in convs:
                if journal.has(run.label, conv.length, conv.index):
                    progress.update(bar, advance=1)
                    continue
                journal.append(mt.run_conversation(engine, run, conv, args.max_new_tokens or conv.max_new, decode))
                if all(journal.has(run.label, c.length, c.index) for c in convs if c.length == conv.length):
                    write(plots=False)  # a finished (policy, length) cell: the tables again
                mine = [x["score"] for x in journal.records if x["policy"] == run.label]
                progress.update(bar, advance=1, acc=f"score {100 * sum(mine) / len(mine):.0f}%")
    paths = write(plots=True)
    for n in lengths:
        what = "accuracy (%)" if args.data is None else "LongBench score (x100)"
        _print_table(f"multi-turn {what} per turn, {n}-token context, {name}", *mt.turn_rows(paths["report"], n))
    _print_paths(paths, f"{out_dir}/multiturn-*.png")
    return 0


# ------------------------------------------------------------------------------------------------ longbench


def longbench(args: argparse.Namespace) -> int:
    from infinichat.eval import longbench as lb
    from infinichat.eval.longbench_metrics import score_sample
    from infinichat.eval.prompt import prompt_format
    from infinichat.eval.runner import generate

    _check_common(args)
    if not args.data:
        raise InfinichatError("eval longbench needs LongBench-format data: --data FILE.jsonl (repeatable)")
    if args.dataset is not None and args.dataset not in lb.DATASETS:
        raise InfinichatError(f"unknown --dataset {args.dataset!r}; accepted: {', '.join(lb.DATASETS)}")
    if args.limit is not None and args.limit < 1:
        raise InfinichatError(f"--limit must be >= 1, got {args.limit}")
    if args.max_length is not None and args.max_length < 16:
        raise InfinichatError(f"--max-length must be at least 16 tokens, got {args.max_length}")
    records = [r for path in args.data for r in lb.load_jsonl(path, args.dataset, args.limit)]
    runs = _policy_runs(args)
    out_dir = _out_dir(args, "longbench")
    journal = _journal(
        args,
        out_dir,
        "longbench",
        ("policy", "item"),  # the record's place in the files given, in order
        {"policy": str, "dataset": str, "score": NUMBER},
        data=[str(Path(p).resolve()) for p in args.data],
        dataset=args.dataset,
        limit=args.limit,
        max_length=args.max_length,
    )

    err = Console(stderr=True, highlight=False)
    tok, name, engine, threads, compute = _load(args)
    chat_fmt = prompt_format(tok, chat=not args.no_chat_template)
    plain_fmt = prompt_format(tok, chat=False)
    datasets = list(dict.fromkeys(r.dataset for r in records))
    plan = [(r.label, i) for r in runs for i in range(len(records))]

    def one(run, rec) -> dict:
        spec = lb.DATASETS[rec.dataset]
        max_new = args.max_new_tokens or spec.max_gen
        max_length = args.max_length or max(16, engine.cfg.max_position - max_new - 64)
        ids, truncated = lb.build_prompt(tok, rec, max_length, chat_fmt, plain_fmt)
        gen = generate(engine, run, ids, max_new, lambda x: tok.decode(x, skip_special=True))
        pred = lb.postprocess(rec.dataset, gen.text)
        return {
            "dataset": rec.dataset,
            "id": rec.id,
            "line": rec.line,
            "truncated": truncated,
            "prediction": pred,
            "answers": rec.answers,
            "score": score_sample(spec.metric, pred, rec.answers, rec.all_classes),
            **gen.to_json(),
        }

    def write() -> dict:
        results = journal.ordered(plan)
        report = {
            **_data_report("longbench", args, name, compute, threads, engine),
            "chat_template": chat_fmt.chat,
            "datasets": datasets,
            "policies": [r.to_json() for r in runs],
            "summary": lb.records_summary(results, [r.label for r in runs], datasets),
            "results": results,
        }
        _write_files(out_dir, "longbench", report, lb.markdown(report))
        return report

    report = _each_item(err, journal, runs, records, lambda r: r.dataset, one, write)
    return _print_scores(out_dir, "longbench", report, f"LongBench scores, {name}", datasets, "by_dataset", ".2f")


# ------------------------------------------------------------------------------------------- infinitebench


def infinitebench(args: argparse.Namespace) -> int:
    from infinichat.eval import infinitebench as ib
    from infinichat.eval.prompt import prompt_format
    from infinichat.eval.runner import generate

    _check_common(args)
    if args.task is not None:
        ib.check_task(args.task)
    gen_tasks = parse_list("--generate", args.generate, str, "a task name") if args.generate else []
    for t in gen_tasks:
        if t not in ib.GENERATED:
            raise InfinichatError(f"--generate {t!r}: only {', '.join(ib.GENERATED)} can be generated")
    if not args.data and not gen_tasks:
        raise InfinichatError(
            "eval infinitebench needs data: --data FILE.jsonl (InfiniteBench format, repeatable) or "
            f"--generate {','.join(ib.GENERATED)}"
        )
    if args.limit is not None and args.limit < 1:
        raise InfinichatError(f"--limit must be >= 1, got {args.limit}")
    if args.max_length is not None and args.max_length < 16:
        raise InfinichatError(f"--max-length must be at least 16 tokens, got {args.max_length}")
    from infinichat.eval.needle import MAX_LENGTH, MAX_SAMPLES

    # (huge ones were accepted: the records, all generated before the first runs, grew until the memory ran out)
    if not (1 <= args.gen_samples <= MAX_SAMPLES and 64 <= args.gen_length <= MAX_LENGTH):
        raise InfinichatError(
            f"--gen-samples must be from 1 to {MAX_SAMPLES} and --gen-length from 64 to {MAX_LENGTH} tokens, got "
            f"{args.gen_samples}, {args.gen_length}"
        )
    records = [r for path in args.data for r in ib.load_jsonl(path, args.task, args.limit)]
    runs = _policy_runs(args)
    out_dir = _out_dir(args, "infinitebench")
    journal = _journal(
        args,
        out_dir,
        "infinitebench",
        ("policy", "item"),  # the record's place in the files given, then the generated ones
        {"policy": str, "task": str, "score": NUMBER},
        data=[str(Path(p).resolve()) for p in args.data],
        task=args.task,
        limit=args.limit,
        max_length=args.max_length,
        prompts=args.prompts,
        generate=gen_tasks,
        gen_samples=args.gen_samples if gen_tasks else None,
        gen_length=args.gen_length if gen_tasks else None,
    )

    err = Console(stderr=True, highlight=False)
    tok, name, engine, threads, compute = _load(args)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        for t in gen_tasks:  # written next to the results, in the format --data reads
            made = ib.generate(t, args.gen_samples, args.gen_length, lambda s: len(tok.encode(s)), args.seed)
            ib.write_jsonl(made, out_dir / f"{t}-generated.jsonl")
            records += made
    except OSError as e:
        raise InfinichatError(f"cannot write the generated data into {out_dir}: {e.strerror or e}") from None
    chat_fmt = prompt_format(tok, chat=True) if args.prompts == "chat" else prompt_format(tok, chat=False)
    plain_fmt = prompt_format(tok, chat=False)
    tasks = list(dict.fromkeys(r.task for r in records))
    plan = [(r.label, i) for r in runs for i in range(len(records))]

    def one(run, rec) -> dict:
        max_new = args.max_new_tokens or ib.TASKS[rec.task].max_new
        max_length = args.max_length or max(16, engine.cfg.max_position - max_new - 64)
        ids, truncated = ib.build_prompt(tok, rec, max_length, args.prompts, chat_fmt, plain_fmt)
        gen = generate(engine, run, ids, max_new, lambda x: tok.decode(x, skip_special=True))
        return {
            "task": rec.task,
            "id": rec.id,
            "line": rec.line,
            "truncated": truncated,
            "prediction": gen.text,
            "answers": rec.answers,
            "score": ib.score(rec.task, gen.text, rec.answers, rec.options),
            **gen.to_json(),
        }

    def write() -> dict:
        results = journal.ordered(plan)
        report = {
            **_data_report("infinitebench", args, name, compute, threads, engine),
            "generated": {
                t: {"samples": args.gen_samples, "tokens": args.gen_length, "seed": args.seed} for t in gen_tasks
            },
            "prompts": args.prompts,
            "tasks": tasks,
            "policies": [r.to_json() for r in runs],
            "summary": ib.summary(results, [r.label for r in runs], tasks),
            "results": results,
        }
        _write_files(out_dir, "infinitebench", report, ib.markdown(report))
        return report

    report = _each_item(err, journal, runs, records, lambda r: r.task, one, write)
    title = f"InfiniteBench scores, {name}"
    return _print_scores(out_dir, "infinitebench", report, title, tasks, "by_task", ".1f")
