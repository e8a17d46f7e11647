"""`infinichat chat`: the terminal client. One command loop over a ChatBackend: a server (`--server URL`)
or an in-process SessionManager. Commands start with ':' (see HELP); anything else is a message."""

from __future__ import annotations

import argparse
import time

from rich.console import Console
from rich.table import Table

from infinichat.cli.chat_backends import ChatBackend, HttpBackend, LocalBackend
from infinichat.errors import InfinichatError

HELP = """\
:history        the transcript, with turn numbers      :revert N   back to before message N
:retry          another reply to the last message      :continue   extend the last reply
:narrate        a narration                            :suggest    draft your next message
:rag TEXT       put TEXT in the context (replaces the previous one)
:sessions       list sessions                          :help       this text
:exit           leave (Ctrl-C stops a reply)"""

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


def _params(args: argparse.Namespace, defaults: dict) -> dict:
    """Sampling flags given on the command line apply to every action."""
    out = {v: getattr(args, k) for k, v in {**SETTING_FLAGS, **PARAM_FLAGS}.items() if getattr(args, k) != defaults[k]}
    if "stop" in out:
        out["stop"] = list(out["stop"])
    if "dry_sequence_breakers" in out:
        out["dry_sequence_breakers"] = breakers_of(out["dry_sequence_breakers"])
    return out


def _backend(args: argparse.Namespace) -> ChatBackend:
    if args.server:
        return HttpBackend(args.server, args.api_key)
    from infinichat.engine.backends import load_engine
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
                kv_dtype=getattr(args, "kv_dtype", "auto"),
            )
        return LocalBackend(SessionManager(engine, tok, model_id, data_dir, SessionSettings()), name, lock)
    except BaseException:
        lock.release()
        raise


def _stream(console: Console, events) -> dict | None:
    done = None
    try:
        for kind, data in events:
            if kind == "token":
                console.print(data, end="", markup=False)
            else:
                done = data
    except KeyboardInterrupt:
        events.close()
        console.print("[dim] (stopped)[/]", end="")
    console.print()
    return done


def _show_history(console: Console, h: dict) -> None:
    for m in h["messages"]:
        tag = {"user": "you", "assistant": "bot"}.get(m["kind"], m["kind"])
        alts = f" [{m['selected'] + 1}/{len(m['alternatives'])}]" if len(m["alternatives"]) > 1 else ""
        dim = "" if m.get("in_context", True) and m.get("tokens_in_cache", 1) else " [dim](out of context)[/]"
        console.print(f"[bold]{m['turn']:>3} {tag}{alts}>[/]{dim} ", end="")
        console.print(m["text"], markup=False)
    c = h.get("cache", {})
    if c.get("resident"):
        console.print(f"[dim]cache {c['tokens']}/{c['budget']} tokens, {c['evictions']} evictions[/]")


def _show_sessions(console: Console, rows: list[dict]) -> None:
    t = Table("id", "name", "messages", "updated", "resident")
    for r in rows:
        t.add_row(
            r["id"],
            r["name"],
            str(r["messages"]),
            time.strftime("%Y-%m-%d %H:%M", time.localtime(r["updated"])),
            "yes" if r["resident"] else "",
        )
    console.print(t)


def run_command(console: Console, b: ChatBackend, line: str, params: dict) -> bool:
    """Run one input line; False means leave."""
    cmd, _, rest = line.partition(" ")
    rest = rest.strip()
    if not cmd.startswith(":"):
        console.print("[bold cyan]bot>[/] ", end="")
        _stream(console, b.act("send", params, line))
    elif cmd in (":exit", ":quit", ":q"):
        return False
    elif cmd == ":help":
        console.print(HELP, markup=False)
    elif cmd == ":history":
        _show_history(console, b.history())
    elif cmd == ":sessions":
        _show_sessions(console, b.sessions())
    elif cmd == ":revert":
        if not rest.isdigit():
            raise InfinichatError(":revert needs a message number (see :history), e.g. :revert 2")
        h = b.revert(int(rest))
        console.print(f"[dim]reverted: {len(h['messages'])} messages left[/]")
    elif cmd == ":rag":
        if not rest:
            raise InfinichatError(":rag needs the text to put in the context, e.g. :rag The door code is 4321.")
        b.rag(rest)
        console.print("[dim]added to the context[/]")
    elif cmd in (":retry", ":continue", ":narrate", ":suggest"):
        label = {":narrate": "narrator>", ":suggest": "suggestion>"}.get(cmd, "bot>")
        console.print(f"[bold cyan]{label}[/] ", end="")
        _stream(console, b.act(cmd[1:], params))
    else:
        raise InfinichatError(f"unknown command {cmd}; type :help for the list")
    return True


def chat(args: argparse.Namespace, defaults: dict) -> int:
    params = _params(args, defaults)
    sid = args.session or time.strftime("chat-%Y%m%d-%H%M%S")
    b = _backend(args)
    console = Console(highlight=False, soft_wrap=True)
    try:
        h = b.open(sid, _settings(args), args.system)
        console.print(f"[dim]{b.name} · session {sid} · {len(h['messages'])} messages · :help for commands[/]")
        if h["messages"]:
            _show_history(console, h)
        while True:
            try:
                line = console.input("[bold green]you>[/] ").strip()
            except EOFError:
                console.print()
                return 0
            if not line:
                continue
            try:
                if not run_command(console, b, line, params):
                    return 0
            except InfinichatError as e:
                console.print("[red]error:[/]", end=" ")
                console.print(str(e), markup=False)
    finally:
        b.close()
