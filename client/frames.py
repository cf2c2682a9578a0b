"""Frames of one ``rpc_inference`` stream, as hivemind writes them, and a reader that takes
a server's replies as they arrive.

A chain that pushes has several steps in flight on one stream (a pushed step's small
acknowledgement may still be unread when the next step is sent) and waits on several
streams at once, so replies are read by a task of their own into ``ReplyReader`` and taken
in order. Each reply counts as arrived once it has crossed the simulated link: half a
round trip after the moment it was read off the wire, however late it is taken.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from dataclasses import dataclass

from google.protobuf.message import DecodeError
from hivemind.p2p import P2P
from hivemind.proto import runtime_pb2
from hivemind.proto.p2pd_pb2 import RPCError

from protocol.errors import BadReply, PeerUnavailable
from protocol.latency import SimulatedLink
from protocol.rpc import MAX_MESSAGE_BYTES

MAX_REPLY_BYTES = MAX_MESSAGE_BYTES + 64 * 1024  # hivemind's cap, plus framing and metadata
MAX_UNREAD = 8  # replies read ahead of the chain; a server sending more waits (backpressure)


async def send_frame(writer: asyncio.StreamWriter, marker: bytes, payload: bytes) -> None:
    writer.write(marker + len(payload).to_bytes(P2P.HEADER_LEN, P2P.BYTEORDER) + payload)
    await writer.drain()


async def receive_frame(reader: asyncio.StreamReader, peer_id: str) -> runtime_pb2.ExpertResponse:
    """One framed reply, its length bounded before a byte of it is buffered."""
    marker = await reader.readexactly(1)
    length = int.from_bytes(await reader.readexactly(P2P.HEADER_LEN), P2P.BYTEORDER)
    if length > MAX_REPLY_BYTES:
        raise BadReply(f"{peer_id} sent a {length}-byte message", peer_id)
    payload = await reader.readexactly(length)
    if marker == P2P.ERROR_MARKER:  # hivemind's report of an exception in the handler
        error = RPCError()
        error.ParseFromString(payload)
        raise PeerUnavailable(f"{peer_id}: {error.message or 'the handler failed'}", peer_id)
    if marker != P2P.MESSAGE_MARKER:
        raise BadReply(f"{peer_id} sent a malformed frame", peer_id)
    response = runtime_pb2.ExpertResponse()
    try:
        response.ParseFromString(payload)
    except DecodeError:
        raise BadReply(f"{peer_id} sent a malformed message", peer_id) from None
    return response


@dataclass(frozen=True)
class _Read:
    arrived: float  # loop time it was read off the wire
    reply: runtime_pb2.ExpertResponse | None
    error: BaseException | None  # how the stream ended or broke; nothing follows it


class ReplyReader:
    """Reads a server's replies into a buffer as they come; ``ready`` waits for the n-th
    unread one without taking it (so waits may race and be cancelled), ``take`` takes the
    oldest."""

    def __init__(self, reader: asyncio.StreamReader, peer_id: str, link: SimulatedLink) -> None:
        self._reader = reader
        self._peer_id = peer_id
        self._link = link
        self._unread: deque[_Read] = deque()
        self._changed = asyncio.Event()
        self._task = asyncio.ensure_future(self._run())

    async def ready(self, n: int = 1) -> runtime_pb2.ExpertResponse | None:
        """Wait until the ``n``-th unread reply has arrived (or the stream ended before
        it); that reply, None if the stream ended or broke first."""
        while True:
            ended = next((i for i, read in enumerate(self._unread) if read.error), None)
            if ended is not None and ended < n:
                return None
            if len(self._unread) >= n:
                read = self._unread[n - 1]
                loop = asyncio.get_running_loop()
                await self._link.inbound(elapsed_s=loop.time() - read.arrived)
                return read.reply
            self._changed.clear()
            await self._changed.wait()

    def take(self) -> runtime_pb2.ExpertResponse:
        """The oldest unread reply, after ``ready()`` said it is there; raises what ended
        the stream if that came first."""
        read = self._unread[0]
        if read.error is not None:
            raise read.error
        self._unread.popleft()
        self._changed.set()
        assert read.reply is not None
        return read.reply

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                while len(self._unread) >= MAX_UNREAD:
                    self._changed.clear()
                    await self._changed.wait()
                reply = await receive_frame(self._reader, self._peer_id)
                self._unread.append(_Read(loop.time(), reply, None))
                self._changed.set()
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # end of stream, a reset, a malformed frame
            self._unread.append(_Read(loop.time(), None, e))
            self._changed.set()

    async def stop(self) -> None:
        """Stop reading (before the stream is read to its end by someone else)."""
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
