"""One framed ``rpc_inference`` stream to one server, as the step protocol
(``client.hop_stream``) uses it: dialed once, watched for a hung server, and failed for good
once it breaks.

Every way it can break (dialing, the daemon, a timeout, a closed stream, a malformed
frame) becomes one ``SwarmError`` naming the peer, kept in ``_failed``: every later call
raises it again, so a chain never steps a broken hop twice. Steps are watched
(``_watched``): past a soft deadline the server is probed, and one that leaves the probe
unanswered fails at once as hung instead of at the hard deadline.

The stream is framed here rather than through hivemind's ``iterate_protobuf_handler``:
that iterator notices a dead connection only once the caller sends its next request, so a
server killed mid-step would cost a whole deadline instead of a moment; and here a reply's
length is checked before it is read into memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any, Protocol, TypeVar

from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2

from client.frames import ReplyReader, receive_frame, send_frame
from protocol.errors import PeerUnavailable, SwarmError
from protocol.latency import SimulatedLink
from protocol.rpc import RPC_INFERENCE

OPEN_TIMEOUT_S = 10.0  # dialing a server and hearing its first reply
CLOSE_TIMEOUT_S = 10.0  # how long a closing stream may take to say goodbye
# A suspect hop is probed again this often while its step stays unanswered (it answered the
# last probe: slow, not hung), until the step's hard deadline.
REPROBE_S = 1.0
T = TypeVar("T")
NO_DELAY = SimulatedLink()  # a link as it is: the simulated delay is for benchmarks only
_detached: set[asyncio.Task[None]] = set()  # strong references until each task finishes


def detach(coroutine: Coroutine[Any, Any, None]) -> None:
    """Run ``coroutine`` outside the current task, so cancelling the caller cannot stop it."""
    task = asyncio.get_running_loop().create_task(coroutine)
    _detached.add(task)
    task.add_done_callback(_detached.discard)


class Watch(Protocol):
    """How a stream tells a slow hop from a hung one (client.liveness): a soft deadline
    from the hop's own step times, and a liveness probe once it passes."""

    def suspect_after_s(self, peer_id: str, tokens: int) -> float:
        """How long a step of ``tokens`` may stay unanswered before the hop is probed."""
        ...

    async def alive(self, peer_id: str) -> bool:
        """Whether the peer answers a probe now (False: it is hung, and banned)."""
        ...

    def hung(self, peer_id: str) -> bool:
        """Whether a probe found the peer hung and it has not answered since."""
        ...

    def stepped(self, peer_id: str, seconds: float, tokens: int) -> None:
        """A step of ``tokens`` answered in ``seconds``."""
        ...


