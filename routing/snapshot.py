"""A frozen view of the swarm at one instant, and the hops that routes through it are made of."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from protocol.swarm import ModelRecord, NodeState, ServerRecord


@dataclass(frozen=True)
class Hop:
    """One server of a route, running blocks ``[start, end)``: a sub-range of what it holds."""

    peer_id: str
    start: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class SwarmSnapshot:
    model: ModelRecord | None
    servers: Mapping[str, ServerRecord] = field(default_factory=dict)  # peer id → record
    taken_at: float = 0.0  # DHT time, seconds

    @property
    def num_blocks(self) -> int:
        return self.model.num_blocks if self.model is not None else 0

    def online(self) -> dict[str, ServerRecord]:
        return {p: r for p, r in self.servers.items() if r.state is NodeState.ONLINE}


def coverage(servers: Mapping[str, ServerRecord], num_blocks: int) -> list[int]:
    """How many servers hold each block."""
    counts = [0] * num_blocks
    for record in servers.values():
        for block in range(record.start, min(record.end, num_blocks)):
            counts[block] += 1
    return counts
