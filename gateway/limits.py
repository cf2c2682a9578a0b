"""Bounds on what clients can make the gateway hold: body bytes and generations in flight."""

from __future__ import annotations

import asyncio
import json
from collections import Counter, deque

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from protocol.errors import CapacityExceeded, TooManyRequests


class BodySizeLimit:
    """Refuses bodies over ``max_bytes`` with 413 before they are read into memory, by
    ``Content-Length`` up front or, for chunked uploads, as the bytes arrive."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send)
            return
        seen = 0
        refused = False

        async def counting_receive() -> Message:
            nonlocal seen, refused
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes and not refused:
                refused = True
                await self._refuse(send)
                # The app sees a client that went away, and stops reading and answering.
                return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            if not refused:
                await send(message)

        await self.app(scope, counting_receive, guarded_send)

    async def _refuse(self, send: Send) -> None:
        body = json.dumps(
            {
                "error": {
                    "message": f"the request body exceeds {self.max_bytes} bytes",
                    "type": "invalid_request_error",
                    "param": None,
                    "code": "request_too_large",
                }
            }
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


class Admission:
    """At most ``max_active`` generations run: a request counts as many as it runs at once
    (chat's ``n``, a list of completion prompts), up to all of them; ``max_waiting``
    more requests wait their turn, first come first served; beyond that a request is
    refused at once (429 with Retry-After) instead of queueing forever. One client (API
    key) may have at most ``max_per_key`` generations running or waiting (a request asking
    for more takes them all), so that a few clients cannot take every slot."""

    def __init__(self, max_active: int, max_waiting: int, max_per_key: int | None = None) -> None:
        self._max_active = max_active
        self._max_waiting = max_waiting
        self._max_per_key = max_per_key
        self._free = max_active
        self._queue: deque[tuple[int, asyncio.Future[None]]] = deque()  # (weight, turn)
        self._per_key: Counter[str] = Counter()  # generations running or waiting, by key

    async def admit(self, key: str, generations: int = 1) -> Slot:
        """A running slot for a request of client ``key`` that runs ``generations`` at
        once, once there is room."""
        weight = max(1, min(generations, self._max_active))
        mine = weight if self._max_per_key is None else min(weight, self._max_per_key)
        if self._max_per_key is not None and self._per_key[key] + mine > self._max_per_key:
            held = self._per_key[key]
            asked = f"; this request's {mine} would make {held + mine}" if mine > 1 else ""
            raise TooManyRequests(
                f"this API key already has {held} generations in flight{asked}, and "
                f"{self._max_per_key} is the most one key may have; retry when one has finished"
            )
        if not self._fits(weight) and len(self._queue) >= self._max_waiting:
            raise CapacityExceeded(
                f"the gateway is busy: {self._max_active - self._free} generations running "
                f"and {len(self._queue)} requests waiting; retry later"
            )
        self._per_key[key] += mine
        try:
            await self._take(weight)
        except BaseException:
            self._leave(key, mine)
            raise
        return Slot(self, key, weight, mine)

    @property
    def waiting(self) -> int:
        """Requests admitted to the queue and waiting for a slot now."""
        return len(self._queue)

    def in_flight(self, key: str) -> int:
        return self._per_key[key]

    def _fits(self, weight: int) -> bool:
        return not self._queue and self._free >= weight

    async def _take(self, weight: int) -> None:
        if self._fits(weight):
            self._free -= weight
            return
        turn = asyncio.get_running_loop().create_future()
        entry = (weight, turn)
        self._queue.append(entry)
        try:
            await turn
        except BaseException:
            if turn.done() and not turn.cancelled():  # given its turn as it was cancelled
                self._free += weight
            elif entry in self._queue:
                self._queue.remove(entry)
            self._grant()  # those behind it may fit now
            raise

    def _grant(self) -> None:
        """Wake waiters in order while the first fits (none overtakes a larger one)."""
        while self._queue and self._free >= self._queue[0][0]:
            weight, turn = self._queue.popleft()
            if turn.cancelled():  # its request left; it takes nothing
                continue
            self._free -= weight
            turn.set_result(None)

    def _release(self, key: str, weight: int, mine: int) -> None:
        self._free += weight
        self._leave(key, mine)
        self._grant()

    def _leave(self, key: str, mine: int) -> None:
        self._per_key[key] -= mine
        if self._per_key[key] <= 0:
            del self._per_key[key]  # keys come and go: keep only those in flight


class Slot:
    """One admitted request's place; ``release`` frees it (idempotent, never suspends)."""

    def __init__(self, admission: Admission, key: str, weight: int = 1, mine: int = 1) -> None:
        self._admission = admission
        self._key = key
        self._weight = weight
        self._mine = mine
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._admission._release(self._key, self._weight, self._mine)
