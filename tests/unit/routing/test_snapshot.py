"""Snapshots: a DHT read that misses a record does not drop a server before it expires."""

from __future__ import annotations

from protocol.swarm import ModelRecord, NodeState, ServerRecord
from routing.snapshot import SwarmSnapshot, carry_over

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
