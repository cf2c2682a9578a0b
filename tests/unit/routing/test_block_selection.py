"""choose_blocks and split_evenly: where joining servers go."""

from __future__ import annotations

import itertools

import pytest

from protocol.swarm import ModelRecord, NodeState, ServerRecord
from routing.block_selection import choose_blocks, split_evenly
from routing.snapshot import SwarmSnapshot


def record(start: int, end: int, state: NodeState = NodeState.ONLINE) -> ServerRecord:
    return ServerRecord(state=state, start=start, end=end, throughput=1.0)


def snap(num_blocks: int, servers: dict[str, ServerRecord] | None = None) -> SwarmSnapshot:
    model = ModelRecord(
        name="m", architecture="llama", num_blocks=num_blocks, hidden_size=8, max_length=128
    )
    return SwarmSnapshot(model=model, servers=servers or {})


# ---- choose_blocks ----


def test_empty_swarm_starts_at_block_zero() -> None:
    assert choose_blocks(snap(10), 10, 4) == (0, 4)


def test_fills_the_uncovered_window() -> None:
    assert choose_blocks(snap(10, {"a": record(0, 6)}), 10, 4) == (6, 10)


def test_fills_a_gap_in_the_middle() -> None:
    servers = {"a": record(0, 3), "b": record(7, 10)}
    assert choose_blocks(snap(10, servers), 10, 4) == (3, 7)


def test_a_gap_beats_a_window_with_more_total_coverage_elsewhere() -> None:
    # Blocks 0..4 are held twice, 5..9 once except block 8 (a gap). Any window covering
    # block 8 has a weakest block of 0, so it wins over thin-but-covered windows.
    servers = {"a": record(0, 5), "b": record(0, 8), "c": record(9, 10)}
    start, end = choose_blocks(snap(10, servers), 10, 3)
    assert start <= 8 < end
    assert (start, end) == (6, 9)  # lowest total coverage among windows holding the gap


def test_least_total_coverage_when_every_window_is_covered() -> None:
    servers = {"a": record(0, 10), "b": record(0, 6), "c": record(0, 3)}
    # counts: [3,3,3,2,2,2,1,1,1,1]
    assert choose_blocks(snap(10, servers), 10, 4) == (6, 10)


def test_ties_go_to_the_lowest_start() -> None:
    servers = {"a": record(0, 10)}
    assert choose_blocks(snap(10, servers), 10, 3) == (0, 3)
    # Two equally thin windows: [0,2) and [8,10).
    servers = {"a": record(0, 10), "b": record(2, 8)}
    assert choose_blocks(snap(10, servers), 10, 2) == (0, 2)


def test_draining_servers_count_as_absent() -> None:
    servers = {
        "a": record(0, 5),
        "leaving": record(5, 10, state=NodeState.DRAINING),
    }
    assert choose_blocks(snap(10, servers), 10, 5) == (5, 10)


def test_joining_servers_count_as_present() -> None:
    servers = {"a": record(0, 5), "b": record(5, 10, state=NodeState.JOINING)}
    # Both halves held once: tie, lowest start.
    assert choose_blocks(snap(10, servers), 10, 5) == (0, 5)
    servers = {"a": record(0, 5, state=NodeState.JOINING)}
    assert choose_blocks(snap(10, servers), 10, 5) == (5, 10)


@pytest.mark.parametrize(("length", "expected"), [(100, (0, 6)), (6, (0, 6)), (0, (0, 1))])
def test_length_is_clamped(length: int, expected: tuple[int, int]) -> None:
    assert choose_blocks(snap(6), 6, length) == expected


def test_result_is_always_a_valid_window() -> None:
    servers = {"a": record(1, 4), "b": record(3, 9), "c": record(6, 12)}
    for length in range(1, 13):
        start, end = choose_blocks(snap(12, servers), 12, length)
        assert 0 <= start < end <= 12
        assert end - start == length


# ---- split_evenly ----


@pytest.mark.parametrize(("num_blocks", "parts"), [(10, 1), (10, 3), (7, 7), (24, 5), (30, 4)])
def test_split_examples(num_blocks: int, parts: int) -> None:
    spans = split_evenly(num_blocks, parts)
    assert len(spans) == parts
    assert spans[0][0] == 0 and spans[-1][1] == num_blocks


def test_split_exact_values() -> None:
    assert split_evenly(10, 1) == [(0, 10)]
    assert split_evenly(10, 2) == [(0, 5), (5, 10)]
    assert split_evenly(4, 4) == [(0, 1), (1, 2), (2, 3), (3, 4)]


def test_split_is_contiguous_and_balanced_for_every_size() -> None:
    for num_blocks in range(1, 41):
        for parts in range(1, num_blocks + 1):
            spans = split_evenly(num_blocks, parts)
            assert len(spans) == parts
            assert spans[0][0] == 0 and spans[-1][1] == num_blocks
            for (_, a_end), (b_start, _) in itertools.pairwise(spans):
                assert a_end == b_start
            sizes = [end - start for start, end in spans]
            assert min(sizes) >= 1
            assert max(sizes) - min(sizes) <= 1, (num_blocks, parts, sizes)
            assert sum(sizes) == num_blocks


@pytest.mark.parametrize(("num_blocks", "parts"), [(10, 0), (10, -1), (3, 4), (0, 1), (0, 0)])
def test_split_rejects_impossible_requests(num_blocks: int, parts: int) -> None:
    with pytest.raises(ValueError):
        split_evenly(num_blocks, parts)
