"""The batcher's contract, on a fake kernel: coalescing, limits, deadlines, failures, cancellation."""

import asyncio
import threading
import time

import numpy as np
import pytest

from service.core.batching import BatchFailed, Batcher, DeadlineExceeded, QueueFull
from service.core.metrics import Metrics


class Kernel:
    """Doubles its input and records the size of every call."""

    def __init__(self, fail_on=None, delay=0.0):
        self.calls = []
        self.fail_on = fail_on
        self.delay = delay

    def __call__(self, kernel, rows, params):
        self.calls.append((kernel, len(rows), params))
        if self.delay:
            time.sleep(self.delay)
        if self.fail_on is not None and self.fail_on(rows):
            raise RuntimeError("injected failure")
        return {"y": rows * 2, "k": np.full(len(rows), params or 0)}


class Runner:
    """The batcher's view of a runtime: ``run`` is the fake kernel, every call holds at most ``rows`` rows."""

    def __init__(self, kernel, rows):
        self.run, self.rows = kernel, rows

    def max_rows(self, kernel, params):
        return self.rows


def make(kernel, *, max_rows=8, delay=0.05, queue_limit=1000, workers=1):
    return Batcher(Runner(kernel, max_rows), kernels=("k",), max_delay_s=delay, queue_limit=queue_limit,
                   metrics=Metrics(), workers=workers)


async def started(batcher):
    batcher.start()
    return batcher


@pytest.mark.parametrize(
    "sizes, max_rows, delay, expected_calls",
    [
        ([1], 8, 0.0, [1]),  # one item, no delay: runs at once
        ([1] * 8, 8, 0.2, [8]),  # a full batch closes before the delay
        ([3, 3, 3], 8, 0.2, [6, 3]),  # a request never straddles two calls when it fits whole in the next
        ([20], 8, 0.0, [8, 8, 4]),  # one big request is split into row-limited pieces
    ],
)
async def test_coalesces_rows_up_to_the_limit(sizes, max_rows, delay, expected_calls):
    kernel = Kernel()
    batcher = await started(make(kernel, max_rows=max_rows, delay=delay))
    try:
        inputs = [np.arange(n, dtype=np.float32) + 100 * i for i, n in enumerate(sizes)]
        results = await asyncio.gather(*(batcher.submit("k", x) for x in inputs))
        for x, out in zip(inputs, results):
            np.testing.assert_array_equal(out["y"], x * 2)  # each caller gets exactly its rows back, in order
        assert [n for _, n, _ in kernel.calls] == expected_calls
    finally:
        await batcher.stop()


async def test_rows_with_different_params_never_share_a_call():
    kernel = Kernel()
    batcher = await started(make(kernel, delay=0.1))
    try:
        a, b = await asyncio.gather(batcher.submit("k", np.ones(2), params=4), batcher.submit("k", np.ones(2), params=16))
        assert a["k"].tolist() == [4, 4] and b["k"].tolist() == [16, 16]
        assert sorted(p for _, _, p in kernel.calls) == [4, 16]
    finally:
        await batcher.stop()


async def test_a_delay_holds_a_lone_row_open_until_the_batch_fills():
    kernel = Kernel()
    batcher = await started(make(kernel, max_rows=8, delay=60.0))
    try:
        first = asyncio.create_task(batcher.submit("k", np.ones(1)))
        for _ in range(20):
            await asyncio.sleep(0)  # every turn the batcher could take: the batch stays open
        assert kernel.calls == [] and not first.done()
        rest = [asyncio.create_task(batcher.submit("k", np.full(1, float(i)))) for i in range(7)]
        await asyncio.gather(first, *rest)  # the eighth row fills the batch: it runs, long before the delay
        assert [n for _, n, _ in kernel.calls] == [8]
    finally:
        await batcher.stop()


class GatedKernel(Kernel):
    """Its first call waits at a gate, after saying it has started: the one worker is then busy."""

    def __init__(self):
        super().__init__()
        self.started, self.gate = threading.Event(), threading.Event()

    def __call__(self, kernel, rows, params):
        if not self.calls:
            self.started.set()
            assert self.gate.wait(30), "the test never opened the gate"
        return super().__call__(kernel, rows, params)


async def test_rows_arriving_while_the_worker_is_busy_form_the_next_batch():
    kernel = GatedKernel()
    batcher = await started(make(kernel, max_rows=8, delay=0.0))
    try:
        first = asyncio.create_task(batcher.submit("k", np.ones(1)))
        await asyncio.to_thread(kernel.started.wait, 30)  # the lone row went to the idle worker at once
        rest = [asyncio.create_task(batcher.submit("k", np.full(1, float(i)))) for i in range(5)]
        for _ in range(20):
            await asyncio.sleep(0)  # all five queued behind the busy worker
        kernel.gate.set()
        await asyncio.gather(first, *rest)
        assert [n for _, n, _ in kernel.calls] == [1, 5]  # the five share the next call
    finally:
        await batcher.stop()


