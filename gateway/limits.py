"""Bounds on what clients can make the gateway hold: body bytes and requests in flight."""

from __future__ import annotations

import asyncio
import json
from collections import Counter

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
    """At most ``max_active`` requests run (each generates its choices one after another);
    ``max_waiting`` more wait their turn; beyond that a request is refused at once (429 with
    Retry-After) instead of queueing forever. One client (API key) may have at most
    ``max_per_key`` requests running or waiting, so that a few clients cannot take every
    slot."""

    def __init__(self, max_active: int, max_waiting: int, max_per_key: int | None = None) -> None:
        self._slots = asyncio.Semaphore(max_active)
        self._max_active = max_active
        self._max_waiting = max_waiting
        self._max_per_key = max_per_key
        self._waiting = 0
        self._per_key: Counter[str] = Counter()  # requests running or waiting, by client key

    async def admit(self, key: str) -> Slot:
        """A running slot for a request of client ``key``, once one is free."""
        if self._max_per_key is not None and self._per_key[key] >= self._max_per_key:
            raise TooManyRequests(
                f"this API key already has {self._per_key[key]} requests in flight, the most "
                "one key may have; retry when one has finished"
            )
        if self._slots.locked() and self._waiting >= self._max_waiting:
            raise CapacityExceeded(
                f"the gateway is busy: {self._max_active} requests running and "
                f"{self._waiting} waiting; retry later"
            )
        self._per_key[key] += 1
        self._waiting += 1
        try:
            await self._slots.acquire()
        except BaseException:
            self._leave(key)
            raise
        finally:
            self._waiting -= 1
        return Slot(self, key)

    @property
    def waiting(self) -> int:
        """Requests admitted to the queue and waiting for a slot now."""
        return self._waiting

    def in_flight(self, key: str) -> int:
        return self._per_key[key]

    def _release(self, key: str) -> None:
        self._slots.release()
        self._leave(key)

    def _leave(self, key: str) -> None:
        self._per_key[key] -= 1
        if not self._per_key[key]:
            del self._per_key[key]  # keys come and go: keep only those in flight


class Slot:
    """One admitted request's place; ``release`` frees it (idempotent, never suspends)."""

    def __init__(self, admission: Admission, key: str) -> None:
        self._admission = admission
        self._key = key
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._admission._release(self._key)
