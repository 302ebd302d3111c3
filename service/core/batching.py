"""Dynamic batching: rows from concurrent requests share model calls, one queue per kernel.

Contract of ``Batcher.submit(kernel, rows, params, deadline, runner=...)`` over a ``Runner`` (a model
runtime): it returns a dict of arrays with exactly ``len(rows)`` rows each, in order, or raises ``QueueFull``
(nothing was enqueued), ``DeadlineExceeded`` (rows expired before compute), ``BatcherStopped`` or the model's
own exception (only the requests of that batch see it). Rows, not requests, are the unit: a request is split
into pieces of at most the kernel's row limit, pieces of many requests are coalesced up to that limit or until
``max_delay_s`` has passed since the first row of the batch arrived, and rows with different ``params`` (e.g.
the score's K) or for different runners (the model before and after a reload) never share a call. Model calls run on ``workers`` threads (one per CPU core on CPU, one per GPU), never on
the event loop. A batch is formed when a worker is free: it takes every waiting row of its kernel up to the
limit, so batches grow by themselves while the workers are busy and a lone request on an idle server is
computed at once. ``max_delay_s`` > 0 additionally holds a batch open that long after its first row arrived
(fewer, larger calls for a device whose call cost hardly depends on its size), but only while a worker is
free: it never adds to the time a row already waited for one. After Ray Serve's ``_BatchQueue``, MLServer's
per-request futures and Triton's instance groups.
"""

import asyncio
import logging
import math
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Deque, Dict, Hashable, List, Optional, Protocol, Sequence, Set

import numpy as np

from service.core.metrics import Metrics

log = logging.getLogger(__name__)

Outputs = Dict[str, np.ndarray]


class Runner(Protocol):
    """What the batcher drives (``service.core.runtime.ModelRuntime``): a kernel on rows, and each call's row limit."""

    def run(self, kernel: str, rows: np.ndarray, params: Hashable) -> Outputs: ...

    def max_rows(self, kernel: str, params: Hashable) -> int: ...


class QueueFull(Exception):
    """The kernel's queue has no room for the request's rows; retry after ``retry_after`` seconds."""

    def __init__(self, kernel: str, retry_after: int) -> None:
        super().__init__(f"the {kernel} queue is full; retry in {retry_after} s")
        self.retry_after = retry_after


class DeadlineExceeded(Exception):
    """The request's deadline passed while its rows were still waiting; they were not computed."""


class BatcherStopped(Exception):
    """The batcher is shutting down and takes no more work."""


class Abandoned(Exception):
    """The caller stopped waiting (client disconnected); its rows were dropped before compute."""


class BatchFailed(Exception):
    """A model call failed; every request in that batch gets this, with the id logged beside the cause."""

    def __init__(self, error_id: str) -> None:
        super().__init__(f"model call failed (error id {error_id})")
        self.error_id = error_id


@dataclass(eq=False)
class _Item:
    rows: np.ndarray
    params: Hashable
    runner: Runner
    future: asyncio.Future
    deadline: float
    enqueued: float = field(default_factory=time.monotonic)

    def joins(self, first: "_Item") -> bool:
        """Whether these rows may share ``first``'s call: the same parameters on the same model."""
        return self.params == first.params and self.runner is first.runner


