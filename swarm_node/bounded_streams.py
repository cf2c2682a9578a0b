"""The node's streaming RPCs, read with bounds before anything is known about the caller.

hivemind's protobuf stream handlers read a frame's 8-byte length as the sender states it and
buffer that many bytes, and the handler sees the first message, with the caller's pass,
only once it is whole. A stranger who reaches a node's port could open many streams and
announce 2**40-byte frames: the node would buffer until it was killed for memory. Here the
same wire format (a marker byte, an 8-byte big-endian length, the protobuf) is read by
swarmgate itself, so that:

- a frame longer than its limit is refused before a byte of it is buffered; the first
  frame, which carries the pass and never a tensor, has a far smaller limit than the rest;
- the first frame must arrive within ``FIRST_FRAME_S``;
- streams whose caller has not shown a valid pass yet are capped per remote peer and in
  total: past the caps a new stream is closed at once, so strangers hold at most
  ``MAX_UNPROVEN`` first frames' worth of memory, however many streams they open (a caller
  that has shown a valid pass lately is not counted: a member's burst is never refused);
- a handler admits its caller (``Caller.admitted``) once the pass checks out, which frees
  the stream's place among the unproven, and takes any slot (a session, a training call)
  only after that;
- a stream that breaks the rules, or goes silent, ends quietly: a log line, no traceback.

Clients see hivemind's protocol unchanged (``P2P.call_binary_stream_handler`` with
hivemind's framing, or ``iterate_protobuf_handler``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.message import DecodeError
from hivemind.p2p import P2P, PeerID
from hivemind.p2p.p2p_daemon_bindings.datastructures import StreamInfo
from hivemind.proto import runtime_pb2
from hivemind.proto.p2pd_pb2 import RPCError

from protocol.rpc import MAX_MESSAGE_BYTES

logger = logging.getLogger("swarmgate.node.streams")

MAX_FRAME_BYTES = MAX_MESSAGE_BYTES + 64 * 1024  # hivemind's cap, plus framing and metadata
# The first frame is an opening or a training call: metadata only (prefix hashes included).
MAX_FIRST_FRAME_BYTES = 1024 * 1024
FIRST_FRAME_S = 5.0
# Streams that have not shown a valid pass yet, all callers together and per caller. A
# gateway opening a request's choices at once opens as many streams to one server (8 with
# n=8), all before any has shown its pass: the cap per peer leaves room for that. A caller
# that has shown a valid pass is known for PROVEN_S and its streams are not counted.
MAX_UNPROVEN = 64
MAX_UNPROVEN_PER_PEER = 16
PROVEN_S = 600.0
MAX_PROVEN_PEERS = 4096
PREFETCH = 5  # requests read ahead of the handler (hivemind's default)

Handler = Callable[
    [AsyncIterator[runtime_pb2.ExpertRequest], "Caller"],
    AsyncIterator[runtime_pb2.ExpertResponse],
]


class FrameRefused(Exception):
    """A frame broke a bound; the stream ends."""


@dataclass
class Caller:
    """Who opened a stream, as the handler sees it (in place of hivemind's P2PContext)."""

    remote_id: PeerID
    admitted: Callable[[], None] = field(default=lambda: None)


class Unproven:
    """Streams not yet admitted, per remote peer and in total; and the peers that showed a
    valid pass lately, whose streams are not counted (a member's burst is never refused)."""

    def __init__(
        self,
        total: int = MAX_UNPROVEN,
        per_peer: int = MAX_UNPROVEN_PER_PEER,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._total = total
        self._per_peer = per_peer
        self._clock = clock
        self._of: Counter[str] = Counter()
        self._proven: dict[str, float] = {}  # peer → until when it counts as a member

    @property
    def count(self) -> int:
        return sum(self._of.values())

    def enter(self, peer: str) -> bool | None:
        """Room for a stream of ``peer``: True (counted until it leaves), None (a peer
        proven lately: not counted), False (no room: refuse it)."""
        until = self._proven.get(peer)
        if until is not None:
            if until > self._clock():
                return None
            del self._proven[peer]
        if self.count >= self._total or self._of[peer] >= self._per_peer:
            return False
        self._of[peer] += 1
        return True

    def prove(self, peer: str) -> None:
        """``peer`` showed a valid pass: its next streams are a member's."""
        self._proven.pop(peer, None)
        self._proven[peer] = self._clock() + PROVEN_S
        while len(self._proven) > MAX_PROVEN_PEERS:
            del self._proven[next(iter(self._proven))]

    def leave(self, peer: str) -> None:
        self._of[peer] -= 1
        if self._of[peer] <= 0:
            del self._of[peer]


async def read_frame(reader: asyncio.StreamReader, limit: int) -> tuple[bytes, bytes]:
    """One frame: its marker and payload, the length checked before the payload is read."""
    marker = await reader.readexactly(1)
    length = int.from_bytes(await reader.readexactly(P2P.HEADER_LEN), P2P.BYTEORDER)
    if length > limit:
        raise FrameRefused(f"a {length}-byte frame (at most {limit})")
    return marker, await reader.readexactly(length)


def parse_request(marker: bytes, payload: bytes) -> runtime_pb2.ExpertRequest | None:
    """A request; None for the caller's end of stream (hivemind's END_OF_STREAM)."""
    if marker == P2P.ERROR_MARKER:
        return None
    if marker != P2P.MESSAGE_MARKER:
        raise FrameRefused("a frame with an unknown marker")
    request = runtime_pb2.ExpertRequest()
    try:
        request.ParseFromString(payload)
    except DecodeError:
        raise FrameRefused("a malformed message") from None
    return request


async def send_response(writer: asyncio.StreamWriter, response: Any) -> None:
    marker = P2P.ERROR_MARKER if isinstance(response, RPCError) else P2P.MESSAGE_MARKER
    payload = response.SerializeToString()
    writer.write(marker + len(payload).to_bytes(P2P.HEADER_LEN, P2P.BYTEORDER) + payload)
    await writer.drain()


class BoundedStreams:
    """Registers streaming handlers on a node's P2P, each read through the bounds above."""

    def __init__(self, unproven: Unproven | None = None) -> None:
        self.unproven = unproven or Unproven()

    async def add(self, p2p: P2P, name: str, handler: Handler) -> None:
        async def handle(
            info: StreamInfo, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
        ) -> None:
            await self._serve(name, handler, info.peer_id, reader, writer)

        await p2p.add_binary_stream_handler(name, handle)

    async def _serve(
        self,
        name: str,
        handler: Handler,
        peer: PeerID,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        caller = peer.to_base58()
        room = self.unproven.enter(caller)
        if room is False:
            logger.warning(
                "%s: refused a stream of %s: too many streams without a pass", name, caller
            )
            writer.close()
            return
        proven = room is None  # a member seen lately: not counted among strangers

        def admitted() -> None:
            nonlocal proven
            self.unproven.prove(caller)
            if not proven:
                proven = True
                self.unproven.leave(caller)

        requests: asyncio.Queue[runtime_pb2.ExpertRequest | None] = asyncio.Queue(PREFETCH)
        try:
            try:
                first = await asyncio.wait_for(
                    read_frame(reader, MAX_FIRST_FRAME_BYTES), FIRST_FRAME_S
                )
                request = parse_request(*first)
            except (FrameRefused, TimeoutError, asyncio.IncompleteReadError, ConnectionError) as e:
                why = "no first message in time" if isinstance(e, TimeoutError) else str(e)
                logger.info("%s: closed a stream of %s: %s", name, caller, why or "it ended")
                return
            await requests.put(request)
            responses = handler(_drain(requests), Caller(peer, admitted))
            producer = asyncio.ensure_future(self._read_rest(name, caller, reader, requests))
            try:
                await self._answer(name, caller, responses, writer)
            finally:
                producer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await producer
        finally:
            if not proven:
                self.unproven.leave(caller)
            writer.close()

    async def _read_rest(
        self,
        name: str,
        caller: str,
        reader: asyncio.StreamReader,
        requests: asyncio.Queue[runtime_pb2.ExpertRequest | None],
    ) -> None:
        """Every later frame into ``requests``; None once the stream ends (or breaks)."""
        try:
            while True:
                request = parse_request(*await read_frame(reader, MAX_FRAME_BYTES))
                await requests.put(request)
                if request is None:
                    return
        except (FrameRefused, asyncio.IncompleteReadError, ConnectionError) as e:
            if isinstance(e, FrameRefused):
                logger.warning("%s: ended a stream of %s: %s", name, caller, e)
            await requests.put(None)

    async def _answer(
        self,
        name: str,
        caller: str,
        responses: AsyncIterator[runtime_pb2.ExpertResponse],
        writer: asyncio.StreamWriter,
    ) -> None:
        try:
            async for response in responses:
                try:
                    await send_response(writer, response)
                except (ConnectionError, RuntimeError):
                    return  # the caller went away: its handler's cleanup runs on close
        except Exception as e:  # a handler's own bug: the caller hears of it, the log too
            logger.warning("%s: a stream of %s failed", name, caller, exc_info=True)
            with contextlib.suppress(Exception):
                await send_response(writer, RPCError(message=str(e)))
        finally:
            aclose = getattr(responses, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()


async def _drain(
    requests: asyncio.Queue[runtime_pb2.ExpertRequest | None],
) -> AsyncIterator[runtime_pb2.ExpertRequest]:
    while (request := await requests.get()) is not None:
        yield request
