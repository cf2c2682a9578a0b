"""Bounds on what clients can make the gateway hold: body bytes and generations in flight."""

from __future__ import annotations

import asyncio
import json
from collections import Counter, deque
from collections.abc import Mapping
from dataclasses import dataclass

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
    more requests wait, first come first served; beyond that a request is refused at once
    (429 with Retry-After) instead of queueing forever.

    A client (API key) may also have a cap on the generations it has running or waiting
    for a slot: ``caps`` by key, else ``max_per_key`` (None: no cap; a request asking for
    more than its cap takes all of it). A request over its key's cap waits up to
    ``key_wait_s`` for one of the key's own generations to finish (at most as many
    requests as the cap wait so, and they count among the ``max_waiting``), then joins the
    queue; past the wait it is refused (429). With ``key_wait_s`` 0 it is refused at once.

    Every change of state that spans an await is undone when the awaiting request is
    cancelled (its client left): a cancelled waiter takes nothing and holds up no one.
    """

    def __init__(
        self,
        max_active: int,
        max_waiting: int,
        max_per_key: int | None = None,
        *,
        caps: Mapping[str, int] | None = None,
        key_wait_s: float = 0.0,
    ) -> None:
        self._max_active = max_active
        self._max_waiting = max_waiting
        self._max_per_key = max_per_key
        self._caps = dict(caps or {})
        self._key_wait_s = key_wait_s
        self._free = max_active
        self._queue: deque[_Waiter] = deque()  # waiting for slots, in order
        self._over: dict[str, deque[_Waiter]] = {}  # waiting for room under their key's cap
        self._per_key: Counter[str] = Counter()  # generations running or queued, by key

    def cap(self, key: str) -> int | None:
        """The most generations ``key`` may have running or queued (None: no cap)."""
        return self._caps.get(key, self._max_per_key)

    async def admit(self, key: str, generations: int = 1) -> Slot:
        """A running slot for a request of client ``key`` that runs ``generations`` at
        once, once there is room."""
        weight = max(1, min(generations, self._max_active))
        cap = self.cap(key)
        mine = weight if cap is None else min(weight, cap)
        # Behind any earlier request of the same key that waits for room: none overtakes.
        over = cap is not None and (key in self._over or self._per_key[key] + mine > cap)
        if over:
            assert cap is not None
            held = self._per_key[key]
            waiting = len(self._over.get(key, ()))
            if self._key_wait_s <= 0 or waiting >= cap:
                raise TooManyRequests(self._over_cap(held, mine, cap, waiting))
        if (over or not self._fits(weight)) and self.waiting >= self._max_waiting:
            raise CapacityExceeded(
                f"the gateway is busy: {self._max_active - self._free} generations running "
                f"and {self.waiting} requests waiting; retry later"
            )
        if not over and self._fits(weight):
            self._per_key[key] += mine
            self._free -= weight
            return Slot(self, key, weight, mine)
        loop = asyncio.get_running_loop()
        waiter = _Waiter(key, weight, mine, loop.create_future(), over)
        if over:
            self._over.setdefault(key, deque()).append(waiter)
            waiter.timer = loop.call_later(self._key_wait_s, self._expire, waiter)
        else:
            self._per_key[key] += mine
            self._queue.append(waiter)
        try:
            await waiter.turn
        except BaseException:
            self._abandon(waiter)
            raise
        return Slot(self, key, weight, mine)

    @property
    def waiting(self) -> int:
        """Requests waiting now: for a slot, or for room under their key's cap."""
        return len(self._queue) + sum(len(q) for q in self._over.values())

    def in_flight(self, key: str) -> int:
        """Generations of ``key`` running or queued for a slot."""
        return self._per_key[key]

    def _fits(self, weight: int) -> bool:
        return not self._queue and self._free >= weight

    def _over_cap(self, held: int, mine: int, cap: int, waiting: int, waited: float = 0) -> str:
        asked = f"; this request's {mine} would make {held + mine}" if mine > 1 else ""
        queued = f" and {waiting} more waiting for room" if waiting else ""
        after = f" (waited {waited:g} s for one to finish)" if waited else ""
        return (
            f"this API key already has {held} generations in flight{queued}{asked}, and "
            f"{cap} is the most one key may have{after}; retry when one has finished"
        )

    def _expire(self, waiter: _Waiter) -> None:
        """The waiter's key had no room for ``key_wait_s``: it is refused (429)."""
        if not waiter.over or waiter.turn.done():
            return
        key = waiter.key
        self._drop_over(waiter)
        cap = self.cap(key)
        assert cap is not None
        held = self._per_key[key]
        message = self._over_cap(held, waiter.mine, cap, 0, self._key_wait_s)
        waiter.turn.set_exception(TooManyRequests(message))
        self._admit_over(key)  # a lighter request behind it may fit

    def _abandon(self, waiter: _Waiter) -> None:
        """Undo whatever ``waiter`` holds, its request having left (cancelled, or refused
        after its wait)."""
        if waiter.timer is not None:
            waiter.timer.cancel()
        turn = waiter.turn
        if turn.done() and not turn.cancelled() and turn.exception() is None:
            # Given its slots as it was cancelled: they go to those behind it.
            self._release(waiter.key, waiter.weight, waiter.mine)
        elif waiter.over:
            self._drop_over(waiter)
            self._admit_over(waiter.key)  # those of its key behind it may fit now
        else:
            if waiter in self._queue:
                self._queue.remove(waiter)
            self._leave(waiter.key, waiter.mine)
            self._grant()  # those behind it may fit now
            self._admit_over(waiter.key)

    def _drop_over(self, waiter: _Waiter) -> None:
        queue = self._over.get(waiter.key)
        if queue is not None and waiter in queue:
            queue.remove(waiter)
        if not queue:
            self._over.pop(waiter.key, None)

    def _admit_over(self, key: str) -> None:
        """Move the requests of ``key`` waiting for room under its cap into the queue (or
        straight into a slot), in order, while the first fits under the cap."""
        queue = self._over.get(key)
        cap = self.cap(key)
        while queue and cap is not None:
            waiter = queue[0]
            if waiter.turn.done():  # its request left; it takes nothing
                queue.popleft()
                continue
            if self._per_key[key] + waiter.mine > cap:
                break
            queue.popleft()
            waiter.over = False
            if waiter.timer is not None:
                waiter.timer.cancel()
            self._per_key[key] += waiter.mine
            if self._fits(waiter.weight):
                self._free -= waiter.weight
                waiter.turn.set_result(None)
            else:
                self._queue.append(waiter)
        if not queue:
            self._over.pop(key, None)

    def _grant(self) -> None:
        """Wake waiters in order while the first fits (none overtakes a larger one)."""
        while self._queue and self._free >= self._queue[0].weight:
            waiter = self._queue.popleft()
            if waiter.turn.done():  # its request left; it takes nothing
                continue
            self._free -= waiter.weight
            waiter.turn.set_result(None)

    def _release(self, key: str, weight: int, mine: int) -> None:
        self._free += weight
        self._leave(key, mine)
        self._grant()
        self._admit_over(key)

    def _leave(self, key: str, mine: int) -> None:
        self._per_key[key] -= mine
        if self._per_key[key] <= 0:
            del self._per_key[key]  # keys come and go: keep only those in flight


@dataclass(eq=False)
class _Waiter:
    """A request waiting: for room under its key's cap (``over``), then for slots."""

    key: str
    weight: int
    mine: int
    turn: asyncio.Future[None]
    over: bool
    timer: asyncio.TimerHandle | None = None


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