class HopConnection:
    """The stream to ``peer_id``. ``link``: a simulated network delay on every message
    (benchmarks only; each timeout is widened by its round trip, so a slow link alone
    never fails a hop). ``watch``: how a step past its soft deadline is probed; None: the
    hard deadline alone. ``on_close``: called once, when the stream is closed."""

    def __init__(
        self,
        p2p: P2P,
        peer_id: str,
        link: SimulatedLink = NO_DELAY,
        watch: Watch | None = None,
        on_close: Callable[[], None] = lambda: None,
    ) -> None:
        self._p2p = p2p
        self._peer_id = peer_id
        self._link = link
        self._watch = watch
        self._on_close = on_close
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._closed = False
        self._failed: SwarmError | None = None  # the error that broke this stream
        self._replies: ReplyReader | None = None  # once steps overlap: replies as they come

    @property
    def peer_id(self) -> str:
        return self._peer_id

    async def _dial(self) -> None:
        """Open the stream (``OPEN_TIMEOUT_S``)."""
        try:
            peer = PeerID.from_base58(self.peer_id)
            _, self._reader, self._writer = await asyncio.wait_for(
                self._p2p.call_binary_stream_handler(peer, RPC_INFERENCE), OPEN_TIMEOUT_S
            )
        except TimeoutError:
            raise PeerUnavailable(f"{self.peer_id} did not answer in time", self.peer_id) from None
        except Exception as e:  # a malformed peer id, dial errors, daemon control failures
            raise PeerUnavailable(f"{self.peer_id}: {e}", self.peer_id) from e
        if self._closed:  # closed while dialing: nobody will close this stream later
            self._writer.close()
            raise PeerUnavailable(f"the stream to {self.peer_id} is closed", self.peer_id)

    async def _watched(
        self, work: Awaitable[T], hard_s: float, tokens: int, also: HopConnection | None = None
    ) -> T:
        """``work`` (this hop's answer) within ``hard_s``. Once the hop's soft deadline
        passes, it is probed, and ``also`` with it (the hop it pushes to: while that one
        hangs, the push and so this answer wait for it); a probed hop that does not answer
        is marked hung, and this one raises at once. A hop that answers its probe is slow,
        not hung: it is probed again every ``REPROBE_S`` until the hard deadline."""
        if self._watch is None:
            return await asyncio.wait_for(work, hard_s)
        watch = self._watch
        task = asyncio.ensure_future(work)
        deadline = time.monotonic() + hard_s
        wait_s = min(watch.suspect_after_s(self.peer_id, tokens) + self._link.rtt_s, hard_s)
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=wait_s)
                if done:
                    return task.result()
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                suspects = [self] + ([also] if also is not None and also._failed is None else [])
                answers = await asyncio.gather(*(watch.alive(h.peer_id) for h in suspects))
                for hop, answered in zip(suspects, answers, strict=True):
                    if not answered:
                        hop._hang()
                if task.done():  # it answered while being probed after all
                    return task.result()
                if self._failed is not None:
                    raise self._failed
                wait_s = min(REPROBE_S, max(left, 0.0))
        finally:
            task.cancel()

    def _hang(self) -> None:
        """A probe found the server hung: this stream fails, now and on every later call."""
        if self._failed is None:
            self._failed = PeerUnavailable(
                f"{self.peer_id} is hung: it answers neither its step nor a liveness probe",
                self.peer_id,
            )

    async def _ready(self, n: int) -> runtime_pb2.ExpertResponse | None:
        """The ``n``-th unread answer once it arrived; None if the stream ended first."""
        assert self._replies is not None
        return await self._replies.ready(n)

    def _read_ahead(self) -> None:
        if self._replies is None:
            reader, _ = self._streams()
            self._replies = ReplyReader(reader, self.peer_id, self._link)

    async def _next_reply(self) -> runtime_pb2.ExpertResponse:
        assert self._replies is not None
        await self._replies.ready(1)
        return self._replies.take()

    def close(self) -> None:
        """End the stream; the server frees or keeps the session when it sees the end.

        Synchronous on purpose: it runs while a disconnected client's request is being
        cancelled, where any await would be cancelled too and leave the stream open.
        """
        if self._closed:
            return
        self._closed = True
        self._on_close()
        if self._reader is not None and self._writer is not None:
            detach(self._say_goodbye(self._reader, self._writer, self._replies))

    async def _say_goodbye(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        replies: ReplyReader | None,
    ) -> None:
        try:
            with contextlib.suppress(Exception):
                if replies is not None:
                    await replies.stop()
                await self._link.outbound()
                await asyncio.wait_for(send_frame(writer, P2P.ERROR_MARKER, b""), CLOSE_TIMEOUT_S)
                # The server ends its side once it has released the session.
                await asyncio.wait_for(reader.read(), CLOSE_TIMEOUT_S)
        finally:
            writer.close()

    def _streams(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._failed is None and self._watch is not None and self._watch.hung(self.peer_id):
            self._hang()  # an idle probe found it hung: no step waits for it again
        if self._failed is not None:
            raise self._failed
        if self._reader is None or self._writer is None or self._closed:
            raise PeerUnavailable(f"the stream to {self.peer_id} is closed", self.peer_id)
        return self._reader, self._writer

    async def _exchange(
        self, request: runtime_pb2.ExpertRequest, timeout_s: float, tokens: int | None = None
    ) -> runtime_pb2.ExpertResponse:
        """One message and its answer within ``timeout_s``; a step (``tokens``) is watched
        for a hung hop past its soft deadline."""
        reader, writer = self._streams()

        async def round_trip() -> runtime_pb2.ExpertResponse:
            await self._link.outbound()
            await send_frame(writer, P2P.MESSAGE_MARKER, request.SerializeToString())
            if self._replies is not None:  # steps overlapped before: it reads every reply
                return await self._next_reply()
            reply = await receive_frame(reader, self.peer_id)
            await self._link.inbound()
            return reply

        timeout_s += self._link.rtt_s  # the server's time to answer, plus the wire's
        with self._failures(timeout_s):
            if tokens is None:
                return await asyncio.wait_for(round_trip(), timeout_s)
            return await self._watched(round_trip(), timeout_s, tokens)

    async def _send(self, request: runtime_pb2.ExpertRequest) -> None:
        """One message to the server, answered later (or never: a relay)."""
        _, writer = self._streams()

        async def deliver() -> None:
            await self._link.outbound()
            await send_frame(writer, P2P.MESSAGE_MARKER, request.SerializeToString())

        timeout_s = OPEN_TIMEOUT_S + self._link.rtt_s  # a write waits only on flow control
        with self._failures(timeout_s):
            await asyncio.wait_for(deliver(), timeout_s)

    @contextlib.contextmanager
    def _failures(self, timeout_s: float) -> Iterator[None]:
        """Every way the stream can break, as the ``SwarmError`` it stays failed with."""
        try:
            yield
        except SwarmError as e:
            self._failed = e
            raise
        except asyncio.IncompleteReadError:
            error: SwarmError = PeerUnavailable(f"{self.peer_id} closed the stream", self.peer_id)
            self._failed = error
            raise error from None
        except TimeoutError:
            error = PeerUnavailable(
                f"{self.peer_id} did not answer within {timeout_s:.1f} s", self.peer_id
            )
            self._failed = error
            raise error from None
        except Exception as e:  # connection resets, the daemon going away
            error = PeerUnavailable(f"{self.peer_id}: {e}", self.peer_id)
            self._failed = error
            raise error from e
