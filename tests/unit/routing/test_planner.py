"""plan_route: the chain of servers a session uses, decided from a snapshot alone."""

from __future__ import annotations

import functools
import itertools
import math
import random
from collections.abc import Set

import pytest

from protocol.errors import NoRouteError
from protocol.swarm import ModelRecord, NodeState, ServerRecord
from routing.costs import RouteCosts, hop_cost
from routing.planner import Hop, plan_route, route_cost, route_covers
from routing.snapshot import SwarmSnapshot, coverage


def record(
    start: int,
    end: int,
    throughput: float = 10.0,
    state: NodeState = NodeState.ONLINE,
    load: float = 0.0,
) -> ServerRecord:
    return ServerRecord(state=state, start=start, end=end, throughput=throughput, load=load)


def snap(num_blocks: int, servers: dict[str, ServerRecord]) -> SwarmSnapshot:
    model = ModelRecord(
        name="m", architecture="llama", num_blocks=num_blocks, hidden_size=8, max_length=128
    )
    return SwarmSnapshot(model=model, servers=servers)


def brute_force(
    snapshot: SwarmSnapshot,
    start: int,
    end: int,
    *,
    exclude: Set[str] = frozenset(),
    costs: RouteCosts | None = None,
    revisits: bool = False,
) -> float:
    """The cheapest cost over every chain (that visits each server once unless ``revisits``),
    by trying every hop of every server at every boundary; inf when there is none."""
    costs = costs or RouteCosts()
    servers = {p: r for p, r in snapshot.online().items() if p not in exclude}

    @functools.cache
    def cheapest(position: int, used: frozenset[str]) -> float:
        if position == end:
            return 0.0
        found = math.inf
        for peer_id, r in servers.items():
            if (peer_id in used and not revisits) or not r.start <= position < r.end:
                continue
            for stop in range(position + 1, min(r.end, end) + 1):
                cost = hop_cost(peer_id, r, position, stop, costs)
                found = min(found, cost + cheapest(stop, used | {peer_id}))
        return found

    return cheapest(start, frozenset())


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


# ---- preferences: the cheapest chain ----


def test_a_round_trip_per_hop_makes_one_hop_beat_two_of_the_same_speed() -> None:
    # Every server spends 10 ms per block of a step; the split adds a round trip per token.
    s = snap(
        10,
        {
            "full": record(0, 10, throughput=10.0),
            "half-a": record(0, 5, throughput=20.0),
            "half-b": record(5, 10, throughput=20.0),
        },
    )
    assert plan_route(s, 10) == [Hop("full", 0, 10)]


def test_much_faster_servers_are_worth_an_extra_hop() -> None:
    s = snap(
        10,
        {
            "slow-full": record(0, 10, throughput=1.0),
            "fast-a": record(0, 5, throughput=1000.0),
            "fast-b": record(5, 10, throughput=1000.0),
        },
    )
    assert plan_route(s, 10) == [Hop("fast-a", 0, 5), Hop("fast-b", 5, 10)]


def test_far_peers_cost_a_round_trip_per_token() -> None:
    servers = {"near": record(0, 8), "far": record(0, 8)}
    far = RouteCosts(rtt_s={"near": 0.001, "far": 0.2})
    assert plan_route(snap(8, servers), 8, costs=far) == [Hop("near", 0, 8)]
    near = RouteCosts(rtt_s={"near": 0.2, "far": 0.001})
    assert plan_route(snap(8, servers), 8, costs=near) == [Hop("far", 0, 8)]


def test_a_loaded_server_loses_to_an_idle_one() -> None:
    servers = {"busy": record(0, 8, load=3), "idle": record(0, 8, load=0)}
    assert plan_route(snap(8, servers), 8) == [Hop("idle", 0, 8)]


def test_the_faster_server_takes_the_overlap() -> None:
    # slow: 8 blocks at 1 step/s; fast: 8 blocks at 10 steps/s. Overlap 4..8 goes to fast.
    s = snap(12, {"slow": record(0, 8, throughput=1.0), "fast": record(4, 12, throughput=10.0)})
    assert plan_route(s, 12) == [Hop("slow", 0, 4), Hop("fast", 4, 12)]


def test_a_hop_may_be_a_sub_range_in_the_middle_of_a_span() -> None:
    s = snap(
        12,
        {
            "head": record(0, 4, throughput=100.0),
            "wide": record(0, 12, throughput=2.0),
            "tail": record(8, 12, throughput=100.0),
        },
    )
    assert plan_route(s, 12) == [Hop("head", 0, 4), Hop("wide", 4, 8), Hop("tail", 8, 12)]


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


