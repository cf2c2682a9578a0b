"""plan_route: the chain of servers a session uses, decided from a snapshot alone."""

from __future__ import annotations

import itertools

import pytest

from protocol.errors import NoRouteError
from protocol.swarm import ModelRecord, NodeState, ServerRecord
from routing.planner import Hop, plan_route
from routing.snapshot import SwarmSnapshot, coverage


def record(
    start: int, end: int, throughput: float = 10.0, state: NodeState = NodeState.ONLINE
) -> ServerRecord:
    return ServerRecord(state=state, start=start, end=end, throughput=throughput)


def snap(num_blocks: int, servers: dict[str, ServerRecord]) -> SwarmSnapshot:
    model = ModelRecord(
        name="m", architecture="llama", num_blocks=num_blocks, hidden_size=8, max_length=128
    )
    return SwarmSnapshot(model=model, servers=servers)


def assert_chain(route: list[Hop], num_blocks: int) -> None:
    """Contiguous, non-empty hops from block 0 to the last block."""
    assert route, "empty route"
    assert route[0].start == 0
    assert route[-1].end == num_blocks
    assert all(h.length > 0 for h in route)
    for a, b in itertools.pairwise(route):
        assert a.end == b.start


# ---- snapshot helpers ----


def test_snapshot_num_blocks_and_online_filter() -> None:
    s = snap(
        6,
        {
            "on": record(0, 6),
            "join": record(0, 6, state=NodeState.JOINING),
            "drain": record(0, 6, state=NodeState.DRAINING),
        },
    )
    assert s.num_blocks == 6
    assert set(s.online()) == {"on"}
    assert SwarmSnapshot(model=None).num_blocks == 0


def test_coverage_counts_servers_per_block_and_clamps_to_the_model() -> None:
    servers = {"a": record(0, 3), "b": record(2, 5), "c": record(4, 9)}
    assert coverage(servers, 6) == [1, 1, 2, 1, 2, 1]
    assert coverage({}, 3) == [0, 0, 0]


# ---- basic chains ----


def test_single_server_holding_everything_is_one_hop() -> None:
    route = plan_route(snap(12, {"a": record(0, 12)}), 12)
    assert route == [Hop("a", 0, 12)]
    assert route[0].length == 12


def test_two_servers_split_the_blocks_in_order() -> None:
    route = plan_route(snap(10, {"second": record(4, 10), "first": record(0, 4)}), 10)
    assert route == [Hop("first", 0, 4), Hop("second", 4, 10)]


def test_a_server_longer_than_the_model_is_clamped() -> None:
    route = plan_route(snap(5, {"a": record(0, 8)}), 5)
    assert route == [Hop("a", 0, 5)]


def test_many_servers_make_a_long_chain() -> None:
    servers = {f"p{i}": record(3 * i, 3 * i + 3) for i in range(5)}
    route = plan_route(snap(15, servers), 15)
    assert [h.peer_id for h in route] == [f"p{i}" for i in range(5)]
    assert_chain(route, 15)


# ---- no route ----


def test_gap_names_the_missing_blocks() -> None:
    s = snap(10, {"a": record(0, 3), "b": record(6, 10)})
    with pytest.raises(NoRouteError) as info:
        plan_route(s, 10)
    message = str(info.value)
    assert "3..5" in message
    assert "10" in message


def test_single_missing_block_is_named() -> None:
    s = snap(10, {"a": record(0, 9)})
    with pytest.raises(NoRouteError, match=r"block 9\b"):
        plan_route(s, 10)


def test_missing_first_block() -> None:
    s = snap(4, {"a": record(1, 4)})
    with pytest.raises(NoRouteError, match=r"block 0\b"):
        plan_route(s, 4)


def test_no_servers_at_all() -> None:
    with pytest.raises(NoRouteError, match="no online servers"):
        plan_route(snap(4, {}), 4)


def test_no_model_means_no_route() -> None:
    with pytest.raises(NoRouteError):
        plan_route(SwarmSnapshot(model=None), 0)
    with pytest.raises(NoRouteError):
        plan_route(SwarmSnapshot(model=None, servers={"a": record(0, 4)}), 0)


# ---- overlaps ----


def test_overlapping_spans_use_a_sub_range() -> None:
    s = snap(30, {"A": record(0, 20), "B": record(10, 30)})
    route = plan_route(s, 30)
    assert len(route) == 2
    assert_chain(route, 30)
    a, b = route
    assert (a.peer_id, b.peer_id) == ("A", "B")
    # The boundary lies inside the overlap, and each hop stays within its server's span.
    assert 10 <= a.end <= 20
    assert a.start >= 0 and a.end <= 20
    assert b.start >= 10 and b.end <= 30


def test_overlap_boundary_is_deterministic() -> None:
    servers = {"A": record(0, 20), "B": record(10, 30)}
    first = plan_route(snap(30, servers), 30)
    reordered = plan_route(snap(30, dict(reversed(list(servers.items())))), 30)
    assert first == reordered


def test_server_nested_inside_another_is_not_needed() -> None:
    s = snap(10, {"outer": record(0, 10, throughput=5.0), "inner": record(3, 6, throughput=5.0)})
    assert plan_route(s, 10) == [Hop("outer", 0, 10)]


# ---- preferences ----


def test_fewest_hops_beats_throughput() -> None:
    s = snap(
        10,
        {
            "slow-full": record(0, 10, throughput=1.0),
            "fast-a": record(0, 5, throughput=1000.0),
            "fast-b": record(5, 10, throughput=1000.0),
        },
    )
    assert plan_route(s, 10) == [Hop("slow-full", 0, 10)]


