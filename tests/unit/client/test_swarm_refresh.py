"""How often a gateway re-reads the swarm: fast while it changes, seldom while it stays the
same, at once when a server fails, and before answering that no server can take a request."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import base58
import pytest
import torch
from hivemind.utils import get_dht_time

from client.chain import ChainSession
from client.swarm_client import InferenceClient
from client.swarm_view import SwarmView
from protocol.errors import NoRouteError, PeerUnavailable
from protocol.swarm import ModelRecord, NodeState, ServerRecord, block_key
from routing.planner import Hop
from swarm_dht.join import SwarmMember

MODEL = ModelRecord(name="m", architecture="llama", num_blocks=4, hidden_size=8, max_length=64)
PATIENCE_S = 5.0  # a read that should come comes within milliseconds
T = TypeVar("T")


@dataclass
class Item:
    value: Any
    expiration_time: float


def peer(n: int) -> str:
    return "Qm" + base58.b58encode(n.to_bytes(4, "big")).decode()


def server(start: int, end: int, adapters: tuple[str, ...] = ()) -> ServerRecord:
    return ServerRecord(
        model=MODEL.digest,
        state=NodeState.ONLINE,
        start=start,
        end=end,
        throughput=1.0,
        adapters=adapters,
    )


class FakeDHT:
    """The DHT process as the gateway uses it: ``servers`` is what its records say now."""

    def __init__(self, servers: dict[str, ServerRecord]) -> None:
        self.servers = servers
        self.reads = 0
        self._read = asyncio.Event()

    async def replicate_p2p(self) -> None:
        return None

    def get(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("no model record yet")  # the client starts without one

    def run_coroutine(self, coro: Any, return_future: bool) -> Any:
        return asyncio.ensure_future(coro(self, self))

    async def get_many(self, keys: tuple[str, ...], sufficient_expiration_time: float) -> Any:
        self.reads += 1
        self._read.set()
        expires = get_dht_time() + 60
        found: dict[str, Item | None] = {}
        for block in range(MODEL.num_blocks):
            entries = {
                p + "[owner:k]": Item(r.to_wire(), expires)
                for p, r in self.servers.items()
                if r.start <= block < r.end
            }
            found[block_key("m", block)] = Item(entries, expires) if entries else None
        return {key: found.get(key) for key in keys}

    async def until_reads(self, count: int) -> None:
        while self.reads < count:
            self._read.clear()
            await asyncio.wait_for(self._read.wait(), PATIENCE_S)


def no_embedding(ids: list[int]) -> torch.Tensor:
    raise AssertionError("not used")


def run(scenario: Callable[[InferenceClient, FakeDHT], Awaitable[T]], **settings: Any) -> T:
    async def main() -> T:
        dht = FakeDHT({peer(1): server(0, 2), peer(2): server(2, 4)})
        member = SwarmMember(dht, None, lambda: "")  # type: ignore[arg-type]
        view = SwarmView(member, "m", MODEL, **settings)
        client = InferenceClient(view, no_embedding)
        await view.start()
        try:
            return await scenario(client, dht)
        finally:
            await view.aclose()

    return asyncio.run(asyncio.wait_for(main(), PATIENCE_S * 4))


def test_a_settled_swarm_is_read_less_often_and_a_changed_one_fast_again() -> None:
    async def scenario(client: InferenceClient, dht: FakeDHT) -> tuple[float, float]:
        await dht.until_reads(6)  # 0.01, 0.02, 0.04, 0.08, 0.08 s apart
        backed_off = client.view._refresh_wait_s
        dht.servers[peer(3)] = server(0, 4)  # a server joins
        await dht.until_reads(dht.reads + 2)  # the read that sees it, and one more
        assert peer(3) in client.snapshot().servers
        return backed_off, client.view._refresh_wait_s

    backed_off, after_change = run(scenario, refresh_period_s=0.01, max_refresh_period_s=0.08)
    assert backed_off == 0.08
    assert after_change in (0.01, 0.02)  # fast again (doubling once the change settled)


def test_a_failed_server_wakes_a_read_at_once() -> None:
    async def scenario(client: InferenceClient, dht: FakeDHT) -> int:
        await dht.until_reads(2)  # the loop runs
        client.view._refresh_wait_s = 3600.0  # as if settled long ago: the next read is far off
        client.failed(peer(1), PeerUnavailable("gone", peer(1)))
        await dht.until_reads(3)  # woken
        await dht.until_reads(4)  # and reading fast again, not in an hour
        return client.view._refresh_wait_s

    assert run(scenario, refresh_period_s=0.01, max_refresh_period_s=3600.0) < 1.0


def test_a_request_nobody_can_take_reads_the_swarm_again_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    routes: list[list[Hop]] = []

    async def opened(self: ChainSession, route: list[Hop], prefix_hashes: Any) -> None:
        routes.append(list(route))

    monkeypatch.setattr(ChainSession, "open", opened)

    async def scenario(client: InferenceClient, dht: FakeDHT) -> None:
        await dht.until_reads(2)
        client.view._refresh_wait_s = 3600.0  # the loop reads again in an hour
        with pytest.raises(NoRouteError):  # nobody holds the adapter
            await client.open_session(32, session_id="s", secret="0" * 32, adapter="x")
        assert not routes
        reads = dht.reads
        dht.servers[peer(3)] = server(0, 4, adapters=("x",))  # joined since the last read
        await client.open_session(32, session_id="s", secret="0" * 32, adapter="x")
        assert dht.reads == reads + 1
        assert [hop.peer_id for hop in routes[-1]] == [peer(3)]

    run(scenario, refresh_period_s=0.0, max_refresh_period_s=3600.0)
