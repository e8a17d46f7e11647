"""The server worker's continuous batching (server/worker.py `_round`): a generation whose turn delivers an item
that needs no decode step (the session API's `kv` cache-map events) keeps its computed step for its next turn,
so it stays in the batch instead of running that step alone."""

from __future__ import annotations

import threading
import types

import pytest

from infinichat.engine.sampling import SamplingParams
from infinichat.engine.torch_engine import TorchEngine
from infinichat.server.worker import END, EngineWorker

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_event_turns_keep_their_batched_step(tiny_chat_model):
    engine = TorchEngine(tiny_chat_model.model, ())
    worker = EngineWorker(types.SimpleNamespace(engine=engine, close=lambda: None), max_batch=8).start()
    params = SamplingParams(temperature=0.0, max_tokens=20)
    got: dict[str, list] = {"a": [], "b": []}
    ends = threading.Semaphore(0)

    def fn(prompt):
        def run(m, job):
            seq = engine.new_sequence()
            for st in engine.generate(seq, prompt, params):
                yield st.token
                yield "kv"  # an event between two tokens, as session_events sends

        return run

    def sink(name):
        return lambda item: ends.release() if item is END else got[name].append(item)

    try:
        worker.stream(fn([3, 4, 5]), sink("a"), session="a")
        worker.stream(fn([6, 7, 8, 9]), sink("b"), session="b")
        assert ends.acquire(timeout=120) and ends.acquire(timeout=120)
        sizes = dict(worker.batcher.sizes)
    finally:
        worker.close()
    want = {}
    for name, prompt in (("a", [3, 4, 5]), ("b", [6, 7, 8, 9])):
        toks = [st.token for st in engine.generate(engine.new_sequence(), prompt, params)]
        want[name] = [x for t in toks for x in (t, "kv")]
    assert got == want
    # 20 steps each: all but a few (the two streams starting or ending a round apart) in calls of two
    assert sizes.get(2, 0) >= 17 and sizes.get(1, 0) <= 4, sizes
