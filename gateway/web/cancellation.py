"""A request whose client has left stops its work: the swarm session closes, the slot frees.

Streams notice by themselves (sse-starlette listens for the disconnect and cancels the
stream); a JSON response is only written at the end, so its work races the disconnect here.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import TypeVar

from starlette.requests import ClientDisconnect
from starlette.types import Receive

T = TypeVar("T")


async def unless_disconnected(receive: Receive, work: Awaitable[T]) -> T:
    """``work``'s result; if the client disconnects first, ``work`` is cancelled (its own
    cleanup closes what it opened) and ``ClientDisconnect`` is raised.

    Call it once the request body has been read: from then on the server's ``receive``
    answers only when the client has gone.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
    finally:  # also when this request itself is cancelled
        watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task  # its cleanup runs before we answer
    raise ClientDisconnect()


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