@pytest.mark.parametrize("workers", [1, 2])
async def test_workers_run_batches_side_by_side(workers):
    """Two batches that can only finish together (a two-party barrier): one worker times out, two do not."""
    barrier = threading.Barrier(2, timeout=0.5)

    def kernel(name, rows, params):
        barrier.wait()
        return {"y": rows * 2}

    batcher = await started(make(kernel, max_rows=8, delay=0.0, queue_limit=100, workers=workers))
    try:
        results = await asyncio.gather(batcher.submit("k", np.ones(2), params="a"),
                                       batcher.submit("k", np.ones(3), params="b"), return_exceptions=True)
        if workers == 2:
            assert [r["y"].tolist() for r in results] == [[2.0, 2.0], [2.0, 2.0, 2.0]]
        else:
            assert all(isinstance(r, BatchFailed) for r in results)  # run one after the other, each broke the barrier
    finally:
        barrier.abort()
        await batcher.stop()


async def test_full_queue_rejects_with_retry_after_and_loses_nothing():
    kernel = Kernel(delay=0.2)
    batcher = await started(make(kernel, max_rows=4, delay=0.0, queue_limit=8))
    try:
        first = asyncio.create_task(batcher.submit("k", np.ones(8)))
        await asyncio.sleep(0)  # the 8 rows are admitted
        with pytest.raises(QueueFull) as info:
            await batcher.submit("k", np.ones(1))
        assert info.value.retry_after >= 1
        assert len((await first)["y"]) == 8
        assert len((await batcher.submit("k", np.ones(3)))["y"]) == 3  # room again once drained
    finally:
        await batcher.stop()


async def test_expired_rows_are_dropped_before_compute():
    kernel = Kernel(delay=0.2)
    batcher = await started(make(kernel, max_rows=1, delay=0.0))
    try:
        blocker = asyncio.create_task(batcher.submit("k", np.ones(1)))
        await asyncio.sleep(0.05)  # the worker is busy with the blocker
        with pytest.raises(DeadlineExceeded):
            await batcher.submit("k", np.full(1, 7.0), deadline=time.monotonic() + 0.01)
        await blocker
        assert all(n == 1 for _, n, _ in kernel.calls) and len(kernel.calls) == 1
    finally:
        await batcher.stop()


async def test_a_failing_batch_fails_only_its_requests_and_the_loop_survives():
    kernel = Kernel(fail_on=lambda rows: (rows == -1).any())
    batcher = await started(make(kernel, max_rows=1, delay=0.0))
    try:
        bad, good = await asyncio.gather(
            batcher.submit("k", np.array([-1.0])), batcher.submit("k", np.array([5.0])), return_exceptions=True
        )
        assert isinstance(bad, BatchFailed) and bad.error_id
        assert good["y"].tolist() == [10.0]
        assert (await batcher.submit("k", np.array([1.0])))["y"].tolist() == [2.0]
    finally:
        await batcher.stop()


async def test_cancelled_requests_are_not_computed():
    kernel = Kernel(delay=0.2)
    batcher = await started(make(kernel, max_rows=1, delay=0.0))
    try:
        blocker = asyncio.create_task(batcher.submit("k", np.ones(1)))
        await asyncio.sleep(0.05)
        gone = asyncio.create_task(batcher.submit("k", np.full(1, 3.0)))
        await asyncio.sleep(0.01)
        gone.cancel()  # the client went away while its row waited
        await blocker
        await batcher.submit("k", np.ones(1))
        assert len(kernel.calls) == 2  # blocker + the last one; the cancelled row never ran
    finally:
        await batcher.stop()


async def test_stop_fails_queued_work_and_refuses_new_work():
    kernel = Kernel(delay=0.2)
    batcher = await started(make(kernel, max_rows=1, delay=0.0))
    running = asyncio.create_task(batcher.submit("k", np.ones(1)))
    queued = asyncio.create_task(batcher.submit("k", np.ones(1)))
    await asyncio.sleep(0.05)
    await batcher.stop()
    results = await asyncio.gather(running, queued, return_exceptions=True)
    assert any(isinstance(r, Exception) for r in results)
    with pytest.raises(Exception, match="not serving"):
        await batcher.submit("k", np.ones(1))


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="max_delay_s"):
        Batcher(Runner(Kernel(), 1), kernels=("k",), max_delay_s=-1, queue_limit=1, metrics=Metrics())
    with pytest.raises(ValueError, match="queue_limit"):
        Batcher(Runner(Kernel(), 1), kernels=("k",), max_delay_s=0, queue_limit=0, metrics=Metrics())
    with pytest.raises(ValueError, match="workers"):
        Batcher(Runner(Kernel(), 1), kernels=("k",), max_delay_s=0, queue_limit=1, metrics=Metrics(), workers=0)
