"""Where a stream's time to its first item goes, inside the engine worker (for `/metrics` and
benchmarks/server_load.py): sums over the streams that delivered a first item.

- queue: from admission to the worker's first step of the stream (other jobs' rounds ran meanwhile);
- prefill: forward calls that evaluated its prompt (a batched call counts whole for each of its rows);
- own: the rest of its own steps (chat template, tokenizing, session bookkeeping, sampling the first token);
- wait: the rest, after its first step: the worker ran other streams' decode steps and prompt calls.
The HTTP/SSE part is outside: a client's measured time to first token minus the sum of these.
"""

from __future__ import annotations

from dataclasses import dataclass, field

PARTS = ("queue", "prefill", "own", "wait")


@dataclass
class FirstItemTimes:
    count: int = 0
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PARTS, 0.0))

    def add(self, total: float, queue: float, prefill: float, own: float) -> None:
        """One stream's first item: `total` seconds after admission, of which `queue`, `prefill` and `own`
        (its own steps without their prompt calls); the rest was waiting on others."""
        self.count += 1
        for k, v in (("queue", queue), ("prefill", prefill), ("own", own), ("wait", total - queue - prefill - own)):
            self.seconds[k] += max(0.0, v)

    def lines(self) -> list[str]:
        name = "infinichat_first_item_seconds"
        what = "time from a stream's admission to its first item in the engine worker, by part, summed over streams"
        out = [f"# HELP {name} {what}", f"# TYPE {name} counter"]
        out += [f'{name}{{part="{k}"}} {v:.6f}' for k, v in self.seconds.items()]
        out.append(f"{name}_count {self.count}")
        return out