class Batcher:
    def __init__(self, runner: Optional[Runner], *, kernels: Sequence[str], max_delay_s: float, queue_limit: int,
                 metrics: Metrics, workers: int = 1) -> None:
        if max_delay_s < 0:
            raise ValueError(f"max_delay_s must be >= 0, got {max_delay_s}")
        if queue_limit < 1:
            raise ValueError(f"queue_limit must be >= 1, got {queue_limit}")
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self._runner, self._delay = runner, max_delay_s
        self.queue_limit = queue_limit
        self._metrics = metrics
        self._queues: Dict[str, Deque[_Item]] = {k: deque() for k in kernels}
        self._wakeups: Dict[str, asyncio.Event] = {}
        self._waiting_rows: Dict[str, int] = {k: 0 for k in kernels}  # admitted, not yet started
        self._drain_rate: Dict[str, float] = {k: 0.0 for k in kernels}  # rows/s, moving average
        self.workers = workers
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="model-worker")
        self._free: Optional[asyncio.Semaphore] = None  # workers with no batch; created in start()
        self._tasks: List[asyncio.Task] = []
        self._running: Set[asyncio.Task] = set()  # batches on a worker now
        self._stopped = False
        for k in kernels:
            metrics.queue_capacity.labels(k).set(queue_limit)
            metrics.queue_depth.labels(k).set(0)

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        self._free = asyncio.Semaphore(self.workers)
        for kernel in self._queues:
            self._wakeups[kernel] = asyncio.Event()
            self._tasks.append(asyncio.create_task(self._loop(kernel), name=f"batcher-{kernel}"))

    async def run_in_worker(self, fn: Callable, *args):
        """Run ``fn`` on a model worker thread (warm-up uses it before any batch can run)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def stop(self) -> None:
        """Refuse new work, fail what is still queued, stop the loops and the worker."""
        self._stopped = True
        for task in (*self._tasks, *self._running):
            task.cancel()
        await asyncio.gather(*self._tasks, *self._running, return_exceptions=True)
        for kernel, queue in self._queues.items():
            while queue:
                item = queue.popleft()
                if not item.future.done():
                    item.future.set_exception(BatcherStopped("the service is shutting down"))
            self._set_depth(kernel, 0)
        self._executor.shutdown(wait=True)

    # -- submission ----------------------------------------------------------------------------
    async def submit(self, kernel: str, rows: np.ndarray, params: Hashable = None,
                     deadline: Optional[float] = None, abandoned: Optional[Awaitable] = None,
                     runner: Optional[Runner] = None) -> Outputs:
        """Rows in, outputs out (see the module docstring), computed by ``runner`` (default: the batcher's). If
        ``abandoned`` (e.g. "the client hung up") completes first, the rows are withdrawn, never computed, and
        ``Abandoned`` is raised."""
        runner = runner or self._runner
        if runner is None:
            raise ValueError("submit needs a runner: this batcher has no default one")
        if abandoned is None:
            return await self._submit(kernel, rows, params, deadline, runner)
        work = asyncio.ensure_future(self._submit(kernel, rows, params, deadline, runner))
        watch = asyncio.ensure_future(abandoned)
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
            if not work.done():
                work.cancel()
                await asyncio.wait({work})  # let the cancellation withdraw the queued rows
                raise Abandoned("the caller went away before its rows were computed")
            return work.result()
        finally:
            work.cancel()
            watch.cancel()

    async def _submit(self, kernel: str, rows: np.ndarray, params: Hashable, deadline: Optional[float],
                      runner: Runner) -> Outputs:
        if self._stopped or not self._tasks:
            raise BatcherStopped("the model is not serving")
        n = len(rows)
        if n == 0:
            raise ValueError("submit needs at least one row")
        if self._waiting_rows[kernel] + n > self.queue_limit:
            self._metrics.rejections.labels("queue_full").inc()
            raise QueueFull(kernel, self.retry_after(kernel))
        deadline = math.inf if deadline is None else deadline
        step = runner.max_rows(kernel, params)
        loop = asyncio.get_running_loop()
        # Futures exist before their items are queued, so no result can arrive unobserved.
        items = [_Item(rows[i:i + step], params, runner, loop.create_future(), deadline) for i in range(0, n, step)]
        self._queues[kernel].extend(items)
        self._set_depth(kernel, self._waiting_rows[kernel] + n)
        self._wakeups[kernel].set()
        try:
            parts = await asyncio.gather(*(item.future for item in items))
        finally:
            for item in items:  # a cancelled caller (client gone) leaves nothing behind to compute
                item.future.cancel()
        if len(parts) == 1:
            return parts[0]
        return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}

    def retry_after(self, kernel: str) -> int:
        """Seconds until the queue has drained at the recent rate (at least 1)."""
        rate = self._drain_rate[kernel]
        return max(1, math.ceil(self._waiting_rows[kernel] / rate)) if rate > 0 else 1

    # -- the loop ------------------------------------------------------------------------------
    async def _loop(self, kernel: str) -> None:
        queue, wakeup = self._queues[kernel], self._wakeups[kernel]
        while True:
            while not queue:
                wakeup.clear()
                await wakeup.wait()
            await self._free.acquire()  # rows keep arriving (and batching up) while every worker is busy
            try:
                batch = await self._next_batch(kernel)
            except BaseException:
                self._free.release()
                raise
            if not batch:  # every waiting row was withdrawn or expired
                self._free.release()
                continue
            task = asyncio.create_task(self._execute_then_free(kernel, batch), name=f"batch-{kernel}")
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _execute_then_free(self, kernel: str, batch: List[_Item]) -> None:
        try:
            await self._execute(kernel, batch)
        except asyncio.CancelledError:
            raise
        except Exception:  # one batch's failure never ends the service
            log.exception("unexpected error in a %s batch", kernel)
        finally:
            self._free.release()

    async def _next_batch(self, kernel: str) -> List[_Item]:
        queue, wakeup = self._queues[kernel], self._wakeups[kernel]
        if not queue:
            return []
        first = queue[0]
        limit = first.runner.max_rows(kernel, first.params)
        close_at = first.enqueued + self._delay  # the delay starts at the first row, not at this call
        batch: List[_Item] = []
        rows = 0
        while True:
            while queue and queue[0].joins(first) and rows + len(queue[0].rows) <= limit:
                item = queue.popleft()
                self._set_depth(kernel, self._waiting_rows[kernel] - len(item.rows))
                if self._admit(item):
                    batch.append(item)
                    rows += len(item.rows)
            head_blocked = bool(queue) and (not queue[0].joins(first) or rows + len(queue[0].rows) > limit)
            remaining = close_at - time.monotonic()
            if rows >= limit or head_blocked or remaining <= 0:
                return batch
            wakeup.clear()
            try:
                await asyncio.wait_for(wakeup.wait(), remaining)
            except asyncio.TimeoutError:
                pass

    def _admit(self, item: _Item) -> bool:
        """Drop rows nobody waits for (cancelled) or that are already too late (deadline)."""
        if item.future.done():
            self._metrics.rejections.labels("disconnected").inc(len(item.rows))
            return False
        if time.monotonic() > item.deadline:
            self._metrics.rejections.labels("deadline").inc(len(item.rows))
            item.future.set_exception(DeadlineExceeded("the request's deadline passed before its rows were computed"))
            return False
        return True

    async def _execute(self, kernel: str, batch: List[_Item]) -> None:
        started = time.monotonic()
        params = batch[0].params
        for item in batch:
            self._metrics.queue_wait.labels(kernel).observe(started - item.enqueued)
        sizes = [len(item.rows) for item in batch]
        try:
            outputs = await self.run_in_worker(self._call, batch[0].runner, kernel, [item.rows for item in batch],
                                               params)
        except asyncio.CancelledError:  # stop() while this batch ran: its callers must still hear back
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(BatcherStopped("the service stopped before this batch finished"))
            raise
        except Exception as exc:
            error_id = uuid.uuid4().hex[:12]
            log.error("model call failed: kernel=%s rows=%d error_id=%s", kernel, sum(sizes), error_id, exc_info=exc)
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(BatchFailed(error_id))
            return
        elapsed = time.monotonic() - started
        total = sum(sizes)
        self._metrics.batch_rows.labels(kernel).observe(total)
        self._metrics.model_seconds.labels(kernel).observe(elapsed)
        rate = total / max(elapsed, 1e-6)
        self._drain_rate[kernel] = rate if self._drain_rate[kernel] == 0 else 0.8 * self._drain_rate[kernel] + 0.2 * rate
        offset = 0
        for item, size in zip(batch, sizes):
            if not item.future.done():
                item.future.set_result({name: value[offset:offset + size] for name, value in outputs.items()})
            offset += size

    @staticmethod
    def _call(runner: Runner, kernel: str, pieces: List[np.ndarray], params: Hashable) -> Outputs:
        rows = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
        outputs = runner.run(kernel, rows, params)
        bad = {name: len(v) for name, v in outputs.items() if len(v) != len(rows)}
        if bad:
            raise RuntimeError(f"{kernel} returned {bad} rows for {len(rows)} inputs")
        return outputs

    def _set_depth(self, kernel: str, rows: int) -> None:
        self._waiting_rows[kernel] = rows
        self._metrics.queue_depth.labels(kernel).set(rows)
