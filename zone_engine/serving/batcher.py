"""Dynamic batching: concurrent edits of one batch key gathered into one denoising batch.

A bounded queue of jobs, bucketed by `BatchKey` (latent size, steps, guidance). One worker takes the
bucket of the oldest waiting job, waits until that bucket holds `max_batch` jobs or the oldest job
has waited `max_wait_s`, and runs the batch in a single model thread (one batch on the device at a
time). Each job's own future gets its own result or exception; every job accepted ends with one.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from ..pipeline import EditRequest
from .metrics import ServeMetrics

log = logging.getLogger("zone_engine.serving")

# run_batch(requests) -> one result or exception per request, in order; runs in the model thread.
RunBatch = Callable[[Sequence[EditRequest]], Sequence[Any]]


class QueueFull(Exception):
    """The queue is at its bound; the client should retry after `retry_after_s`."""

    def __init__(self, retry_after_s: int) -> None:
        super().__init__(f"the edit queue is full; retry in about {retry_after_s} s")
        self.retry_after_s = retry_after_s


class ShuttingDown(Exception):
    """The server is stopping and did not start this edit."""


@dataclass(eq=False)
class Job:
    request: EditRequest
    key: Hashable
    future: asyncio.Future
    enqueued: float  # when it was queued, on the batcher's clock


class DynamicBatcher:
    def __init__(self, run_batch: RunBatch, *, max_batch: int, max_wait_s: float, queue_size: int,
                 metrics: ServeMetrics | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.run_batch, self.max_batch, self.max_wait_s, self.queue_size = run_batch, max_batch, max_wait_s, queue_size
        self.metrics = metrics or ServeMetrics()
        self.clock = clock  # seconds; the tests' own clock makes Retry-After's estimate exact
        self._buckets: dict[Hashable, deque[Job]] = {}
        self._changed: asyncio.Condition | None = None
        self._worker: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="zone-model")
        self._closing = self._abandoned = False
        self._running: list[Job] = []  # the batch in the model thread
        self._running_since = 0.0  # when it started, on `clock`
        self._batch_seconds = 0.0  # moving average, for Retry-After

    # ------------------------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the worker on the running event loop."""
        self._changed = asyncio.Condition()
        self._worker = asyncio.get_running_loop().create_task(self._work(), name="zone-batcher")
        self._worker.add_done_callback(self._worker_stopped)

    @property
    def healthy(self) -> bool:
        return self._worker is not None and not self._worker.done()

    def _worker_stopped(self, worker: asyncio.Task) -> None:
        """A worker that died of a bug must not leave requests waiting for their timeout."""
        if worker.cancelled() or worker.exception() is None:
            return
        log.error("the batching worker stopped", exc_info=worker.exception())
        self._closing = True
        error = ShuttingDown("the batching worker stopped unexpectedly; see the server log")
        _fail(self._running, error)  # a batch it died delivering, too
        self._reject_queued(error)

    async def run_in_model_thread(self, work: Callable[[], Any]) -> Any:
        """Run `work` in the model thread (loading, warm-up): never beside a batch."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, work)

    async def stop(self) -> None:
        """Take no more edits and reject what waits (ShuttingDown); the running batch goes on."""
        self._closing = True
        self._reject_queued(ShuttingDown("the server is shutting down; the edit was not started"))
        if self._worker is not None and not self._worker.done():
            async with self._changed:
                self._changed.notify_all()

    def abandon(self) -> None:
        """A forced quit: answer the running batch's edits now (ShuttingDown), cancel their work (it ends at the
        next step), and let `close` return without waiting for it."""
        self._abandoned = True
        for job in self._running:
            _cancel_work(job)
        _fail(self._running, ShuttingDown("the server was stopped before the edit finished"))

    async def close(self) -> None:
        """`stop`, let the running batch finish (unless abandoned), stop the worker."""
        await self.stop()
        if self._abandoned and self._worker is not None:
            self._worker.cancel()
        elif self._worker is not None and not self._worker.done():
            await self._worker
        self._executor.shutdown(wait=not self._abandoned)

    def _reject_queued(self, error: Exception) -> None:
        for bucket in self._buckets.values():
            _fail(bucket, error)
        self._buckets.clear()
        self.metrics.queue_depth.set(0)

    # ------------------------------------------------------------------------------------ submitting

    @property
    def queued(self) -> int:
        return sum(len(bucket) for bucket in self._buckets.values())

    def retry_after_s(self, arriving: int = 0) -> int:
        """About how long the edits ahead take to run: the batches queued (with `arriving` edits about to be: uploads
        being decoded, which hold their queue places) and running times a batch's duration (at least as long as the
        running batch has run so far: before the first batch ends, the only figure there is). Longer than until the
        first slot frees, on purpose: clients told to come back then would meet a full queue again."""
        batches_ahead = (self.queued + arriving) / self.max_batch + 1
        running_s = self.clock() - self._running_since if self._running else 0.0
        return max(1, math.ceil(batches_ahead * max(self._batch_seconds, running_s)))

    async def submit(self, request: EditRequest, key: Hashable) -> Any:
        """Queue one edit and wait for its result. Cancelling the caller (e.g. `asyncio.wait_for`
        timing out) withdraws the edit: out of the queue, or cancelled at its next step."""
        if self._closing or self._worker is None:
            raise ShuttingDown("the server is not accepting edits (starting up or shutting down)")
        if self.queued >= self.queue_size:
            raise QueueFull(self.retry_after_s())
        job = Job(request, key, asyncio.get_running_loop().create_future(), self.clock())
        self._buckets.setdefault(key, deque()).append(job)
        self.metrics.queue_depth.set(self.queued)
        try:  # from here on a cancelled caller withdraws its job, also while waiting for the lock
            async with self._changed:
                self._changed.notify_all()
            return await asyncio.shield(job.future)
        except asyncio.CancelledError:
            self._withdraw(job)
            raise

    def _withdraw(self, job: Job) -> None:
        """Stop a job nobody waits for: out of the queue if still there, else its work cancelled."""
        bucket = self._buckets.get(job.key)
        if bucket is not None and job in bucket:
            bucket.remove(job)
            self.metrics.queue_depth.set(self.queued)
        _cancel_work(job)
        job.future.cancel()

    # ------------------------------------------------------------------------------------ the worker

    async def _work(self) -> None:
        while True:
            async with self._changed:
                await self._changed.wait_for(lambda: self._closing or self.queued > 0)
                if self._closing:
                    return
                key = min(
                    (key for key, bucket in self._buckets.items() if bucket),
                    key=lambda k: self._buckets[k][0].enqueued,
                )
                await self._gather(key)
                batch = self._take(key)
            if batch:
                await self._run(batch)

    async def _gather(self, key: Hashable) -> None:
        """Wait (holding the condition's lock between checks) until the bucket is full or its oldest is due."""
        deadline = self._buckets[key][0].enqueued + self.max_wait_s
        while not self._closing and 0 < len(self._buckets.get(key, ())) < self.max_batch:
            remaining = deadline - self.clock()
            if remaining <= 0:
                return
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except asyncio.TimeoutError:
                return

    def _take(self, key: Hashable) -> list[Job]:
        bucket = self._buckets.get(key, deque())
        batch = [bucket.popleft() for _ in range(min(self.max_batch, len(bucket)))]
        if not bucket:
            self._buckets.pop(key, None)
        self.metrics.queue_depth.set(self.queued)
        return [job for job in batch if not job.future.done()]

    async def _run(self, batch: list[Job]) -> None:
        started = self.clock()
        for job in batch:
            self.metrics.queue_wait.observe(started - job.enqueued)
        self.metrics.batch_size.observe(len(batch))
        self.metrics.running.set(len(batch))
        self._running, self._running_since = batch, started
        try:
            outcomes = await self.run_in_model_thread(lambda: self.run_batch([job.request for job in batch]))
        except Exception as error:  # the runner itself failed: every job of the batch learns it
            outcomes = [error] * len(batch)
        finally:
            self.metrics.running.set(0)
        elapsed = self.clock() - started
        self._batch_seconds = elapsed if self._batch_seconds == 0 else 0.8 * self._batch_seconds + 0.2 * elapsed
        for job, outcome in zip(batch, outcomes, strict=True):
            if job.future.done():  # withdrawn while running
                continue
            if isinstance(outcome, StopIteration):  # a future refuses it (TypeError): it would kill the worker
                outcome = RuntimeError(f"the edit raised {outcome!r}")
            if isinstance(outcome, BaseException):
                job.future.set_exception(outcome)
            else:
                job.future.set_result(outcome)
        self._running = []


def _cancel_work(job: Job) -> None:
    """Its edit stops at the next step boundary (one without a cancel event runs to its end)."""
    if job.request.cancel is not None:
        job.request.cancel.set()


def _fail(jobs: Iterable[Job], error: Exception) -> None:
    for job in jobs:
        if not job.future.done():
            job.future.set_exception(error)
