"""The terminal chat's commands, driven by scripted input (no tmux, no terminal) against a tiny random model,
in-process (LocalBackend) and through a real test server (HttpBackend): every command's effect on the session,
and bad input answered by one `error:` line, never a traceback, with the session left as it was."""

from __future__ import annotations

import io
import json
import re
import sys
import uuid

import pytest
from rich.console import Console
from server_util import LiveServer

from infinichat.cli.chat import ChatClient
from infinichat.cli.chat_backends import HttpBackend, LocalBackend
from infinichat.cli.chat_commands import COMMANDS, parse_setting
from infinichat.cli.chat_io import ScriptReader, print_stream
from infinichat.engine.torch_engine import TorchEngine
from infinichat.errors import InfinichatError
from infinichat.session.manager import SessionManager

pytestmark = pytest.mark.usefixtures("one_torch_thread")
GREEDY = {"temperature": 0.0, "max_tokens": 6}


@pytest.fixture(params=["local", "http"])
def backend(request, tiny_chat_model, tmp_path):
    if request.param == "local":
        m = tiny_chat_model
        b = LocalBackend(
            SessionManager(TorchEngine(m.model, m.tokenizer.eos_ids), m.tokenizer, m.file_hash, tmp_path), "tiny"
        )
    else:
        b = HttpBackend(request.getfixturevalue("live").url)
    yield b
    b.close()


class Run:
    """A client over `backend` whose input is `lines`; `out` is what it printed."""

    def __init__(
        self, backend, lines: list[str], settings: dict | None = None, sid: str | None = None, given: dict | None = None
    ):
        self.buf = io.StringIO()
        console = Console(file=self.buf, width=250, highlight=False, soft_wrap=True)
        self.client = ChatClient(console, backend, ScriptReader(console, lines), settings=settings or GREEDY)
        self.b = backend
        # a fresh id each run: the module's server outlives a Run, and id(self) is reused once a Run is freed
        self.client.open(sid or f"s{uuid.uuid4().hex[:12]}", given=given)
        self.rc = self.client.loop()

    @property
    def out(self) -> str:
        return self.buf.getvalue()

    def errors(self) -> list[str]:
        return [ln for ln in self.out.splitlines() if ln.startswith("error: ")]

    def history(self) -> dict:
        return self.b.history()


def texts(h: dict) -> list[tuple[str, str]]:
    return [(m["kind"], m["text"]) for m in h["messages"]]


def test_messages_retry_select_edit_delete(backend):
    r = Run(backend, ["Hello", "How are you?", ":retry", ":select 1", ":edit 0 Hi there", ":delete 1", ":exit"])
    assert r.rc == 0 and not r.errors(), r.out
    h = r.history()
    assert [k for k, _ in texts(h)] == ["user", "user", "assistant"]  # message 1 (the first reply) deleted
    assert h["messages"][0]["text"] == "Hi there" and h["messages"][1]["text"] == "How are you?"
    last = h["messages"][2]
    assert len(last["alternatives"]) == 2 and last["selected"] == 0  # :select 1 chose the first version
    assert "[1/2]>" in r.out
    assert "Traceback" not in r.out


def test_select_of_an_earlier_message_and_its_bad_input(backend):
    r = Run(
        backend,
        [
            "Hello",
            ":retry",
            ":select 1 1",
            ":select 3",
            ":select 0",
            ":select x",
            ":select 0 2",
            ":select 9 1",
            ":exit",
        ],
    )
    h = r.history()
    assert h["messages"][1]["selected"] == 0 and len(h["messages"][1]["alternatives"]) == 2
    errs = r.errors()
    assert len(errs) == 5, r.out
    assert "alternatives 1 to 2" in errs[0] and "got 3" in errs[0]
    assert "alternatives 1 to 2" in errs[1] and "got 0" in errs[1]
    assert ":select needs an alternative number" in errs[2]
    assert "message 0 has only one version" in errs[3] and "got 2" in errs[3]
    assert "no message 9" in errs[4]


