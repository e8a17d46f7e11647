"""SIGKILL in the middle of a reply loses no completed turn (a real subprocess is killed)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from gguf_util import tiny_llama, write_gguf

from infinichat.engine.torch_engine import TorchEngine
from infinichat.model.loader import load_model
from infinichat.session.manager import SessionManager

CHILD = textwrap.dedent("""
    import sys, time
    from infinichat.engine.torch_engine import TorchEngine
    from infinichat.model.loader import load_model
    from infinichat.session.manager import SessionManager
    gguf, cache, data = sys.argv[1:4]
    m = load_model(gguf, "float32", cache_dir=cache)
    mgr = SessionManager(TorchEngine(m.model, m.tokenizer.eos_ids), m.tokenizer, m.file_hash, data)
    s = mgr.create("crash", system_prompt="Be brief.", settings={"temperature": 0.0, "max_tokens": 8})
    for text in ("first", "second"):
        list(s.send(text))
    for i, ev in enumerate(s.send("third", s.settings.sampling(max_tokens=100000))):
        if i == 3:
            print("GENERATING", flush=True)
        time.sleep(0.01)
""")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    write_gguf(d / "tiny.gguf", tiny_llama(seed=3, max_position_embeddings=4096))
    return d


def test_sigkill_mid_reply_loses_no_completed_turn(tiny, tmp_path):
    data = tmp_path / "data"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tiny / "tiny.gguf"), str(tiny / "cache"), str(data)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        line = child.stdout.readline()
        assert line.strip() == "GENERATING", child.stderr.read()
        time.sleep(0.2)
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == -signal.SIGKILL

    m = load_model(tiny / "tiny.gguf", "float32", cache_dir=tiny / "cache")
    mgr = SessionManager(TorchEngine(m.model, m.tokenizer.eos_ids), m.tokenizer, m.file_hash, data)
    assert [d["id"] for d in mgr.list()] == ["crash"]
    s = mgr.get("crash")
    # both completed turns survive; the user's third message was saved before its reply started;
    # the interrupted reply is absent (never half-written)
    assert [(m.kind, m.text) for m in s.messages][::2] == [("user", "first"), ("user", "second"), ("user", "third")]
    assert [m.kind for m in s.messages] == ["user", "assistant", "user", "assistant", "user"]
    assert all(len(m.alternatives[0].tokens) == 8 for m in s.messages if m.kind == "assistant")
    # the session continues: the missing reply is generated, and the cache matches the transcript
    events = list(s.retry())
    assert events[-1].kind == "done" and s.messages[-1].kind == "assistant"
    list(s.send("fourth"))
    ref = SessionManager(mgr.engine, m.tokenizer, m.file_hash, tmp_path / "ref")
    r = ref.create("r", system_prompt="Be brief.", settings={"temperature": 0.0, "max_tokens": 8})
    r.messages = s.messages
    r.rebuild()
    assert s.seq.token_ids() == r.seq.token_ids()
    mgr.db.close()
    ref.db.close()
