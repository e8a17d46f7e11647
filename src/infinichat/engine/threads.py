"""How many threads a decode step uses, chosen at run time from measured step times (issue 22).

A decode step of a small model is short (~10-50 ms) and crosses hundreds of OpenMP barriers (our native step:
~8 per layer; the PyTorch path: one per op). When another process takes one of the cores, one of our threads
runs only in the scheduler's slices while the others spin at every barrier waiting for it: on a 2-core machine,
2 threads then decoded ~10x slower than 1 (issue 22: 34-55 s against 4-6 s for 100 tokens), while on a quiet
machine 2 threads are the fastest. No count fixed in advance is right in both cases, so `ThreadGovernor`:

- starts at the count the idle CPUs allow (`starting_count()`: /proc/stat over 0.1 s, before the model loads,
  which runs at that count too);
- times each decode step's forward call and, now and then, runs one step at a neighbouring count on the
  ladder max, max/2, ..., 1; it moves when that step took less than `margin` x the current count's recent
  median. A probe that loses makes the next wait longer (x2; x8 when it was over twice as slow, so that a
  starved count is rarely paid for), up to `max_interval` steps;
- probes upwards only while the CPUs it would add were idle since the last probe (a busy machine pays no
  probes of a count that would starve), and downwards at once after a step over twice the recent median (a
  competitor just arrived).

`benchmarks/busy_threads.py` measures it against fixed counts, quiet and with a competing busy loop.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

TICK = 1 / os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 0.01  # /proc/stat's unit, seconds


def ladder(n: int) -> list[int]:
    """The thread counts tried, most first: n, n/2, n/4, ..., 1."""
    out = [max(1, n)]
    while out[-1] > 1:
        out.append(out[-1] // 2)
    return out


def idle_seconds() -> float | None:
    """Idle time so far of the CPUs this process may run on (seconds, summed over them); None where unknown."""
    try:
        cpus = {f"cpu{i}" for i in os.sched_getaffinity(0)}
        total = 0
        with open("/proc/stat") as f:
            for line in f:
                name, _, rest = line.partition(" ")
                if name in cpus:
                    fields_ = rest.split()
                    total += int(fields_[3]) + int(fields_[4])  # idle + iowait
        return total * TICK
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def idle_cpus(seconds: float = 0.1) -> float | None:
    """How many of this process's CPUs were idle, on average, over the next `seconds`; None where unknown."""
    a, t = idle_seconds(), time.monotonic()
    time.sleep(seconds)
    b = idle_seconds()
    if a is None or b is None:
        return None
    return (b - a) / (time.monotonic() - t)


def starting_count(max_threads: int) -> int:
    """The count on the ladder that the CPUs idle right now allow (the busy ones are somebody else's): where the
    governor starts, and what a model loads with."""
    counts = ladder(max_threads)
    idle = idle_cpus() if len(counts) > 1 else None
    room = max_threads if idle is None else max(1, round(idle))
    return next((n for n in counts if n <= room), 1)


@dataclass
class ThreadGovernor:
    max_threads: int
    start: int | None = None  # the starting count (default: starting_count())
    first_probe: int = 2  # steps at a new count before its first probe
    max_interval: int = 512  # steps between probes, at most
    margin: float = 0.85  # a probe wins when its step took less than margin x the current median
    window: int = 5  # recent step times whose median stands for the current count
    counts: list[int] = field(init=False)
    level: int = field(init=False, default=0)  # index of the current count in `counts`
    steps: int = field(init=False, default=0)  # decode steps timed
    moves: int = field(init=False, default=0)
    probes: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.counts = ladder(self.max_threads)
        start = starting_count(self.max_threads) if self.start is None else self.start
        self.level = next((i for i, n in enumerate(self.counts) if n <= max(1, start)), len(self.counts) - 1)
        self._recent: deque[float] = deque(maxlen=self.window)
        self._until_probe = self.first_probe
        self._interval = self.first_probe
        self._down_next = False  # after a slow step: probe fewer threads at once
        self._idle_mark = (time.monotonic(), idle_seconds())

    @property
    def current(self) -> int:
        return self.counts[self.level]

    def _idle_since_mark(self) -> float | None:
        t0, idle0 = self._idle_mark
        idle1, t1 = idle_seconds(), time.monotonic()
        self._idle_mark = (t1, idle1)
        if idle0 is None or idle1 is None or t1 <= t0:
            return None
        return (idle1 - idle0) / (t1 - t0)

    def _probe_level(self) -> int | None:
        if len(self.counts) == 1 or self._until_probe > 0 or len(self._recent) < (1 if self._down_next else 2):
            return None
        down = self.level + 1 if self.level + 1 < len(self.counts) else None  # the ladder runs from many to one
        up = self.level - 1 if self.level > 0 else None
        idle = self._idle_since_mark()
        room = up is not None and (idle is None or idle >= 0.5 * (self.counts[up] - self.current))
        if self._down_next or not room:
            self._down_next = False
            if down is None:  # at one thread on a busy machine: look again later, without a probe
                self._until_probe = self._interval
            return down
        return up

    def choose(self) -> tuple[int | None, int]:
        """The next step's thread count: (the ladder index it probes, or None at the current count; the count)."""
        probe = self._probe_level()
        return probe, self.counts[probe] if probe is not None else self.current

    @contextlib.contextmanager
    def step(self) -> Iterator[int]:
        """Around one decode step's forward call: sets the thread count it runs with, and times it."""
        probe, n = self.choose()
        torch.set_num_threads(n)
        t = time.perf_counter()
        try:
            yield n
        finally:
            if probe is not None:
                torch.set_num_threads(self.current)  # back to the chosen count for other work (prompts, batches)
        self.record(probe, time.perf_counter() - t)
        torch.set_num_threads(self.current)

    def record(self, probe: int | None, dt: float) -> None:
        """A step of `dt` seconds, run as `choose()` said."""
        self.steps += 1
        if probe is None:
            if len(self._recent) >= 2 and dt > 2 * statistics.median(self._recent):
                self._down_next, self._until_probe = True, 0  # a competitor may just have arrived:
                self._recent.clear()  # the probe is weighed against this step
            else:
                self._until_probe -= 1
            self._recent.append(dt)
            return
        self.probes += 1
        now = statistics.median(self._recent)
        if dt < self.margin * now:
            self.level, self.moves = probe, self.moves + 1
            self._recent.clear()
            self._recent.append(dt)
            self._interval = self.first_probe
        else:
            self._interval = min(self.max_interval, self._interval * (8 if dt > 2 * now else 2))
        self._until_probe = self._interval
