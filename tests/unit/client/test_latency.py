"""Simulated round trips: half of one on every message each way, only the stream's own task
waits, and nothing at all unless ``SWARMGATE_SIMULATED_RTT_MS`` asks for it."""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable, Callable

import pytest
import torch
from hivemind.p2p import P2P
from hivemind.proto import runtime_pb2

from client.hop_stream import HopStream
from protocol.codec import make_response, read_tensors
from protocol.errors import PeerUnavailable
from protocol.latency import SIMULATED_RTT_ENV, SimulatedLink, parse_rtt_ms
from protocol.prefix import TokenHistory
from protocol.rpc import OpenSession, SessionOpened, Step, StepDone, decode
from routing.planner import Hop

PEER = "QmTestPeer"  # base58, as PeerID.from_base58 wants
OPENING = OpenSession(secret="5e" * 16, session_id="s", start=0, end=2, max_length=64)

# ---- the variable ----


@pytest.mark.parametrize("environ", [{}, {SIMULATED_RTT_ENV: ""}, {SIMULATED_RTT_ENV: " 0 "}])
def test_no_variable_means_no_delay_and_no_sleep(environ: dict[str, str]) -> None:
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    link = SimulatedLink.from_env(environ, sleep)

    async def scenario() -> None:
        await link.outbound()
        await link.inbound()

    asyncio.run(scenario())

    assert link.rtt_s == 0.0 and not link.enabled and slept == []


@pytest.mark.parametrize(("text", "rtt_s"), [("20", 0.02), ("12.5", 0.0125), ("10000", 10.0)])
def test_the_variable_is_a_round_trip_in_milliseconds(text: str, rtt_s: float) -> None:
    link = SimulatedLink.from_env({SIMULATED_RTT_ENV: text})
    assert link.enabled and link.rtt_s == pytest.approx(rtt_s)


@pytest.mark.parametrize("text", ["-1", "10000.5", "1e9", "abc", "20ms", "nan", "inf", "-inf"])
def test_a_bad_value_is_refused_naming_the_variable(text: str) -> None:
    with pytest.raises(ValueError, match=SIMULATED_RTT_ENV):
        parse_rtt_ms(text)
    with pytest.raises(ValueError, match="from 0 to 10000"):
        SimulatedLink.from_env({SIMULATED_RTT_ENV: text})


# ---- a hop stream over a simulated link ----


class Wire:
    """Both ends of one in-memory ``rpc_inference`` stream, with a server that answers the
    opening and doubles each step's hidden states (or, if ``silent``, never answers a step).
    ``events`` records what the server received, in order with whatever else is appended."""

    def __init__(self, events: list[str], silent: bool = False) -> None:
        self.events = events
        self.silent = silent
        self.reader = asyncio.StreamReader()  # what the gateway reads
        self.ended = False

    def write(self, data: bytes) -> None:  # the gateway's writer: one whole frame per write
        marker, payload = data[:1], data[1 + P2P.HEADER_LEN :]
        if marker == P2P.ERROR_MARKER:  # the gateway's goodbye
            self.events.append("server: goodbye")
            self.reader.feed_eof()
            return
        request = runtime_pb2.ExpertRequest.FromString(payload)
        if not request.tensors:
            self.events.append("server: opening")
            self._reply(make_response(SessionOpened(cached_tokens=0)))
            return
        (hidden,) = read_tensors(request)
        self.events.append(f"server: step of {hidden.shape[1]}")
        if not self.silent:
            end = decode(Step, request.metadata).position + hidden.shape[1]
            self._reply(make_response(StepDone(position=end), hidden * 2))

    def _reply(self, reply: runtime_pb2.ExpertResponse) -> None:
        payload = reply.SerializeToString()
        header = P2P.MESSAGE_MARKER + len(payload).to_bytes(P2P.HEADER_LEN, P2P.BYTEORDER)
        self.reader.feed_data(header + payload)

    async def drain(self) -> None:
        pass

    def close(self) -> None:
        self.ended = True


class WireP2P:
    def __init__(self, events: list[str], silent: bool = False) -> None:
        self.wire = Wire(events, silent)

    async def call_binary_stream_handler(
        self, peer: object, name: str
    ) -> tuple[None, asyncio.StreamReader, Wire]:
        return None, self.wire.reader, self.wire


