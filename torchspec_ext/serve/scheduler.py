"""The request queue in front of an engine: first come, first served, up to ``max_batch`` at a time.

The HTTP handlers (asyncio) submit :class:`Job`s; one worker thread runs them through the engine in
the order they came (torch releases the GIL while it computes, so the event loop keeps serving).
Up to ``max_batch`` requests decode together, one target forward a step for all of them (a request
waiting joins between two steps, when one ends or the batch has room). Tokens reach each job's asyncio
queue as they are verified. Between two steps the worker puts in the newest draft weights the learner
handed over, for the requests that begin after that (a running one keeps the draft it began with). A
job cancelled while waiting is skipped; one cancelled while running stops at its next verification.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from torchspec_ext.serve.engine import Engine, GenerationRequest, GenerationStats


def own_threads(count: int) -> None:
    """Gives the calling thread ``count`` torch threads. A thread's first torch call copies the count
    last set by any thread, so that call is made first; after it, each thread keeps its own (OpenMP's
    per-thread setting), and the learner's share does not shrink the decoder's."""
    torch.get_num_threads()
    torch.set_num_threads(count)


class QueueFull(Exception):
    pass


class Draining(Exception):
    pass


@dataclass
class Job:
    request: GenerationRequest
    on_tokens: Callable[[list[int]], bool]  # runs in the worker thread; True stops the generation
    loop: asyncio.AbstractEventLoop
    id: int = 0
    events: asyncio.Queue = field(default_factory=asyncio.Queue)  # ("stats", GenerationStats) | ("error", str)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.monotonic)
    started_order: int = -1  # the how-many-th job the worker started (fair order: submission order)

    def cancel(self) -> None:
        self.cancelled.set()

    def send(self, event) -> None:
        """From the worker thread to the handler's event loop."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop is closed: nobody listens any more
            pass


@dataclass
class Finished:
    tokens: int
    forwards: int
    seconds: float
    queued_seconds: float


class Stats:
    """Counters and rolling figures over the last ``window`` finished requests, for /metrics."""

    def __init__(self, window: int):
        self.lock = threading.Lock()
        self.recent: deque[Finished] = deque(maxlen=window)
        self.requests = {"ok": 0, "cancelled": 0, "error": 0}
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.target_forwards = 0
        self.decode_seconds = 0.0
        self.draft_updates = 0
        self.steps = 0  # the engine's decoding steps
        self.step_requests = 0  # requests in them, summed: / steps is the mean batch
        self.started = time.monotonic()

    def finished(self, job: Job, stats: GenerationStats, queued: float, status: str) -> None:
        with self.lock:
            self.requests[status] += 1
            self.prompt_tokens += len(job.request.prompt)
            self.generated_tokens += len(stats.tokens)
            self.target_forwards += stats.target_forwards
            self.decode_seconds += stats.seconds
            if status == "ok" and stats.target_forwards:
                self.recent.append(Finished(len(stats.tokens), stats.target_forwards, stats.seconds, queued))

    def rolling(self) -> tuple[float, float, int]:
        """(acceptance length, tokens/s of decoding, requests) over the window."""
        with self.lock:
            tokens = sum(f.tokens for f in self.recent)
            forwards = sum(f.forwards for f in self.recent)
            seconds = sum(f.seconds for f in self.recent)
            return tokens / max(forwards, 1), tokens / seconds if seconds > 0 else 0.0, len(self.recent)


