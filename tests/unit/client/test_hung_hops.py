"""A hop's silence past its soft deadline gets it probed: a hop that answers the probe is
slow and keeps its step; one that does not is hung and fails at once, long before the hard
deadline (client/hop_connection.py ``Watch``, client/liveness.py)."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from client.hop_stream import HopStream
from protocol.errors import PeerUnavailable
from protocol.prefix import TokenHistory
from protocol.rpc import Step
from routing.planner import Hop
from tests.unit.client.test_hop_stream import OPENING, PEER, FakeP2P, FakeServer, doubled

HARD_S = 5.0  # the hard deadline: no test here may come near it
SOFT_S = 0.05


class FakeWatch:
    def __init__(self, answers: bool, hung: bool = False) -> None:
        self.answers = answers
        self.is_hung = hung
        self.probes: list[str] = []
        self.steps: list[tuple[str, int]] = []

    def suspect_after_s(self, peer_id: str, tokens: int) -> float:
        return SOFT_S

    async def alive(self, peer_id: str) -> bool:
        self.probes.append(peer_id)
        await asyncio.sleep(0.01)
        return self.answers

    def hung(self, peer_id: str) -> bool:
        return self.is_hung

    def stepped(self, peer_id: str, seconds: float, tokens: int) -> None:
        self.steps.append((peer_id, tokens))


def stream_on(server: FakeServer, watch: FakeWatch) -> HopStream:
    return HopStream(
        FakeP2P(server),  # type: ignore[arg-type]  # duck-typed
        Hop(PEER, 0, 2),
        16,
        deadline_s=lambda tokens: HARD_S,
        watch=watch,
    )


def silent(step: Step, hidden: torch.Tensor) -> None:
    return None  # the server froze: no answer, and the connection stays open


def test_a_silent_hop_that_fails_its_probe_is_hung_in_well_under_its_deadline() -> None:
    watch = FakeWatch(answers=False)

    async def scenario() -> float:
        stream = stream_on(FakeServer(reply=silent), watch)
        await stream.open(OPENING)
        began = time.monotonic()
        with pytest.raises(PeerUnavailable, match="is hung") as raised:
            await stream.step(torch.randn(1, 1, 8), TokenHistory([1]))
        assert raised.value.peer_id == PEER
        # It stays failed: the next call says so without waiting.
        with pytest.raises(PeerUnavailable, match="is hung"):
            await stream.step(torch.randn(1, 1, 8), TokenHistory([1, 2]))
        return time.monotonic() - began

    took = asyncio.run(scenario())
    assert took < 1.0 < HARD_S
    assert watch.probes == [PEER]


def test_a_slow_hop_that_answers_its_probes_keeps_its_step() -> None:
    watch = FakeWatch(answers=True)
    server = FakeServer()
    loop_replies: list[asyncio.Task[None]] = []

    def late(step: Step, hidden: torch.Tensor) -> None:
        async def answer() -> None:
            await asyncio.sleep(0.4)  # 8 soft deadlines: slow, not hung
            assert server.reader is not None
            server._send(server.reader, doubled(step, hidden))

        loop_replies.append(asyncio.get_running_loop().create_task(answer()))

    server.reply = late

    async def scenario() -> torch.Tensor:
        stream = stream_on(server, watch)
        await stream.open(OPENING)
        hidden = torch.randn(1, 1, 8)
        out = await stream.step(hidden, TokenHistory([1]))
        torch.testing.assert_close(out, hidden * 2)
        return out

    asyncio.run(scenario())
    assert watch.probes  # it was suspected and asked, and its answer counted
    assert watch.steps == [(PEER, 1)]


def test_a_hop_found_hung_between_steps_fails_before_sending() -> None:
    watch = FakeWatch(answers=True)
    server = FakeServer()

    async def scenario() -> None:
        stream = stream_on(server, watch)
        await stream.open(OPENING)
        watch.is_hung = True  # an idle probe found it frozen
        with pytest.raises(PeerUnavailable, match="is hung"):
            await stream.step(torch.randn(1, 1, 8), TokenHistory([1]))

    asyncio.run(scenario())
    assert server.steps == []  # nothing was sent to wait on
    assert watch.probes == []