def hop_stream(
    p2p: WireP2P, link: SimulatedLink, chunk: int = 4, deadline_s: float = 5.0
) -> HopStream:
    hop = Hop(PEER, 0, 2)
    return HopStream(p2p, hop, chunk, lambda tokens: deadline_s, link=link)  # duck-typed p2p


def recording(events: list[str]) -> Callable[[float], Awaitable[None]]:
    """A sleep that returns at once and writes down how long it was asked to wait."""

    async def sleep(seconds: float) -> None:
        events.append(f"wait {seconds * 1000:g} ms")

    return sleep


def test_every_message_waits_half_the_round_trip_each_way() -> None:
    events: list[str] = []

    async def scenario() -> None:
        p2p = WireP2P(events)
        stream = hop_stream(p2p, SimulatedLink(0.1, recording(events)), chunk=4)
        await stream.open(OPENING)
        events.append("gateway: opened")
        await stream.step(torch.ones(1, 6, 8), TokenHistory())  # two chunks: two messages
        events.append("gateway: stepped")
        stream.close()
        for _ in range(100):  # the detached goodbye runs on its own
            if p2p.wire.ended:
                break
            await asyncio.sleep(0)

    asyncio.run(scenario())

    there = back = "wait 50 ms"
    assert events == [
        *(there, "server: opening", back, "gateway: opened"),
        *(there, "server: step of 4", back),
        *(there, "server: step of 2", back, "gateway: stepped"),
        *(there, "server: goodbye"),
    ]


def test_one_streams_delay_does_not_hold_another_sharing_the_link() -> None:
    held_events: list[str] = []
    free_events: list[str] = []
    gate = asyncio.Event()
    held_stream = contextvars.ContextVar("held_stream", default=False)  # tasks inherit it

    async def sleep(seconds: float) -> None:
        if held_stream.get():
            await gate.wait()  # this stream's messages stay in flight until released

    link = SimulatedLink(0.1, sleep)  # one link for both, as the gateway has

    async def use(events: list[str], held: bool = False) -> torch.Tensor:
        held_stream.set(held)
        stream = hop_stream(WireP2P(events), link)
        await stream.open(OPENING)
        return await stream.step(torch.ones(1, 2, 8), TokenHistory())

    async def scenario() -> None:
        held = asyncio.create_task(use(held_events, held=True))
        out = await asyncio.wait_for(use(free_events), 5.0)
        torch.testing.assert_close(out, torch.full((1, 2, 8), 2.0))
        assert not held.done() and held_events == []  # its opening is still on the wire
        gate.set()
        torch.testing.assert_close(await asyncio.wait_for(held, 5.0), out)

    asyncio.run(scenario())

    assert free_events == held_events == ["server: opening", "server: step of 2"]


def test_a_step_slower_than_its_deadline_by_the_link_alone_still_succeeds() -> None:
    # Each one-way wait takes 0.1 s of real time, over the step's 0.05 s deadline; the
    # deadline is widened by the link's declared 10 s round trip, far over what they take.
    async def slow(seconds: float) -> None:
        await asyncio.sleep(0.1)

    async def scenario() -> torch.Tensor:
        stream = hop_stream(WireP2P([]), SimulatedLink(10.0, slow), deadline_s=0.05)
        await stream.open(OPENING)
        return await stream.step(torch.ones(1, 1, 8), TokenHistory())

    torch.testing.assert_close(asyncio.run(scenario()), torch.full((1, 1, 8), 2.0))


def test_a_silent_server_still_fails_its_widened_deadline() -> None:
    events: list[str] = []

    async def scenario() -> None:
        link = SimulatedLink(0.1, recording(events))
        stream = hop_stream(WireP2P(events, silent=True), link, deadline_s=0.05)
        await stream.open(OPENING)
        with pytest.raises(PeerUnavailable, match=r"did not answer within 0\.\d s"):
            # bounded by the test too, should the deadline not hold
            await asyncio.wait_for(stream.step(torch.ones(1, 1, 8), TokenHistory()), 5.0)

    asyncio.run(scenario())

    assert events[-2:] == ["wait 50 ms", "server: step of 1"]  # no reply, so no wait back