class Scheduler:
    def __init__(
        self, engine: Engine, max_queue: int, window: int = 50, threads: int | None = None, learner=None,
        max_batch: int = 1,
    ):  # fmt: skip
        if max_batch < 1:
            raise ValueError(f"Scheduler: max_batch must be >= 1, got {max_batch}")
        self.engine, self.max_queue, self.learner, self.max_batch = engine, max_queue, learner, max_batch
        self.threads = threads or torch.get_num_threads()  # the loading thread's: what torch chose here
        self.stats = Stats(window)
        self.queue: queue.Queue[Job | None] = queue.Queue()
        self.waiting = 0
        self.running: list[Job] = []
        self.draining = False
        self._ids = itertools.count(1)
        self._started = itertools.count()
        self._lock = threading.Lock()
        self._pending_update: tuple[dict, int] | None = None
        self._thread = threading.Thread(target=self._work, name="decoder", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, request: GenerationRequest, on_tokens, loop) -> Job:
        with self._lock:
            if self.draining:
                raise Draining()
            if self.waiting >= self.max_queue:
                raise QueueFull()
            self.waiting += 1
            job = Job(request, on_tokens, loop, id=next(self._ids))
            self.queue.put(job)
        return job

    def busy(self) -> bool:
        return bool(self.running) or self.waiting > 0

    def offer_draft(self, state: dict, version: int) -> None:
        """From the learner: weights to put in before the next request (a newer offer replaces it)."""
        with self._lock:
            self._pending_update = (state, version)

    def drain(self) -> None:
        """Refuses new jobs, runs every job already submitted, then ends the worker."""
        with self._lock:
            self.draining = True
            self.queue.put(None)
        self._thread.join()

    def _apply_update(self) -> None:
        with self._lock:
            update, self._pending_update = self._pending_update, None
        if update is not None:
            self.engine.update_draft(*update)
            with self.stats.lock:
                self.stats.draft_updates += 1

    def _work(self) -> None:
        own_threads(self.threads)
        running: dict[int, tuple] = {}  # id(the engine's handle) -> (handle, job, recorder, queued)
        ending = False
        while not ending or running:
            while not ending and len(running) < self.max_batch:  # admit, in the order submitted
                try:
                    job = self.queue.get(block=not running)  # idle: wait for one
                except queue.Empty:
                    break
                if job is None:
                    ending = True
                    break
                with self._lock:
                    self.waiting -= 1
                self._begin(job, running)
            if not running:
                continue
            with self.stats.lock:
                self.stats.steps += 1
                self.stats.step_requests += len(running)
            try:
                ended = self.engine.step()
                error = ""
            except Exception as exc:  # the batch's step failed: its requests end with the error
                error = f"{type(exc).__name__}: {exc}"
                print(f"[serve] a decoding step failed: {error}", file=sys.stderr)
                ended = self.engine.abort()
            for handle in ended:
                _, job, recorder, queued = running.pop(id(handle))
                status = "error" if error else "cancelled" if job.cancelled.is_set() else "ok"
                self._end(job, handle.stats if not error else GenerationStats(), status, recorder, queued, error)

    def _begin(self, job: Job, running: dict) -> None:
        """Starts ``job`` in the engine (its prefill), or ends it at once: cancelled while waiting, failed,
        or with nothing to generate."""
        queued = time.monotonic() - job.submitted
        if job.cancelled.is_set():
            self._end(job, GenerationStats(stopped=True), "cancelled", None, queued)
            return
        self._apply_update()
        job.started_order = next(self._started)
        recorder = self.learner.recorder(job.request.prompt) if self.learner is not None else None

        def on_tokens(tokens: list[int]) -> bool:
            return bool(job.on_tokens(tokens)) or job.cancelled.is_set()

        with self._lock:
            self.running.append(job)
        try:
            handle = self.engine.begin(job.request, on_tokens, recorder)
        except Exception as exc:  # one request's failure is its own: the server goes on
            error = f"{type(exc).__name__}: {exc}"
            print(f"[serve] request {job.id} failed: {error}", file=sys.stderr)
            self._end(job, GenerationStats(), "error", None, queued, error)
            return
        if handle.done:
            self._end(job, handle.stats, "cancelled" if job.cancelled.is_set() else "ok", recorder, queued)
        else:
            running[id(handle)] = (handle, job, recorder, queued)

    def _end(self, job: Job, stats: GenerationStats, status: str, recorder, queued: float, error: str = "") -> None:
        with self._lock:
            if job in self.running:  # before the counters: whoever sees the request counted sees it done
                self.running.remove(job)
        self.stats.finished(job, stats, queued, status)
        if recorder is not None and status != "error":  # a cancelled request's verified positions are as good
            try:
                self.learner.add(recorder)
            except Exception as exc:
                print(f"[serve] request {job.id}: not learned from: {type(exc).__name__}: {exc}", file=sys.stderr)
        job.send(("error", error) if status == "error" else ("stats", stats))
