"""Micro-batching on one worker thread.

Calls that arrive while the thread is busy queue; when it frees up, everything queued (up
to ``max_batch``) runs as one job. So batches grow as much as the load makes callers wait
anyway.

A call that finds the thread idle runs at once, unless the owner ``expected`` more calls
than are queued: then the job waits while calls keep coming, each within ``gap_s`` of the
last, and at most ``GATHER_SHARE`` of a job's time (``MAX_GATHER_S`` at most: the gather
policy a block server's step scheduler shares, ``protocol/gather.py``). Calls that
belong together (the rows of one server's batched forward, answered stream by stream)
arrive within milliseconds; starting on the first would run it alone and the rest in a
second job costing as much, and the split would then persist, step after step. A lone
caller (one expected) waits for nothing.

All bookkeeping happens on the event loop; the thread only runs ``run_batch``. No torch
here: what a batch means is the caller's business.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, TypeVar

from protocol.gather import gather_window

Req = TypeVar("Req")
Res = TypeVar("Res")

# One outcome per request, in order: a result, or the exception for that caller alone.
BatchFn = Callable[[Sequence[Req]], Sequence[Res | Exception]]


class BatcherClosed(RuntimeError):
    """The batcher was closed before this call could run."""


class MicroBatcher(Generic[Req, Res]):
    def __init__(
        self,
        run_batch: BatchFn[Req, Res],
        *,
        max_batch: int,
        thread_name: str,
        on_batch: Callable[[Sequence[Req]], None] = lambda batch: None,
        expected: Callable[[], int] = lambda: 0,
        gap_s: float = 0.0,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, not {max_batch}")
        self._run_batch = run_batch
        self._max_batch = max_batch
        self._on_batch = on_batch  # sees each batch as it starts (metrics, tests)
        self._expected = expected  # calls likely to come soon, those queued included
        self._gap_s = gap_s
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=thread_name)
        self._waiting: deque[tuple[Req, asyncio.Future[Res]]] = deque()
        self._busy = False  # a job is on the thread; new calls queue behind it
        self._closed = False
        self._job_s = 0.0  # how long jobs take, smoothed
        self._gathering_since: float | None = None  # the thread idles while calls gather
        self._gather_timer: asyncio.TimerHandle | None = None

    @property
    def waiting(self) -> int:
        """Calls queued behind the job in flight (cancelled ones included until skipped)."""
        return len(self._waiting)

    async def submit(self, request: Req) -> Res:
        """The outcome of ``request``, run in the next job. Cancelling the caller drops its
        request if it has not started, and its result if it has; the rest of its batch is
        unaffected either way."""
        if self._closed:
            raise BatcherClosed("the batcher is closed")
        future: asyncio.Future[Res] = asyncio.get_running_loop().create_future()
        self._waiting.append((request, future))
        if not self._busy:
            self._start_or_gather()
        # Awaiting the future itself: a cancelled caller cancels it, which marks the request
        # as abandoned for _start_next and _deliver.
        return await future

    def close(self) -> None:
        """Fail every queued call; a job in flight finishes, and its callers get results."""
        self._closed = True
        self._stop_gathering()
        self._fail_waiting()
        self._thread.shutdown(wait=False)

    def _start_or_gather(self) -> None:
        """The thread is idle and a call waits: start it now, or wait a little for more."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self._gathering_since is None:
            self._gathering_since = now
        until = self._gathering_since + gather_window(self._job_s)
        if len(self._waiting) >= self._expected() or now >= until or self._gap_s <= 0:
            self._stop_gathering()
            self._start_next()
            return
        if self._gather_timer is not None:
            self._gather_timer.cancel()
        self._gather_timer = loop.call_at(min(now + self._gap_s, until), self._gathered)

    def _gathered(self) -> None:
        self._gather_timer = None
        self._stop_gathering()
        if not self._busy:
            self._start_next()

    def _stop_gathering(self) -> None:
        if self._gather_timer is not None:
            self._gather_timer.cancel()
            self._gather_timer = None
        self._gathering_since = None

    def _start_next(self) -> None:
        if self._closed:
            self._fail_waiting()
        batch: list[tuple[Req, asyncio.Future[Res]]] = []
        while self._waiting and len(batch) < self._max_batch:
            request, future = self._waiting.popleft()
            if not future.done():  # a cancelled caller's request is dropped here
                batch.append((request, future))
        self._busy = bool(batch)
        if not batch:
            return
        requests = [request for request, _ in batch]
        loop = asyncio.get_running_loop()
        began = loop.time()
        job = loop.run_in_executor(self._thread, self._run_batch, requests)
        job.add_done_callback(lambda done: self._deliver(batch, done, loop.time() - began))
        self._on_batch(requests)

    def _deliver(
        self,
        batch: list[tuple[Req, asyncio.Future[Res]]],
        job: asyncio.Future[Sequence[Res | Exception]],
        took_s: float,
    ) -> None:
        self._job_s = took_s if not self._job_s else 0.8 * self._job_s + 0.2 * took_s
        outcomes: Sequence[Res | BaseException]
        if job.cancelled():
            outcomes = [BatcherClosed("the job was cancelled")] * len(batch)
        elif (error := job.exception()) is not None:
            outcomes = [error] * len(batch)  # the whole job failed: every caller hears it
        else:
            outcomes = job.result()
            if len(outcomes) != len(batch):
                error = RuntimeError(f"a batch of {len(batch)} gave {len(outcomes)} outcomes")
                outcomes = [error] * len(batch)
        for (_, future), outcome in zip(batch, outcomes, strict=True):
            if future.done():  # its caller was cancelled while the job ran
                continue
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)
        self._busy = False
        if self._waiting:
            self._start_or_gather()

    def _fail_waiting(self) -> None:
        for _, future in self._waiting:
            if not future.done():
                future.set_exception(BatcherClosed("the batcher was closed"))
        self._waiting.clear()