@pytest.mark.parametrize("with_full", [True, False])
def test_route_is_the_same_whatever_the_snapshot_order(with_full: bool) -> None:
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
    assert len(routes) == 1
    (route,) = routes
    assert route_cost(snap(12, servers), route) == pytest.approx(
        brute_force(snap(12, servers), 0, 12)
    )


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


# ---- exact: the same cost as trying every chain ----


def random_case(
    rng: random.Random,
) -> tuple[SwarmSnapshot, int, int, frozenset[str], RouteCosts]:
    """A small random swarm and gateway state; spans may run past the model's end."""
    blocks = rng.randint(1, 6)
    servers = {}
    for k in range(rng.randint(0, 5)):
        first = rng.randrange(blocks)
        state = rng.choices(list(NodeState), weights=[1, 8, 1])[0]
        servers[f"p{k}"] = ServerRecord(
            state=state,
            start=first,
            end=rng.randint(first + 1, blocks + 1),
            throughput=rng.choice(
                [0.0, rng.uniform(0.1, 2.0), rng.uniform(20.0, 200.0)]
            ),  # slow|fast
            load=float(rng.randint(0, 3)),
        )
    peers = sorted(servers)
    cached = []
    for peer_id in rng.sample(peers, min(len(peers), rng.randint(0, 2))):
        r = servers[peer_id]
        first = rng.randint(r.start, min(r.end, blocks) - 1)
        cached.append(Hop(peer_id, first, rng.randint(first + 1, min(r.end, blocks))))
    costs = RouteCosts(
        rtt_s={p: rng.uniform(0.0, 0.05) for p in rng.sample(peers, len(peers) // 2)},
        default_rtt_s=rng.choice([0.0, 0.005]),
        local_load={p: rng.randint(0, 3) for p in rng.sample(peers, len(peers) // 2)},
        banned=frozenset(rng.sample(peers, min(len(peers), rng.randint(0, 2)))),
        ban_penalty_s=rng.choice([0.5, 30.0]),
        cached_hops=tuple(cached),
        cached_tokens=rng.randint(0, 50),
        prompt_tokens=rng.randint(0, 60),
        decode_tokens=rng.choice([0, 1, 64]),
    )
    start = rng.randrange(blocks)
    end = rng.randint(start + 1, blocks)
    exclude = frozenset(rng.sample(peers, min(len(peers), rng.randint(0, 1))))
    return snap(blocks, servers), start, end, exclude, costs


def test_the_plan_costs_what_the_cheapest_of_all_chains_costs() -> None:
    rng = random.Random(1234)
    planned = revisits_avoided = 0
    for _ in range(400):
        s, start, end, exclude, costs = random_case(rng)
        best = brute_force(s, start, end, exclude=exclude, costs=costs)
        if best == math.inf:
            with pytest.raises(NoRouteError):
                plan_route(s, end, start=start, exclude=exclude, costs=costs)
            continue
        route = plan_route(s, end, start=start, exclude=exclude, costs=costs)
        assert route_cost(s, route, costs) == pytest.approx(best, rel=1e-9, abs=1e-12)
        assert route_covers(route, start, end)
        assert len({h.peer_id for h in route}) == len(route), "a server visited twice"
        online = s.online()
        for hop in route:
            assert hop.peer_id in online and hop.peer_id not in exclude
            assert online[hop.peer_id].start <= hop.start < hop.end <= online[hop.peer_id].end
        planned += 1
        revisiting = brute_force(s, start, end, exclude=exclude, costs=costs, revisits=True)
        revisits_avoided += revisiting < best * (1 - 1e-6)
    assert planned > 200  # the cases are not mostly gaps
    assert revisits_avoided > 0  # and some needed the planner to refuse a cheaper revisit


def test_the_cheapest_chain_without_revisits_is_found_in_slow_wide_swarms() -> None:
    # A slow server holding every block among fast short ones: the cheapest chains would
    # often come back to it, so the planner has to search among the others.
    rng = random.Random(7)
    revisits_avoided = 0
    for _ in range(150):
        blocks = rng.randint(3, 6)
        servers = {"wide": record(0, blocks, throughput=rng.uniform(0.2, 2.0))}
        for k in range(rng.randint(1, 4)):
            first = rng.randrange(blocks)
            servers[f"f{k}"] = record(
                first, rng.randint(first + 1, blocks), throughput=rng.uniform(20.0, 200.0)
            )
        cached = (Hop("wide", 0, rng.randint(1, blocks)),) if rng.random() < 0.3 else ()
        costs = RouteCosts(
            rtt_s={p: rng.uniform(0.0, 0.02) for p in servers},
            cached_hops=cached,
            cached_tokens=rng.randint(0, 500),
            prompt_tokens=500,
        )
        s = snap(blocks, servers)
        best = brute_force(s, 0, blocks, costs=costs)
        route = plan_route(s, blocks, costs=costs)
        assert route_cost(s, route, costs) == pytest.approx(best, rel=1e-9, abs=1e-12)
        assert len({h.peer_id for h in route}) == len(route)
        revisiting = brute_force(s, 0, blocks, costs=costs, revisits=True)
        revisits_avoided += revisiting < best * (1 - 1e-6)
    assert revisits_avoided > 20


def test_plans_do_not_depend_on_dictionary_order() -> None:
    rng = random.Random(99)
    for _ in range(100):
        s, start, end, exclude, costs = random_case(rng)
        flipped_costs = RouteCosts(
            rtt_s=dict(reversed(list(costs.rtt_s.items()))),
            default_rtt_s=costs.default_rtt_s,
            local_load=dict(reversed(list(costs.local_load.items()))),
            banned=set(costs.banned),
            ban_penalty_s=costs.ban_penalty_s,
            cached_hops=tuple(reversed(costs.cached_hops)),
            cached_tokens=costs.cached_tokens,
            prompt_tokens=costs.prompt_tokens,
            decode_tokens=costs.decode_tokens,
        )
        assert s.model is not None
        flipped = SwarmSnapshot(s.model, dict(reversed(list(s.servers.items()))))
        try:
            route = plan_route(s, end, start=start, exclude=exclude, costs=costs)
        except NoRouteError:
            continue
        assert plan_route(flipped, end, start=start, exclude=exclude, costs=flipped_costs) == route


# ---- a server once per chain ----


def test_a_server_is_not_visited_twice_even_when_that_would_be_cheaper() -> None:
    # slow, fast, slow would be cheapest, but a server runs one stream per session.
    servers = {"slow": record(0, 12, throughput=1.0), "fast": record(3, 9, throughput=100.0)}
    s = snap(12, servers)
    assert brute_force(s, 0, 12, revisits=True) < brute_force(s, 0, 12)
    assert plan_route(s, 12) == [Hop("slow", 0, 12)]


def test_without_a_revisit_the_next_cheapest_chain_is_found() -> None:
    servers = {
        "slow": record(0, 12, throughput=1.0),
        "fast": record(3, 9, throughput=100.0),
        "head": record(0, 3, throughput=20.0),
    }
    route = plan_route(snap(12, servers), 12)
    assert route == [Hop("head", 0, 3), Hop("fast", 3, 9), Hop("slow", 9, 12)]


def test_a_cached_hop_next_to_the_same_server_is_not_a_second_stream() -> None:
    # Caches on slow [0, 4) make slow(0,4) + slow(4,12) the cheapest pair of hops.
    servers = {"slow": record(0, 12, throughput=1.0)}
    costs = RouteCosts(cached_hops=(Hop("slow", 0, 4),), cached_tokens=1000, prompt_tokens=1000)
    assert plan_route(snap(12, servers), 12, costs=costs) == [Hop("slow", 0, 12)]


# ---- ranges ----


def test_a_failed_span_is_replaced_on_its_own() -> None:
    # The session's hop on "dead" ran [3, 7); the rest of its chain stays where it is.
    servers = {
        "dead": record(0, 10),
        "wide": record(2, 8),
        "left": record(3, 5),
        "right": record(5, 7),
    }
    route = plan_route(snap(10, servers), 7, start=3, exclude={"dead"})
    assert route == [Hop("wide", 3, 7)]
    assert route_covers(route, 3, 7)


def test_a_range_only_needs_servers_for_its_blocks() -> None:
    s = snap(10, {"mid": record(3, 7)})
    assert plan_route(s, 6, start=4) == [Hop("mid", 4, 6)]
    with pytest.raises(NoRouteError):
        plan_route(s, 10)


def test_a_gap_in_a_range_names_only_the_range() -> None:
    s = snap(10, {"a": record(0, 5), "b": record(7, 9)})
    with pytest.raises(NoRouteError, match=r"holds blocks 5\.\.6 \(of 10\)$"):
        plan_route(s, 9, start=2)


@pytest.mark.parametrize(("start", "end"), [(-1, 5), (5, 5), (6, 5), (0, 11)])
def test_a_range_outside_the_model_is_a_value_error(start: int, end: int) -> None:
    with pytest.raises(ValueError, match="cannot plan"):
        plan_route(snap(10, {"a": record(0, 10)}), end, start=start)


# ---- what the gateway knows ----


def test_concurrent_sessions_spread_over_equal_replicas() -> None:
    s = snap(8, {"r1": record(0, 8), "r2": record(0, 8)})
    local_load: dict[str, int] = {}
    chosen = []
    for _ in range(6):
        (hop,) = plan_route(s, 8, costs=RouteCosts(local_load=local_load))
        chosen.append(hop.peer_id)
        local_load[hop.peer_id] = local_load.get(hop.peer_id, 0) + 1
    assert chosen == ["r1", "r2"] * 3


def test_a_banned_peer_is_avoided_while_another_can_serve() -> None:
    s = snap(8, {"a": record(0, 8, throughput=50.0), "b": record(0, 8, throughput=5.0)})
    assert plan_route(s, 8) == [Hop("a", 0, 8)]
    assert plan_route(s, 8, costs=RouteCosts(banned={"a"})) == [Hop("b", 0, 8)]


def test_a_banned_peer_is_the_last_resort() -> None:
    s = snap(8, {"a": record(0, 4), "only": record(4, 8)})
    route = plan_route(s, 8, costs=RouteCosts(banned={"only"}))
    assert route == [Hop("a", 0, 4), Hop("only", 4, 8)]


def test_a_cached_hop_wins_over_an_equal_replica() -> None:
    s = snap(8, {"r1": record(0, 8), "r2": record(0, 8)})
    costs = RouteCosts(cached_hops=(Hop("r2", 0, 8),), cached_tokens=500, prompt_tokens=600)
    assert plan_route(s, 8, costs=costs) == [Hop("r2", 0, 8)]


def test_a_cache_on_another_range_is_no_bonus() -> None:
    s = snap(8, {"r1": record(0, 8), "r2": record(0, 8)})
    costs = RouteCosts(cached_hops=(Hop("r2", 0, 4),), cached_tokens=5, prompt_tokens=6)
    assert plan_route(s, 8, costs=costs) == [Hop("r1", 0, 8)]


def test_a_much_faster_server_beats_a_slow_cached_one_for_a_short_prompt() -> None:
    s = snap(8, {"cached": record(0, 8, throughput=1.0), "fast": record(0, 8, throughput=100.0)})
    costs = RouteCosts(cached_hops=(Hop("cached", 0, 8),), cached_tokens=9, prompt_tokens=10)
    assert plan_route(s, 8, costs=costs) == [Hop("fast", 0, 8)]


# ---- remembered routes ----


def test_route_covers_wants_contiguous_non_empty_hops() -> None:
    assert route_covers([Hop("a", 0, 3), Hop("b", 3, 5)], 0, 5)
    assert route_covers([Hop("a", 2, 5)], 2, 5)
    assert not route_covers([], 0, 5)
    assert not route_covers([Hop("a", 0, 3), Hop("b", 4, 5)], 0, 5)  # a gap
    assert not route_covers([Hop("a", 0, 3), Hop("b", 2, 5)], 0, 5)  # an overlap
    assert not route_covers([Hop("a", 0, 5), Hop("b", 5, 5)], 0, 5)  # an empty hop
    assert not route_covers([Hop("a", 0, 4)], 0, 5)


def test_route_cost_sums_the_hops() -> None:
    s = snap(10, {"a": record(0, 5), "b": record(5, 10, throughput=2.0)})
    route = [Hop("a", 0, 5), Hop("b", 5, 10)]
    costs = RouteCosts(decode_tokens=10)
    expected = hop_cost("a", s.servers["a"], 0, 5, costs) + hop_cost(
        "b", s.servers["b"], 5, 10, costs
    )
    assert route_cost(s, route, costs) == pytest.approx(expected)
    with pytest.raises(ValueError, match="not in the snapshot"):
        route_cost(s, [Hop("ghost", 0, 10)])


def test_past_the_search_budget_revisits_are_merged_into_one_hop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    servers = {
        "slow": record(0, 12, throughput=1.0),  # 83 ms per block
        "fast": record(3, 9, throughput=100.0),
        "head": record(0, 3, throughput=3.5),  # 95 ms per block: slow, fast, slow is cheaper
    }
    exact = [Hop("head", 0, 3), Hop("fast", 3, 9), Hop("slow", 9, 12)]
    assert plan_route(snap(12, servers), 12) == exact
    monkeypatch.setattr("routing.planner._MAX_SUBPROBLEMS", 1)
    # The first sweep's slow, fast, slow becomes one hop of slow: valid, if not the cheapest.
    assert plan_route(snap(12, servers), 12) == [Hop("slow", 0, 12)]
