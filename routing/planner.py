"""Choose the chain of servers that runs blocks ``[start, end)`` of the model, once per session.

The chain minimises the session's expected time, the sum of each hop's ``hop_cost``
(``routing/costs.py``): per generated token, a round trip to each hop plus its blocks' share
of its decode step, slowed by the streams it already serves; the prompt's prefill, less
what a hop already caches for this session; and a penalty for peers that failed lately.
So a chain trades hops (round trips) against fast, idle servers, and a gateway that counts
its open sessions per peer in ``RouteCosts.local_load`` sends the next session to an idle
replica: load spreading needs no other mechanism. Only online servers are eligible: joining
ones are not ready, draining ones take no new sessions. Banned peers are merely expensive,
so that a swarm whose only holder of some block failed once still serves.

How: block boundaries ``0..N`` form a DAG and a hop of server ``s`` from ``b`` to ``e``
costs ``fixed_s + (e - b) * unit_s``. Sweeping ``e`` upward, each server covering block
``e - 1`` keeps its best entry point ``min over b of dist[b] - b * unit_s``, so the best
hop of ``s`` ending at ``e`` costs ``entry_s + e * unit_s + fixed_s``: one step per (block,
server) pair, exact, with no enumeration of sub-ranges. Hops that hold this session's
cache are extra edges, as their discount applies to one exact range only.

A chain never visits a server twice: a server runs one stream per session (see the
sub-problems below), so the planner returns the cheapest chain among those that use each
server at most once, which rarely costs more than the one sweep.

Costs within a relative 1e-9 of each other are equal; ties go to fewer hops, then to the
smaller peer id of the last hop, then to the earliest boundary, so every gateway given the
same snapshot and costs picks the same chain whatever the order of its dictionaries.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass, field, replace
from typing import NamedTuple

from protocol.errors import NoRouteError
from protocol.swarm import ServerRecord
from routing.costs import RouteCosts, hop_cost, hop_terms
from routing.snapshot import Hop, SwarmSnapshot, coverage

__all__ = ["Hop", "plan_route", "route_cost", "route_covers"]

_TIE = 1e-9  # relative: float noise between equal chains must not decide, tie-breaks do
_INF = float("inf")


def plan_route(
    snapshot: SwarmSnapshot,
    end: int,
    *,
    start: int = 0,
    exclude: Set[str] = frozenset(),
    costs: RouteCosts | None = None,
) -> list[Hop]:
    """The cheapest chain of online servers not in ``exclude`` covering ``[start, end)``.

    ``NoRouteError`` names the uncovered blocks; ``ValueError`` for a range outside the model.
    """
    if snapshot.model is None or end <= 0:
        raise NoRouteError("no server of this model has announced itself yet")
    if not 0 <= start < end <= snapshot.num_blocks:
        raise ValueError(
            f"cannot plan blocks [{start}, {end}) of a {snapshot.num_blocks}-block model"
        )
    servers = {p: r for p, r in snapshot.online().items() if p not in exclude}
    swarm = _Swarm.of(servers, start, end, costs if costs is not None else RouteCosts())
    route = _cheapest_without_revisits(swarm)
    if route is None:
        raise NoRouteError(_describe_gap(servers, start, end, snapshot.num_blocks))
    return route


class _Server(NamedTuple):  # a tuple: a plan builds a thousand of them
    peer_id: str
    lo: int  # the blocks it may run in this plan, [lo, hi)
    hi: int
    fixed: float  # a hop over k blocks costs fixed + k * unit
    unit: float


@dataclass(frozen=True)
class _Swarm:
    """What one plan works on: eligible servers by peer id, costs already computed."""

    start: int
    end: int
    servers: tuple[_Server, ...]
    cached: tuple[tuple[Hop, float], ...]  # hops holding the session's cache, with their cost

    @classmethod
    def of(
        cls, servers: Mapping[str, ServerRecord], start: int, end: int, costs: RouteCosts
    ) -> _Swarm:
        eligible = []
        for peer_id, record in sorted(servers.items()):
            lo, hi = max(record.start, start), min(record.end, end)
            if lo < hi:
                fixed, unit = hop_terms(peer_id, record, costs, prefill=costs.prompt_tokens)
                eligible.append(_Server(peer_id, lo, hi, fixed, unit))
        cached = []
        for hop in sorted(set(costs.cached_hops), key=lambda h: (h.start, h.end, h.peer_id)):
            holder = servers.get(hop.peer_id)
            if holder is None or not start <= hop.start < hop.end <= end:
                continue
            if holder.start <= hop.start and hop.end <= holder.end:  # else its cache is gone
                cached.append((hop, hop_cost(hop.peer_id, holder, hop.start, hop.end, costs)))
        return cls(start, end, tuple(eligible), tuple(cached))


# ---- one server, one hop: no revisits ----
#
# The sweep may return a chain that visits a server twice (a slow server holding every
# block around a fast one holding the middle: A, F, A). A server runs one stream per
# session, and a second one for the same session waits, then gets a cold fork of the
# cache. So such a chain is split into sub-problems that each forbid it (best first, so
# the first chain without revisits is the cheapest of all such chains). For a server A
# visited on [a1, b1) and again on [a2, b2), a chain using A at most once, on [x, y), has
# y <= a2 (A limited to blocks below a2), or x >= b1 (A limited to blocks from b1), or it
# runs A across the whole gap [b1, a2) (nobody else may run those blocks). When the
# visits touch (b1 == a2, which only a cached hop can cause), the third case is A
# crossing b1, which excludes A's cached hops that end or start there.

_MAX_SUBPROBLEMS = 64  # past this, merge the revisits instead: bounded time, near optimal


@dataclass(frozen=True)
class _Limits:
    """What a sub-problem forbids."""

    clip: Mapping[str, tuple[int, int]] = field(default_factory=dict)  # peer → allowed blocks
    reserved: tuple[tuple[str, int, int], ...] = ()  # (peer, lo, hi): only peer runs [lo, hi)
    dropped: frozenset[Hop] = frozenset()  # cached hops not to use


def _cheapest_without_revisits(swarm: _Swarm) -> list[Hop] | None:
    first = _cheapest_chain(swarm, _Limits())
    if first is None:
        return None
    queue = [(first[0], len(first[1]), 0, first[1], _Limits())]
    solved = 1
    while queue:
        _, _, _, route, limits = heapq.heappop(queue)
        revisit = _first_revisit(route)
        if revisit is None:
            return route
        if solved >= _MAX_SUBPROBLEMS:
            return _merge_revisits(route)
        for child in _split(swarm, limits, revisit):
            found = _cheapest_chain(swarm, child)
            solved += 1
            if found is not None:
                heapq.heappush(queue, (found[0], len(found[1]), solved, found[1], child))
    return _merge_revisits(first[1])  # unreachable: merging makes a chain in some sub-problem


def _first_revisit(route: Sequence[Hop]) -> tuple[str, int, int] | None:
    """``(peer, b1, a2)`` for the first server visited twice: it ends at b1, returns at a2."""
    last: dict[str, Hop] = {}
    for hop in route:
        before = last.get(hop.peer_id)
        if before is not None:
            return hop.peer_id, before.end, hop.start
        last[hop.peer_id] = hop
    return None


def _split(swarm: _Swarm, limits: _Limits, revisit: tuple[str, int, int]) -> list[_Limits]:
    peer, b1, a2 = revisit
    lo, hi = limits.clip.get(peer, (swarm.start, swarm.end))
    children = [
        replace(limits, clip={**limits.clip, peer: (lo, min(hi, a2))}),
        replace(limits, clip={**limits.clip, peer: (max(lo, b1), hi)}),
    ]
    if b1 < a2:
        children.append(replace(limits, reserved=(*limits.reserved, (peer, b1, a2))))
    else:
        touching = {h for h, _ in swarm.cached if h.peer_id == peer and b1 in (h.start, h.end)}
        if not touching <= limits.dropped:
            children.append(replace(limits, dropped=limits.dropped | touching))
    return children


def _merge_revisits(route: Sequence[Hop]) -> list[Hop]:
    """One hop from a server's first visit to its last: it holds every block in between."""
    merged = list(route)
    while (revisit := _first_revisit(merged)) is not None:
        peer = revisit[0]
        first = next(i for i, h in enumerate(merged) if h.peer_id == peer)
        last = max(i for i, h in enumerate(merged) if h.peer_id == peer)
        hop = Hop(peer, merged[first].start, merged[last].end)
        merged[first : last + 1] = [hop]
    return merged