def test_select_before_any_reply(backend):
    r = Run(backend, [":select 1", ":exit"])
    assert r.errors() == ["error: there is no reply to choose an alternative of yet"]


def test_bad_message_numbers_leave_the_session_as_it_was(backend):
    r = Run(backend, ["Hello", ":edit 5 x", ":edit x y", ":edit 0", ":delete 2", ":delete", ":revert -1", ":exit"])
    errs = r.errors()
    assert len(errs) == 6, r.out
    assert errs[0] == "error: no message 5: this session has 2 messages (numbered 0 to 1, see :history)"
    assert "needs a message number" in errs[1] and "'x'" in errs[1]
    assert ":edit needs the new text" in errs[2]
    assert "no message 2" in errs[3]
    assert "needs a message number" in errs[4] and "nothing" in errs[4]
    assert "needs a message number" in errs[5]
    assert [k for k, _ in texts(r.history())] == ["user", "assistant"] and r.history()["messages"][0]["text"] == "Hello"


def test_set_changes_validated_settings_with_the_sessions_own_messages(backend):
    r = Run(
        backend,
        [
            ":set temperature 0.5",
            ":set temperature 0.5",
            ":set max_tokens 4",
            ":set user_name 123",
            ":set seed 7",
            ":set seed none",
            ":set dry_sequence_breakers none",
            ":set temperature abc",
            ":set nosuch 1",
            ":set budget 10",
            ":set policy nosuch",
            ":set top_k",
            ":set",
            ":exit",
        ],
    )
    st = r.history()["settings"]
    assert st["temperature"] == 0.5 and st["max_tokens"] == 4 and st["user_name"] == "123" and st["seed"] is None
    assert list(st["dry_sequence_breakers"]) == []
    assert "settings changed: temperature 0.0 -> 0.5" in r.out and "settings unchanged" in r.out
    assert "settings changed: seed 7 -> null" in r.out
    errs = r.errors()
    assert len(errs) == 5, r.out
    assert "temperature='abc' is not accepted; expected 0 (greedy) or a number" in errs[0]
    assert "unknown setting(s) nosuch; accepted:" in errs[1] and "temperature" in errs[1]
    assert "budget must be an integer number of tokens in [64" in errs[2]
    assert "unknown policy 'nosuch'; accepted:" in errs[3]
    assert ":set needs a value" in errs[4] and "top_k = 40" in errs[4]
    assert "top_k = 40" in r.out and 'policy = "turns"' in r.out  # :set alone lists them


def test_parse_setting_follows_the_settings_types():
    cur = {"temperature": 0.7, "user_name": "User", "dry_sequence_breakers": ["\n"], "seed": None}
    assert parse_setting(cur, "temperature", "0.9") == 0.9
    assert parse_setting(cur, "user_name", "42") == "42"
    assert parse_setting(cur, "dry_sequence_breakers", '["a", "b"]') == ["a", "b"]
    assert parse_setting(cur, "dry_sequence_breakers", ";") == [";"]
    assert parse_setting(cur, "seed", "none") is None and parse_setting(cur, "seed", "12") == 12
    assert parse_setting(cur, "temperature", "warm") == "warm"  # the session refuses it, naming the setting


@pytest.mark.parametrize(
    ("answers", "sent"),
    [(["y"], "suggestion"), (["e", "my own words"], "my own words"), (["n"], None), ([""], None), (["e", ""], None)],
)
def test_suggest_can_be_accepted_edited_or_discarded(backend, answers, sent):
    r = Run(backend, ["Hello", ":suggest", *answers, ":exit"])
    assert not r.errors(), r.out
    h = r.history()
    suggestion = r.out.split("suggestion> ")[1].split("\n")[0].strip()
    if sent is None:
        assert [k for k, _ in texts(h)] == ["user", "assistant"], r.out
        assert "suggestion discarded" in r.out
    else:
        want = suggestion if sent == "suggestion" else sent
        assert texts(h)[2] == ("user", want) and h["messages"][3]["kind"] == "assistant", r.out


