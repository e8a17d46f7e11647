"""`infinichat chat`: the terminal client. One command loop (ChatClient) over a ChatBackend: a server
(`--server URL`) or an in-process SessionManager. Commands start with ':' (cli/chat_commands.py); anything else
is a message. Flags that are session settings create a new session with them, or change a reopened one."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from rich.console import Console

from infinichat.cli.chat_backends import ChatBackend, HttpBackend, LocalBackend
from infinichat.cli.chat_commands import ALIASES, BY_NAME
from infinichat.cli.chat_io import LineReader, make_reader, print_stream
from infinichat.errors import InfinichatError, gpu_out_of_memory

# chat flags that are session settings (used when the session is created) / per-request parameters
SETTING_FLAGS = {
    "temperature": "temperature",
    "top_k": "top_k",
    "top_p": "top_p",
    "min_p": "min_p",
    "repeat_penalty": "repetition_penalty",
    "dry_multiplier": "dry_multiplier",
    "dry_base": "dry_base",
    "dry_allowed_length": "dry_allowed_length",
    "dry_penalty_last_n": "dry_penalty_last_n",
    "dry_sequence_breaker": "dry_sequence_breakers",
    "xtc_probability": "xtc_probability",
    "xtc_threshold": "xtc_threshold",
    "seed": "seed",
    "max_tokens": "max_tokens",
}
PARAM_FLAGS = {
    "repeat_last_n": "repeat_last_n",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "stop": "stop",
}


def breakers_of(flag: list[str] | None) -> list[str] | None:
    """--dry-sequence-breaker values: None (not given) = the defaults, `none` = no breakers."""
    if flag is None:
        return None
    return [] if flag == ["none"] else list(flag)


def _settings(args: argparse.Namespace) -> dict:
    out = {v: getattr(args, k) for k, v in SETTING_FLAGS.items()}
    breakers = breakers_of(args.dry_sequence_breaker)
    if breakers is None:
        del out["dry_sequence_breakers"]  # the session's defaults
    else:
        out["dry_sequence_breakers"] = breakers
    if args.ctx:
        out["budget"] = args.ctx
    if getattr(args, "policy", None):
        out["policy"] = args.policy
    return out


def _given_settings(args: argparse.Namespace, defaults: dict) -> dict:
    """The settings of the flags given on the command line (or in --config), for a reopened session."""
    out = {v: getattr(args, k) for k, v in SETTING_FLAGS.items() if getattr(args, k) != defaults[k]}
    if "dry_sequence_breakers" in out:
        out["dry_sequence_breakers"] = breakers_of(out["dry_sequence_breakers"])
    if args.ctx:
        out["budget"] = args.ctx
    if getattr(args, "policy", None):
        out["policy"] = args.policy
    return out


def _params(args: argparse.Namespace, defaults: dict) -> dict:
    """Sampling flags that are not session settings (penalties' window, stop strings) apply to every action."""
    out = {v: getattr(args, k) for k, v in PARAM_FLAGS.items() if getattr(args, k) != defaults[k]}
    if "stop" in out:
        out["stop"] = list(out["stop"])
    return out


def _same(a: object, b: object) -> bool:
    return _plain(a) == _plain(b)


def _plain(v: object) -> object:
    return list(v) if isinstance(v, (list, tuple)) else v


def _history_file(args: argparse.Namespace) -> Path:
    """Where the typed lines are kept across runs (the data directory, or the default one with --server)."""
    from infinichat.session.manager import default_data_dir

    if args.data_dir and not args.server:
        return Path(args.data_dir) / "chat_history"
    return default_data_dir() / "chat_history"


def _backend(args: argparse.Namespace) -> ChatBackend:
    if args.server:
        return HttpBackend(args.server, args.api_key)
    from infinichat.engine.backends import load_engine
    from infinichat.model.label import model_label
    from infinichat.model.loader import default_model_path
    from infinichat.session.datalock import lock_data_dir
    from infinichat.session.manager import SessionManager, default_data_dir
    from infinichat.session.settings import SessionSettings

    data_dir = args.data_dir or default_data_dir()
    lock = lock_data_dir(data_dir, "chat (in-process)")  # before the model loads: a second writer fails at once
    try:
        err = Console(stderr=True, highlight=False)
        with err.status("loading model...", spinner="dots"):
            engine, tok, model_id, name = load_engine(
                args.backend,
                args.model,
                args.dtype,
                args.threads,
                args.cache_dir,
                show_progress=err.is_terminal,
                quant=getattr(args, "quant", "none"),
                device=getattr(args, "device", "auto"),
                compile=getattr(args, "compile", False),
                kv_dtype=getattr(args, "kv_dtype", "auto"),
            )
        label = model_label(args.model or default_model_path(), name)  # the file's name, not a machine-made title
        return LocalBackend(SessionManager(engine, tok, model_id, data_dir, SessionSettings()), label, lock)
    except BaseException:
        lock.release()
        raise


class ChatClient:
    """The command loop's state: the backend, where lines come from, how replies print, the per-request params;
    `settings` / `system_prompt` create the sessions this client opens new."""

    def __init__(
        self,
        console: Console,
        backend: ChatBackend,
        reader: LineReader,
        params: dict | None = None,
        settings: dict | None = None,
        system_prompt: str | None = None,
        markdown: bool = False,
    ):
        self.console, self.backend, self.reader = console, backend, reader
        self.params = params or {}
        self.settings = settings or {}
        self.system_prompt = system_prompt
        self.markdown = markdown

    # ------------------------------------------------------------------ output
    def note(self, text: str) -> None:
        self.console.print(f"[dim]{_escape(text)}[/]")

    def error(self, text: str) -> None:
        self.console.print("[red]error:[/]", end=" ")
        self.console.print(text, markup=False, highlight=False)

    def show_message(self, m: dict) -> None:
        tag = {"user": "you", "assistant": "bot"}.get(m["kind"], m["kind"])
        alts = f" [{m['selected'] + 1}/{len(m['alternatives'])}]" if len(m["alternatives"]) > 1 else ""
        dim = "" if m.get("in_context", True) and m.get("tokens_in_cache", 1) else " [dim](out of context)[/]"
        self.console.print(f"[bold]{m['turn']:>3} {tag}{_escape(alts)}>[/]{dim} ", end="")
        self.console.print(m["text"], markup=False, highlight=False)

    def show_history(self, h: dict) -> None:
        for m in h["messages"]:
            self.show_message(m)
        c = h.get("cache", {})
        if c.get("resident"):
            self.note(f"cache {c['tokens']}/{c['budget']} tokens, {c['evictions']} evictions")

    # ------------------------------------------------------------------ input
    def ask(self, prompt: str, default: str = "") -> str:
        """A line for a question; the end of input answers with an empty line."""
        try:
            return self.reader.read(prompt, default)
        except EOFError:
            return ""

    def confirm(self, prompt: str) -> bool:
        return self.ask(prompt).strip().lower() in ("y", "yes")

    # ------------------------------------------------------------------ actions
    def act(self, action: str, text: str | None = None) -> dict | None:
        label = {"narrate": "narrator>", "suggest": "suggestion>"}.get(action, "bot>")
        self.console.print(f"[bold cyan]{label}[/]", end="\n" if self.markdown else " ")
        try:
            return print_stream(self.console, self.backend.act(action, self.params, text), self.markdown)
        except (InfinichatError, RuntimeError):  # (RuntimeError: torch's, such as the GPU out of memory)
            if not self.markdown:
                self.console.print()  # the error goes on a line of its own
            raise

    def send(self, text: str) -> dict | None:
        return self.act("send", text)

    def change_settings(self, changes: dict) -> None:
        """Apply setting changes (validated by the session); say which changed, from what to what."""
        old = self.backend.history()["settings"]
        changes = {k: v for k, v in changes.items() if k not in old or not _same(old[k], v)}
        if not changes:
            self.note("settings unchanged")
            return
        new = self.backend.update_settings(changes)["settings"]
        said = ", ".join(f"{k} {_show(old.get(k))} -> {_show(new.get(k))}" for k in changes)
        self.note(f"settings changed: {said}")

    def open(self, sid: str, announce: bool = False, given: dict | None = None) -> dict:
        """Open session `sid` (a new id creates it with this client's settings). `given`: flags to apply to an
        existing session."""
        existed = self.backend.exists(sid)
        h = self.backend.open(sid, self.settings, self.system_prompt)
        what = "opened" if existed else "new"
        self.note(f"{self.backend.name} · {what} session {sid} · {len(h['messages'])} messages · :help for commands")
        if existed and given:
            self.change_settings(given)
        if existed and self.system_prompt is not None and self.system_prompt != h.get("system_prompt"):
            self.note(f"--system applies to new sessions; {sid} keeps its system prompt")
        if h["messages"]:
            self.show_history(h)
        return h

    # ------------------------------------------------------------------ the loop
    def run_line(self, line: str) -> bool:
        """Run one input line; False means leave. Bad input raises InfinichatError."""
        cmd, _, rest = line.partition(" ")
        if not cmd.startswith(":"):
            self.send(line)
            return True
        c = BY_NAME.get(ALIASES.get(cmd, cmd))
        if c is None:
            raise InfinichatError(f"unknown command {cmd}; type :help for the list")
        return c.run(self, rest.strip()) is not False

    def loop(self) -> int:
        while True:
            try:
                line = self.reader.read("[bold green]you>[/] ").strip()
            except EOFError:
                self.console.print()
                return 0
            except KeyboardInterrupt:
                if not self.reader.can_prefill:
                    raise  # plain input (a pipe): Ctrl-C ends the program
                self.note("(:exit or Ctrl-D leaves)")
                continue
            if not line:
                continue
            try:
                if not self.run_line(line):
                    return 0
            except InfinichatError as e:
                self.error(str(e))
            except RuntimeError as e:
                if not gpu_out_of_memory(e):
                    raise
                self.error(
                    "the GPU ran out of memory: nothing was changed (a reply it cut short is kept); try a shorter "
                    "message, or a smaller budget (:set budget N)"
                )


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def _show(v: object) -> str:
    return json.dumps(_plain(v))


def chat(args: argparse.Namespace, defaults: dict) -> int:
    sid = args.session or time.strftime("chat-%Y%m%d-%H%M%S")
    b = _backend(args)
    console = Console(highlight=False, soft_wrap=True)
    try:
        reader = make_reader(console, _history_file(args), [*BY_NAME, *ALIASES])
        markdown = console.is_terminal and not args.plain
        client = ChatClient(console, b, reader, _params(args, defaults), _settings(args), args.system, markdown)
        client.open(sid, given=_given_settings(args, defaults))
        return client.loop()
    finally:
        b.close()