# ---- the sweep ----


def _pieces(server: _Server, limits: _Limits) -> list[tuple[int, int]]:
    """The block ranges ``server`` may run under ``limits``."""
    lo, hi = server.lo, server.hi
    if server.peer_id in limits.clip:
        clip_lo, clip_hi = limits.clip[server.peer_id]
        lo, hi = max(lo, clip_lo), min(hi, clip_hi)
    pieces = [(lo, hi)] if lo < hi else []
    for owner, r_lo, r_hi in limits.reserved:
        if owner != server.peer_id:
            pieces = [
                (a, b)
                for p_lo, p_hi in pieces
                for a, b in ((p_lo, min(p_hi, r_lo)), (max(p_lo, r_hi), p_hi))
                if a < b
            ]
    return pieces


def _cheapest_chain(swarm: _Swarm, limits: _Limits) -> tuple[float, list[Hop]] | None:
    """The cheapest chain under ``limits`` (revisits allowed) and its cost; one sweep."""
    start, n = swarm.start, swarm.end - swarm.start  # boundaries relative to start: 0..n
    ids: list[str] = []
    fixed: list[float] = []
    unit: list[float] = []
    last_end: list[int] = []
    opening: list[list[int]] = [[] for _ in range(n)]
    allowed: dict[str, list[tuple[int, int]]] = {}
    for server in swarm.servers:
        pieces = _pieces(server, limits) if limits.clip or limits.reserved else None
        if pieces is not None:
            allowed[server.peer_id] = pieces
        for lo, hi in pieces if pieces is not None else [(server.lo, server.hi)]:
            opening[lo - start].append(len(ids))
            ids.append(server.peer_id)
            fixed.append(server.fixed)
            unit.append(server.unit)
            last_end.append(hi - start)
    cached: list[list[tuple[int, str, float]]] = [[] for _ in range(n + 1)]
    for hop, cost in swarm.cached:
        pieces = allowed.get(hop.peer_id, [(hop.start, hop.end)])
        if hop not in limits.dropped and any(a <= hop.start and hop.end <= b for a, b in pieces):
            cached[hop.end - start].append((hop.start - start, hop.peer_id, cost))

    # The best chain to each boundary: cost, hops, last hop (peer, from), and the window of
    # costs that count as a tie with it.
    dist = [_INF] * (n + 1)
    hops = [0] * (n + 1)
    last_peer = [""] * (n + 1)
    last_from = [0] * (n + 1)
    below = [_INF] * (n + 1)
    above = [_INF] * (n + 1)
    dist[0] = below[0] = above[0] = 0.0
    # The best entry point of each server: value, hops once through it, boundary.
    entry = [_INF] * len(ids)
    entry_hops = [0] * len(ids)
    entry_at = [0] * len(ids)
    active: list[int] = []  # servers holding block e, the one that stops first last
    for e in range(n + 1):
        for a, peer_id, cost in cached[e]:  # every chain to a is final: a < e
            if dist[a] == _INF:
                continue
            c, h = dist[a] + cost, hops[a] + 1
            if c < below[e] or (
                c <= above[e] and (h, peer_id, a) < (hops[e], last_peer[e], last_from[e])
            ):
                dist[e], hops[e], last_peer[e], last_from[e] = c, h, peer_id, a
                below[e], above[e] = _window(c)
        if e == n:
            break
        for i in opening[e]:
            bisect.insort(active, i, key=lambda j: -last_end[j])
        d, h, e1 = dist[e], hops[e] + 1, e + 1
        tie = _TIE * (1.0 + d) if d < _INF else 0.0
        best, best_hops, best_peer, best_from = _INF, 0, "", 0
        low = high = _INF
        for i in active:  # the hot loop: O(1) per (block, server)
            u = unit[i]
            v, w = entry[i], d - e * u
            if w < v - tie or (w <= v + tie and h < entry_hops[i]):  # a better entry at e
                entry[i] = v = w
                entry_hops[i], entry_at[i] = h, e
            elif v == _INF:  # neither e nor any earlier block of this server is reachable
                continue
            c = v + e1 * u + fixed[i]
            if c < low or (
                c <= high
                and (entry_hops[i], ids[i], entry_at[i]) < (best_hops, best_peer, best_from)
            ):
                best, best_hops, best_peer, best_from = c, entry_hops[i], ids[i], entry_at[i]
                low, high = _window(c)
        dist[e1], hops[e1], last_peer[e1], last_from[e1] = best, best_hops, best_peer, best_from
        below[e1], above[e1] = low, high
        while active and last_end[active[-1]] == e1:
            active.pop()

    if dist[n] == _INF:
        return None
    route: list[Hop] = []
    e = n
    while e > 0:
        route.append(Hop(last_peer[e], last_from[e] + start, e + start))
        e = last_from[e]
    return dist[n], route[::-1]


