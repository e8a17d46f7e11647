"""One writer per data directory: real processes contend for the lock (serve, in-process chat, a killed holder)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from infinichat.errors import InfinichatError
from infinichat.session.datalock import lock_data_dir

SRC = Path(__file__).resolve().parents[1] / "src"
ENV = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1"}
HOLD = "import sys, time; from infinichat.session.datalock import lock_data_dir as L; L(sys.argv[1], 'holder'); "
HOLD += "print('held', flush=True); time.sleep(120)"


def cli(*args: str, timeout: int = 120, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "infinichat", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=ENV,
        timeout=timeout,
    )


def wait_for(pred, what: str, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_second_process_is_refused_with_one_line_and_a_killed_holder_leaves_no_stale_lock(tmp_path):
    d = tmp_path / "data"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(d)], stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        for cmd in (["serve", "--port", "0"], ["chat"]):
            out = cli(*cmd, "--data-dir", str(d))
            assert out.returncode == 2, (cmd, out.stderr)
            lines = out.stderr.strip().splitlines()
            assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
            assert f"{d} is in use" in lines[0] and f"pid {holder.pid}: holder" in lines[0], lines[0]
        with pytest.raises(InfinichatError, match="in use by another infinichat process"):
            lock_data_dir(d, "test")  # a second hold inside a process is refused too
    finally:
        holder.send_signal(signal.SIGKILL)  # a crash: no clean-up code runs
        holder.wait()
    assert (d / "lock").exists()  # the file stays behind, but the kernel dropped the lock with the process
    with lock_data_dir(d, "after the crash"):
        assert "after the crash" in (d / "lock").read_text()
        with pytest.raises(InfinichatError):
            lock_data_dir(d, "again")
    lock_data_dir(d, "after release").release()  # released on close: free again


def test_unwritable_data_dir_is_a_clear_error(tmp_path):
    f = tmp_path / "file"
    f.write_text("not a directory")
    with pytest.raises(InfinichatError, match="cannot create the lock file"):
        lock_data_dir(f / "sub", "test")


@pytest.mark.slow
def test_in_process_chat_holds_the_directory_until_it_exits(tmp_path):
    d = tmp_path / "data"
    chat = subprocess.Popen(
        [sys.executable, "-m", "infinichat", "chat", "--data-dir", str(d), "-n", "4", "--temperature", "0"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    try:
        lock = d / "lock"
        wait_for(lambda: lock.exists() and "chat (in-process)" in lock.read_text(), "the chat to take the lock")
        out = cli("serve", "--port", "0", "--data-dir", str(d))
        assert out.returncode == 2 and f"pid {chat.pid}: chat (in-process)" in out.stderr, out.stderr
        _, stderr = chat.communicate(":exit\n", timeout=300)
        assert chat.returncode == 0, stderr
    finally:
        if chat.poll() is None:
            chat.kill()
            chat.wait()
    lock_data_dir(d, "after the chat").release()  # a clean exit frees it
