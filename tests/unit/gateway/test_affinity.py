"""Affinity bookkeeping in memory: TTLs, prefixes and leases (Redis is tested for real)."""

from __future__ import annotations

import asyncio

from gateway.affinity import InMemoryAffinityStore, SessionPin
from protocol.prefix import BLOCK_TOKENS, TokenHistory, block_hashes, common_blocks
from routing.planner import Hop


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


PIN = SessionPin("s1", (Hop("a", 0, 2), Hop("b", 2, 4)), 64)


def test_pins_round_trip_and_expire() -> None:
    clock = Clock()
    store = InMemoryAffinityStore(ttl_s=10, clock=clock)

    async def scenario() -> None:
        await store.put_key("chat-1", PIN)
        assert await store.get_key("chat-1") == PIN
        clock.now = 11
        assert await store.get_key("chat-1") is None

    asyncio.run(scenario())


def test_the_longest_known_prefix_wins() -> None:
    store = InMemoryAffinityStore()
    short, long = SessionPin("short", (), 32), SessionPin("long", (), 64)
    hashes = block_hashes(list(range(100)))

    async def scenario() -> None:
        await store.put_prefixes(hashes[:1], short)
        await store.put_prefixes(hashes[:2], long)
        assert await store.longest_prefix(hashes) == long
        assert await store.longest_prefix(hashes[:1]) == long  # same first block, newer pin
        assert await store.longest_prefix(block_hashes(list(range(1, 101)))) is None

    asyncio.run(scenario())


def test_a_lease_is_exclusive_until_released_or_expired() -> None:
    clock = Clock()
    store = InMemoryAffinityStore(lease_ttl_s=30, clock=clock)

    async def scenario() -> None:
        token = await store.acquire("s1")
        assert token and await store.acquire("s1") is None
        await store.release("s1", "not-mine")
        assert await store.acquire("s1") is None
        assert await store.renew("s1", token)
        await store.release("s1", token)
        assert await store.acquire("s1") is not None
        clock.now = 31
        assert await store.acquire("s1") is not None

    asyncio.run(scenario())


def test_block_hashes_chain_so_equal_hashes_mean_equal_prefixes() -> None:
    a = list(range(3 * BLOCK_TOKENS + 5))
    b = [*a[:BLOCK_TOKENS], 0, *a[BLOCK_TOKENS + 1 :]]
    assert len(block_hashes(a)) == 3
    assert common_blocks(block_hashes(a), block_hashes(b)) == 1
    assert block_hashes(a, salt="m1") != block_hashes(a, salt="m2")
    history = TokenHistory(a[:10])
    for token in a[10:]:
        history.extend([token])
    assert history.hashes == block_hashes(a)
