"""HopStream: nothing a server sends back is used unchecked, and every failure names the peer."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
import torch
from hivemind.p2p import P2P
from hivemind.proto import runtime_pb2
from hivemind.proto.p2pd_pb2 import RPCError

from client.hop_stream import HopStream, check_cached, check_hidden
from protocol.codec import make_response, read_tensors
from protocol.errors import BadReply, CapacityExceeded, PeerUnavailable
from protocol.prefix import BLOCK_TOKENS, TokenHistory, block_hashes
from protocol.rpc import (
    ErrorCode,
    OpenSession,
    PushTarget,
    Relay,
    RpcError,
    SessionOpened,
    Step,
    StepDone,
    decode,
    decode_stream_message,
)
from routing.planner import Hop

PEER = "QmTestPeer"  # base58, as PeerID.from_base58 wants
SHAPE = torch.Size([1, 3, 8])

# ---- check_hidden ----


def test_usable_hidden_states_pass_through() -> None:
    tensor = torch.randn(SHAPE)
    assert check_hidden(tensor, SHAPE, PEER) is tensor


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_hidden_states_are_a_bad_reply(value: float) -> None:
    tensor = torch.randn(SHAPE)
    tensor[0, 2, 5] = value
    with pytest.raises(BadReply, match="non-finite") as raised:
        check_hidden(tensor, SHAPE, PEER)
    assert raised.value.peer_id == PEER


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64, torch.int64])
def test_hidden_states_of_another_dtype_are_a_bad_reply(dtype: torch.dtype) -> None:
    with pytest.raises(BadReply, match="expected float32") as raised:
        check_hidden(torch.zeros(SHAPE, dtype=dtype), SHAPE, PEER)
    assert raised.value.peer_id == PEER


@pytest.mark.parametrize("shape", [[1, 2, 8], [1, 3, 4], [2, 3, 8], [3, 8], [1, 3, 8, 1]])
def test_hidden_states_of_another_shape_are_a_bad_reply(shape: list[int]) -> None:
    with pytest.raises(BadReply, match=PEER) as raised:
        check_hidden(torch.zeros(shape), SHAPE, PEER)
    assert raised.value.peer_id == PEER


# ---- check_cached ----


@pytest.mark.parametrize(("cached", "blocks"), [(0, 0), (0, 2), (40, 2), (64, 2)])
def test_a_cached_count_the_hashes_allow_passes(cached: int, blocks: int) -> None:
    assert check_cached(cached, ["h"] * blocks, PEER) == cached


@pytest.mark.parametrize(("cached", "blocks"), [(-1, 2), (1, 0), (2 * BLOCK_TOKENS + 1, 2)])
def test_a_cached_count_the_hashes_cannot_allow_is_a_bad_reply(cached: int, blocks: int) -> None:
    with pytest.raises(BadReply, match=f"{cached} cached tokens") as raised:
        check_cached(cached, ["h"] * blocks, PEER)
    assert raised.value.peer_id == PEER


def test_a_resumed_conversation_may_be_cached_up_to_its_length_and_no_further() -> None:
    assert check_cached(70, ["h"] * 2, PEER, resumed=70) == 70
    with pytest.raises(BadReply):
        check_cached(71, ["h"] * 2, PEER, resumed=70)


# ---- HopStream over an in-memory stream ----

Reply = Callable[[Step, torch.Tensor], runtime_pb2.ExpertResponse | bytes | None]


def frame(payload: bytes, marker: bytes = P2P.MESSAGE_MARKER) -> bytes:
    return marker + len(payload).to_bytes(P2P.HEADER_LEN, P2P.BYTEORDER) + payload


def doubled(step: Step, hidden: torch.Tensor) -> runtime_pb2.ExpertResponse:
    return make_response(StepDone(position=step.position + hidden.shape[1]), hidden * 2)


class Writer:
    """The gateway's end of the stream: each frame it writes goes to the server."""

    def __init__(self) -> None:
        self.frames: asyncio.Queue[tuple[bytes, bytes]] = asyncio.Queue()
        self.closed = False

    def write(self, data: bytes) -> None:
        length = int.from_bytes(data[1 : 1 + P2P.HEADER_LEN], P2P.BYTEORDER)
        assert len(data) == 1 + P2P.HEADER_LEN + length  # one whole frame per write
        self.frames.put_nowait((data[:1], data[1 + P2P.HEADER_LEN :]))

    async def drain(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


class FakeServer:
    """The other end of ``rpc_inference``: answers the opening with ``opened``, then each
    step with ``reply`` (a response, a raw frame, or ``None`` to hang). Records what it got."""

    def __init__(self, cached: int = 0, reply: Reply = doubled) -> None:
        self.opened: runtime_pb2.ExpertResponse | bytes = make_response(
            SessionOpened(cached_tokens=cached)
        )
        self.reply = reply
        self.opening: OpenSession | None = None
        self.steps: list[tuple[Step, int]] = []  # each step and its tokens
        self.ended = False  # the gateway said goodbye
        self.reader: asyncio.StreamReader | None = None  # what the gateway reads

    async def serve(self, writer: Writer, reader: asyncio.StreamReader) -> None:
        self.reader = reader
        _, payload = await writer.frames.get()
        self.opening = decode(OpenSession, runtime_pb2.ExpertRequest.FromString(payload).metadata)
        self._send(reader, self.opened)
        while True:
            marker, payload = await writer.frames.get()
            if marker == P2P.ERROR_MARKER:  # the gateway's end of stream
                self.ended = True
                reader.feed_eof()
                return
            request = runtime_pb2.ExpertRequest.FromString(payload)
            step = decode(Step, request.metadata)
            (hidden,) = read_tensors(request)
            self.steps.append((step, hidden.shape[1]))
            response = self.reply(step, hidden)
            if response is not None:
                self._send(reader, response)

    @staticmethod
    def _send(reader: asyncio.StreamReader, reply: runtime_pb2.ExpertResponse | bytes) -> None:
        reader.feed_data(reply if isinstance(reply, bytes) else frame(reply.SerializeToString()))


class FakeP2P:
    def __init__(self, server: FakeServer | None, dialed: asyncio.Event | None = None) -> None:
        self.server = server
        self.dialed = dialed  # the dial hangs until it is set
        self.writer = Writer()
        self.tasks: list[asyncio.Task[None]] = []

    async def call_binary_stream_handler(
        self, peer: object, name: str
    ) -> tuple[None, asyncio.StreamReader, Writer]:
        assert str(peer) == PEER and name == "swarmgate.rpc_inference"
        if self.dialed is not None:
            await self.dialed.wait()
        if self.server is None:
            raise ConnectionError("no route to host")
        reader = asyncio.StreamReader()
        self.tasks.append(asyncio.create_task(self.server.serve(self.writer, reader)))
        return None, reader, self.writer


OPENING = OpenSession(
    secret="5e" * 16, session_id="s", start=0, end=2, max_length=128, prefix_hashes=["ab" * 16] * 2
)


class Harness:
    def __init__(
        self, server: FakeServer | None, chunk_tokens: int = 16, dialed: asyncio.Event | None = None
    ) -> None:
        self.server = server
        self.p2p = FakeP2P(server, dialed)
        self.closes = 0
        self.stream = HopStream(
            self.p2p,  # duck-typed
            Hop(PEER, 0, 2),
            chunk_tokens,
            deadline_s=lambda tokens: 0.2,
            on_close=self._closed,
        )

    def _closed(self) -> None:
        self.closes += 1


def test_a_step_goes_in_chunks_with_the_hashes_each_one_completes() -> None:
    server = FakeServer(cached=40)
    tokens = list(range(100))
    hidden = torch.randn(1, 30, 8)

    async def scenario() -> None:
        stream = Harness(server).stream
        assert await stream.open(OPENING) == 40
        stream.position = 40  # as ChainSession sets it
        out = await stream.step(hidden, TokenHistory(tokens[:70]))
        torch.testing.assert_close(out, hidden * 2)
        assert stream.position == 70

    asyncio.run(scenario())

    assert server.opening == OPENING
    hashes = block_hashes(tokens[:70])
    assert [(s.position, s.new_hashes, n) for s, n in server.steps] == [
        (40, [], 16),
        (56, [hashes[1]], 14),  # tokens 56..70 complete block 1 (tokens 32..64)
    ]


def test_an_open_claiming_more_than_the_prefix_is_a_bad_reply() -> None:
    harness = Harness(FakeServer(cached=2 * BLOCK_TOKENS + 1))

    async def scenario() -> None:
        with pytest.raises(BadReply) as raised:
            await harness.stream.open(OPENING)
        assert raised.value.peer_id == PEER

    asyncio.run(scenario())


def test_a_full_server_says_so_with_its_peer_id() -> None:
    server = FakeServer()
    server.opened = make_response(RpcError(error=ErrorCode.CAPACITY, message="full"))

    async def scenario() -> None:
        with pytest.raises(CapacityExceeded) as raised:
            await Harness(server).stream.open(OPENING)
        assert raised.value.peer_id == PEER

    asyncio.run(scenario())


def test_a_server_that_cannot_be_dialed_is_unavailable() -> None:
    async def scenario() -> None:
        with pytest.raises(PeerUnavailable, match="no route to host") as raised:
            await Harness(None).stream.open(OPENING)
        assert raised.value.peer_id == PEER

    asyncio.run(scenario())


def test_a_stream_closed_while_dialing_is_closed_when_the_dial_returns() -> None:
    async def scenario() -> Harness:
        dialed = asyncio.Event()
        harness = Harness(FakeServer(), dialed=dialed)
        opening = asyncio.create_task(harness.stream.open(OPENING))
        await asyncio.sleep(0)
        harness.stream.close()  # a cancelled request's cleanup
        dialed.set()
        with pytest.raises(PeerUnavailable, match="closed"):
            await opening
        return harness

    harness = asyncio.run(scenario())

    assert harness.p2p.writer.closed and harness.closes == 1


def wrong_position(step: Step, hidden: torch.Tensor) -> runtime_pb2.ExpertResponse:
    return make_response(StepDone(position=step.position), hidden)


def two_tensors(step: Step, hidden: torch.Tensor) -> runtime_pb2.ExpertResponse:
    return make_response(StepDone(position=step.position + hidden.shape[1]), hidden, hidden)


def nan(step: Step, hidden: torch.Tensor) -> runtime_pb2.ExpertResponse:
    return doubled(step, hidden * float("nan"))


def bfloat16(step: Step, hidden: torch.Tensor) -> runtime_pb2.ExpertResponse:
    return doubled(step, hidden.bfloat16())


def fewer_tokens(step: Step, hidden: torch.Tensor) -> runtime_pb2.ExpertResponse:
    return make_response(StepDone(position=step.position + hidden.shape[1]), hidden[:, :1])


def internal_error(step: Step, hidden: torch.Tensor) -> runtime_pb2.ExpertResponse:
    return make_response(RpcError(error=ErrorCode.INTERNAL, message="CUDA error"))


def handler_error(step: Step, hidden: torch.Tensor) -> bytes:
    return frame(RPCError(message="handler raised").SerializeToString(), P2P.ERROR_MARKER)


def huge(step: Step, hidden: torch.Tensor) -> bytes:
    return bytes(P2P.MESSAGE_MARKER) + (1 << 40).to_bytes(P2P.HEADER_LEN, P2P.BYTEORDER)


def unknown_marker(step: Step, hidden: torch.Tensor) -> bytes:
    return frame(doubled(step, hidden).SerializeToString(), b"\x07")


def garbage(step: Step, hidden: torch.Tensor) -> bytes:
    return frame(b"\xff" * 16)


def silence(step: Step, hidden: torch.Tensor) -> None:
    return None  # no answer within the deadline


@pytest.mark.parametrize(
    ("reply", "error"),
    [
        (wrong_position, BadReply),
        (two_tensors, BadReply),
        (nan, BadReply),
        (bfloat16, BadReply),
        (fewer_tokens, BadReply),
        (huge, BadReply),
        (unknown_marker, BadReply),
        (garbage, BadReply),
        (internal_error, PeerUnavailable),
        (handler_error, PeerUnavailable),
        (silence, PeerUnavailable),
    ],
)
def test_a_bad_step_reply_fails_the_hop_with_its_peer_id(
    reply: Reply, error: type[PeerUnavailable]
) -> None:
    harness = Harness(FakeServer(reply=reply))

    async def scenario() -> None:
        await harness.stream.open(OPENING)
        with pytest.raises(error) as raised:
            await harness.stream.step(torch.randn(1, 2, 8), TokenHistory())
        assert type(raised.value) is error and raised.value.peer_id == PEER
        assert harness.stream.position == 0  # nothing was accepted
        harness.stream.close()

    asyncio.run(scenario())


def test_a_server_ending_the_stream_is_unavailable() -> None:
    def hang_up(step: Step, hidden: torch.Tensor) -> None:
        assert server.reader is not None
        server.reader.feed_eof()

    server = FakeServer(reply=hang_up)

    async def scenario() -> None:
        stream = Harness(server).stream
        await stream.open(OPENING)
        with pytest.raises(PeerUnavailable, match="closed the stream") as raised:
            await stream.step(torch.randn(1, 1, 8), TokenHistory())
        assert raised.value.peer_id == PEER

    asyncio.run(scenario())


def test_close_is_synchronous_idempotent_and_ends_the_servers_side() -> None:
    server = FakeServer()
    harness = Harness(server)

    async def scenario() -> None:
        await harness.stream.open(OPENING)
        harness.stream.close()
        harness.stream.close()
        assert harness.closes == 1
        with pytest.raises(PeerUnavailable, match="closed"):
            await harness.stream.step(torch.randn(1, 1, 8), TokenHistory())
        for _ in range(100):  # the detached goodbye runs on its own
            if harness.p2p.writer.closed:
                break
            await asyncio.sleep(0)

    asyncio.run(scenario())

    assert server.ended and harness.p2p.writer.closed and server.steps == []


# ---- steps in two halves, for pushing chains ----


class PushingServer(FakeServer):
    """A server that takes pushes: a step without its input waits for a relay (the test
    plays the pusher by relaying), a step told to push answers ``pushed`` if ``push_works``.
    ``messages`` records what came, in order."""

    def __init__(self, push_works: bool = True, takes_pushes: bool = True) -> None:
        super().__init__()
        self.opened = make_response(SessionOpened(push=takes_pushes))
        self.push_works = push_works
        self.messages: list[Step | Relay] = []

    async def serve(self, writer: Writer, reader: asyncio.StreamReader) -> None:
        self.reader = reader
        await writer.frames.get()
        self._send(reader, self.opened)
        waiting: Step | None = None
        while True:
            marker, payload = await writer.frames.get()
            if marker == P2P.ERROR_MARKER:
                self.ended = True
                reader.feed_eof()
                return
            request = runtime_pb2.ExpertRequest.FromString(payload)
            message = decode_stream_message(request.metadata)
            self.messages.append(message)
            if isinstance(message, Step) and message.input_tokens:
                waiting = message
                continue
            step = waiting if isinstance(message, Relay) else message
            assert step is not None
            (hidden,) = read_tensors(request)
            done = StepDone(position=step.position + hidden.shape[1])
            if step.push_to is not None and self.push_works:
                self._send(reader, make_response(done.model_copy(update={"pushed": True})))
            else:
                self._send(reader, make_response(done, hidden * 2))


TARGET = PushTarget(peer_id="QmNextPeer", token="7a" * 16)


def test_a_step_told_to_push_is_finished_without_hidden_states() -> None:
    server = PushingServer()
    hidden = torch.randn(1, 3, 8)

    async def scenario() -> None:
        stream = Harness(server).stream
        await stream.open(OPENING.model_copy(update={"push_token": "b3" * 16}))
        assert stream.push_target == PushTarget(peer_id=PEER, token="b3" * 16)
        await stream.begin(hidden.shape, TokenHistory(list(range(3))), hidden, TARGET)
        assert stream.pending and not stream.awaits_input
        assert await stream.finish() is None
        assert stream.position == 3 and not stream.pending

    asyncio.run(scenario())

    (step,) = server.messages
    assert isinstance(step, Step) and step.push_to == TARGET and step.input_tokens == 0


@pytest.mark.parametrize("push_works", [True, False])
def test_a_step_awaiting_its_input_takes_a_relay_and_answers_with_its_output(
    push_works: bool,
) -> None:
    server = PushingServer(push_works=push_works)
    hidden = torch.randn(1, 2, 8)

    async def scenario() -> torch.Tensor | None:
        stream = Harness(server).stream
        await stream.open(OPENING.model_copy(update={"push_token": "b3" * 16}))
        await stream.begin(hidden.shape, TokenHistory(list(range(2))), push_to=TARGET)
        assert stream.awaits_input
        await stream.relay(hidden)  # its previous hop could not push it
        assert not stream.awaits_input
        return await stream.finish()

    out = asyncio.run(scenario())

    if push_works:
        assert out is None
    else:  # its own push failed: the output comes back for the gateway to relay
        assert out is not None
        torch.testing.assert_close(out, hidden * 2)
    step, relay = server.messages
    assert isinstance(step, Step) and step.input_tokens == 2 and step.position == 0
    assert isinstance(relay, Relay) and relay.position == 0


def test_a_server_that_predates_push_gets_no_push_target() -> None:
    async def scenario() -> HopStream:
        stream = Harness(PushingServer(takes_pushes=False)).stream
        await stream.open(OPENING.model_copy(update={"push_token": "b3" * 16}))
        return stream

    assert asyncio.run(scenario()).push_target is None


def claims_pushed(step: Step, hidden: torch.Tensor) -> runtime_pb2.ExpertResponse:
    return make_response(StepDone(position=step.position + hidden.shape[1], pushed=True))


def test_a_server_claiming_a_push_it_was_not_told_to_make_is_a_bad_reply() -> None:
    harness = Harness(FakeServer(reply=claims_pushed))
    hidden = torch.randn(1, 1, 8)

    async def scenario() -> None:
        await harness.stream.open(OPENING)
        await harness.stream.begin(hidden.shape, TokenHistory([1]), hidden)
        with pytest.raises(BadReply, match="pushed what it was not told"):
            await harness.stream.finish()

    asyncio.run(scenario())


def test_a_stream_that_broke_stays_broken() -> None:
    harness = Harness(FakeServer(reply=silence))
    hidden = torch.randn(1, 1, 8)

    async def scenario() -> None:
        await harness.stream.open(OPENING)
        await harness.stream.begin(hidden.shape, TokenHistory([1]), hidden)
        with pytest.raises(PeerUnavailable, match="did not answer") as first:
            await harness.stream.finish()
        with pytest.raises(PeerUnavailable) as again:
            await harness.stream.step(hidden, TokenHistory([1]))
        assert again.value is first.value

    asyncio.run(scenario())


class ManualServer(FakeServer):
    """Answers the opening (taking pushes), then whatever the test makes it answer."""

    def __init__(self) -> None:
        super().__init__()
        self.opened = make_response(SessionOpened(push=True))
        self.messages: list[Step | Relay] = []

    async def serve(self, writer: Writer, reader: asyncio.StreamReader) -> None:
        self.reader = reader
        await writer.frames.get()
        self._send(reader, self.opened)
        while True:
            marker, payload = await writer.frames.get()
            if marker == P2P.ERROR_MARKER:
                self.ended = True
                reader.feed_eof()
                return
            request = runtime_pb2.ExpertRequest.FromString(payload)
            self.messages.append(decode_stream_message(request.metadata))

    def answer(self, reply: runtime_pb2.ExpertResponse) -> None:
        assert self.reader is not None
        self._send(self.reader, reply)


async def pushing_pair() -> tuple[HopStream, ManualServer, HopStream, ManualServer]:
    """Two open streams: the first's steps push to the second's."""
    first, second = ManualServer(), ManualServer()
    a, b = Harness(first).stream, Harness(second).stream
    await a.open(OPENING.model_copy(update={"push_token": "a1" * 16}))
    await b.open(OPENING.model_copy(update={"push_token": "b2" * 16}))
    return a, first, b, second


async def pushed_step(a: HopStream, b: HopStream, n: int, history: TokenHistory) -> None:
    hidden = torch.randn(1, n, 8)
    await a.begin(hidden.shape, history, hidden, push_to=b.push_target)
    await b.begin(hidden.shape, history)


async def settled(condition: Callable[[], bool]) -> None:
    for _ in range(200):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("never settled")


def test_a_pusher_is_done_once_its_successor_answers_and_its_ack_is_read_later() -> None:
    async def scenario() -> None:
        a, first, b, second = await pushing_pair()
        history = TokenHistory(list(range(3)))
        await pushed_step(a, b, 2, history)
        finishing = asyncio.ensure_future(a.finish(successor=b))
        await asyncio.sleep(0.01)
        assert not finishing.done()
        out = torch.randn(1, 2, 8)
        second.answer(make_response(StepDone(position=2), out))  # b computed on the push
        assert await asyncio.wait_for(finishing, 1) is None  # before a's own word
        assert a.position == 2 and not a.pending
        torch.testing.assert_close(await b.finish(), out)

        # The next step goes out before a's first acknowledgement was read; both are
        # read, in order, when the next answer is.
        await pushed_step(a, b, 1, history)
        assert [m.position for m in first.messages if isinstance(m, Step)] == [0, 2]
        first.answer(make_response(StepDone(position=2, pushed=True)))
        first.answer(make_response(StepDone(position=3, pushed=True)))
        assert await asyncio.wait_for(a.finish(), 1) is None
        assert a.position == 3
        second.answer(make_response(StepDone(position=3), torch.randn(1, 1, 8)))
        await b.finish()

    asyncio.run(scenario())


def test_a_successors_error_proves_nothing_the_pusher_answers_for_itself() -> None:
    async def scenario() -> None:
        a, first, b, second = await pushing_pair()
        await pushed_step(a, b, 2, TokenHistory(list(range(2))))
        finishing = asyncio.ensure_future(a.finish(successor=b))
        second.answer(make_response(RpcError(error=ErrorCode.INTERNAL, message="broke")))
        await asyncio.sleep(0.01)
        assert not finishing.done()
        out = torch.randn(1, 2, 8)
        first.answer(make_response(StepDone(position=2), out))  # its push had failed
        torch.testing.assert_close(await asyncio.wait_for(finishing, 1), out)

    asyncio.run(scenario())


def test_a_pushed_step_answered_with_hidden_states_later_is_a_bad_reply() -> None:
    async def scenario() -> None:
        a, first, b, second = await pushing_pair()
        history = TokenHistory(list(range(3)))
        await pushed_step(a, b, 2, history)
        finishing = asyncio.ensure_future(a.finish(successor=b))
        second.answer(make_response(StepDone(position=2), torch.randn(1, 2, 8)))
        assert await asyncio.wait_for(finishing, 1) is None
        await b.finish()
        first.answer(make_response(StepDone(position=2), torch.randn(1, 2, 8)))  # a lie
        with pytest.raises(BadReply, match="answered a step it had pushed"):
            await a.step(torch.randn(1, 1, 8), history)

    asyncio.run(scenario())
