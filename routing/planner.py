"""Choose the chain of servers that runs every block of the model, once per session.

The rule: fewest hops first (each hop costs a network round trip per token), then the
highest bottleneck throughput (a chain decodes no faster than its slowest server), then
peer ids in order so that every gateway picks the same chain for the same snapshot.
Spans may overlap: a hop may use only a sub-range of what its server holds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass

from protocol.errors import NoRouteError
from protocol.swarm import ServerRecord
from routing.snapshot import SwarmSnapshot, coverage


@dataclass(frozen=True)
class Hop:
    peer_id: str
    start: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class _Path:
    bottleneck: float
    hops: tuple[Hop, ...]

    def better_than(self, other: _Path | None) -> bool:
        if other is None:
            return True
        if self.bottleneck != other.bottleneck:
            return self.bottleneck > other.bottleneck
        return [h.peer_id for h in self.hops] < [h.peer_id for h in other.hops]


def plan_route(
    snapshot: SwarmSnapshot, num_blocks: int, *, exclude: Set[str] = frozenset()
) -> list[Hop]:
    """The best chain covering blocks ``[0, num_blocks)``; ``NoRouteError`` if none exists."""
    servers = {p: r for p, r in snapshot.online().items() if p not in exclude}
    if num_blocks <= 0:
        raise NoRouteError("no server of this model has announced itself yet")
    # best[b]: the best path with exactly k hops that ends at block boundary b.
    best: dict[int, _Path] = {0: _Path(float("inf"), ())}
    for _ in range(num_blocks):
        best = _extend(best, servers, num_blocks)
        if num_blocks in best:
            return list(best[num_blocks].hops)
        if not best:
            break
    raise NoRouteError(_describe_gap(servers, num_blocks))


def _extend(
    paths: Mapping[int, _Path], servers: Mapping[str, ServerRecord], num_blocks: int
) -> dict[int, _Path]:
    extended: dict[int, _Path] = {}
    for position, path in paths.items():
        for peer_id, record in servers.items():
            if not record.start <= position < record.end:
                continue
            for end in range(position + 1, min(record.end, num_blocks) + 1):
                candidate = _Path(
                    min(path.bottleneck, record.throughput),
                    (*path.hops, Hop(peer_id, position, end)),
                )
                if candidate.better_than(extended.get(end)):
                    extended[end] = candidate
    return extended


def _describe_gap(servers: Mapping[str, ServerRecord], num_blocks: int) -> str:
    if not servers:
        return "no online servers in the swarm"
    missing = [b for b, n in enumerate(coverage(servers, num_blocks)) if n == 0]
    runs: list[list[int]] = []
    for block in missing:  # consecutive missing blocks as one run: "2..3, 7"
        if runs and runs[-1][-1] == block - 1:
            runs[-1].append(block)
        else:
            runs.append([block])
    listed = ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}..{r[-1]}" for r in runs)
    blocks = f"block {listed}" if len(missing) == 1 else f"blocks {listed}"
    return f"no online server holds {blocks} (of {num_blocks})"


def route_is_usable(
    snapshot: SwarmSnapshot,
    route: Sequence[Hop],
    num_blocks: int,
    *,
    exclude: Set[str] = frozenset(),
) -> bool:
    """Whether a remembered route still works: contiguous, complete, every server online
    and still holding its hop's blocks."""
    online = snapshot.online()
    position = 0
    for hop in route:
        record = online.get(hop.peer_id)
        if hop.peer_id in exclude or record is None or hop.start != position:
            return False
        if not record.start <= hop.start < hop.end <= record.end:
            return False
        position = hop.end
    return position == num_blocks > 0