def test_reset_asks_first(backend):
    r = Run(backend, ["Hello", ":reset", "n", ":reset", "y", ":reset x", ":exit"])
    assert "nothing changed" in r.out and "reset: the session is back to its start" in r.out
    assert r.history()["messages"] == []
    assert r.errors() == ["error: :reset takes no arguments, got 'x'"]


def test_open_switches_and_creates_sessions(backend):
    Run(backend, ["Hello", ":exit"], sid="first")
    r = Run(backend, [":open first", ":open", ":open a b", ":open bad/id", ":open second", ":exit"], sid="zero")
    assert "opened session first · 2 messages" in r.out and "new session second" in r.out
    assert r.history()["id"] == "second"
    errs = r.errors()
    assert len(errs) == 3, r.out
    assert ":open needs one session id" in errs[0] and ":open needs one session id" in errs[1]
    assert "bad/id" in errs[2]
    ids = {s["id"] for s in backend.sessions()}
    assert {"first", "second", "zero"} <= ids


def test_every_command_with_bad_input_gives_one_error_line(backend):
    """Each command with arguments it does not take: one `error:` line each, the loop goes on."""
    lines = ["Hello", ":nosuch", ":", ":history x", ":sessions x", ":retry now", ":continue 1", ":narrate x"]
    lines += [":suggest x", ":rag", ":revert", ":select", ":edit", ":delete 1 2", ":set", ":help", ":exit"]
    r = Run(backend, lines)
    assert r.rc == 0 and "Traceback" not in r.out
    errs = r.errors()
    assert len(errs) == 13, r.out
    assert errs[0] == "error: unknown command :nosuch; type :help for the list"
    for cmd in (":history", ":sessions", ":retry", ":continue", ":narrate", ":suggest"):
        assert any(e.startswith(f"error: {cmd} takes no arguments") for e in errs), (cmd, errs)
    assert texts(r.history())[0] == ("user", "Hello") and len(r.history()["messages"]) == 2
    for c in COMMANDS:
        assert c.name in r.out  # :help lists every command


def test_generating_commands_and_rag(backend):
    r = Run(backend, ["Hello", ":continue", ":narrate", ":rag The door code is 4321.", ":history", ":exit"])
    assert not r.errors(), r.out
    kinds = [k for k, _ in texts(r.history())]
    assert kinds == ["user", "assistant", "narration", "rag"]
    assert "narrator>" in r.out and "added to the context" in r.out and "rag>" in r.out


def test_a_failed_action_prints_an_error_and_changes_nothing(backend):
    r = Run(backend, [":continue", ":retry", ":exit"])
    errs = r.errors()
    assert len(errs) == 2, r.out
    assert "continue needs the last message to be a reply" in errs[0]
    assert "nothing to retry" in errs[1]
    assert r.history()["messages"] == []


def test_reopening_with_given_settings_changes_them_and_says_which(backend):
    Run(backend, ["Hello", ":exit"], sid="again")
    r = Run(backend, [":exit"], sid="again", given={"temperature": 0.9, "top_k": 40, "max_tokens": 6})
    assert "opened session again · 2 messages" in r.out
    assert "settings changed: temperature 0.0 -> 0.9" in r.out and "top_k" not in r.out  # unchanged ones unsaid
    assert r.history()["settings"]["temperature"] == 0.9
    with pytest.raises(InfinichatError, match="budget must be an integer number of tokens"):
        Run(backend, [":exit"], sid="again", given={"temperature": 0.5, "budget": 10})
    assert backend.history()["settings"]["temperature"] == 0.9  # the bad change changed nothing


def test_end_of_input_leaves_cleanly(backend):
    r = Run(backend, ["Hello"])  # no :exit: the input just ends
    assert r.rc == 0 and len(r.history()["messages"]) == 2


