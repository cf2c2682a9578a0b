"""A stranger (no swarm key) who reaches a node's port costs it next to nothing: frames are
bounded before they are buffered, the first must come in seconds, and streams without a
pass are capped per peer and in total (swarm_node/bounded_streams.py).

The stranger here is an in-process libp2p peer that dials the node directly, as anyone who
knows its address can, and speaks hivemind's framing with lies in it.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from itertools import pairwise

import psutil
import pytest
from hivemind.p2p import P2P, PeerID

from protocol.rpc import RPC_INFERENCE
from swarm_node.bounded_streams import FIRST_FRAME_S, MAX_UNPROVEN_PER_PEER
from tests.integration.conftest import Swarm
from tests.integration.test_failover import expected_text, stream_chat
from tests.integration.test_membership import _node_address
from tests.processes import node_identity

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STREAMS = 50
ANNOUNCED = 2**40  # bytes each frame claims to hold
SENT = 64 * 1024 * 1024  # bytes each stream tries to send behind it
CHUNK = 1024 * 1024
MAX_GROWTH = 50 * 1024 * 1024
SILENT = MAX_UNPROVEN_PER_PEER + 8  # silent streams of one stranger: some past its cap


def tree_rss(pid: int) -> int:
    """Resident bytes of a node and its children (its DHT process, the p2pd daemons)."""
    root = psutil.Process(pid)
    total = 0
    for process in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += process.memory_info().rss
    return total


class PeakRss:
    """Samples a process tree's RSS in a thread until stopped; the peak."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = tree_rss(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, tree_rss(self.pid))


async def liar(p2p: P2P, peer: PeerID, announced: int, sent: int) -> float:
    """One stream announcing a frame of ``announced`` bytes and sending up to ``sent``; the
    seconds until the node closed it."""
    began = time.monotonic()
    _, reader, writer = await p2p.call_binary_stream_handler(peer, RPC_INFERENCE)
    try:
        writer.write(P2P.MESSAGE_MARKER + announced.to_bytes(P2P.HEADER_LEN, P2P.BYTEORDER))
        junk = b"\0" * CHUNK
        for _ in range(sent // CHUNK):
            if reader.at_eof():
                break
            writer.write(junk)
            await asyncio.wait_for(writer.drain(), 10)
    except (ConnectionError, TimeoutError, OSError):
        pass  # the node reset the stream under us: what it should do
    with contextlib.suppress(ConnectionError, OSError):  # a reset is a close too
        await asyncio.wait_for(reader.read(), FIRST_FRAME_S + 10)  # until the node closes it
    writer.close()
    return time.monotonic() - began


async def attack(address: list[str], peer: str, announced: int, sent: int) -> list[float]:
    p2p = await P2P.create(initial_peers=address)
    try:
        target = PeerID.from_base58(peer)
        return list(
            await asyncio.gather(*(liar(p2p, target, announced, sent) for _ in range(STREAMS)))
        )
    finally:
        await p2p.shutdown()


def test_a_stranger_cannot_fill_a_nodes_memory_and_members_keep_streaming(
    swarm: Swarm,
) -> None:
    node = swarm.nodes[-1]
    peer, _ = node_identity(node)
    expected, _ = expected_text(swarm.model_path)
    member: dict[str, object] = {}

    def chat() -> None:
        times: list[float] = []
        member["result"] = stream_chat(swarm.base_url, lambda n, s: times.append(time.monotonic()))
        member["times"] = times

    with PeakRss(node.popen.pid) as rss:
        before = rss.peak
        talking = threading.Thread(target=chat)
        talking.start()
        closed = asyncio.run(attack(_node_address(node), peer, ANNOUNCED, SENT))
        talking.join(120)
    growth = rss.peak - before
    print(f"peak RSS growth {growth / 2**20:.1f} MiB; streams closed after {max(closed):.2f} s")
    assert growth < MAX_GROWTH
    assert max(closed) < FIRST_FRAME_S + 5
    result = member["result"]
    assert result.text == expected and not result.errors  # type: ignore[attr-defined]
    times = member["times"]
    assert max(b - a for a, b in pairwise(times)) < 2.0  # type: ignore[arg-type]
    assert "Traceback" not in node.output()


def test_silent_streams_are_closed_quietly_and_capped(swarm: Swarm) -> None:
    node = swarm.nodes[0]
    peer, _ = node_identity(node)

    async def silent() -> list[float]:
        p2p = await P2P.create(initial_peers=_node_address(node))
        try:
            target = PeerID.from_base58(peer)

            async def one() -> float:
                began = time.monotonic()
                _, reader, writer = await p2p.call_binary_stream_handler(target, RPC_INFERENCE)
                await asyncio.wait_for(reader.read(), FIRST_FRAME_S + 10)
                writer.close()
                return time.monotonic() - began

            return list(await asyncio.gather(*(one() for _ in range(SILENT))))
        finally:
            await p2p.shutdown()

    closed = sorted(asyncio.run(silent()))
    # Past the per-peer cap of streams without a pass, a stream is closed at once; the
    # few within it when their first message does not come in time.
    assert closed[-1] < FIRST_FRAME_S + 3
    assert closed[0] < 1.0
    assert sum(t < FIRST_FRAME_S - 1 for t in closed) >= SILENT - MAX_UNPROVEN_PER_PEER
    assert "Traceback" not in node.output()
