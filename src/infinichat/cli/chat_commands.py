"""The terminal chat's `:` commands, one table: each entry's arguments, help line and handler. A handler raises
InfinichatError for bad input (printed as one `error:` line by the loop); the session is then unchanged."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from rich.table import Table

from infinichat.errors import InfinichatError

if TYPE_CHECKING:
    from infinichat.cli.chat import ChatClient


@dataclass(frozen=True)
class Command:
    name: str
    args: str  # how its arguments are written in :help
    help: str
    run: Callable[[ChatClient, str], bool | None]  # False: leave the chat


def _turn(c: ChatClient, word: str, cmd: str) -> int:
    """A message number as :history shows it."""
    if not word.isdigit():
        raise InfinichatError(f"{cmd} needs a message number (see :history), got {word or 'nothing'!r}")
    n = int(word)
    count = len(c.backend.history()["messages"])
    if n >= count:
        raise InfinichatError(
            f"no message {n}: this session has {count} messages"
            + (f" (numbered 0 to {count - 1}, see :history)" if count else "")
        )
    return n


def _no_args(cmd: str, rest: str) -> None:
    if rest:
        raise InfinichatError(f"{cmd} takes no arguments, got {rest!r}")


def cmd_history(c: ChatClient, rest: str) -> None:
    _no_args(":history", rest)
    c.show_history(c.backend.history())


def cmd_sessions(c: ChatClient, rest: str) -> None:
    _no_args(":sessions", rest)
    t = Table("id", "name", "messages", "updated", "resident")
    for r in c.backend.sessions():
        t.add_row(
            r["id"],
            r["name"],
            str(r["messages"]),
            time.strftime("%Y-%m-%d %H:%M", time.localtime(r["updated"])),
            "yes" if r["resident"] else "",
        )
    c.console.print(t)


def cmd_open(c: ChatClient, rest: str) -> None:
    if not rest or " " in rest:
        raise InfinichatError(":open needs one session id (see :sessions), e.g. :open mine")
    c.open(rest, announce=True)


def cmd_revert(c: ChatClient, rest: str) -> None:
    h = c.backend.revert(_turn(c, rest, ":revert"))
    c.note(f"reverted: {len(h['messages'])} messages left")


def cmd_select(c: ChatClient, rest: str) -> None:
    """`:select N`: alternative N of the last reply; `:select TURN N`: of message TURN."""
    words = rest.split()
    if len(words) not in (1, 2) or not all(w.isdigit() for w in words):
        raise InfinichatError(":select needs an alternative number, e.g. :select 2 (or :select TURN N)")
    msgs = c.backend.history()["messages"]
    if len(words) == 2:
        turn = _turn(c, words[0], ":select")
    else:
        replies = [m["turn"] for m in msgs if m["kind"] in ("assistant", "narration")]
        if not replies:
            raise InfinichatError("there is no reply to choose an alternative of yet")
        turn = replies[-1]
    alts = msgs[turn]["alternatives"]
    n = int(words[-1])
    if not 1 <= n <= len(alts):
        have = "only one version" if len(alts) == 1 else f"alternatives 1 to {len(alts)}"
        raise InfinichatError(f"message {turn} has {have} (:retry makes another), got {n}")
    h = c.backend.select(turn, n - 1)
    c.show_message(h["messages"][turn])


def cmd_edit(c: ChatClient, rest: str) -> None:
    word, _, text = rest.partition(" ")
    turn = _turn(c, word, ":edit")
    if not text.strip():
        raise InfinichatError(":edit needs the new text after the message number, e.g. :edit 2 Hello again")
    h = c.backend.edit(turn, text.strip())
    c.note(f"message {turn} edited; the cache after it is re-evaluated")
    c.show_message(h["messages"][turn])


def cmd_delete(c: ChatClient, rest: str) -> None:
    h = c.backend.delete(_turn(c, rest, ":delete"))
    c.note(f"deleted: {len(h['messages'])} messages left")


def cmd_reset(c: ChatClient, rest: str) -> None:
    _no_args(":reset", rest)
    n = len(c.backend.history()["messages"])
    if n and not c.confirm(f"reset deletes all {n} messages of this session; sure? \\[y/N] "):
        c.note("nothing changed")
        return
    h = c.backend.reset()
    c.note("reset: the session is back to its start")
    if h["messages"]:
        c.show_history(h)


def parse_setting(current: dict, key: str, raw: str) -> object:
    """VALUE of `:set KEY VALUE` as the setting's type: text settings take it as typed; list settings a JSON
    list, `none` (empty) or one item; the others a JSON value (a number, true/false, null; `none` = null).
    Whether it is accepted is for the session (the server's own messages)."""
    old = current.get(key)
    if isinstance(old, str):
        return raw
    if isinstance(old, (list, tuple)):
        if raw.startswith("["):
            try:
                return json.loads(raw)
            except ValueError:
                raise InfinichatError(f'{key} takes a JSON list of strings, e.g. ["\\n", ":"]; got {raw!r}') from None
        return [] if raw.lower() == "none" else [raw]
    if raw.lower() == "none":
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return raw  # the session names the setting and what it accepts


def cmd_set(c: ChatClient, rest: str) -> None:
    current = c.backend.history()["settings"]
    if not rest:
        for k, v in current.items():
            c.console.print(f"{k} = {json.dumps(list(v) if isinstance(v, tuple) else v)}", markup=False)
        return
    key, _, raw = rest.partition(" ")
    if not raw.strip():
        raise InfinichatError(f":set needs a value, e.g. :set temperature 0.9 (now {key} = {current.get(key)!r})")
    c.change_settings({key: parse_setting(current, key, raw.strip())})


def cmd_rag(c: ChatClient, rest: str) -> None:
    if not rest:
        raise InfinichatError(":rag needs the text to put in the context, e.g. :rag The door code is 4321.")
    c.backend.rag(rest)
    c.note("added to the context")


def _generate(action: str) -> Callable[[ChatClient, str], None]:
    def run(c: ChatClient, rest: str) -> None:
        _no_args(f":{action}", rest)
        c.act(action)

    return run


def cmd_suggest(c: ChatClient, rest: str) -> None:
    _no_args(":suggest", rest)
    done = c.act("suggest")
    text = str(done.get("text", "")).strip() if done else ""
    if not text:
        if done is not None:
            c.note("the suggestion is empty")
        return
    answer = c.ask("send it? \\[y]es, \\[e]dit, \\[n]o (default no): ").strip().lower()
    if answer in ("y", "yes"):
        c.send(text)
    elif answer in ("e", "edit"):
        if c.reader.can_prefill:
            line = c.ask("[bold green]you>[/] ", default=text)
        else:
            line = c.ask("[dim]type the message to send instead (empty: discard)[/]\n[bold green]you>[/] ")
        if line.strip():
            c.send(line.strip())
        else:
            c.note("suggestion discarded")
    else:
        c.note("suggestion discarded")


def cmd_export(c: ChatClient, rest: str) -> None:
    """`:export PATH [json|jsonl]`: the session to a file (ours, with alternatives, or SillyTavern's chat JSONL;
    by default from the file's extension). An existing file is never overwritten."""
    words = rest.split()
    if len(words) not in (1, 2) or (len(words) == 2 and words[1] not in ("json", "jsonl")):
        raise InfinichatError(":export needs a file path and optionally json or jsonl, e.g. :export mira.jsonl")
    path = Path(words[0]).expanduser()
    fmt = words[1] if len(words) == 2 else ("jsonl" if path.suffix.lower() == ".jsonl" else "json")
    if path.exists():
        raise InfinichatError(f"{path} exists; choose another file name (an export never overwrites a file)")
    if not path.parent.is_dir():
        raise InfinichatError(f"no folder {path.parent} to write {path.name} into")
    text = c.backend.export(fmt)
    try:
        with path.open("x", encoding="utf-8") as f:  # "x": a file created meanwhile is not overwritten either
            f.write(text)
    except OSError as e:
        raise InfinichatError(f"cannot write {path}: {e.strerror or e}") from None
    c.note(f"exported ({'SillyTavern chat JSONL' if fmt == 'jsonl' else 'infinichat JSON'}) to {path}")


def cmd_help(c: ChatClient, rest: str) -> None:
    width = max(len(f"{x.name} {x.args}") for x in COMMANDS)
    for x in COMMANDS:
        c.console.print(f"{x.name + ' ' + x.args:<{width}}  {x.help}", markup=False, highlight=False)
    c.console.print("anything else is sent as your message; Ctrl-C stops a reply, Ctrl-D leaves", markup=False)


COMMANDS = [
    Command(":history", "", "the transcript, with message numbers", cmd_history),
    Command(
        ":retry", "", "another reply to the last message (the earlier ones stay as alternatives)", _generate("retry")
    ),
    Command(":select", "N", "show alternative N of the last reply (:select TURN N for another message)", cmd_select),
    Command(":continue", "", "extend the last reply", _generate("continue")),
    Command(":narrate", "", "a narration", _generate("narrate")),
    Command(":suggest", "", "draft your next message, then send, edit or discard it", cmd_suggest),
    Command(":edit", "N TEXT", "replace the text of message N", cmd_edit),
    Command(":delete", "N", "remove message N", cmd_delete),
    Command(":revert", "N", "back to before message N (N and everything after it go)", cmd_revert),
    Command(":reset", "", "back to the session's start (asks first)", cmd_reset),
    Command(":rag", "TEXT", "put TEXT in the context (replaces the previous one)", cmd_rag),
    Command(
        ":set",
        "[KEY VALUE]",
        "change a session setting (temperature, max_tokens, budget, ...); alone: list them",
        cmd_set,
    ),
    Command(":sessions", "", "list sessions", cmd_sessions),
    Command(":open", "SESSION", "switch to another session (a new id creates it)", cmd_open),
    Command(":export", "PATH [json|jsonl]", "write this chat to a file (jsonl: SillyTavern's chat format)", cmd_export),
    Command(":help", "", "this list", cmd_help),
    Command(":exit", "", "leave (also :quit, :q)", lambda c, rest: False),
]
ALIASES = {":quit": ":exit", ":q": ":exit"}
BY_NAME = {x.name: x for x in COMMANDS}
