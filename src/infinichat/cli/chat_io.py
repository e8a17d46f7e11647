"""The terminal chat's input and output: a line reader (prompt_toolkit line editing and a persistent history in a
terminal, plain `input()` in pipes and tests) and the reply printer (Markdown rendered with rich in a terminal,
the raw text as it streams everywhere else)."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Protocol

from rich.console import Console, ConsoleOptions, RenderableType, RenderResult
from rich.live import Live
from rich.markdown import Markdown
from rich.segment import Segment

Event = tuple[str, object]


class LineReader(Protocol):
    def read(self, prompt: str, default: str = "") -> str:
        """One line typed after `prompt` (rich markup), `default` pre-filled where the reader can edit it.
        EOFError at the end of input; KeyboardInterrupt on Ctrl-C."""
        ...

    @property
    def can_prefill(self) -> bool: ...


class PlainReader:
    """input() through rich (pipes, scripts, tests): no line editing; `default` cannot be pre-filled."""

    can_prefill = False

    def __init__(self, console: Console):
        self.console = console

    def read(self, prompt: str, default: str = "") -> str:
        return self.console.input(prompt)


class ScriptReader:
    """Lines from a list, echoed after their prompt as a terminal would show them (tests, scripted runs)."""

    can_prefill = False

    def __init__(self, console: Console, lines: Iterable[str]):
        self.console, self.lines = console, iter(lines)

    def read(self, prompt: str, default: str = "") -> str:
        self.console.print(prompt, end="")
        line = next(self.lines, None)
        if line is None:
            raise EOFError
        self.console.print(line, markup=False, highlight=False)
        return line


class PromptReader:
    """prompt_toolkit: line editing, Up/Down through a history kept in `history_file` across runs, completion of
    the `:` commands, suggestions from the history (Right accepts)."""

    can_prefill = True

    def __init__(self, history_file: Path | None, commands: list[str]):
        from prompt_toolkit import PromptSession
        from prompt_toolkit.auto_suggest import AutoSuggestFromHistory
        from prompt_toolkit.completion import WordCompleter
        from prompt_toolkit.history import FileHistory, History, InMemoryHistory

        history: History = InMemoryHistory()
        if history_file is not None:
            try:
                history_file.parent.mkdir(parents=True, exist_ok=True)
                history_file.touch()
                history = FileHistory(str(history_file))
            except OSError:
                pass  # a read-only home: this run's lines are still recalled
        completer = WordCompleter(commands, sentence=True, pattern=None)
        self.session: PromptSession = PromptSession(
            history=history, completer=completer, auto_suggest=AutoSuggestFromHistory(), complete_while_typing=False
        )

    def read(self, prompt: str, default: str = "") -> str:
        from prompt_toolkit.formatted_text import ANSI

        return self.session.prompt(ANSI(_ansi(prompt)), default=default)


def _ansi(markup: str) -> str:
    """rich markup as ANSI escapes, for prompt_toolkit's prompt."""
    c = Console(force_terminal=True, color_system="standard", file=None, highlight=False)
    with c.capture() as cap:
        c.print(markup, end="")
    return cap.get()


def make_reader(console: Console, history_file: Path | None, commands: list[str]) -> LineReader:
    """Line editing where both ends are a terminal; plain input() otherwise (pipes keep working)."""
    if sys.stdin.isatty() and sys.stdout.isatty():
        return PromptReader(history_file, commands)
    return PlainReader(console)


class _Tail:
    """While a reply streams, the last screenful of its rendering (the top scrolls away as in a terminal)."""

    def __init__(self, inner: RenderableType):
        self.inner = inner

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        lines = console.render_lines(self.inner, options, pad=False)
        for line in lines[-max(1, console.size.height - 2) :]:
            yield from line
            yield Segment.line()


def print_stream(console: Console, events: Iterator[Event], markdown: bool) -> dict | None:
    """Print a generating action's text as it arrives; return its done info (None when stopped with Ctrl-C).
    `markdown` (a terminal): rendered live with rich, the whole reply once it ends; else the raw text."""
    done: dict | None = None
    text: list[str] = []
    live = Live(console=console, auto_refresh=False, transient=False) if markdown else None
    try:
        if live is not None:
            live.start()
        for kind, data in events:
            if kind != "token":
                done = data if isinstance(data, dict) else None
            elif live is not None:
                text.append(str(data))
                live.update(_Tail(Markdown("".join(text))), refresh=True)
            else:
                console.print(str(data), end="", markup=False, highlight=False)
    except KeyboardInterrupt:
        close = getattr(events, "close", None)
        if close is not None:
            close()
        if live is None:
            console.print("[dim] (stopped)[/]", end="")
        else:
            text.append("\n\n*(stopped)*")
    finally:
        if live is not None:
            live.update(Markdown("".join(text)))
            live.stop()
    if live is None:
        console.print()
    return done
