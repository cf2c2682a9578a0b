"""Snapshots: a DHT read that misses a record does not drop a server before it expires."""

from __future__ import annotations

from protocol.swarm import ModelRecord, NodeState, ServerRecord
from routing.snapshot import SwarmSnapshot, carry_over, next_refresh_s, settled

MODEL = ModelRecord(name="m", architecture="llama", num_blocks=4, hidden_size=8, max_length=64)


def server(start: int, end: int) -> ServerRecord:
    return ServerRecord(state=NodeState.ONLINE, start=start, end=end, throughput=1.0)


def test_a_missed_record_stays_until_it_expires_and_fresh_records_win() -> None:
    previous = SwarmSnapshot(
        MODEL,
        {"a": server(0, 2), "b": server(2, 4), "gone": server(0, 4)},
        taken_at=100.0,
        expires={"a": 115.0, "b": 115.0, "gone": 104.0},
    )
    fresh = SwarmSnapshot(MODEL, {"b": server(2, 3)}, taken_at=105.0, expires={"b": 120.0})
    merged = carry_over(previous, fresh)
    assert set(merged.servers) == {"a", "b"}, "a's record is still valid; gone's expired"
    assert merged.servers["b"] == server(2, 3), "what the DHT says now wins"
    assert merged.expires == {"a": 115.0, "b": 120.0}
    later = SwarmSnapshot(MODEL, {}, taken_at=116.0)
    assert carry_over(merged, later).servers.keys() == {"b"}


def test_nothing_is_carried_over_to_another_model() -> None:
    previous = SwarmSnapshot(MODEL, {"a": server(0, 2)}, 100.0, {"a": 200.0})
    other = ModelRecord(**{**MODEL.model_dump(), "num_blocks": 6})
    assert carry_over(previous, SwarmSnapshot(other, {}, 101.0)).servers == {}


def test_a_swarm_is_settled_when_the_same_servers_cover_every_block() -> None:
    two = SwarmSnapshot(MODEL, {"a": server(0, 2), "b": server(2, 4)}, 100.0)
    busier = SwarmSnapshot(
        MODEL, {"a": server(0, 2).model_copy(update={"load": 7.0}), "b": server(2, 4)}, 110.0
    )
    assert settled(two, busier), "load and counters change with every announcement"
    joined = SwarmSnapshot(MODEL, {**two.servers, "c": server(0, 4)}, 110.0)
    assert not settled(two, joined) and not settled(joined, two)
    moved = SwarmSnapshot(MODEL, {"a": server(0, 3), "b": server(2, 4)}, 110.0)
    assert not settled(two, moved)
    draining = server(2, 4).model_copy(update={"state": NodeState.DRAINING})
    leaving = SwarmSnapshot(MODEL, {"a": server(0, 2), "b": draining}, 110.0)
    assert not settled(two, leaving)
    assert not settled(leaving, leaving), "a block without an online server is not settled"
    assert not settled(SwarmSnapshot(MODEL), SwarmSnapshot(MODEL))


def test_reads_back_off_while_settled_and_come_back_fast_on_a_change() -> None:
    waits, wait = [], 2.0
    for calm in [True, True, True, True, False, True]:
        wait = next_refresh_s(wait, settled=calm, fastest=2.0, slowest=10.0)
        waits.append(wait)
    assert waits == [4.0, 8.0, 10.0, 10.0, 2.0, 4.0]
