"""The engine worker: one thread owns the engine and the SessionManager; HTTP handlers submit jobs to it.

Two kinds of job: a *call* (a function of the manager, run once, its result handed back through a
concurrent Future) and a *stream* (a function of the manager returning an iterator of JSON-ready items,
advanced one item at a time). Active streams are served round-robin, one item (about one token) each per
turn, with pending calls taken in between, so one long reply never starves the other sessions.

Continuous batching (engine/batch.py): after a stream's turn the worker takes the decode step its generation
offered (the sequence and its next token); at the start of the next round it runs the offered steps of all
active streams in batched forward calls of at most `max_batch` sequences, and each generation, on its turn,
claims its logits and samples with its own sampler. Steps that cannot be batched (eviction, attention
weights) run alone on the generation's turn; sessions join and leave the batch at token boundaries.

Chunked prefill (engine/batch.py `PrefillPacer`): while other streams are generating, a stream's prompt is
evaluated in calls of at most `prefill_chunk` tokens, and between two calls the worker runs one round of the
other generating streams (batched as above), so a long prompt does not freeze their output. A stop or a
disconnect of the prefilling stream is honoured between its calls: the prefill is abandoned (`Cancelled`), and
the session's all-or-nothing rule puts it back as it was before the request.

Jobs that touch a session carry its id; a second mutating job on a session that has one running is refused
(`Busy`, 409), and the number of jobs waiting or running is bounded (`QueueFull`, 429). A stream's job can be
stopped (`should_stop` turns true: the generation ends with finish_reason "cancelled" and its last item is
still delivered) or abandoned (the client went away: the iterator is closed, so the session keeps the partial
reply, marked cancelled, with a consistent cache).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from infinichat.engine.base import Engine
from infinichat.engine.batch import DecodeBatcher, PrefillPacer

log = logging.getLogger(__name__)

END = object()  # the last item a stream's sink receives


class Busy(Exception):
    """The session already has an operation running."""


class QueueFull(Exception):
    """Too many jobs waiting or running."""


class Cancelled(Exception):
    """A stream stopped (or abandoned by its client) while its prompt was being evaluated, before any output:
    the action did not happen."""


def _no_sink(item: Any) -> None:
    """The sink of a call job: its outcome goes to its future."""


def _close(it: Iterator) -> None:
    """Close a stream's iterator: a generator runs its cleanup (the session marks the reply cancelled)."""
    close = getattr(it, "close", None)
    if close is not None:
        close()


@dataclass
class Job:
    fn: Callable[[Any], Any]  # manager -> result (call) or iterator (stream)
    session: str | None = None
    mutates: bool = True
    future: concurrent.futures.Future | None = None  # calls (None: a stream)
    sink: Callable[[Any], object] = _no_sink  # streams: receives items, an exception, then END
    stop: threading.Event = field(default_factory=threading.Event)
    abandoned: bool = False
    it: Iterator = field(default_factory=lambda: iter(()))  # a stream's items, once started
    offers: list = field(default_factory=list)  # the decode step its generation offered on its last turn
    started: bool = False  # a stream that has delivered an item (past its prompt)

    def should_stop(self) -> bool:
        return self.stop.is_set()