def _window(cost: float) -> tuple[float, float]:
    t = _TIE * (1.0 + cost)
    return cost - t, cost + t


def _describe_gap(
    servers: Mapping[str, ServerRecord], start: int, end: int, num_blocks: int
) -> str:
    if not servers:
        return "no online servers in the swarm"
    missing = [b for b, n in enumerate(coverage(servers, end)) if n == 0 and b >= start]
    runs: list[list[int]] = []
    for block in missing:  # consecutive missing blocks as one run: "2..3, 7"
        if runs and runs[-1][-1] == block - 1:
            runs[-1].append(block)
        else:
            runs.append([block])
    listed = ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}..{r[-1]}" for r in runs)
    blocks = f"block {listed}" if len(missing) == 1 else f"blocks {listed}"
    return f"no online server holds {blocks} (of {num_blocks})"


def route_covers(route: Sequence[Hop], start: int, end: int) -> bool:
    """Whether ``route`` runs blocks ``[start, end)`` once each, in order, with no empty hop."""
    if not route or route[0].start != start or route[-1].end != end:
        return False
    if any(h.end <= h.start for h in route):
        return False
    return all(a.end == b.start for a, b in itertools.pairwise(route))


def route_cost(
    snapshot: SwarmSnapshot, route: Sequence[Hop], costs: RouteCosts | None = None
) -> float:
    """The expected seconds of ``route``: the sum of its hops' ``hop_cost``."""
    costs = costs if costs is not None else RouteCosts()
    total = 0.0
    for hop in route:
        record = snapshot.servers.get(hop.peer_id)
        if record is None:
            raise ValueError(f"{hop.peer_id} is not in the snapshot")
        total += hop_cost(hop.peer_id, record, hop.start, hop.end, costs)
    return total
