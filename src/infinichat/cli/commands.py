"""The CLI commands. Each loads the model, then streams text to the terminal with rich."""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass, field

from rich.console import Console
from rich.text import Text

from infinichat.cli.chat import breakers_of
from infinichat.engine.base import Engine
from infinichat.engine.sampling import DRY_BREAKERS, SamplingParams
from infinichat.engine.textgen import Generation, stream_text
from infinichat.errors import InfinichatError
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
    from infinichat.engine.backends import load_engine as build

    err = _err_console()
    with err.status("loading model...", spinner="dots"):
        engine, tok, _, name = build(
            args.backend,
            args.model,
            args.dtype,
            args.threads,
            args.cache_dir,
            show_progress=err.is_terminal,
            quant=getattr(args, "quant", "none"),
            n_ctx=n_ctx,
            device=getattr(args, "device", "auto"),
            compile=getattr(args, "compile", False),
            kv_dtype=getattr(args, "kv_dtype", "auto"),
        )
    return tok, name, engine


def _load(args: argparse.Namespace) -> tuple[Tokenizer, str, Engine]:
    if args.ctx < 0:
        raise InfinichatError(f"--ctx must be a positive number of tokens, got {args.ctx}")
    return load_engine(args, n_ctx=args.ctx or None)


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    """The sampling flags (or a config file's [sampling]) as checked SamplingParams."""
    breakers = breakers_of(args.dry_sequence_breaker)
    params = SamplingParams(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repeat_penalty,
        repeat_last_n=args.repeat_last_n,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        dry_multiplier=args.dry_multiplier,
        dry_base=args.dry_base,
        dry_allowed_length=args.dry_allowed_length,
        dry_penalty_last_n=args.dry_penalty_last_n,
        dry_sequence_breakers=DRY_BREAKERS if breakers is None else tuple(breakers),
        xtc_probability=args.xtc_probability,
        xtc_threshold=args.xtc_threshold,
        seed=args.seed,
        max_tokens=args.max_tokens,
        stop=tuple(args.stop),
        top_logprobs=5 if getattr(args, "show_probs", False) else 0,
    )
    params.validate()
    return params


@dataclass
class Timing:
    """When the generation started, and when each token came."""

    start: float
    stamps: list[float] = field(default_factory=list)

    def summary(self, prompt_tokens: int, max_tokens: int, finish: str) -> str:
        """One line for stderr: tokens out of the maximum, decode rate, prompt time, why it ended."""
        n = len(self.stamps)
        if not n:
            return f"0 tokens (prompt {prompt_tokens} tokens in {time.perf_counter() - self.start:.1f} s; {finish})"
        first = self.stamps[0] - self.start  # the prompt's evaluation and the first token
        rate = f"{(n - 1) / (self.stamps[-1] - self.stamps[0]):.1f} tok/s" if n > 1 else "- tok/s"
        return (
            f"{n} of at most {max_tokens} tokens, {rate} (prompt {prompt_tokens} tokens, first token after "
            f"{first:.2f} s; {finish})"
        )


def _stream(console: Console, chunks, timing: Timing | None = None) -> list:
    """Print text as it comes; return the steps (token, logprob, alternatives)."""
    steps = []
    try:
        for chunk in chunks:
            if chunk.text:
                console.print(chunk.text, end="", markup=False)
            if chunk.step is not None:
                steps.append(chunk.step)
                if timing is not None:
                    timing.stamps.append(time.perf_counter())
    finally:
        console.print()
    return steps


def _run_prompt(args: argparse.Namespace, prompt: list[dict] | str) -> int:
    """Generate after `prompt`: chat messages (rendered with the model's template) or raw text."""
    params = sampling_params(args)  # bad flags are reported before the (possibly slow) model load
    tok, _, engine = _load(args)
    if isinstance(prompt, str):
        ids = tok.encode(prompt, add_bos=tok.add_bos, parse_special=False)
    else:
        ids = tok.encode(tok.apply_chat_template(prompt, add_generation_prompt=True), add_bos=tok.add_bos)
    cache = engine.new_sequence(budget=args.ctx or None, policy="streaming")  # never runs out of room
    console = _console()
    result = Generation()
    timing = Timing(time.perf_counter())
    finish = None  # an error (out of memory...) prints no summary: its one line follows
    err = _err_console()
    chunks = stream_text(engine, tok, cache, ids, params, result=result)
    try:
        if err.is_terminal and not console.is_terminal:  # the text goes to a file: progress on the terminal
            with err.status("", spinner="dots") as status:
                chunks = _progress(chunks, status, timing, params.max_tokens)
                steps = _stream(console, chunks, timing)
        else:
            steps = _stream(console, chunks, timing)
        finish = {"stop": "the text ended", "length": "reached --max-tokens"}.get(result.finish_reason, "stopped")
    except KeyboardInterrupt:
        finish = "stopped with Ctrl-C"
        raise
    finally:  # the speed goes to stderr, after the text: stdout stays the text alone
        if finish is not None:
            err.print(f"[dim]{timing.summary(len(ids), params.max_tokens, finish)}[/]", highlight=False, soft_wrap=True)
    if getattr(args, "show_probs", False):
        console.print(_probs_table(tok, steps))
    return 0


def _progress(chunks, status, timing: Timing, max_tokens: int):
    """The chunks, updating a status line: tokens so far of the maximum, and the rate."""
    for chunk in chunks:
        yield chunk
        n = len(timing.stamps)
        if n > 1 and n % 4 == 0:
            rate = (n - 1) / (timing.stamps[-1] - timing.stamps[0])
            status.update(f"{n}/{max_tokens} tokens, {rate:.1f} tok/s")


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
    return _run_prompt(args, messages)


def generate(args: argparse.Namespace) -> int:
    return _run_prompt(args, args.prompt)


def chat(args: argparse.Namespace) -> int:
    """Terminal chat over sessions, in-process or through a server (see cli/chat.py)."""
    from infinichat.cli.chat import chat as run_chat
    from infinichat.cli.main import build_parser

    sampling_params(args)  # bad flags are reported before the (possibly slow) model load
    defaults = vars(build_parser().parse_args(["chat"]))
    return run_chat(args, defaults)
