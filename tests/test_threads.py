"""The decode thread governor's decisions on simulated step times (no timing here: the speed itself is measured by
benchmarks/busy_threads.py): it finds the faster count quickly, pays little for probing, never probes a count
that would need CPUs that are busy, reacts to a competitor arriving and leaving; and the engine uses it only
for the default thread count."""

from __future__ import annotations

import pytest

from infinichat.engine import threads
from infinichat.engine.threads import ThreadGovernor, ladder


def test_ladder():
    assert ladder(2) == [2, 1] and ladder(16) == [16, 8, 4, 2, 1] and ladder(3) == [3, 1] and ladder(1) == [1]


class Host:
    """Simulated step times per thread count, and the CPUs left idle (seen through `idle_seconds`)."""

    def __init__(self, monkeypatch, cost: dict[int, float], idle: float):
        self.cost, self.idle, self.clock, self.idle_total = cost, idle, 0.0, 0.0
        monkeypatch.setattr(threads, "idle_seconds", lambda: self.idle_total)
        monkeypatch.setattr(threads.time, "monotonic", lambda: self.clock)

    def run(self, g: ThreadGovernor, steps: int) -> tuple[float, list[int]]:
        """Total time of `steps` decode steps under `g`, and the count each ran at."""
        total, used = 0.0, []
        for _ in range(steps):
            probe, n = g.choose()
            dt = self.cost[n]
            g.record(probe, dt)
            self.clock += dt
            self.idle_total += dt * max(0.0, self.idle - (n - 1))  # our extra threads take idle CPUs
            total += dt
            used.append(n)
        return total, used


QUIET = {2: 1.0, 1: 1.6}  # 2 threads the fastest
BUSY = {2: 10.0, 1: 1.0}  # one core taken: 2 threads starve at every barrier


@pytest.mark.parametrize("start", [1, 2])
def test_quiet_machine_ends_on_the_fastest_count_at_little_cost(monkeypatch, start):
    host = Host(monkeypatch, QUIET, idle=1.0)
    g = ThreadGovernor(2, start=start)
    total, used = host.run(g, 200)
    assert g.current == 2 and used[-50:].count(2) >= 49
    assert total <= 1.05 * 200 * QUIET[2], total


@pytest.mark.parametrize("start", [1, 2])
def test_busy_machine_stays_on_one_thread_within_the_target(monkeypatch, start):
    host = Host(monkeypatch, BUSY, idle=0.0)
    g = ThreadGovernor(2, start=start)
    total, used = host.run(g, 100)
    assert g.current == 1 and used[-90:] == [1] * 90
    assert total <= 1.2 * 100 * BUSY[1], total  # even from the wrong start, 100 tokens stay within 1.2x
    if start == 1:
        assert g.probes == 0  # no CPU was idle: a second thread was never tried


def test_a_competitor_arriving_and_leaving(monkeypatch):
    host = Host(monkeypatch, QUIET, idle=1.0)
    g = ThreadGovernor(2, start=2)
    host.run(g, 300)  # a long quiet stretch: the probes of 1 thread are far apart by now
    assert g.current == 2
    host.cost, host.idle = BUSY, 0.0
    total, _ = host.run(g, 100)
    assert g.current == 1 and total <= 1.2 * 100 * BUSY[1], total  # the first slow step sends it down
    host.cost, host.idle = QUIET, 1.0
    total, _ = host.run(g, 200)
    assert g.current == 2 and total <= 1.15 * 200 * QUIET[2], total


def test_starting_count_follows_the_idle_cpus(monkeypatch):
    monkeypatch.setattr(threads, "idle_cpus", lambda seconds=0.1: 1.1)
    assert ThreadGovernor(2).current == 1 and ThreadGovernor(8).current == 1
    monkeypatch.setattr(threads, "idle_cpus", lambda seconds=0.1: 3.7)
    assert ThreadGovernor(8).current == 4 and ThreadGovernor(2).current == 2
    monkeypatch.setattr(threads, "idle_cpus", lambda seconds=0.1: None)  # unknown: all of them
    assert ThreadGovernor(8).current == 8


def test_many_cores_climb_the_ladder(monkeypatch):
    cost = {16: 1.0, 8: 1.3, 4: 2.0, 2: 3.5, 1: 6.0}
    host = Host(monkeypatch, cost, idle=15.0)
    g = ThreadGovernor(16, start=1)
    host.run(g, 100)
    assert g.current == 16


def test_the_engine_governs_only_the_default_thread_count(tiny_chat_model):
    import torch

    from infinichat.engine.torch_engine import TorchEngine, configure_threads, physical_cores

    n = torch.get_num_threads()
    try:
        engine = TorchEngine(tiny_chat_model.model, tiny_chat_model.tokenizer.eos_ids)
        configure_threads(engine, 1)
        assert engine.threads is None and torch.get_num_threads() == 1
        configure_threads(engine, None)
        if physical_cores() > 1:
            g = engine.threads
            assert g is not None and g.max_threads == physical_cores()
            seq = engine.new_cache(64)
            logits = engine.prefill(seq, [1, 2, 3])
            for _ in range(6):
                logits = engine.decode_one(seq, int(torch.argmax(logits)))
            assert g.steps == 6  # every decode step went through it
    finally:
        torch.set_num_threads(n)