class EngineWorker:
    def __init__(
        self,
        manager,
        max_jobs: int = 64,
        on_idle: Callable[[Any], None] | None = None,
        max_batch: int = 8,
        prefill_chunk: int | None = 256,
    ):
        """`max_batch`: sequences per batched decode call (1: no batching; an engine that cannot batch, such
        as the llama.cpp backend, always steps its generations one by one). `prefill_chunk`: tokens per prompt
        call while other streams are generating (None: prompts in the engine's own chunks, no interleaving)."""
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.manager = manager
        self.max_jobs = max_jobs
        engine = getattr(manager, "engine", None)
        self.batcher: DecodeBatcher | None = None
        if max_batch > 1 and engine is not None and type(engine).decode_rows is not Engine.decode_rows:
            self.batcher = engine.batcher = DecodeBatcher(engine, max_batch)
        self._current: Job | None = None  # the stream being stepped
        self._pausing = False  # inside a pause: a prefill there runs in one go
        if prefill_chunk is not None and engine is not None:
            engine.pacer = PrefillPacer(prefill_chunk, self._others_waiting, self._pause)
        self.rounds = 0  # rounds of stream steps run (the pauses' included)
        self.on_idle = on_idle  # called in the worker between rounds (metrics snapshot)
        self._q: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._jobs = 0  # waiting + running
        self._busy: dict[str, Job] = {}  # session id -> its running mutating job
        self._active: list[Job] = []
        self._thread = threading.Thread(target=self._run, name="infinichat-engine", daemon=True)
        self._closed = False

    # ------------------------------------------------------------------ handler side (any thread)
    def start(self) -> EngineWorker:
        self._thread.start()
        return self

    @property
    def depth(self) -> int:
        return self._jobs

    def busy_sessions(self) -> set[str]:
        """The sessions with a mutating job waiting or running."""
        with self._lock:
            return set(self._busy)

    def _admit(self, job: Job) -> None:
        with self._lock:
            if self._closed:
                raise QueueFull("the server is shutting down")
            if self._jobs >= self.max_jobs:
                raise QueueFull(
                    f"the server has {self._jobs} requests waiting or running (at most {self.max_jobs}); retry later"
                )
            if job.session is not None and job.mutates:
                if job.session in self._busy:
                    raise Busy(
                        f"session {job.session!r} is busy with another request; wait for it to finish "
                        f"or POST /api/sessions/{job.session}/stop"
                    )
                self._busy[job.session] = job
            self._jobs += 1
        self._q.put(job)

    def call(
        self, fn: Callable[[Any], Any], session: str | None = None, mutates: bool = True
    ) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._admit(Job(fn, session, mutates, future=future))
        return future

    async def acall(self, fn: Callable[[Any], Any], session: str | None = None, mutates: bool = True) -> Any:
        return await asyncio.wrap_future(self.call(fn, session, mutates))

    def stream(
        self, fn: Callable[[Any, Job], Iterator], sink: Callable[[Any], object], session: str | None = None
    ) -> Job:
        """Submit a stream job; `fn(manager, job)` returns the iterator (it may use job.should_stop)."""
        job = Job(lambda m: None, session, True, sink=sink)
        job.fn = lambda m: fn(m, job)
        self._admit(job)
        return job

    def stop_session(self, session: str) -> bool:
        with self._lock:
            job = self._busy.get(session)
        if job is None or job.future is not None:  # nothing running, or a call (not a stream)
            return False
        job.stop.set()
        return True

    def abandon(self, job: Job) -> None:
        """The client went away: close the job's iterator at the worker's next turn."""
        job.abandoned = True
        job.stop.set()

    def close(self, timeout: float = 30.0) -> None:
        with self._lock:
            self._closed = True
        self._q.put(None)
        self._thread.join(timeout)

    # ------------------------------------------------------------------ worker side
    def _finish(self, job: Job) -> None:
        with self._lock:
            self._jobs -= 1
            if job.session is not None and self._busy.get(job.session) is job:
                del self._busy[job.session]

    def _run(self) -> None:
        job: Job | Literal[False] | None  # False: nothing new to start; None: shut down
        while True:
            try:
                job = self._q.get(block=not self._active, timeout=None if not self._active else 0)
            except queue.Empty:
                job = False
            while job is not False:
                if job is None:
                    self._shutdown()
                    return
                self._start(job)
                try:
                    job = self._q.get_nowait()
                except queue.Empty:
                    job = False
            self._round(list(self._active))
            if self.on_idle is not None:
                try:
                    self.on_idle(self.manager)
                except Exception:  # metrics must never stop the worker
                    log.exception("on_idle failed")

    def _round(self, jobs: list[Job]) -> None:
        """One step of each stream: first their offered decode steps in batched calls, then each in turn (it
        claims its precomputed logits, or runs its own step). A stream that already stepped in a pause of this
        round (its new offer is waiting) is skipped: it is batched in the next round."""
        self.rounds += 1
        b = self.batcher
        ran: dict[int, list] = {}  # id(job) -> the offers run for it this round
        if b is not None:
            b.take()  # offers made by calls (not generations driven here) are dropped
            for j in jobs:
                if not j.abandoned and j.offers:
                    ran[id(j)] = j.offers
                j.offers = []
            try:
                b.run(o for offers in ran.values() for o in offers)
            except Exception:  # a failed batched call: each generation runs its own step instead
                log.exception("a batched decode step failed")
        for job in jobs:
            if job not in self._active or job.offers:
                continue
            outer, self._current = self._current, job
            try:
                self._step(job)
            finally:
                self._current = outer
            if b is not None:
                new = b.take()
                if not new and job in self._active:  # its turn delivered an event without a step: keep the result
                    new = [o for o in ran.get(id(job), []) if b.pending(o)]
                job.offers = new
        if b is not None:
            b.clear(keep=[o for j in self._active for o in j.offers])

    # ------------------------------------------------------------------ chunked prefill (the engine's pacer)
    def _others_waiting(self) -> bool:
        """Whether streams other than the prefilling one are generating (so its prompt goes in chunks)."""
        return not self._pausing and any(j.started and j is not self._current for j in self._active)

    def _pause(self) -> None:
        """Between two prompt calls of the current stream: cancel it if it was stopped, else advance the other
        generating streams by one round."""
        job = self._current
        if job is not None and job.stop.is_set():
            raise Cancelled(
                "the request was stopped while its prompt was being evaluated; nothing was changed"
                if not job.abandoned
                else "the client went away while its prompt was being evaluated"
            )
        if self._pausing:
            return
        others = [j for j in self._active if j.started and j is not job]
        if not others:
            return
        self._pausing = True
        try:
            self._round(others)
        finally:
            self._pausing = False

    def _start(self, job: Job) -> None:
        # A job is finished (the session free again) before its client can see the outcome: a client that
        # sends its next request the moment a reply arrives must not find the session still busy.
        if job.future is not None:
            if not job.future.set_running_or_notify_cancel():
                self._finish(job)
                return
            try:
                result, error = job.fn(self.manager), None
            except BaseException as e:  # handed to the handler, which maps it to an HTTP error
                result, error = None, e
            self._finish(job)
            if error is None:
                job.future.set_result(result)
            else:
                job.future.set_exception(error)
            return
        self._pin(job, True)
        try:
            job.it = iter(job.fn(self.manager))
        except Exception as e:
            self._pin(job, False)
            self._finish(job)
            job.sink(e)
            job.sink(END)
            return
        self._active.append(job)

    def _pin(self, job: Job, on: bool) -> None:
        """A session generating keeps its cache in memory (other requests may offload idle caches)."""
        pinned = getattr(self.manager, "pinned", None)
        if job.session is not None and pinned is not None:
            (pinned.add if on else pinned.discard)(job.session)

    def _step(self, job: Job) -> None:
        done = False
        if job.abandoned:
            try:
                _close(job.it)  # the session keeps the partial reply (cancelled), cache consistent
            except Exception:
                log.exception("closing an abandoned generation failed")
            done = True
        else:
            t = time.monotonic()
            try:
                job.sink(next(job.it))
                job.started = True
            except StopIteration:
                done = True
            except Exception as e:
                job.sink(e)
                done = True
            if time.monotonic() - t > 5:
                log.info("one generation step took %.1f s", time.monotonic() - t)
        if done:
            self._active.remove(job)
            self._pin(job, False)
            self._finish(job)
            job.sink(END)  # after _finish: see _start

    def _shutdown(self) -> None:
        for job in self._active:
            try:
                _close(job.it)
            except Exception:
                log.exception("closing a generation at shutdown failed")
            job.sink(END)
        self._active.clear()
        try:
            self.manager.close()
        except Exception:
            log.exception("closing the session manager failed")