def test_highest_bottleneck_wins_among_equal_hop_counts() -> None:
    # 2-hop chains: a1→b1 (bottleneck 5), a2→b1 (5, via a sub-range of a2), a2→b2 (20).
    # a1 cannot reach b2 (gap at blocks 3..6). Peer ids alone would prefer a1.
    s = snap(
        10,
        {
            "a1": record(0, 3, throughput=100.0),
            "b1": record(3, 10, throughput=5.0),
            "a2": record(0, 7, throughput=20.0),
            "b2": record(7, 10, throughput=50.0),
        },
    )
    assert [h.peer_id for h in plan_route(s, 10)] == ["a2", "b2"]


def test_bottleneck_is_the_minimum_not_the_sum() -> None:
    # x→y: min 9; a→b: min 8 though its sum is much larger; x→b (x 0:1): min 8.
    # a cannot reach y (gap at block 1). Peer ids alone would prefer a.
    s = snap(
        4,
        {
            "a": record(0, 1, throughput=1000.0),
            "b": record(1, 4, throughput=8.0),
            "x": record(0, 2, throughput=9.0),
            "y": record(2, 4, throughput=9.0),
        },
    )
    assert plan_route(s, 4) == [Hop("x", 0, 2), Hop("y", 2, 4)]


def test_ties_are_broken_by_peer_id() -> None:
    servers = {
        "zeta": record(0, 8, throughput=10.0),
        "alpha": record(0, 8, throughput=10.0),
        "mu": record(0, 8, throughput=10.0),
    }
    assert plan_route(snap(8, servers), 8) == [Hop("alpha", 0, 8)]
    reordered = dict(sorted(servers.items()))
    assert plan_route(snap(8, reordered), 8) == [Hop("alpha", 0, 8)]


def test_ties_in_a_chain_are_broken_by_peer_ids_in_order() -> None:
    servers = {
        "b-first": record(0, 5),
        "a-first": record(0, 5),
        "d-second": record(5, 10),
        "c-second": record(5, 10),
    }
    for order in itertools.permutations(servers):
        route = plan_route(snap(10, {p: servers[p] for p in order}), 10)
        assert route == [Hop("a-first", 0, 5), Hop("c-second", 5, 10)]


@pytest.mark.parametrize(
    ("with_full", "expected"),
    [
        (True, (Hop("c", 0, 12),)),
        (False, (Hop("e", 0, 6), Hop("d", 6, 12))),
    ],
)
def test_route_is_the_same_whatever_the_snapshot_order(
    with_full: bool, expected: tuple[Hop, ...]
) -> None:
    servers = {
        "a": record(0, 7, throughput=3.0),
        "b": record(4, 12, throughput=6.0),
        "d": record(6, 12, throughput=9.0),
        "e": record(0, 6, throughput=9.0),
    }
    if with_full:
        servers["c"] = record(0, 12, throughput=1.0)
    routes = {
        tuple(plan_route(snap(12, {p: servers[p] for p in order}), 12))
        for order in itertools.permutations(servers)
    }
    assert routes == {expected}


# ---- who is eligible ----


@pytest.mark.parametrize("state", [NodeState.DRAINING, NodeState.JOINING])
def test_non_online_servers_are_ignored(state: NodeState) -> None:
    s = snap(
        10,
        {
            "leaving": record(0, 10, throughput=1000.0, state=state),
            "a": record(0, 5),
            "b": record(5, 10),
        },
    )
    route = plan_route(s, 10)
    assert [h.peer_id for h in route] == ["a", "b"]


@pytest.mark.parametrize("state", [NodeState.DRAINING, NodeState.JOINING])
def test_only_non_online_servers_means_no_route(state: NodeState) -> None:
    with pytest.raises(NoRouteError):
        plan_route(snap(10, {"a": record(0, 10, state=state)}), 10)


def test_exclude_skips_peers() -> None:
    servers = {"best": record(0, 10, throughput=100.0), "backup": record(0, 10, throughput=1.0)}
    assert plan_route(snap(10, servers), 10) == [Hop("best", 0, 10)]
    assert plan_route(snap(10, servers), 10, exclude={"best"}) == [Hop("backup", 0, 10)]


def test_excluding_the_only_holder_is_no_route() -> None:
    s = snap(10, {"a": record(0, 5), "b": record(5, 10)})
    with pytest.raises(NoRouteError, match=r"5\.\.9"):
        plan_route(s, 10, exclude={"b"})
    with pytest.raises(NoRouteError):
        plan_route(s, 10, exclude={"a", "b"})


def test_exclude_of_unknown_peers_changes_nothing() -> None:
    s = snap(10, {"a": record(0, 10)})
    assert plan_route(s, 10, exclude={"nobody"}) == [Hop("a", 0, 10)]


def test_separate_gaps_are_named_one_by_one() -> None:
    swarm = snap(10, {"a": record(0, 2), "b": record(3, 7), "c": record(9, 10)})
    with pytest.raises(NoRouteError, match=r"holds blocks 2, 7\.\.8 \(of 10\)"):
        plan_route(swarm, 10)


def test_choose_blocks_refuses_a_model_without_blocks() -> None:
    from routing.block_selection import choose_blocks

    with pytest.raises(ValueError, match="at least one block"):
        choose_blocks(snap(1, {}), 0, 1)
