"""hop_cost and step_deadline_s: what a hop costs a session, and how long to wait for it."""

from __future__ import annotations

import math

import pytest

from protocol.swarm import PROTOCOL_VERSION, NodeState, ServerRecord
from routing.costs import (
    PREFILL_FACTOR,
    UNKNOWN_BLOCK_S,
    UNKNOWN_DEADLINE_S,
    RouteCosts,
    hop_cost,
    per_block_s,
    step_deadline_s,
)
from routing.snapshot import Hop


def record(
    start: int = 0, end: int = 10, throughput: float = 10.0, load: float = 0.0
) -> ServerRecord:
    # Built without validation: the cost model must stay finite even for values that
    # records now refuse at the wire, in case a caller builds one by hand.
    return ServerRecord.model_construct(
        version=PROTOCOL_VERSION,
        state=NodeState.ONLINE,
        start=start,
        end=end,
        throughput=throughput,
        load=load,
    )


def test_a_block_takes_its_share_of_the_whole_span_step() -> None:
    assert per_block_s(record(0, 10, throughput=10.0)) == pytest.approx(0.01)
    assert per_block_s(record(0, 10, throughput=0.0)) == UNKNOWN_BLOCK_S


def test_the_cost_formula() -> None:
    r = record(0, 10, throughput=10.0, load=1.0)  # 10 ms per block
    costs = RouteCosts(rtt_s={"p": 0.02}, local_load={"p": 2}, prompt_tokens=100, decode_tokens=50)
    decode = 50 * (0.02 + 4 * 0.01 * (1 + 1 + 2))
    prefill = 100 * 4 * 0.01 * PREFILL_FACTOR
    assert hop_cost("p", r, 2, 6, costs) == pytest.approx(decode + prefill)


def test_unmeasured_peers_get_the_default_round_trip() -> None:
    costs = RouteCosts(default_rtt_s=0.1, decode_tokens=10, prompt_tokens=0)
    assert hop_cost("p", record(throughput=1e12), 0, 1, costs) == pytest.approx(1.0)


def test_a_ban_adds_its_penalty() -> None:
    costs = RouteCosts(banned={"p"}, ban_penalty_s=30.0)
    plain = hop_cost("q", record(), 0, 10, costs)
    assert hop_cost("p", record(), 0, 10, costs) == pytest.approx(plain + 30.0)


def test_a_cache_saves_prefill_only_on_its_exact_range() -> None:
    r = record(0, 10)
    costs = RouteCosts(
        cached_hops=(Hop("p", 0, 5),), cached_tokens=80, prompt_tokens=100, decode_tokens=0
    )
    blocks_s = 5 * 0.01 * PREFILL_FACTOR
    assert hop_cost("p", r, 0, 5, costs) == pytest.approx(20 * blocks_s)
    assert hop_cost("p", r, 0, 4, costs) == pytest.approx(100 * blocks_s * 4 / 5)
    assert hop_cost("q", r, 0, 5, costs) == pytest.approx(100 * blocks_s)
    more = RouteCosts(cached_hops=(Hop("p", 0, 5),), cached_tokens=500, prompt_tokens=100)
    assert hop_cost("p", r, 0, 5, more) == hop_cost("p", r, 0, 5, RouteCosts(prompt_tokens=0))


def test_costs_are_never_negative_nor_nan() -> None:
    costs = RouteCosts(
        rtt_s={"p": -1.0, "q": math.nan},
        local_load={"p": -5},
        ban_penalty_s=-3.0,
        banned={"p"},
        prompt_tokens=-10,
        decode_tokens=-4,
    )
    for peer in ("p", "q"):
        cost = hop_cost(peer, record(), 0, 10, costs)
        assert cost >= 0 and not math.isnan(cost)


def test_absurd_inputs_give_a_large_finite_cost() -> None:
    r = record(throughput=1e-300, load=math.inf)
    cost = hop_cost("p", r, 0, 10, RouteCosts(rtt_s={"p": math.inf}))
    assert math.isfinite(cost) and cost > 1e6


def test_more_blocks_more_tokens_more_load_cost_more() -> None:
    base = hop_cost("p", record(), 0, 5, RouteCosts())
    assert hop_cost("p", record(), 0, 6, RouteCosts()) > base
    assert hop_cost("p", record(load=1), 0, 5, RouteCosts()) > base
    assert hop_cost("p", record(), 0, 5, RouteCosts(decode_tokens=65)) > base
    assert hop_cost("p", record(), 0, 5, RouteCosts(prompt_tokens=100)) > base


def test_a_step_deadline_scales_with_the_work_above_a_floor() -> None:
    r = record(0, 10, throughput=10.0)  # 10 ms per block per token
    assert step_deadline_s(r, 5, 1) == pytest.approx(10.0 + 8 * 1 * 5 * 0.01)
    assert step_deadline_s(r, 5, 1000, floor_s=1.0, slack=2.0) == pytest.approx(1 + 2 * 50.0)
    assert step_deadline_s(r, 0, 0) == 10.0


def test_an_unknown_speed_gets_a_generous_cap() -> None:
    assert step_deadline_s(record(throughput=0.0), 10, 1000) == UNKNOWN_DEADLINE_S
    assert step_deadline_s(record(throughput=0.0), 1, 1, floor_s=300.0) == 300.0
