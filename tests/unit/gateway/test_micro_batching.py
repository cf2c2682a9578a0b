"""The head thread's micro-batcher: what runs together, and how long an idle thread waits."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from gateway.engine.batching import MicroBatcher
from protocol import gather


class Jobs:
    """A ``run_batch`` that doubles each request and records the size of every job."""

    def __init__(self) -> None:
        self.sizes: list[int] = []

    def __call__(self, requests: Sequence[int]) -> list[int]:
        self.sizes.append(len(requests))
        return [2 * r for r in requests]


def test_an_idle_thread_runs_a_call_at_once_when_no_more_are_expected() -> None:
    jobs = Jobs()

    async def scenario() -> list[int]:
        batcher = MicroBatcher(jobs, max_batch=8, thread_name="t", expected=lambda: 1, gap_s=60)
        try:
            await batcher.submit(0)  # times a job
            return list(await asyncio.gather(*(batcher.submit(i) for i in (1, 2, 3))))
        finally:
            batcher.close()

    assert asyncio.run(asyncio.wait_for(scenario(), 30)) == [2, 4, 6]
    assert jobs.sizes == [1, 1, 2]  # the first at once, alone; the rest queued behind it


def test_an_idle_thread_waits_for_the_calls_it_expects() -> None:
    jobs = Jobs()

    async def scenario() -> list[int]:
        batcher = MicroBatcher(jobs, max_batch=8, thread_name="t", expected=lambda: 3, gap_s=60)
        try:
            await batcher.submit(0)  # alone: the wait is a share of a job, none timed yet
            return list(await asyncio.gather(*(batcher.submit(i) for i in (1, 2, 3))))
        finally:
            batcher.close()

    assert asyncio.run(asyncio.wait_for(scenario(), 30)) == [2, 4, 6]
    assert jobs.sizes == [1, 3]


def test_a_call_never_waits_longer_than_the_window_for_calls_that_do_not_come() -> None:
    """Five expected, one comes: it runs once a share of a job's time has passed, not after
    the (minute-long) gap."""
    jobs = Jobs()

    async def scenario() -> int:
        batcher = MicroBatcher(jobs, max_batch=8, thread_name="t", expected=lambda: 5, gap_s=60)
        try:
            await batcher.submit(0)
            return await batcher.submit(1)
        finally:
            batcher.close()

    assert gather.MAX_GATHER_S < 1
    assert asyncio.run(asyncio.wait_for(scenario(), 10)) == 2
    assert jobs.sizes == [1, 1]