def test_a_server_that_goes_away_is_one_error_line(tiny_chat_model, tmp_path):
    with LiveServer(tiny_chat_model, tmp_path) as srv:
        b = HttpBackend(srv.url)
        buf = io.StringIO()
        console = Console(file=buf, width=200)
        client = ChatClient(console, b, ScriptReader(console, []), settings=GREEDY)
        client.open("gone")
    lines = iter(["Hello", ":history", ":exit"])
    client.reader = ScriptReader(console, lines)
    assert client.loop() == 0
    errs = [ln for ln in buf.getvalue().splitlines() if ln.startswith("error: ")]
    assert len(errs) == 2 and all("did not answer" in e for e in errs), buf.getvalue()
    b.close()


def test_markdown_rendering_in_a_terminal_and_raw_text_in_a_pipe():
    events = [
        ("token", "Some **bold** "),
        ("token", "text\n\n| a | b |\n|---|---|\n| 1 | 2 |\n"),
        ("done", {"turn": 1}),
    ]
    pipe = io.StringIO()
    done = print_stream(Console(file=pipe, width=80), iter(events), markdown=False)
    assert done == {"turn": 1} and pipe.getvalue() == "Some **bold** text\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n"
    tty = io.StringIO()
    print_stream(Console(file=tty, width=80, force_terminal=True, color_system="standard"), iter(events), markdown=True)
    out = tty.getvalue()
    assert "**bold**" not in out and "\x1b[1m" in out  # bold rendered as an escape, not asterisks
    assert "|---|" not in out and "| 1 |" not in out and "──" in out  # a table, not its source


def test_plain_stdin_is_not_a_prompt_toolkit_reader(monkeypatch):
    from infinichat.cli.chat_io import PlainReader, make_reader

    monkeypatch.setattr(sys, "stdin", io.StringIO("x\n"))
    assert isinstance(make_reader(Console(file=io.StringIO()), None, [":help"]), PlainReader)


def test_flags_given_on_reopening_update_the_session_and_say_so(
    tiny_gguf_1k, tmp_path, monkeypatch, capsys, cli_threads
):
    """`infinichat chat` in-process, as a pipe runs it: flags create a new session's settings; on reopening, the
    flags given change the session's settings and the client names each change; no flags, no change."""
    from infinichat.cli.main import main

    def chat(stdin: str, *flags: str, rc: int = 0) -> str:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        args = ["chat", "--model", str(tiny_gguf_1k), "--data-dir", str(tmp_path), "--session", "mine"]
        assert main([*args, "--threads", "1", "--cache-dir", str(tmp_path / "cache"), *flags]) == rc
        out, err = capsys.readouterr()
        return out if rc == 0 else err

    out = chat("Hello\n:exit\n", "-n", "4", "--temperature", "0")
    assert "new session mine" in out and "bot> " in out and "settings changed" not in out
    out = chat(":set\n:exit\n", "--temperature", "0.9", "--ctx", "512", "--top-k", "40")
    assert "opened session mine · 2 messages" in out
    changed = re.search(r"settings changed: temperature 0.0 -> 0.9, budget \d+ -> 512\n", out)
    assert changed, out  # and not top_k: 40 is its default
    assert "temperature = 0.9" in out and "max_tokens = 4" in out and "budget = 512" in out
    out = chat(":set\n:exit\n")
    assert "settings changed" not in out and "temperature = 0.9" in out
    err = chat(":exit\n", "--ctx", "10", rc=2)  # a bad value: one line, exit code 2, the session unchanged
    assert err.strip() == "infinichat: error: budget must be an integer number of tokens in [64, 1048576], got 10"
    assert "budget = 512" in chat(":set\n:exit\n")


PTY_CLIENT = r"""
import sys
from pathlib import Path
from rich.console import Console
from infinichat.cli.chat_io import make_reader
r = make_reader(Console(), Path(sys.argv[1]), [":help", ":exit"])
print(type(r).__name__, flush=True)
for default in ("", "", "drafted"):
    print("GOT", repr(r.read("[bold green]you>[/] ", default=default)), flush=True)
"""


