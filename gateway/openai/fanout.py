"""Several generations of one request (chat's ``n``, a list of completion prompts), at once.

Concurrent streams are what the servers batch: one at a time, eight choices cost eight
times one; together, little more than one. Choices that share their prompt (chat's ``n``,
or completion prompts with a common few-shot prefix) should not all compute it, though: with
``lead``, the first choice starts alone and the others once its prompt is on the servers,
so each of them starts from a copy of that cache (the servers' prefix index) and computes
only what is its own.

``fan_in`` runs them and merges their chunks as they come, each choice's in its order
(OpenAI interleaves the chunks of ``n`` choices the same way). The first failure cancels
the others (each closes its own stream as it unwinds) and is raised as itself, not as a
group, so it maps to its HTTP status. A response sent whole collects the same chunks
(gateway/openai/choices.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")

# Streams choice ``index``; calls ``prompt_done`` once its prompt's forward has returned.
Stream = Callable[[int, Callable[[], None]], AsyncGenerator[T, None]]
FAN_IN_BUFFER = 16  # chunks the choices may run ahead of a slow reader, in all


@dataclass(frozen=True)
class _Ended:
    error: Exception | None = None  # why its choice ended early; None: it finished


async def fan_in(stream: Stream[T], count: int, *, lead: bool) -> AsyncGenerator[T, None]:
    """The items of choices ``0 .. count - 1`` as they come, each choice's in order, with
    the followers started once the first's prompt is done (with ``lead``), else at once.
    The first failure cancels the others and is raised as itself; closing this generator
    (a reader that left) cancels every choice, and each closes its own stream as it
    unwinds."""
    if count < 1:
        return
    merged: asyncio.Queue[T | _Ended] = asyncio.Queue(FAN_IN_BUFFER)
    prompt_done = asyncio.Event()

    async def pump(index: int) -> None:
        try:
            if lead and index > 0:
                await prompt_done.wait()
            done = prompt_done.set if index == 0 else (lambda: None)
            async with aclosing(stream(index, done)) as items:
                async for item in items:
                    await merged.put(item)
        except Exception as e:  # the reader raises it
            await merged.put(_Ended(e))
        else:
            await merged.put(_Ended())

    tasks = [asyncio.ensure_future(pump(i)) for i in range(count)]
    # However the first ends, the others go on (or are cancelled with the rest).
    tasks[0].add_done_callback(lambda _: prompt_done.set())
    try:
        running = count
        while running:
            item = await merged.get()
            if not isinstance(item, _Ended):
                yield item
            elif item.error is not None:
                raise item.error
            else:
                running -= 1
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks)
