from __future__ import annotations

import itertools

import pytest

from protocol.errors import NoRouteError
from protocol.swarm import ModelRecord, NodeState, ServerRecord
from routing.block_selection import choose_blocks, split_evenly
from routing.planner import Hop, plan_route
from routing.snapshot import SwarmSnapshot

N = 10


def server(
    start: int, end: int, throughput: float = 10.0, state: NodeState = NodeState.ONLINE
) -> ServerRecord:
    return ServerRecord(state=state, start=start, end=end, throughput=throughput)


def snapshot(**servers: ServerRecord) -> SwarmSnapshot:
    model = ModelRecord(name="m", architecture="llama", num_blocks=N, hidden_size=8, max_length=64)
    return SwarmSnapshot(model=model, servers=servers)


def covers_all(route: list[Hop]) -> bool:
    return (
        route[0].start == 0
        and route[-1].end == N
        and all(a.end == b.start for a, b in itertools.pairwise(route))
    )


def test_one_server_holding_everything_is_one_hop() -> None:
    assert plan_route(snapshot(a=server(0, N)), N) == [Hop("a", 0, N)]


def test_two_halves_make_a_chain_in_block_order() -> None:
    route = plan_route(snapshot(b=server(5, N), a=server(0, 5)), N)
    assert route == [Hop("a", 0, 5), Hop("b", 5, N)]


def test_overlapping_spans_use_a_sub_range() -> None:
    route = plan_route(snapshot(a=server(0, 7), b=server(4, N)), N)
    assert len(route) == 2 and covers_all(route)
    assert [h.peer_id for h in route] == ["a", "b"]


def test_fewest_hops_beats_throughput() -> None:
    route = plan_route(
        snapshot(slow=server(0, N, throughput=1), x=server(0, 5, 100), y=server(5, N, 100)), N
    )
    assert route == [Hop("slow", 0, N)]


def test_equal_hops_prefer_the_highest_bottleneck() -> None:
    route = plan_route(
        snapshot(a=server(0, 5, 50), b=server(5, N, 5), c=server(0, 5, 20), d=server(5, N, 30)), N
    )
    assert [h.peer_id for h in route] == ["a", "d"]


def test_ties_are_broken_by_peer_id_so_gateways_agree() -> None:
    twins = snapshot(zed=server(0, N), alpha=server(0, N))
    assert plan_route(twins, N) == [Hop("alpha", 0, N)]


def test_a_gap_is_a_no_route_error_naming_the_blocks() -> None:
    with pytest.raises(NoRouteError, match=r"blocks 4\.\.5"):
        plan_route(snapshot(a=server(0, 4), b=server(6, N)), N)


def test_empty_swarm_and_unknown_model_have_no_route() -> None:
    with pytest.raises(NoRouteError, match="no online servers"):
        plan_route(snapshot(), N)
    with pytest.raises(NoRouteError, match="announced"):
        plan_route(SwarmSnapshot(model=None), 0)


def test_only_online_servers_and_not_excluded_peers_are_used() -> None:
    swarm = snapshot(
        draining=server(0, N, 99, NodeState.DRAINING),
        joining=server(0, N, 99, NodeState.JOINING),
        a=server(0, N, 1),
        b=server(0, N, 2),
    )
    assert plan_route(swarm, N) == [Hop("b", 0, N)]
    assert plan_route(swarm, N, exclude={"b"}) == [Hop("a", 0, N)]
    with pytest.raises(NoRouteError):
        plan_route(swarm, N, exclude={"a", "b"})


def test_choose_blocks_fills_the_thinnest_window() -> None:
    swarm = snapshot(a=server(0, 5), b=server(0, 5))
    assert choose_blocks(swarm, N, 5) == (5, 10)
    assert choose_blocks(snapshot(), N, 3) == (0, 3)
    assert choose_blocks(snapshot(), N, 99) == (0, N)
    draining = snapshot(a=server(0, 5), b=server(5, N, state=NodeState.DRAINING))
    assert choose_blocks(draining, N, 5) == (5, 10)


@pytest.mark.parametrize(("blocks", "parts"), [(30, 2), (30, 4), (7, 3), (5, 5)])
def test_split_evenly_covers_contiguously(blocks: int, parts: int) -> None:
    spans = split_evenly(blocks, parts)
    assert len(spans) == parts and spans[0][0] == 0 and spans[-1][1] == blocks
    assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))
    sizes = [e - s for s, e in spans]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("parts", [0, 11])
def test_split_evenly_rejects_impossible_splits(parts: int) -> None:
    with pytest.raises(ValueError):
        split_evenly(N, parts)