def test_line_editing_and_a_persistent_history_in_a_terminal(tmp_path):
    """In a pseudo-terminal the reader is prompt_toolkit's: Up recalls the previous line (also from an earlier
    run, through the history file), Backspace edits, a suggestion is pre-filled for editing."""
    import os
    import pty
    import select
    import time
    from pathlib import Path

    hist = tmp_path / "chat_history"
    hist.write_text("\n# 2026-01-01 00:00:00\n+from an earlier run\n")
    pid, fd = pty.fork()
    if pid == 0:  # the child: the reader in a terminal
        env = {**os.environ, "TERM": "xterm", "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
        os.execvpe(sys.executable, [sys.executable, "-c", PTY_CLIENT, str(hist)], env)
    out = b""

    def until(done, timeout: float = 60) -> None:
        nonlocal out
        end = time.monotonic() + timeout
        while not done() and time.monotonic() < end:
            if select.select([fd], [], [], 0.1)[0]:
                try:
                    out += os.read(fd, 4096)
                except OSError:
                    return

    def prompt_after(n_lines: int) -> bool:  # the reader printed n_lines lines, then its next prompt
        return out.count(b"GOT ") >= n_lines and b"you>" in out.rsplit(b"GOT ", 1)[-1] if n_lines else b"you>" in out

    try:
        for i, keys in enumerate([b"\x1b[A\x1b[A\r", b"hello\x7f\x7fp me\r", b"\x7f\x7f\x7fY\r"]):
            until(lambda i=i: prompt_after(i))
            os.write(fd, keys)
        until(lambda: out.count(b"GOT ") >= 3 and b"\n" in out.rsplit(b"GOT ", 1)[-1])
    finally:
        os.waitpid(pid, 0)
    got = [ln.split("GOT ", 1)[1].strip() for ln in out.decode(errors="replace").splitlines() if "GOT " in ln]
    assert b"PromptReader" in out, out
    assert got == ["'from an earlier run'", "'help me'", "'drafY'"], out
    assert "+help me" in hist.read_text()


def test_generate_reports_its_speed_on_stderr_after_the_text(tiny_gguf_1k, tmp_path, capsys, cli_threads):
    from infinichat.cli.main import main

    args = ["generate", "Hello", "--model", str(tiny_gguf_1k), "-n", "6", "--temperature", "0", "--threads", "1"]
    assert main([*args, "--cache-dir", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert "tok/s" not in out and out.strip()  # stdout: the text alone
    line = err.strip().splitlines()[-1]
    assert "of at most 6 tokens" in line and "tok/s" in line and "prompt" in line, err


def test_export_writes_both_formats_and_never_overwrites(backend, tmp_path):
    ours, st = tmp_path / "chat.json", tmp_path / "chat.jsonl"
    st.write_text("keep me")  # an existing file is refused, not overwritten
    r = Run(
        backend,
        [
            "Hello",
            f":export {ours}",
            f":export {st}",
            f":export {tmp_path / 'st.txt'} jsonl",
            f":export {tmp_path / 'no-such-dir' / 'x.json'}",
            ":export",
            f":export {tmp_path / 'y.json'} xml",
            ":exit",
        ],
    )
    errs = r.errors()
    assert len(errs) == 4, r.out
    assert "exists" in errs[0] and "never overwrites" in errs[0]
    assert "no folder" in errs[1]
    assert ":export needs a file path" in errs[2] and ":export needs a file path" in errs[3]
    assert st.read_text() == "keep me"
    data = json.loads(ours.read_text())
    h = r.history()
    assert data["format"] == "infinichat-chat"
    assert [m["alternatives"][m["selected"]]["text"] for m in data["messages"]] == [m["text"] for m in h["messages"]]
    lines = [json.loads(x) for x in (tmp_path / "st.txt").read_text().splitlines()]
    assert "character_name" in lines[0] and [x["mes"] for x in lines[1:]] == [m["text"] for m in h["messages"]]
    assert not (tmp_path / "y.json").exists()
