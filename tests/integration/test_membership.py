"""A closed swarm on real processes: strangers announce, dial and forge, and get nothing.

The session's swarm (a DHT, two nodes and a gateway) holds the test session's key. Next to
it run a rogue node without a key, one with another swarm's key and one with a gateway's
credential of this swarm, all announcing the whole model at the highest throughput a
record may claim, and kept running although no member answers them.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch
from hivemind.p2p import P2P
from hivemind.utils import get_dht_time

from client.hop_stream import HopStream
from models.loading import load_config
from protocol.credentials import Role
from protocol.errors import NotAMember
from protocol.membership import Membership, PassIssuer, SwarmKey
from protocol.prefix import TokenHistory
from protocol.rpc import RPC_INFO, InfoRequest, OpenSession, RpcError
from protocol.swarm import MAX_THROUGHPUT, ServerRecord, block_key
from routing.planner import Hop
from swarm_dht.dht import SwarmDHT
from tests.integration.conftest import (
    MODEL_ID,
    Swarm,
    running_gateway,
    session_member,
    start_gateway,
    start_node,
)
from tests.processes import Process, no_orphans, node_identity, wait_for
from tests.tiny_model import TINY_BLOCKS

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SECRET = "5e" * 16
OURS = TokenHistory(list(range(32)))  # one full block the owner writes
THEIRS = TokenHistory(list(range(100, 132)))  # what a guesser writes under the id


@dataclass
class Rogues:
    no_key: str  # peer ids
    other_key: str
    gateway_credential: str

    @property
    def all(self) -> set[str]:
        return {self.no_key, self.other_key, self.gateway_credential}


def issue(role: str, path: Path) -> Path:
    """A credential for ``role`` from the session's swarm key, issued as an operator would."""
    swarm_key = os.environ["SWARMGATE_SWARM_KEY"]
    argv = ["issue", "--swarm-key", swarm_key, "--role", role, "--days", "1", str(path)]
    subprocess.run(
        [sys.executable, "-m", "swarmgate", *argv],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return path


def revoke(credential: Path, peers: list[str]) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "swarmgate", "revoke", "--initial-peers", *peers, str(credential)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def rogues(swarm: Swarm, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rogues]:
    logs = tmp_path_factory.mktemp("rogues")
    other = logs / "other.key"
    SwarmKey.generate().save(other)
    gateway_credential = issue("gateway", logs / "gateway.cred")
    with no_orphans():
        started: list[Process] = []
        try:
            for name, key in (
                ("rogue-no-key", ""),
                ("rogue-other-key", str(other)),
                ("rogue-gateway-credential", str(gateway_credential)),
            ):
                started.append(
                    start_node(
                        swarm.model_path,
                        swarm.initial_peers,
                        logs,
                        (0, TINY_BLOCKS),
                        name=name,
                        module="tests.rogue_node",
                        env={"SWARMGATE_SWARM_KEY": key},
                    )
                )
            for process in started:
                wait_for(
                    lambda p=process: "serving blocks" in p.output() or not p.alive(),
                    120,
                    f"{process.name} to announce itself",
                )
                assert process.alive(), process.output()[-3000:]
            yield Rogues(*(node_identity(process)[0] for process in started))
        finally:
            for process in started:
                process.stop()


def listed(url: str) -> set[str]:
    return {s["peer_id"] for s in httpx.get(f"{url}/swarm", timeout=10).json()["servers"]}


def test_strangers_are_never_listed_nor_routed_to(
    swarm: Swarm, rogues: Rogues, tmp_path: Path
) -> None:
    members = {node_identity(n)[0] for n in swarm.nodes}
    # A member joining after the rogues: once the gateway lists it, the rogues have had
    # every chance to be listed too.
    late = start_node(swarm.model_path, swarm.initial_peers, tmp_path, (0, TINY_BLOCKS))
    try:
        wait_for(lambda: "serving blocks" in late.output() or not late.alive(), 120, "a member")
        members.add(node_identity(late)[0])
        wait_for(lambda: members <= listed(swarm.base_url), 60, "the late member in /swarm")
        assert listed(swarm.base_url) == members

        body = {"model": MODEL_ID, "prompt": "Once upon a time", "max_tokens": 4}
        for _ in range(6):
            r = httpx.post(f"{swarm.base_url}/v1/completions", json=body, timeout=60)
            assert r.status_code == 200, r.text
            route = {hop.split(":")[0] for hop in r.headers["x-swarmgate-route"].split(",")}
            assert route <= members and not route & rogues.all
    finally:
        late.stop()


def test_a_gateway_without_the_key_cannot_join(swarm: Swarm, tmp_path: Path) -> None:
    gateway, _ = start_gateway(
        swarm.model_path, swarm.initial_peers, tmp_path, env={"SWARMGATE_SWARM_KEY": ""}
    )
    try:
        wait_for(lambda: not gateway.alive(), 120, "the keyless gateway to give up")
        assert "none of the initial peers answered" in gateway.output()
    finally:
        gateway.stop()


def test_a_gateway_with_the_key_joins(swarm: Swarm, tmp_path: Path) -> None:
    with running_gateway(swarm, tmp_path, name="gateway-member") as url:
        body = {"model": MODEL_ID, "prompt": "Hello", "max_tokens": 2}
        assert httpx.post(f"{url}/v1/completions", json=body, timeout=60).status_code == 200


def _node_address(node: Process) -> list[str]:
    for line in node.output().splitlines():
        if "--initial-peers" in line and "serving blocks" in line:
            return line.split("--initial-peers", 1)[1].split()
    raise AssertionError(f"{node.name} printed no address")


class Dialer:
    """An in-process peer that dials a node directly, with or without a pass."""

    def __init__(self, p2p: P2P, node: Process, hidden_size: int) -> None:
        self.p2p = p2p
        self.peer_id, (self.start, self.end) = node_identity(node)
        self.hidden_size = hidden_size
        self.me = p2p.peer_id.to_base58()

    async def open(
        self,
        member_pass: str,
        session_id: str,
        secret: str = SECRET,
        hashes: tuple[str, ...] = tuple(OURS.hashes),
    ) -> tuple[HopStream, int]:
        """A stream on the node's session and how many tokens of it the node holds."""
        hop = Hop(self.peer_id, self.start, self.end)
        stream = HopStream(self.p2p, hop, 64, lambda tokens: 30.0)
        opening = OpenSession(
            member_pass=member_pass,
            session_id=session_id,
            secret=secret,
            start=self.start,
            end=self.end,
            max_length=64,
            prefix_hashes=list(hashes),
        )
        try:
            return stream, await stream.open(opening)
        except BaseException:
            stream.close()
            raise

    async def fill(self, stream: HopStream, history: TokenHistory = OURS) -> None:
        """One full block of tokens, so that the session has something to resume."""
        await stream.step(torch.randn(1, 32, self.hidden_size), history)

    async def info(self, member_pass: str) -> bytes:
        from hivemind.p2p import PeerID
        from hivemind.proto import runtime_pb2

        reply = await self.p2p.call_protobuf_handler(
            PeerID.from_base58(self.peer_id),
            RPC_INFO,
            runtime_pb2.ExpertRequest(metadata=InfoRequest(member_pass=member_pass).encode()),
            runtime_pb2.ExpertResponse,
        )
        return bytes(reply.metadata)


def test_nodes_serve_members_only_and_sessions_only_to_their_owner(swarm: Swarm) -> None:
    node = swarm.nodes[0]
    hidden_size = load_config(swarm.model_path).hidden_size
    key, other = session_member(), Membership.of(SwarmKey.generate(), Role.GATEWAY)

    async def scenario() -> None:
        p2p = await P2P.create(initial_peers=_node_address(node))
        try:
            dialer = Dialer(p2p, node, hidden_size)
            # A valid pass, stolen from another member: libp2p proves we are not that peer.
            someone_else = PassIssuer(key, node_identity(swarm.nodes[1])[0]).current()
            refused = {
                "no pass": "",
                "another swarm's pass": PassIssuer(other, dialer.me).current(),
                "a pass for another peer": someone_else,
                "garbage": "not-a-pass",
            }
            for why, member_pass in refused.items():
                with pytest.raises(NotAMember):
                    await dialer.open(member_pass, "conv")
                error = RpcError.model_validate_json(await dialer.info(member_pass))
                assert error.error == "forbidden", why

            # A member's session: resumed with its secret; its id alone opens a fresh one,
            # and what is written there never reaches the owner's session.
            ours = PassIssuer(key, dialer.me).current()
            stream, _ = await dialer.open(ours, "conv")
            await dialer.fill(stream)
            stream.close()
            guess, cached = await dialer.open(ours, "conv", "77" * 16, hashes=())
            assert cached == 0
            await dialer.fill(guess, THEIRS)
            guess.close()
            resumed, cached = await dialer.open(ours, "conv")
            resumed.close()
            assert cached == 32
            assert "sessions" in json.loads(await dialer.info(ours))
        finally:
            await p2p.shutdown()

    asyncio.run(scenario())


def test_records_cannot_be_forged_or_overwritten(swarm: Swarm, tmp_path: Path) -> None:
    member_peer, (start, _) = node_identity(swarm.nodes[0])
    key = block_key(MODEL_ID, start)

    def member_entry(dht: SwarmDHT) -> tuple[str, dict]:
        found = dht.get(key, latest=True)
        assert found is not None
        [(subkey, item)] = [(s, v) for s, v in found.value.items() if s.startswith(member_peer)]
        return subkey, item.value

    # Another member (it holds the swarm key, not the node's own signing key)...
    insider = SwarmDHT(
        initial_peers=swarm.initial_peers,
        client_mode=True,
        start=True,
        membership=session_member(Role.SERVER),
    )
    # ...a gateway, whose credential may read but never store...
    gateway = SwarmDHT(
        initial_peers=swarm.initial_peers,
        client_mode=True,
        start=True,
        membership=Membership.load(issue("gateway", tmp_path / "gw.cred"), Role.GATEWAY),
    )
    # ...and a stranger who keeps going although no member answers it.
    stranger = SwarmDHT(
        initial_peers=swarm.initial_peers, start=True, ensure_bootstrap_success=False
    )
    try:
        subkey, original = member_entry(insider)
        record = ServerRecord.model_validate(original)
        forged = record.model_copy(update={"throughput": MAX_THROUGHPUT}).to_wire()
        # Far in the future: if any peer took it, every read would return it.
        expiration = get_dht_time() + 600
        assert not insider.store(key, forged, expiration, subkey=subkey)
        # Not even a record of its own, signed with its own key: members refuse its stores.
        own = gateway.peer_id.to_base58() + gateway.owner_tag
        assert gateway.get(key, latest=True) is not None  # it does read the swarm
        gateway.store(key, forged, expiration, subkey=own)  # kept in its own storage only
        stranger.store(key, forged, expiration, subkey=subkey)
        stranger.store(key, forged, expiration, subkey=stranger.peer_id.to_base58())

        _, now = member_entry(insider)
        assert now["throughput"] == original["throughput"] < MAX_THROUGHPUT
        peers = {s.split("[")[0] for s in insider.get(key, latest=True).value}
        assert stranger.peer_id.to_base58() not in peers
        assert gateway.peer_id.to_base58() not in peers
    finally:
        insider.shutdown()
        gateway.shutdown()
        stranger.shutdown()


def test_an_insider_cannot_speak_for_other_servers(tiny_model: Path, tmp_path: Path) -> None:
    """A member stores, under every honest server's peer id, records signed with its own key
    saying "draining" and expiring later than the real ones: the DHT takes them (the subkey
    differs), but gateways ask each server which key it signs with, and keep routing to it."""
    from tests.integration.conftest import run_swarm
    from tests.integration.test_failover import expected_text, online, stream_chat

    expected, _ = expected_text(tiny_model)
    with run_swarm(
        tiny_model, tmp_path, [(0, TINY_BLOCKS // 2), (TINY_BLOCKS // 2, TINY_BLOCKS)]
    ) as swarm:
        insider = SwarmDHT(
            initial_peers=swarm.initial_peers,
            client_mode=True,
            start=True,
            membership=session_member(Role.SERVER),
        )
        try:
            expiration = get_dht_time() + 600
            for node in swarm.nodes:
                peer, (start, end) = node_identity(node)
                for block in range(start, end):
                    found = insider.get(block_key(MODEL_ID, block), latest=True)
                    [real] = [v.value for s, v in found.value.items() if s.startswith(peer)]
                    forged = ServerRecord.model_validate(real).model_copy(
                        update={"state": "draining"}
                    )
                    subkey = peer + insider.owner_tag
                    assert insider.store(
                        block_key(MODEL_ID, block), forged.to_wire(), expiration, subkey=subkey
                    )
            # A gateway that joins now reads the forged records beside the real ones.
            with running_gateway(swarm, tmp_path, name="later gateway") as url:
                later = Swarm(
                    url, MODEL_ID, tiny_model, swarm.initial_peers, swarm.nodes, swarm.gateway
                )
                assert len(online(later)) == 2
                result = stream_chat(url)
                assert result.text == expected and not result.errors
                served = {part.rsplit(":", 1)[0] for part in result.route.split(",")}
                assert served == {node_identity(n)[0] for n in swarm.nodes}
        finally:
            insider.shutdown()


def test_revoked_credentials_are_refused_within_seconds(swarm: Swarm, tmp_path: Path) -> None:
    """A node with a server credential and a caller with a gateway credential, both taken,
    then revoked with `swarmgate revoke`: the gateway stops listing (and routing to) the
    node, and the session's nodes refuse the caller, within the revocation refresh."""
    server_credential = issue("server", tmp_path / "server.cred")
    gateway_credential = issue("gateway", tmp_path / "gateway.cred")
    node = swarm.nodes[0]
    hidden_size = load_config(swarm.model_path).hidden_size
    late = start_node(
        swarm.model_path,
        swarm.initial_peers,
        tmp_path,
        (0, TINY_BLOCKS),
        name="node-with-credential",
        env={"SWARMGATE_SWARM_KEY": str(server_credential)},
    )
    try:
        wait_for(lambda: "serving blocks" in late.output() or not late.alive(), 120, "the node")
        peer = node_identity(late)[0]
        wait_for(lambda: peer in listed(swarm.base_url), 60, "the node in /swarm")

        async def scenario() -> None:
            p2p = await P2P.create(initial_peers=_node_address(node))
            try:
                dialer = Dialer(p2p, node, hidden_size)
                caller = Membership.load(gateway_credential, Role.GATEWAY)
                member_pass = PassIssuer(caller, dialer.me).current()

                async def admitted() -> bool:
                    try:
                        stream, _ = await dialer.open(member_pass, "revoked", hashes=())
                    except NotAMember:
                        return False
                    stream.close()
                    return True

                assert await admitted()
                # Both revocations at once: each `swarmgate revoke` pays its own start-up
                # and DHT join, and neither waits for the other.
                printed = await asyncio.gather(
                    *(
                        asyncio.to_thread(revoke, credential, swarm.initial_peers)
                        for credential in (gateway_credential, server_credential)
                    )
                )
                assert all("is revoked" in out for out in printed), printed
                deadline = asyncio.get_running_loop().time() + 60
                while await admitted():
                    assert asyncio.get_running_loop().time() < deadline, "still admitted"
                    await asyncio.sleep(1)
            finally:
                await p2p.shutdown()

        asyncio.run(scenario())
        wait_for(lambda: peer not in listed(swarm.base_url), 60, "the revoked node to go")
        body = {"model": MODEL_ID, "prompt": "Hello", "max_tokens": 2}
        r = httpx.post(f"{swarm.base_url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200 and peer not in r.headers["x-swarmgate-route"]
    finally:
        late.stop()
