"""What `swarmgate status` shows: coverage per block, the weakest blocks, every server."""

from __future__ import annotations

from protocol.swarm import ModelRecord, ServerRecord
from routing.snapshot import SwarmSnapshot
from swarmgate.status import format_table, runs, summarize, weakest

MODEL = ModelRecord(name="m", architecture="llama", num_blocks=6, hidden_size=8, max_length=64)


def server(start: int, end: int, state: str = "online") -> ServerRecord:
    return ServerRecord.model_validate(
        {"state": state, "start": start, "end": end, "throughput": 5.0, "cache_bytes_free": 3 << 30}
    )


SNAPSHOT = SwarmSnapshot(
    MODEL,
    {
        "QmA": server(0, 4),
        "QmB": server(0, 2),
        "QmC": server(4, 6),
        "QmD": server(2, 6, "draining"),
    },
)


def test_coverage_counts_online_servers_and_finds_the_weakest_blocks() -> None:
    summary = summarize(SNAPSHOT)
    assert summary["coverage"] == [2, 2, 1, 1, 1, 1]
    assert summary["weakest"] == {"servers": 1, "blocks": ["2:6"]}
    assert [s["peer_id"] for s in summary["servers"]] == ["QmA", "QmB", "QmD", "QmC"]


def test_runs_and_weakest_split_at_every_change() -> None:
    assert runs([1, 1, 0, 2, 0]) == [(0, 2, 1), (2, 3, 0), (3, 4, 2), (4, 5, 0)]
    assert weakest([1, 1, 0, 2, 0]) == (0, [(2, 3), (4, 5)])
    assert weakest([]) == (0, [])


def test_the_table_names_coverage_weak_spots_and_each_servers_state() -> None:
    table = format_table([SNAPSHOT])
    assert "online servers per block: 0:2 (2), 2:6 (1)" in table
    assert "weakest: 2:6 (1 server)" in table
    [draining] = [line for line in table.splitlines() if "QmD" in line]
    assert "draining" in draining and "3.0 GiB" in draining
