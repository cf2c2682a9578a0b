"""``ServerStats``: the one type behind a server's DHT record and its ``rpc_info`` answer,
whose fields keep the names today's peers send and read."""

from __future__ import annotations

import json

import pytest

from protocol.rpc import ServerInfo
from protocol.swarm import NodeState, ServerRecord, ServerStats

SHARED = {"version", "state", "start", "end", "throughput", "load", "cache_bytes_free", "evictions"}


def test_the_record_and_the_info_share_their_stats_under_the_same_names() -> None:
    record = ServerRecord(state=NodeState.ONLINE, start=1, end=3, throughput=2.0, cached_sessions=4)
    info = ServerInfo(state="online", start=1, end=3, throughput=2.0, load=1.0, sessions=4)
    assert isinstance(record, ServerStats) and isinstance(info, ServerStats)
    wire_record, wire_info = record.to_wire(), json.loads(info.encode())
    assert set(wire_record) >= SHARED and set(wire_info) >= SHARED
    # Each keeps its own name for the cached sessions, as before they shared a type.
    assert wire_record["cached_sessions"] == 4 and "sessions" not in wire_record
    assert wire_info["sessions"] == 4 and "cached_sessions" not in wire_info
    assert wire_info["state"] == "online"


def test_an_info_from_a_peer_of_today_reads_as_before() -> None:
    sent = {
        "version": 3,
        "start": 0,
        "end": 2,
        "state": "draining",
        "sessions": 5,
        "load": 2.0,
        "cache_bytes_free": 10,
        "throughput": 3.5,
        "evictions": 1,
        "tokens_computed": 7,
        "tokens_reused": 2,
        "owner": "tag",
        "credential": "",
    }
    info = ServerInfo.model_validate_json(json.dumps(sent))
    assert info.cached_sessions == 5 and info.state == NodeState.DRAINING
    assert json.loads(info.encode()) == sent


def test_an_info_is_held_to_the_record_s_bounds() -> None:
    with pytest.raises(ValueError, match="empty span"):
        ServerInfo(state="online", start=2, end=2, throughput=1.0)
