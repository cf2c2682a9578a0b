"""Several generations of one request (chat's ``n``, a list of completion prompts), at once.

Concurrent streams are what the servers batch: one at a time, eight choices cost eight
times one; together, little more than one. Choices that share their prompt (chat's ``n``,
or completion prompts with a common few-shot prefix) should not all compute it, though: with
``lead``, the first choice starts alone and the others once its prompt is on the servers,
so each of them starts from a copy of that cache (the servers' prefix index) and computes
only what is its own.

A task group runs them: the first failure cancels the others (each closes its own session
as it unwinds) and is raised as itself, not as a group, so it maps to its HTTP status.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

# Runs choice ``index``; calls ``prompt_done`` once its prompt's forward has returned.
Run = Callable[[int, Callable[[], None]], Coroutine[Any, Any, T]]


async def fan_out(run: Run[T], count: int, *, lead: bool) -> list[T]:
    """The outcomes of choices ``0 .. count - 1``, in order."""
    if count < 1:
        return []
    prompt_done = asyncio.Event()

    async def follow(index: int) -> T:
        await prompt_done.wait()
        return await run(index, lambda: None)

    try:
        async with asyncio.TaskGroup() as group:
            first = group.create_task(run(0, prompt_done.set))
            # However the first ends, the others go on (or are cancelled with the group).
            first.add_done_callback(lambda _: prompt_done.set())
            tasks = [first] + [
                group.create_task(follow(i) if lead else run(i, lambda: None))
                for i in range(1, count)
            ]
    except BaseExceptionGroup as failed:
        raise failed.exceptions[0] from None
    return [task.result() for task in tasks]
