"""The CLI commands. Each loads the model, then streams text to the terminal with rich."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from rich.console import Console
from rich.text import Text

from infinichat.engine.base import Engine
from infinichat.engine.sampling import SamplingParams
from infinichat.engine.textgen import Generation, stream_text
from infinichat.engine.torch_engine import TorchEngine, set_threads
from infinichat.errors import InfinichatError
from infinichat.model.loader import load_model
from infinichat.model.tokenizer import Tokenizer

STORY_SYSTEM = (
    "You are a gifted storyteller. Write vivid, coherent stories with characters, dialogue and a plot "
    "that moves forward."
)


def _console() -> Console:
    return Console(highlight=False, soft_wrap=True)


def _err_console() -> Console:
    return Console(stderr=True, highlight=False)


def load_engine(args: argparse.Namespace, n_ctx: int | None = None) -> tuple[Tokenizer, str, Engine]:
    """Tokenizer, model name and engine of `--backend` (llamacpp: a context of `n_ctx` tokens, default the
    trained context)."""
    if args.threads < 0:
        raise InfinichatError(f"--threads must be a positive number, got {args.threads}")
    err = _err_console()
    if args.backend == "llamacpp":
        from infinichat.engine.llamacpp import load_llamacpp

        set_threads(1)  # torch only samples here; its threads would compete with llama.cpp's for the cores
        with err.status("loading model...", spinner="dots"):
            return load_llamacpp(args.model, n_ctx=n_ctx, threads=args.threads or None)
    set_threads(args.threads or None)
    with err.status("loading model...", spinner="dots"):
        loaded = load_model(
            args.model, args.dtype, Path(args.cache_dir) if args.cache_dir else None, show_progress=err.is_terminal
        )
    return loaded.tokenizer, loaded.name, TorchEngine(loaded.model, loaded.tokenizer.eos_ids)


def _load(args: argparse.Namespace) -> tuple[Tokenizer, str, Engine]:
    if args.ctx < 0:
        raise InfinichatError(f"--ctx must be a positive number of tokens, got {args.ctx}")
    return load_engine(args, n_ctx=args.ctx or None)


def _params(args: argparse.Namespace) -> SamplingParams:
    params = SamplingParams(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repeat_penalty,
        repeat_last_n=args.repeat_last_n,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        seed=args.seed,
        max_tokens=args.max_tokens,
        stop=tuple(args.stop),
        top_logprobs=5 if getattr(args, "show_probs", False) else 0,
    )
    params.validate()
    return params


def _stream(console: Console, chunks) -> list:
    """Print text as it comes; return the steps (token, logprob, alternatives)."""
    steps = []
    for chunk in chunks:
        if chunk.text:
            console.print(chunk.text, end="", markup=False)
        if chunk.step is not None:
            steps.append(chunk.step)
    console.print()
    return steps


def _run_prompt(args: argparse.Namespace, messages: list[dict] | None, raw: str | None) -> int:
    params = _params(args)  # bad flags are reported before the (possibly slow) model load
    tok, _, engine = _load(args)
    if messages is not None:
        ids = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True), add_bos=tok.add_bos)
    else:
        ids = tok.encode(raw, add_bos=tok.add_bos, parse_special=False)
    cache = engine.new_sequence(budget=args.ctx or None, policy="streaming")  # never runs out of room
    console = _console()
    steps = _stream(console, stream_text(engine, tok, cache, ids, params))
    if getattr(args, "show_probs", False):
        console.print(_probs_table(tok, steps))
    return 0


def _probs_table(tok, steps) -> Text:
    """Each token with the probability it was sampled with, and its top alternatives."""
    out = Text()
    for s in steps:
        others = [(i, lp) for i, lp in s.top if i != s.token][:3]
        alts = ", ".join(f"{tok.decode([i])!r} {math.exp(lp):.0%}" for i, lp in others)
        out.append(f"{tok.decode([s.token])!r} {math.exp(s.logprob):.0%}", style="bold")
        out.append(f"  ({alts})\n" if alts else "\n", style="dim")
    return out


def story(args: argparse.Namespace) -> int:
    messages = [
        {"role": "system", "content": STORY_SYSTEM},
        {"role": "user", "content": f"Write a story about {args.prompt}."},
    ]
    return _run_prompt(args, messages, None)


def generate(args: argparse.Namespace) -> int:
    return _run_prompt(args, None, args.prompt)


def chat(args: argparse.Namespace) -> int:
    """Terminal chat. The cache keeps the conversation: each turn re-renders the template, keeps the
    longest common token prefix in the cache and evaluates only the rest."""
    params = _params(args)  # bad flags are reported before the (possibly slow) model load
    tok, name, engine = _load(args)
    # StreamingLLM: the conversation never runs out of room; the oldest turns are evicted past the budget
    cache = engine.new_sequence(budget=args.ctx or None, policy="streaming")
    messages: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    console = _console()
    console.print(f"[dim]{name} · {cache.capacity} tokens of context · :exit to leave[/]")
    while True:
        try:
            line = console.input("[bold green]you>[/] ")
        except EOFError:
            console.print()
            return 0
        text = line.strip()
        if not text:
            continue
        if text in (":exit", ":quit", ":q"):
            return 0
        messages.append({"role": "user", "content": text})
        ids = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True), add_bos=tok.add_bos)
        keep = _common_prefix(cache.token_ids(), ids, limit=len(ids) - 1)
        cache.truncate(keep)  # after evictions the cache no longer holds the whole history: re-feed from
        result = Generation()  # the first difference (the sessions layer replaces this with per-turn segments)
        console.print("[bold cyan]bot>[/] ", end="")
        try:
            _stream(console, stream_text(engine, tok, cache, ids[keep:], params, history=ids[:keep], result=result))
        except KeyboardInterrupt:
            console.print("[dim] (stopped)[/]")
        messages.append({"role": "assistant", "content": result.text})


def _common_prefix(a: list[int], b: list[int], limit: int) -> int:
    n = min(len(a), len(b), limit)
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i

