"""Affinity bookkeeping in memory: TTLs, prefixes and leases (Redis is tested for real)."""

from __future__ import annotations

import asyncio

from gateway.engine.affinity_stores import InMemoryAffinityStore, SessionPin
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


def test_a_digest_covers_the_partial_last_block_too() -> None:
    tokens = list(range(70))
    history = TokenHistory(tokens, salt="m")
    assert history.digest(64) == history.hashes[1]  # block-aligned: the block hash itself
    assert history.digest(70) == TokenHistory(tokens, salt="m").digest(70)
    assert history.digest(70) != TokenHistory([*tokens[:69], 999], salt="m").digest(70)
    assert history.digest(0) == "m"


def test_only_an_exact_continuation_claims_a_pinned_session_others_fork_near_it() -> None:
    from gateway.engine.affinity import SessionAffinity
    from gateway.metrics import GatewayMetrics

    system = list(range(2 * BLOCK_TOKENS))  # a shared system prompt, two full blocks
    first = TokenHistory([*system, 1, 2, 3, 4, 5])  # conversation A after its turn

    async def scenario() -> None:
        affinity = SessionAffinity(InMemoryAffinityStore(), GatewayMetrics())
        a = await affinity.claim(None, first)
        await affinity.remember(a, PIN.route, first)
        await affinity.release(a)

        # A's next turn extends its whole history: the same session, on its route.
        next_turn = await affinity.claim(None, TokenHistory([*first.tokens, 6, 7]))
        assert (next_turn.session_id, next_turn.prefer) == (a.session_id, PIN.route)
        # ... and tells the servers which history it continues: all of it is resumed.
        assert next_turn.resume == (len(first), first.digest(len(first)))
        await affinity.release(next_turn)

        # B shares the system prompt (and more), then differs: a fork near A's servers.
        other = await affinity.claim(None, TokenHistory([*system, 1, 2, 9, 9, 9, 9]))
        assert other.session_id != a.session_id and other.secret != a.secret
        assert other.prefer == PIN.route and other.resume == (0, "")
        # A session key says "my conversation": an edited turn continues (and crops) it.
        await affinity.remember(a, PIN.route, first)
        keyed = await affinity.claim("k", TokenHistory(system))
        assert keyed.session_id != a.session_id  # no pin under that key yet
        await affinity.remember(keyed, PIN.route, first)
        await affinity.release(keyed)
        edited = await affinity.claim("k", TokenHistory(system))
        assert edited.session_id == keyed.session_id
        assert edited.resume == (0, ""), "an edited turn resumes its common blocks only"

    asyncio.run(scenario())
