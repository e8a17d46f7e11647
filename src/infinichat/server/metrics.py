"""Counters for `GET /metrics` (Prometheus text format)."""

from __future__ import annotations

import threading
import time
from collections import Counter

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # the decode batch size histogram's upper bounds


def histogram(name: str, help_: str, sizes: dict[int, int]) -> list[str]:
    """A Prometheus histogram of batch sizes (size -> calls) over BATCH_BUCKETS."""
    lines = [f"# HELP {name} {help_}", f"# TYPE {name} histogram"]
    for le in BATCH_BUCKETS:
        n = sum(c for b, c in sizes.items() if b <= le)
        lines.append(f'{name}_bucket{{le="{le}"}} {n}')
    lines.append(f'{name}_bucket{{le="+Inf"}} {sum(sizes.values())}')
    lines.append(f"{name}_sum {sum(b * c for b, c in sizes.items())}")
    lines.append(f"{name}_count {sum(sizes.values())}")
    return lines


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.requests: Counter[tuple[str, str, int]] = Counter()  # (method, route, status)
        self.tokens_in = 0
        self.tokens_out = 0
        self.gen_seconds = 0.0  # wall time with at least one generation running
        self._recent: list[tuple[float, int]] = []  # (time, tokens out) for the 60 s rate
        self.cache = {
            "cache_tokens": 0,
            "cache_bytes": 0,
            "resident_sessions": 0,
            "evictions": 0,
            "evicted_tokens": 0,
            "kv_offloads": 0,
            "kv_peak_bytes": 0,
            "kv_limit_bytes": 0,
            "kv_reserved_bytes": 0,
        }
        self.batch_sizes: dict[int, int] = {}  # sequences per decode forward call -> calls (the worker's batcher)
        self.prompt_batch_sizes: dict[int, int] = {}  # sequences per batched prompt call -> calls (the worker's)
        self.started = time.time()

    def request(self, method: str, route: str, status: int) -> None:
        with self._lock:
            self.requests[(method, route, status)] += 1

    def tokens(self, n_in: int = 0, n_out: int = 0) -> None:
        with self._lock:
            self.tokens_in += n_in
            self.tokens_out += n_out
            if n_out:
                now = time.monotonic()
                self._recent.append((now, n_out))
                while self._recent and self._recent[0][0] < now - 60:
                    self._recent.pop(0)

    def snapshot_cache(self, values: dict) -> None:
        with self._lock:
            self.cache.update(values)

    def snapshot_batches(self, sizes: dict[int, int]) -> None:
        with self._lock:
            self.batch_sizes = dict(sizes)

    def snapshot_prompt_batches(self, sizes: dict[int, int]) -> None:
        with self._lock:
            self.prompt_batch_sizes = dict(sizes)

    def _batch_histogram(self) -> list[str]:
        return histogram(
            "infinichat_decode_batch_size",
            "sequences per decode forward call (continuous batching; a step run alone counts 1)",
            self.batch_sizes,
        ) + histogram(
            "infinichat_prefill_batch_size",
            "sequences per prompt forward call of the worker (batched prefill; prompts it cannot batch not counted)",
            self.prompt_batch_sizes,
        )

    def render(self, queue_depth: int) -> str:
        with self._lock:
            now = time.monotonic()
            recent = sum(n for t, n in self._recent if t >= now - 60)
            recent10 = sum(n for t, n in self._recent if t >= now - 10)
            lines = [
                "# HELP infinichat_requests_total HTTP requests by endpoint and status",
                "# TYPE infinichat_requests_total counter",
            ]
            for (method, route, status), n in sorted(self.requests.items()):
                lines.append(f'infinichat_requests_total{{method="{method}",endpoint="{route}",status="{status}"}} {n}')
            gauges = [
                ("tokens_in_total", "counter", "prompt tokens evaluated", self.tokens_in),
                ("tokens_out_total", "counter", "tokens generated", self.tokens_out),
                ("tokens_per_second", "gauge", "tokens generated per second over the last 60 s", recent / 60),
                (
                    "tokens_per_second_10s",
                    "gauge",
                    "tokens generated per second over the last 10 s, all sessions together",
                    recent10 / 10,
                ),
                ("queue_depth", "gauge", "requests waiting or running in the engine worker", queue_depth),
                ("cache_tokens", "gauge", "tokens held in resident KV caches", self.cache["cache_tokens"]),
                (
                    "cache_bytes",
                    "gauge",
                    "bytes of K/V memory the resident KV caches hold (allocated; --kv-dtype sets the bytes per token)",
                    self.cache["cache_bytes"],
                ),
                ("resident_sessions", "gauge", "sessions whose KV cache is in memory", self.cache["resident_sessions"]),
                ("evictions_total", "counter", "eviction events in resident caches", self.cache["evictions"]),
                (
                    "evicted_tokens_total",
                    "counter",
                    "tokens evicted from resident caches",
                    self.cache["evicted_tokens"],
                ),
                (
                    "kv_offloads_total",
                    "counter",
                    "session caches written to disk under the memory cap",
                    self.cache["kv_offloads"],
                ),
                (
                    "kv_peak_bytes",
                    "gauge",
                    "the most KV memory counted when a generation began (resident caches, requests' reservations)",
                    self.cache["kv_peak_bytes"],
                ),
                (
                    "kv_limit_bytes",
                    "gauge",
                    "the hard limit on KV memory: past it a new generation gets 503 (--kv-limit-mb)",
                    self.cache["kv_limit_bytes"],
                ),
                (
                    "kv_reserved_bytes",
                    "gauge",
                    (
                        "KV memory reserved by running requests without a session of their own (anonymous /v1 and "
                        "/completion, echo, /suggest's copy); 0 when none runs"
                    ),
                    self.cache["kv_reserved_bytes"],
                ),
            ]
            for name, kind, help_, v in gauges:
                lines += [
                    f"# HELP infinichat_{name} {help_}",
                    f"# TYPE infinichat_{name} {kind}",
                    f"infinichat_{name} {v:g}" if isinstance(v, float) else f"infinichat_{name} {v}",
                ]
            lines += self._batch_histogram()
        return "\n".join(lines) + "\n"
