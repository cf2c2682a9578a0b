"""Hung servers on a real loopback swarm: a frozen server is found in about a second, and
streams go on, exactly.

A hang is not a death: `kill -STOP` of a node's process group freezes the node and its p2pd
with their connections open, as a hung machine or a network partition does, so nothing
tells the gateway the server is gone. The module shares one DHT and a pool of nodes
(tests/integration/pool.py), each test with a fresh gateway; a frozen group is thawed
(SIGCONT), must then be forgiven by the gateway, and is replaced in the pool.
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import Swarm
from tests.integration.pool import NodePool, node_pool
from tests.integration.test_failover import (
    HALF,
    Streamed,
    expected_text,
    peers_of,
    stream_chat,
)
from tests.processes import Process, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MAX_STALL_S = 2.0  # the bound on the longest gap between tokens around a hang
HANG_AT = 8  # tokens streamed before the server freezes


def freeze(process: Process) -> None:
    os.killpg(process.popen.pid, signal.SIGSTOP)


def thaw(process: Process) -> None:
    os.killpg(process.popen.pid, signal.SIGCONT)


def metric(base_url: str, name: str) -> float:
    text = httpx.get(f"{base_url}/metrics", timeout=5).text
    found = re.search(rf"^{name} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


@pytest.fixture(scope="module")
def pool(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodePool]:
    # A thawed server still holds the stream it hung on: it must not drain it when stopped.
    drain = ("--drain-timeout", "1")
    with node_pool(tiny_model, tmp_path_factory.mktemp("hang-logs"), drain) as running:
        yield running


@pytest.fixture(params=["push", "relay"])
def gateway(request: pytest.FixtureRequest, pool: NodePool) -> Iterator[Swarm]:
    """Two servers for each half of the model + a fresh gateway that pushes or relays."""
    flags = ["--no-push"] if request.param == "relay" else []
    spans = [(0, HALF), (0, HALF), (HALF, 4), (HALF, 4)]
    with pool.gateway(spans, *flags, name=f"gateway {request.param}") as swarm:
        yield swarm


def hang_mid_stream(swarm: Swarm, hop: int, frozen: list[Process]) -> tuple[Streamed, list[float]]:
    """A greedy stream whose ``hop`` (0: first, -1: last) freezes after ``HANG_AT`` tokens;
    the stream and the arrival time of each token."""
    nodes = peers_of(swarm.nodes)
    times: list[float] = []

    def on_token(tokens: int, so_far: Streamed) -> None:
        times.append(time.monotonic())
        if tokens == HANG_AT:
            peer = so_far.route.split(",")[hop].rsplit(":", 1)[0]
            frozen.append(nodes[peer][0])
            freeze(nodes[peer][0])

    return stream_chat(swarm.base_url, on_token), times


@pytest.mark.parametrize("hop", [-1, 0], ids=["last-hop", "first-hop"])
def test_a_hung_server_stalls_a_stream_for_under_two_seconds_and_stays_exact(
    gateway: Swarm, pool: NodePool, hop: int
) -> None:
    replicated = gateway
    expected, length = expected_text(replicated.model_path)
    assert length > HANG_AT + 4, "the reference must outlast the hang"
    frozen: list[Process] = []
    try:
        try:
            result, times = hang_mid_stream(replicated, hop, frozen)
            assert len(frozen) == 1, "the server froze mid-stream"
            assert not result.errors and result.done
            assert result.text == expected
            stall = max(b - a for a, b in pairwise(times))
            print(f"hop {hop}: longest gap between tokens {stall:.2f} s")
            assert stall <= MAX_STALL_S
            assert metric(replicated.base_url, "swarmgate_hung_servers_total") >= 1
            # New streams keep away from the frozen server while it stays frozen...
            frozen_ids = {
                peer for peer, (p, _) in peers_of(replicated.nodes).items() if p in frozen
            }
            again = stream_chat(replicated.base_url)
            assert again.text == expected and not again.errors
            assert not frozen_ids & {part.rsplit(":", 1)[0] for part in again.route.split(",")}
        finally:
            for process in frozen:
                thaw(process)
        # ... and it is forgiven once it answers again.
        wait_for(
            lambda: "answers again" in replicated.gateway.output(),
            30,
            "the gateway to see the thawed server answer",
        )
    finally:
        # A server that was frozen is fresh in no peer's DHT routing table: the next test
        # gets a new one rather than this one, whether this test passed or not. It is
        # discarded, so no drain: its group is killed.
        for process in frozen:
            pool.kill(process, replace=False)
