"""The engine worker: one thread owns the engine and the SessionManager; HTTP handlers submit jobs to it.

Two kinds of job: a *call* (a function of the manager, run once, its result handed back through a
concurrent Future) and a *stream* (a function of the manager returning an iterator of JSON-ready items,
advanced one item at a time). Each job runs in its own greenlet (a coroutine on the worker thread), so it can be
suspended in the middle of its prompt's evaluation, deep inside the session code, and resumed later.

The worker runs rounds; each round, over the active jobs (prefill first, then decode):
1. *Prompt chunks* (batched prefill): a job evaluating a prompt hands each chunk to the worker (the engine's
   `PrefillPacer.submit`) and is suspended. The pending chunks, oldest first, up to the round's token budget
   (`prefill_chunk` tokens while a stream is generating, else the engine's `max_chunk`; a chunk that does not fit
   is split), run in forward calls (`Engine.prefill_rows`: the matrix products on the stacked tokens, attention per
   sequence) that each hold consecutive chunks of at most `prefill_group` tokens together (`serve --prefill-group`,
   default PREFILL_GROUP below: only small prompts gain from sharing a call on a CPU; 0 or 1: one chunk per call).
   After its call each of those jobs resumes: it samples and sends its first token, or hands over its next chunk,
   served in this round too while the budget lasts (the session evaluates a turn in two calls, the message then the
   reply's header: the jobs' second calls, a few tokens each, then share one call).
2. *Decode steps* (continuous batching, engine/batch.py): the decode steps the generating streams offered on their
   last turn run in batched forward calls of at most `max_batch` sequences.
3. *Turns*: every other job resumes once: a generation claims its precomputed logits and samples with its own
   sampler (or runs its own step: eviction, attention weights); a job paused between two prompt calls it ran
   itself goes on.
A new job takes its first step when the worker takes it in, between two rounds (template, tokenizing, up to its
first prompt chunk), so its prompt is evaluated in the next round.
So every generating stream gets one token per round, and a round's prompt calls hold at most the budget: a new
request waits for the current round (and the older prompts of its own round), never behind whole long prompts of
others; the running streams' inter-token latency grows by the round's prompt calls in the rounds that have some.
A prompt chunk the engine cannot batch (eviction during the prompt, a policy that needs attention weights or
compresses at the prompt's end) is evaluated by its job alone, in calls of at most `prefill_chunk` tokens while
others are active, with a pause (the rest of the round) between two calls.

A stop or a disconnect of a job suspended in its prompt is honoured when it resumes: the prefill is abandoned
(`Cancelled`), and the session's all-or-nothing rule puts it back as it was before the request (its cache
truncated to its length before the request).

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

import torch
from greenlet import getcurrent, greenlet

from infinichat.engine.base import Engine
from infinichat.engine.batch import DecodeBatcher, PrefillPacer
from infinichat.kv.sequence import KVSequence
from infinichat.server.first_item import FirstItemTimes

log = logging.getLogger(__name__)

# Prompt chunks of several sequences share a forward call while their tokens total at most this many. On a CPU a
# call of a few rows costs about what a one-token step does (the weights are read once), but from a few tens of
# rows on it is bound by arithmetic: 8 prompts of 25-40 tokens in one call cost nearly what 8 calls do
# (benchmarks/batch_prefill.py, README), and every one of them would wait for the whole call. Small chunks (short
# messages, a reply's closing tokens) are batched; larger ones run one per call, oldest first, each job sending its
# first token as soon as its own call is done. The default of `serve --prefill-group`.
PREFILL_GROUP = 32
END = object()  # the last item a stream's sink receives
PAUSE = object()  # what a job hands the worker between two prompt calls it ran itself


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
class PromptChunk:
    """What a job suspended in its prompt waits for: these tokens evaluated (a prefix of them, if the round's
    budget is short) at the end of `seq`."""

    seq: KVSequence
    ids: torch.Tensor  # (T,)


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
    g: greenlet | None = None  # the greenlet advancing it to its next item (None: between items)
    waiting: object = None  # a suspended job: its PromptChunk, or PAUSE
    admitted: float = field(default_factory=time.perf_counter)  # the probes of server/first_item.py
    first_step: float | None = None  # when the worker first stepped it
    prefill_s: float = 0.0  # its prompt's forward calls, before its first item
    own_s: float = 0.0  # its own steps, before its first item (its prompt calls included)

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
        prefill_group: int = PREFILL_GROUP,
    ):
        """`max_batch`: sequences per batched decode call (1: no batching; an engine that cannot batch always
        steps its generations one by one). `prefill_chunk`: prompt tokens per
        round while a stream is generating (None: each prompt in one go, in the engine's own chunks: no
        interleaving, no batched prompts). `prefill_group`: prompt tokens at most in one call of several sequences'
        chunks (0 or 1: each chunk in its own call)."""
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if prefill_group < 0:
            raise ValueError(f"prefill_group must be at least 0 (0 or 1: no grouping), got {prefill_group}")
        self.manager = manager
        self.max_jobs = max_jobs
        engine = getattr(manager, "engine", None)
        self.batcher: DecodeBatcher | None = None
        if max_batch > 1 and engine is not None and type(engine).decode_rows is not Engine.decode_rows:
            self.batcher = engine.batcher = DecodeBatcher(engine, max_batch)
        self.engine = engine
        self._current: Job | None = None  # the job running in its greenlet
        self._main: greenlet | None = None  # the worker thread's own greenlet
        self.prefill_chunk = prefill_chunk
        self.prefill_group = prefill_group
        self.pacer: PrefillPacer | None = None
        if prefill_chunk is not None and engine is not None:
            submit = self._submit if type(engine).prefill_rows is not Engine.prefill_rows else None
            self.pacer = engine.pacer = PrefillPacer(prefill_chunk, self._others_waiting, self._pause, submit)
        self.prompt_calls: dict[int, int] = {}  # sequences per batched prompt call -> calls
        self.rounds = 0  # rounds of stream steps run (the pauses' included)
        self.first_item = FirstItemTimes()  # where the streams' time to their first item went
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
        self._main = getcurrent()
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
            if self._active:
                self._round()
            if self.on_idle is not None:
                try:
                    self.on_idle(self.manager)
                except Exception:  # metrics must never stop the worker
                    log.exception("on_idle failed")

    def _round(self) -> None:
        """One round (see the module's docstring): the pending prompt chunks in one call, the offered decode steps
        in batched calls, then one turn of every job not waiting for a prompt chunk."""
        self.rounds += 1
        self._prompts([j for j in self._active if isinstance(j.waiting, PromptChunk)])
        b = self.batcher
        ran: dict[int, list] = {}  # id(job) -> the offers run for it this round
        jobs = list(self._active)
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
            if job not in self._active or isinstance(job.waiting, PromptChunk):
                continue
            self._advance(job)
            if b is not None:
                new = b.take()
                if not new and job in self._active:  # its turn delivered an event without a step: keep the result
                    new = [o for o in ran.get(id(job), []) if b.pending(o)]
                job.offers = new
        if b is not None:
            b.clear(keep=[o for j in self._active for o in j.offers])

    def _prompts(self, waiting: list[Job]) -> None:
        """The prompt chunks the jobs wait for, oldest first, within the round's token budget: consecutive chunks
        of at most `prefill_group` tokens together go in one forward call, and each job resumes right after its
        call (so it sends its first token before the next call runs). A job stopped before its first item resumes
        without its chunk (it raises `Cancelled`); one stopped later (closing its reply: the reply's last tokens go
        into the cache) gets it."""
        for j in [j for j in waiting if j.stop.is_set() and not j.started]:
            waiting.remove(j)
            self._advance(j)
        if not waiting or self.engine is None:
            return
        generating = any(j.started and j.future is None for j in self._active)
        budget = self.prefill_chunk if generating and self.prefill_chunk else self.engine.max_chunk
        while waiting and budget > 0:  # a job that hands over another chunk at once (the session evaluates a turn
            # in two calls: the message, then the reply's header) is served again, while the budget lasts
            groups: list[list[tuple[Job, PromptChunk, int]]] = []
            size = 0  # tokens in the last group
            for j in waiting:
                assert isinstance(j.waiting, PromptChunk)
                n = min(j.waiting.ids.shape[0], budget)
                if n < 1:
                    break
                if not groups or size + n > self.prefill_group:
                    groups.append([])
                    size = 0
                groups[-1].append((j, j.waiting, n))
                size += n
                budget -= n
            for rows in groups:
                self._prompt_call(rows)
            waiting = [j for rows in groups for j, _, _ in rows if isinstance(j.waiting, PromptChunk)]

    def _prompt_call(self, rows: list[tuple[Job, PromptChunk, int]]) -> None:
        """One forward call for the rows' chunks (n tokens of each); then each job resumes with its result."""
        assert self.engine is not None
        t0 = time.perf_counter()
        try:
            outs = self.engine.prefill_rows([(c.seq, c.ids[:n]) for _, c, n in rows])
        except Exception as e:  # each job gets the error where it waits: its action is rolled back
            log.exception("a batched prompt call failed")
            for j, _, _ in rows:
                self._advance(j, error=e)
            return
        dt = time.perf_counter() - t0
        if self.pacer is not None:
            self.pacer.seconds += dt
        self.prompt_calls[len(rows)] = self.prompt_calls.get(len(rows), 0) + 1
        for (j, _, n), out in zip(rows, outs, strict=True):
            if not j.started:
                j.prefill_s += dt
            self._advance(j, (n, out))
            if self.batcher is not None:
                j.offers = self.batcher.take()

    # ------------------------------------------------------------------ inside a job's greenlet (the engine's pacer)
    def _in_job(self) -> Job | None:
        job = self._current
        return job if job is not None and job.g is not None and getcurrent() is job.g else None

    def _suspend(self, job: Job, what: object) -> object:
        """Hand control back to the worker until it resumes this job; a stopped job raises `Cancelled`."""
        assert self._main is not None
        self._check_stop(job)
        value = self._main.switch(what)
        self._check_stop(job)
        return value

    @staticmethod
    def _check_stop(job: Job) -> None:
        if job.stop.is_set() and not job.started:
            raise Cancelled(
                "the request was stopped while its prompt was being evaluated; nothing was changed"
                if not job.abandoned
                else "the client went away while its prompt was being evaluated"
            )

    def _submit(self, seq: KVSequence, ids: torch.Tensor) -> tuple[int, torch.Tensor] | None:
        """A prompt chunk for the next round's batched call; None outside a job (the engine evaluates it)."""
        job = self._in_job()
        if job is None:
            return None
        out = self._suspend(job, PromptChunk(seq, ids))
        if not isinstance(out, tuple):  # resumed without its chunk: only a stopped job is
            raise Cancelled("the request was stopped while its prompt was being evaluated")
        return out

    def _others_waiting(self) -> bool:
        """Whether other jobs are active (so a prompt the engine evaluates itself goes in chunks)."""
        job = self._in_job()
        return job is not None and any(j is not job for j in self._active)

    def _pause(self) -> None:
        """Between two prompt calls a job ran itself: the rest of the round runs (a stopped job is cancelled)."""
        job = self._in_job()
        if job is not None:
            self._suspend(job, PAUSE)

    # ------------------------------------------------------------------ starting, advancing, ending jobs
    def _start(self, job: Job) -> None:
        if job.future is not None:
            if not job.future.set_running_or_notify_cancel():
                self._finish(job)
                return
            job.it = self._call(job)
            self._pin(job, True)
            self._active.append(job)
            self._advance(job)  # a call runs now, to its end or until it waits for a prompt chunk
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
        # its first step now (template, tokenizing), up to its first prompt chunk: the next round evaluates it
        b = self.batcher
        if b is not None:
            b.take()  # offers made by calls (not generations driven here) are dropped
        self._advance(job)
        if b is not None:
            job.offers = b.take()

    def _call(self, job: Job) -> Iterator:
        yield job.fn(self.manager)

    def _pin(self, job: Job, on: bool) -> None:
        """A session in use keeps its cache in memory (other requests may offload idle caches)."""
        pinned = getattr(self.manager, "pinned", None)
        if job.session is not None and pinned is not None:
            (pinned.add if on else pinned.discard)(job.session)

    def _advance(self, job: Job, value: object = None, error: BaseException | None = None) -> None:
        """Run `job` in its greenlet until it delivers its next item (or ends), or waits again (`job.waiting`).
        `value`/`error`: what the suspended job's wait returns / raises."""
        if job.abandoned and job.g is None and job.future is None:
            try:
                _close(job.it)  # the session keeps the partial reply (cancelled), cache consistent
            except Exception:
                log.exception("closing an abandoned generation failed")
            self._end(job)
            return
        t0 = time.perf_counter()
        p0 = self.pacer.seconds if self.pacer is not None else 0.0
        if job.first_step is None:
            job.first_step = t0
        if job.g is None:
            job.g = greenlet(lambda *_: next(job.it))  # the first switch passes `value` (None)
        outer, self._current = self._current, job
        job.waiting = None
        try:
            out = job.g.throw(error) if error is not None else job.g.switch(value)
        except StopIteration:
            job.g = None
            self._end(job)
            return
        except BaseException as e:  # a stream's error goes to its sink, a call's to its future
            job.g = None
            if job.future is None and not isinstance(e, Exception):
                raise
            self._end(job, e)
            return
        finally:
            self._current = outer
            if not job.started:  # probes: its own time, without the prompt calls it ran itself
                p1 = self.pacer.seconds if self.pacer is not None else 0.0
                job.own_s += time.perf_counter() - t0 - (p1 - p0)
                job.prefill_s += p1 - p0
        if time.perf_counter() - t0 > 5:
            log.info("one generation step took %.1f s", time.perf_counter() - t0)
        if not job.g.dead:  # suspended: it waits for a prompt chunk, or paused between two prompt calls
            job.waiting = out
            return
        job.g = None
        if job.future is not None:
            self._end(job, result=out)
            return
        if not job.started:
            now = time.perf_counter()
            queue = job.first_step - job.admitted
            self.first_item.add(now - job.admitted, queue, job.prefill_s, job.own_s)
        job.started = True
        job.sink(out)

    def _end(self, job: Job, error: BaseException | None = None, result: object = None) -> None:
        # A job is finished (the session free again) before its client can see the outcome: a client that
        # sends its next request the moment a reply arrives must not find the session still busy.
        if job in self._active:
            self._active.remove(job)
        self._pin(job, False)
        self._finish(job)
        if isinstance(error, torch.OutOfMemoryError) and torch.cuda.is_available():
            torch.cuda.empty_cache()  # the failed call's blocks go back to the GPU (the action was rolled back)
        if job.future is not None:
            if error is None:
                job.future.set_result(result)
            else:
                job.future.set_exception(error)
            return
        if error is not None:
            job.sink(error)
        job.sink(END)

    def _shutdown(self) -> None:
        for job in self._active:
            job.stop.set()
        for _ in range(1000):  # the prompt calls still waiting: a job past its first item finishes its reply's closing
            waiting = [j for j in self._active if isinstance(j.waiting, PromptChunk)]  # (the others are cancelled)
            if not waiting:
                break
            self._prompts(waiting)
        for job in list(self._active):
            try:
                if job.g is not None:
                    self._advance(job)  # a job suspended in its prompt raises Cancelled
                else:
                    _close(job.it)
            except Exception:
                log.exception("closing a generation at shutdown failed")
            if job in self._active:
                self._end(job)
        self._active.clear()
        try:
            self.manager.close()
        except Exception:
            log.exception("closing the session manager failed")
