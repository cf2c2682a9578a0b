"""The server's session caches: reuse by prefix, trimming, LRU and TTL eviction, forks."""

from __future__ import annotations

import pytest
import torch

from protocol.errors import CapacityExceeded, InvalidRequest
from protocol.prefix import BLOCK_TOKENS, TokenHistory
from swarm_node.cache_store import CachedSession, CacheStore
from swarm_node.kv_buffers import KVBuffers, KVShape

PER_TOKEN = 2 * 4 * 4  # keys+values, 1 head of 4 fp32 values, one block


SHAPE = KVShape(kv_heads=1, head_dim=4, dtype=torch.float32)


def new_kv() -> KVBuffers:
    return KVBuffers(1, SHAPE)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def store(budget_tokens: int, clock: Clock | None = None) -> CacheStore:
    return CacheStore(
        budget_tokens * PER_TOKEN,
        PER_TOKEN,
        idle_ttl_s=60,
        clock=clock or Clock(),
    )


def forward(kv: KVBuffers, position: int, tokens: int) -> None:
    """What a forward pass does to a cache, on the compute thread."""
    kv.crop(position)
    kv.ensure(position + tokens)
    kv.write(0, position, torch.zeros(1, 1, tokens, 4), torch.zeros(1, 1, tokens, 4))
    kv.length = position + tokens


