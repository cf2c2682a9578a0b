"""A real swarm on loopback: a DHT, two block servers and the gateway under uvicorn.

Every process of a test session belongs to one closed swarm: its key is exported as
``SWARMGATE_SWARM_KEY``, as an operator would, and children inherit it.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from protocol.credentials import Role
from protocol.membership import Membership, PassIssuer, SwarmKey
from protocol.rpc import ServerInfo
from tests.processes import Process, free_port, http_ok, no_orphans, stop_all, wait_for
from tests.tiny_model import TINY_BLOCKS

MODEL_ID = "tiny-llama"
PREFILL_CHUNK_TOKENS = 16  # small, so that most prompts take several prefill messages


@pytest.fixture(scope="session", autouse=True)
def swarm_key_file(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("swarm-key") / "swarm.key"
    SwarmKey.generate().save(path)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SWARMGATE_SWARM_KEY", str(path))
        yield path


def session_swarm_key() -> SwarmKey:
    """The key every process of this test session was started with."""
    return SwarmKey.load(os.environ["SWARMGATE_SWARM_KEY"])


def session_member(role: Role = Role.GATEWAY) -> Membership:
    """A member of this test session's swarm acting as ``role`` (issued by its key)."""
    return Membership.of(session_swarm_key(), role)


@dataclass
class Swarm:
    base_url: str
    model_id: str
    model_path: Path
    initial_peers: list[str]
    nodes: list[Process]
    gateway: Process
    # Each node's Prometheus /metrics URL, where the swarm's nodes serve one (run_swarm's do).
    node_metrics: list[str] = field(default_factory=list)


def start_gateway(
    model: Path,
    peers: list[str],
    log_dir: Path,
    *extra: str,
    name: str = "gateway",
    model_id: str = MODEL_ID,
    env: dict[str, str] | None = None,
) -> tuple[Process, str]:
    port = free_port()
    argv = [
        "gateway",
        "--model",
        str(model),
        "--model-name",
        model_id,
        "--initial-peers",
        *peers,
        "--port",
        str(port),
        *extra,
    ]
    return Process(name, argv, log_dir, env=env), f"http://127.0.0.1:{port}"


@contextmanager
def running_gateway(swarm: Swarm, log_dir: Path, *flags: str, name: str) -> Iterator[str]:
    """One more gateway on ``swarm`` with ``flags``, healthy; its URL. Stopped on exit."""
    process, url = start_gateway(swarm.model_path, swarm.initial_peers, log_dir, *flags, name=name)
    try:
        wait_for(lambda: http_ok(f"{url}/health") or not process.alive(), 120, name)
        assert process.alive(), process.output()[-3000:]
        yield url
    finally:
        process.stop()


@contextmanager
def run_swarm(
    model: Path,
    logs: Path,
    spans: list[tuple[int, int]],
    *node_flags: str,
    gateway_flags: Sequence[str] = (),
) -> Iterator[Swarm]:
    """A DHT, one node per span and a gateway, started command by command as the README
    tells a user to, and all stopped (with their p2pd daemons) on exit."""
    with no_orphans():
        dht = Process("dht", ["dht"], logs)
        processes: list[Process] = [dht]
        metrics_ports = [free_port() for _ in spans]
        try:
            wait_for(lambda: "--initial-peers" in dht.output() or not dht.alive(), 60, "the DHT")
            peers = printed_initial_peers(dht.output())
            for index, (start, end) in enumerate(spans):
                argv = [
                    "node",
                    "--model",
                    str(model),
                    "--model-name",
                    MODEL_ID,
                    "--initial-peers",
                    *peers,
                    "--blocks",
                    f"{start}:{end}",
                    "--announce-period",
                    "2",
                    "--metrics-port",
                    str(metrics_ports[index]),
                    *node_flags,
                ]
                name = f"node {start}:{end}" + (
                    f" #{index}" if spans.count((start, end)) > 1 else ""
                )
                processes.append(Process(name, argv, logs))
            gateway, url = start_gateway(
                model,
                peers,
                logs,
                "--prefill-chunk-tokens",
                str(PREFILL_CHUNK_TOKENS),
                *gateway_flags,
            )
            processes.append(gateway)

            def ready() -> bool:
                for process in processes:
                    assert process.alive(), f"{process.name} died:\n{process.output()[-3000:]}"
                return http_ok(f"{url}/health")

            wait_for(ready, 180, "the swarm to become healthy")
            node_metrics = [f"http://127.0.0.1:{port}/metrics" for port in metrics_ports]
            yield Swarm(url, MODEL_ID, model, peers, processes[1:-1], gateway, node_metrics)
        finally:
            stop_all(processes)


@pytest.fixture(scope="session")
def swarm(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swarm]:
    half = TINY_BLOCKS // 2
    logs = tmp_path_factory.mktemp("swarm-logs")
    with run_swarm(tiny_model, logs, [(0, half), (half, TINY_BLOCKS)]) as running:
        yield running


def printed_initial_peers(output: str) -> list[str]:
    """The multiaddrs that `swarmgate dht` tells users to pass as --initial-peers."""
    for line in output.splitlines():
        if "--initial-peers" in line:
            return line.split("--initial-peers", 1)[1].split()
    raise AssertionError(f"`swarmgate dht` printed no multiaddrs:\n{output}")


def node_infos(peers: list[str], model_id: str = MODEL_ID) -> dict[str, ServerInfo]:
    """Every node's own counters, asked over P2P (rpc_info), by peer id."""
    from hivemind.p2p import PeerID
    from hivemind.proto import runtime_pb2

    from protocol.rpc import RPC_INFO, InfoRequest, decode
    from swarm_dht.dht import SwarmDHT
    from swarm_dht.discovery import fetch_model, fetch_snapshot

    key = session_member()

    async def read(dht: SwarmDHT) -> dict[str, ServerInfo]:
        p2p = await dht.replicate_p2p()
        model = await fetch_model(dht, model_id)
        assert model is not None, "no model record in the DHT"
        snapshot = await fetch_snapshot(dht, model_id, model)
        asked = InfoRequest(member_pass=PassIssuer(key, dht.peer_id.to_base58()).current())
        infos = {}
        for peer in snapshot.servers:
            reply = await p2p.call_protobuf_handler(
                PeerID.from_base58(peer),
                RPC_INFO,
                runtime_pb2.ExpertRequest(metadata=asked.encode()),
                runtime_pb2.ExpertResponse,
            )
            infos[peer] = decode(ServerInfo, reply.metadata)
        return infos

    dht = SwarmDHT(initial_peers=peers, client_mode=True, start=True, membership=key)
    try:
        return asyncio.run(read(dht))
    finally:
        dht.shutdown()


def start_node(
    model: Path,
    peers: list[str],
    log_dir: Path,
    blocks: tuple[int, int],
    *extra: str,
    name: str | None = None,
    model_id: str = MODEL_ID,
    module: str = "swarmgate",
    env: dict[str, str] | None = None,
) -> Process:
    """One `swarmgate node` for ``blocks``, announcing every 2 s, as `run_swarm` starts them
    (``module``: another module with the same command line, such as a test's wrapper)."""
    start, end = blocks
    argv = [
        "node",
        "--model",
        str(model),
        "--model-name",
        model_id,
        "--initial-peers",
        *peers,
        "--blocks",
        f"{start}:{end}",
        "--announce-period",
        "2",
        *extra,
    ]
    return Process(name or f"node {start}:{end}", argv, log_dir, env=env, module=module)
