"""What one hop of a route is expected to cost a session, in seconds.

A session's time on a hop is its decode steps plus its first (prefill) step:

    decode_tokens * (rtt + blocks * per_block_s * (1 + load))      every generated token
    + prefill * blocks * per_block_s * PREFILL_FACTOR               the prompt, in one step
    + ban_penalty_s                                                 if the peer failed lately

``per_block_s = 1 / (throughput * record.length)``: a server announces decode steps per
second through its *whole* span, so one of its blocks takes that share of a step. ``load``
is the streams it already serves (announced plus this gateway's own, fresher count): a
server shared by ``load`` other streams answers each of them about ``1 + load`` times more
slowly. ``prefill`` is the prompt less what the hop already caches for this session.

The cost is linear in ``blocks`` for a given server, prompt and cache, which is what lets
the planner find the cheapest chain in one sweep (see ``routing/planner.py``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass, field

from protocol.swarm import ServerRecord
from routing.snapshot import Hop

# A prompt token costs far less than a decode step: prefill runs all tokens of the step in
# one batched pass, so its time grows much more slowly than one step per token.
PREFILL_FACTOR = 0.1
# A server that has not measured its throughput yet (or announced 0) is assumed slow but
# usable: one second per block keeps it behind any measured server, not out of reach.
UNKNOWN_BLOCK_S = 1.0
# The step deadline of a server whose speed is unknown: no estimate to scale, so a cap.
UNKNOWN_DEADLINE_S = 120.0
# Costs are clamped here so that absurd inputs (an infinite load) sort last instead of
# turning the planner's arithmetic into inf - inf = NaN.
MAX_COST_S = 1e9


@dataclass(frozen=True)
class RouteCosts:
    """What a gateway knows beyond the snapshot; every field optional."""

    rtt_s: Mapping[str, float] = field(default_factory=dict)  # smoothed round trip per peer
    default_rtt_s: float = 0.005  # for peers never measured
    local_load: Mapping[str, int] = field(default_factory=dict)  # this gateway's open sessions
    banned: Set[str] = frozenset()  # failed recently: penalised, still a last resort
    ban_penalty_s: float = 30.0
    cached_hops: Sequence[Hop] = ()  # hops (peer, start, end) holding this session's cache
    cached_tokens: int = 0  # tokens those hops hold
    prompt_tokens: int = 1  # tokens the session's first step computes
    decode_tokens: int = 64  # tokens it is expected to generate


def per_block_s(record: ServerRecord) -> float:
    """Seconds one decode step spends in one of the server's blocks."""
    rate = record.throughput * record.length
    if not rate > 0:
        return UNKNOWN_BLOCK_S
    return min(1.0 / rate, MAX_COST_S)


def hop_terms(
    peer_id: str, record: ServerRecord, costs: RouteCosts, *, prefill: int
) -> tuple[float, float]:
    """``(fixed, per_block)``: a hop over ``blocks`` blocks costs ``fixed + blocks * per_block``.

    ``prefill`` is the number of prompt tokens the hop computes (the cache already subtracted).
    """
    rtt = _non_negative(costs.rtt_s.get(peer_id, costs.default_rtt_s))
    load = _non_negative(record.load + costs.local_load.get(peer_id, 0))
    decode = max(costs.decode_tokens, 0)
    fixed = decode * rtt
    if peer_id in costs.banned:
        fixed += _non_negative(costs.ban_penalty_s)
    unit = per_block_s(record) * (decode * (1.0 + load) + max(prefill, 0) * PREFILL_FACTOR)
    return min(fixed, MAX_COST_S), min(unit, MAX_COST_S)


def prefill_tokens(hop: Hop, costs: RouteCosts) -> int:
    """Prompt tokens ``hop`` computes: fewer where the server caches exactly that range."""
    if hop in costs.cached_hops:
        return max(costs.prompt_tokens - costs.cached_tokens, 0)
    return max(costs.prompt_tokens, 0)


def hop_cost(peer_id: str, record: ServerRecord, start: int, end: int, costs: RouteCosts) -> float:
    """Expected seconds that running blocks ``[start, end)`` on this server adds to a session."""
    prefill = prefill_tokens(Hop(peer_id, start, end), costs)
    fixed, unit = hop_terms(peer_id, record, costs, prefill=prefill)
    return fixed + max(end - start, 0) * unit


def step_deadline_s(
    record: ServerRecord, blocks: int, tokens: int, *, floor_s: float = 10.0, slack: float = 8.0
) -> float:
    """How long a hop may take to answer one step before the gateway treats it as failed.

    ``floor_s + slack * tokens * blocks * per_block_s``. The floor is generous on purpose:
    swarm servers often share their CPUs with other work, and a session's first step warms
    up caches and allocators, so a healthy server can be seconds slower than its announced
    throughput; declaring it dead would cost far more (a new route, a lost cache) than waiting.
    """
    if not record.throughput > 0:
        return max(floor_s, UNKNOWN_DEADLINE_S)
    return floor_s + slack * max(tokens, 0) * max(blocks, 0) * per_block_s(record)


def _non_negative(value: float) -> float:
    return value if value >= 0 else 0.0  # NaN too: an unusable measurement adds nothing
