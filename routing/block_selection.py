"""Which span a joining server should take: the least-covered window of blocks."""

from __future__ import annotations

import itertools

from protocol.swarm import NodeState
from routing.snapshot import SwarmSnapshot, coverage


def choose_blocks(snapshot: SwarmSnapshot, num_blocks: int, length: int) -> tuple[int, int]:
    """``[start, end)`` of ``length`` blocks where the swarm is thinnest.

    Windows are compared by their weakest block first (a gap is worse than anything), then
    by total coverage; ties go to the lowest start so that the choice is deterministic.
    Draining servers are about to leave, so their blocks count as uncovered.
    """
    if num_blocks <= 0:
        raise ValueError(f"a model has at least one block, got {num_blocks}")
    length = max(1, min(length, num_blocks))
    staying = {p: r for p, r in snapshot.servers.items() if r.state is not NodeState.DRAINING}
    counts = coverage(staying, num_blocks)
    starts = range(num_blocks - length + 1)
    start = min(starts, key=lambda s: (min(counts[s : s + length]), sum(counts[s : s + length]), s))
    return start, start + length


def split_evenly(num_blocks: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous spans covering ``[0, num_blocks)``, sizes differing by at most 1."""
    if not 0 < parts <= num_blocks:
        raise ValueError(f"cannot split {num_blocks} blocks into {parts} spans")
    bounds = [round(i * num_blocks / parts) for i in range(parts + 1)]
    return list(itertools.pairwise(bounds))
