"""The response of a streamed completion: SSE events, and a cleanup that always runs."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping

from sse_starlette import EventSourceResponse, ServerSentEvent
from sse_starlette.sse import SendTimeoutError
from starlette.types import Receive, Scope, Send

from gateway.web import sse

logger = logging.getLogger(__name__)


class EventStream(EventSourceResponse):
    """Sends ``events``, then runs ``cleanup`` however the stream ended: done, failed, its
    client gone, or never started.

    A client that stops reading fills the socket buffers until a send blocks; each send
    (keep-alive pings too) must complete within ``send_timeout_s``, else the stream is
    cancelled as if the client had left, so that it cannot hold its generation forever.
    """

    def __init__(
        self,
        events: AsyncIterator[ServerSentEvent],
        *,
        cleanup: Callable[[], Awaitable[None]],
        send_timeout_s: float,
        headers: Mapping[str, str],
    ) -> None:
        super().__init__(
            events,
            headers=headers,
            sep=sse.SEP,
            ping=sse.PING_PERIOD_S,
            send_timeout=send_timeout_s,
        )
        self._cleanup = cleanup

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except SendTimeoutError:  # the response stays unfinished: the server drops it
            logger.warning(
                "a client read nothing for %s s; its stream is cancelled", self.send_timeout
            )
        finally:
            await self._cleanup()
