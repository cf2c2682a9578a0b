"""Hung servers on a real loopback swarm: a frozen server is found in about a second, and
streams go on, exactly.

A hang is not a death: `kill -STOP` of a node's process group freezes the node and its p2pd
with their connections open, as a hung machine or a network partition does, so nothing
tells the gateway the server is gone. Each swarm is started command by command; a frozen
group is thawed (SIGCONT) before the swarm stops, and must then be forgiven by the gateway.
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import time
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import Swarm, run_swarm, start_gateway
from tests.integration.test_failover import (
    HALF,
    Streamed,
    expected_text,
    online,
    peers_of,
    stream_chat,
)
from tests.processes import Process, http_ok, wait_for

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
def replicated(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swarm]:
    """DHT + two servers for each half of the model + a gateway that pushes."""
    spans = [(0, HALF), (0, HALF), (HALF, 4), (HALF, 4)]
    with run_swarm(tiny_model, tmp_path_factory.mktemp("hang"), spans) as swarm:
        yield swarm


@pytest.fixture(params=["push", "relay"])
def gateway(request: pytest.FixtureRequest, replicated: Swarm, tmp_path: Path) -> Iterator[Swarm]:
    """The swarm through its own gateway (push), or through a second one with --no-push
    (relay); every server online (the frozen ones of the test before thawed and back)."""
    wait_for(lambda: len(online(replicated)) == 4, 120, "all four servers online")
    if request.param == "push":
        yield replicated
        return
    process, url = start_gateway(
        replicated.model_path, replicated.initial_peers, tmp_path, "--no-push", name="relaying"
    )
    try:
        wait_for(lambda: http_ok(f"{url}/health") or not process.alive(), 120, "the gateway")
        assert process.alive(), process.output()[-3000:]
        yield dataclasses.replace(replicated, base_url=url, gateway=process)
    finally:
        process.stop()


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


def test_a_hung_server_stalls_a_stream_for_under_two_seconds_and_stays_exact(
    gateway: Swarm,
) -> None:
    replicated = gateway
    expected, length = expected_text(replicated.model_path)
    assert length > HANG_AT + 4, "the reference must outlast the hang"
    frozen: list[Process] = []
    try:
        for hop in (-1, 0):  # the last hop, then (on the servers left) the first
            result, times = hang_mid_stream(replicated, hop, frozen)
            assert len(frozen) == (1 if hop == -1 else 2), "the server froze mid-stream"
            assert not result.errors and result.done
            assert result.text == expected
            stall = max(b - a for a, b in pairwise(times))
            print(f"hop {hop}: longest gap between tokens {stall:.2f} s")
            assert stall <= MAX_STALL_S
        assert metric(replicated.base_url, "swarmgate_hung_servers_total") >= 2
        # New streams keep away from both frozen servers while they stay frozen...
        frozen_ids = {peer for peer, (p, _) in peers_of(replicated.nodes).items() if p in frozen}
        # Each node here hosts a DHT peer too: with two of them frozen, a swarm read can miss
        # the live servers' records for a while (a 503 with Retry-After, as a client sees it).
        answers: list[Streamed] = []

        def answered() -> bool:
            try:
                answers.append(stream_chat(replicated.base_url))
            except AssertionError:  # 503: the swarm read missed the live servers
                return False
            return True

        wait_for(answered, 60, "a new stream on the servers left")
        again = answers[-1]
        assert again.text == expected and not again.errors
        assert not frozen_ids & {part.rsplit(":", 1)[0] for part in again.route.split(",")}
    finally:
        for process in frozen:
            thaw(process)
    # ... and are forgiven once they answer again.
    wait_for(
        lambda: replicated.gateway.output().count("answers again") >= 2,
        30,
        "the gateway to see the thawed servers answer",
    )