def run(
    store_: CacheStore, session: CachedSession, tokens: list[int], history: TokenHistory
) -> None:
    """Feed ``tokens`` as one step, as the handler does (the forward pass fills the cache)."""
    position = len(history)
    history.extend(tokens)
    new = history.hashes[position // BLOCK_TOKENS : len(history) // BLOCK_TOKENS]
    hashes = store_.check_step(session, position, len(tokens), new)
    forward(session.kv, position, len(tokens))
    digest = history.digest(len(history))
    store_.commit_step(session, position, len(tokens), hashes, first=True, digest=digest)


def test_the_next_turn_reuses_the_common_prefix_block_aligned() -> None:
    s = store(1000)
    first = list(range(100))
    history = TokenHistory()
    session, cached = s.open("conv", 0, 1, 200, TokenHistory(first).hashes, new_kv)
    assert cached == 0
    run(s, session, first, history)
    s.release(session)

    follow_up = TokenHistory(first + [7] * 20)
    session, cached = s.open("conv", 0, 1, 200, follow_up.hashes, new_kv)
    assert cached == 96  # 3 full blocks of the 100 tokens
    assert s.stats().sessions == 1


def test_the_conversation_that_continues_exactly_resumes_all_of_it() -> None:
    s = store(1000)
    first = list(range(100))
    history = TokenHistory()
    session, _ = s.open("conv", 0, 1, 200, [], new_kv)
    run(s, session, first, history)
    s.release(session)
    follow_up = TokenHistory(first + [7] * 20)
    resume = (100, history.digest(100))
    session, cached = s.open("conv", 0, 1, 200, follow_up.hashes, new_kv, resume=resume)
    assert cached == 100, "the partial last block too"
    s.release(session)

    other = TokenHistory(first[:99] + [5] + [7] * 20)  # the same blocks, another tail
    claimed = (100, other.digest(100))
    session, cached = s.open("conv", 0, 1, 200, other.hashes, new_kv, resume=claimed)
    assert cached == 96, "a digest of another history resumes whole blocks only"
    s.truncate(session, 96)
    assert session.digest == "", "a truncated history no longer matches any digest"


def test_an_edited_turn_is_trimmed_to_the_common_prefix() -> None:
    s = store(1000)
    tokens = list(range(96))
    history = TokenHistory()
    session, _ = s.open("conv", 0, 1, 200, [], new_kv)
    run(s, session, tokens, history)
    s.release(session)

    edited = TokenHistory(tokens[:40] + [999] * 56)
    session, cached = s.open("conv", 0, 1, 200, edited.hashes, new_kv)
    assert cached == 32
    hashes = s.check_step(session, cached, 64, edited.hashes[1:3])
    assert hashes == edited.hashes[:3]
    assert session.position == 96, "checking a step changes nothing"
    s.truncate(session, cached)  # the handler accepted the step: the old tail is gone
    assert session.position == 32 and session.hashes == edited.hashes[:1]
    forward(session.kv, cached, 64)
    s.commit_step(session, cached, 64, hashes, first=True)
    assert session.position == 96 and session.kv.length == 96
    assert session.hashes == edited.hashes[:3]
    with pytest.raises(InvalidRequest):
        s.check_step(session, 97, 1, [])  # past what the cache holds


def test_a_discarded_session_is_never_handed_out_again() -> None:
    s = store(1000)
    tokens = list(range(64))
    history = TokenHistory()
    session, _ = s.open("conv", 0, 1, 200, [], new_kv)
    run(s, session, tokens, history)
    s.release(session)
    session, cached = s.open("conv", 0, 1, 200, history.hashes, new_kv)
    assert cached == 64
    s.discard(session)  # its step was cancelled mid-forward
    s.release(session)  # the stream's cleanup runs after: it must not bring it back
    assert "conv" not in s.cache_keys()
    again, cached = s.open("conv", 0, 1, 200, history.hashes, new_kv)
    assert again is not session and again.kv is not session.kv and cached == 0


def test_a_throwaway_session_is_dropped_when_its_stream_closes() -> None:
    s = store(1000)
    session, _ = s.open("replay", 0, 1, 50, [], new_kv, keep=False)
    run(s, session, [1, 2, 3], TokenHistory())
    s.release(session)
    assert s.cache_keys() == []


def test_a_session_in_use_is_forked_never_shared() -> None:
    s = store(1000)
    a, _ = s.open("conv", 0, 1, 50, [], new_kv)
    b, cached = s.open("conv", 0, 1, 50, [], new_kv)
    assert b is not a and b.key != a.key and cached == 0
    run(s, b, [1, 2, 3], TokenHistory())
    s.release(b)
    assert b.key not in s.cache_keys()  # forks are private: dropped when done


def test_idle_sessions_are_evicted_lru_first_and_in_use_ones_never() -> None:
    s = store(100)
    sessions = {}
    for name in ("old", "mid"):
        session, _ = s.open(name, 0, 1, 40, [], new_kv)
        run(s, session, list(range(40)), TokenHistory())
        s.release(session)
        sessions[name] = session
    s.open("busy", 0, 1, 30, [], new_kv)  # needs room for 30: evicts "old" only
    assert s.cache_keys() == ["mid", "busy"] and s.evictions == 1
    with pytest.raises(CapacityExceeded):
        s.open("huge", 0, 1, 90, [], new_kv)  # even without "mid" there is no room
    assert s.cache_keys() == ["mid", "busy"], "refused before anything is evicted"


def test_idle_sessions_expire_after_the_ttl() -> None:
    clock = Clock()
    s = store(1000, clock)
    session, _ = s.open("conv", 0, 1, 10, [], new_kv)
    run(s, session, [1, 2], TokenHistory())
    s.release(session)
    clock.now = 59
    s.expire()
    assert s.cache_keys() == ["conv"]
    clock.now = 61
    s.expire()
    assert s.cache_keys() == [] and s.evictions == 1


def test_a_different_span_is_a_different_cache() -> None:
    s = store(1000)
    session, _ = s.open("conv", 0, 1, 40, [], new_kv)
    run(s, session, list(range(BLOCK_TOKENS)), TokenHistory())
    s.release(session)
    _, cached = s.open("conv", 0, 2, 40, TokenHistory(list(range(BLOCK_TOKENS))).hashes, new_kv)
    assert cached == 0


def test_an_oversized_reservation_is_refused_before_anything_is_evicted() -> None:
    s = store(100)
    for name in ("a", "b"):
        session, _ = s.open(name, 0, 1, 40, [], new_kv)
        run(s, session, list(range(40)), TokenHistory())
        s.release(session)
    s.open("busy", 0, 1, 30, [], new_kv)  # evicts "a": 40 + 30 fit in 100
    assert s.cache_keys() == ["b", "busy"]
    with pytest.raises(CapacityExceeded) as refused:
        s.open("huge", 0, 1, 90, [], new_kv)  # even without "b" there is no room
    assert s.cache_keys() == ["b", "busy"], "nothing may be evicted for a refused request"
    assert "40" not in str(refused.value) and "30" not in str(refused.value)


def test_the_running_byte_total_matches_the_sessions_after_any_sequence() -> None:
    import random

    rng = random.Random(7)
    s = store(400)
    open_sessions: dict[str, tuple[CachedSession, TokenHistory]] = {}
    for _ in range(300):
        name = f"c{rng.randrange(6)}"
        action = rng.random()
        try:
            if name not in open_sessions and action < 0.5:
                session, _ = s.open(name, 0, 1, rng.randrange(1, 120), [], new_kv)
                open_sessions[name] = (session, TokenHistory())
            elif name in open_sessions and action < 0.7:
                session, history = open_sessions[name]
                room = session.reserved_bytes // PER_TOKEN - len(history)
                if room > 0:
                    run(s, session, list(range(rng.randrange(1, room + 1))), history)
            elif name in open_sessions and action < 0.9:
                s.release(open_sessions.pop(name)[0])
            elif name in open_sessions:
                s.discard(open_sessions.pop(name)[0])
            else:
                s.expire()
        except CapacityExceeded:
            pass
        stored = [s._cached[k] for k in s.cache_keys()]
        assert s.used_bytes == sum(x.charge() for x in stored)
        assert s.used_bytes <= s.budget_bytes


def test_the_prefix_index_follows_every_change_of_its_sessions() -> None:
    clock = Clock()
    s = store(1000, clock)
    shared = list(range(2 * BLOCK_TOKENS + 7))
    donor, _ = s.open("a", 0, 1, 200, [], new_kv)
    run(s, donor, shared, TokenHistory())
    s.release(donor)
    wanted = TokenHistory(shared + [999] * BLOCK_TOKENS).hashes  # shares two full blocks

    fresh, _ = s.open("b", 0, 1, 200, wanted, new_kv)
    assert s.find_prefix(fresh, wanted) == (donor, 2 * BLOCK_TOKENS)
    other_blocks, _ = s.open("c", 0, 2, 200, wanted, new_kv)
    assert s.find_prefix(other_blocks, wanted) is None  # a session over other blocks
    assert s.find_prefix(fresh, TokenHistory([7] * 64).hashes) is None

    # Cropped to one block (an edited turn): only that block is still found.
    again, _ = s.open("a", 0, 1, 200, wanted[:1], new_kv)
    run(s, again, [5] * 40, TokenHistory(shared[:BLOCK_TOKENS]))
    s.release(again)
    assert s.find_prefix(fresh, wanted) == (again, BLOCK_TOKENS)

    # Gone (idle past its TTL): found nowhere, and never a dangling key.
    s.release(fresh)
    s.release(other_blocks)
    clock.now += 61
    s.expire()
    probe, _ = s.open("d", 0, 1, 200, wanted, new_kv)
    assert s.find_prefix(probe, wanted) is None
    assert not s._holders


def test_a_session_is_seeded_only_from_sessions_of_its_own_caller() -> None:
    """Block hashes are the caller's word: another peer's session under a prompt's hashes
    (garbage written there on purpose) is never a donor; the caller's own sessions are."""
    s = store(1000)
    shared = list(range(2 * BLOCK_TOKENS))
    wanted = TokenHistory(shared).hashes
    poisoned, _ = s.open("poison", 0, 1, 200, [], new_kv, caller="QmPoisoner")
    run(s, poisoned, shared, TokenHistory())
    s.release(poisoned)

    fresh, _ = s.open("b", 0, 1, 200, wanted, new_kv, caller="QmGateway")
    assert s.find_prefix(fresh, wanted) is None
    assert s.find_prefix(poisoned, wanted) is None  # not itself either
    own, _ = s.open("a", 0, 1, 200, [], new_kv, caller="QmGateway")
    run(s, own, shared, TokenHistory())
    s.release(own)
    assert s.find_prefix(fresh, wanted) == (own, 2 * BLOCK_TOKENS)

    # Resumed with its key (the secret's holder, even from another peer): it counts as
    # that caller's from then on, since that caller writes to it now.
    resumed, cached = s.open("a", 0, 1, 200, wanted, new_kv, caller="QmOtherGateway")
    assert resumed is own and cached == 2 * BLOCK_TOKENS
    s.release(resumed)
    assert s.find_prefix(fresh, wanted) is None
