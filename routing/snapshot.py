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
    expires: Mapping[str, float] = field(default_factory=dict)  # peer id → its record's expiry

    @property
    def num_blocks(self) -> int:
        return self.model.num_blocks if self.model is not None else 0

    def online(self) -> dict[str, ServerRecord]:
        return {p: r for p, r in self.servers.items() if r.state is NodeState.ONLINE}

    def serving(self, adapter: str | None) -> SwarmSnapshot:
        """The swarm as a session of LoRA ``adapter`` sees it: only servers holding it
        (None: the base model, which every server runs)."""
        if adapter is None:
            return self
        servers = {p: r for p, r in self.servers.items() if adapter in r.adapters}
        expires = {p: t for p, t in self.expires.items() if p in servers}
        return SwarmSnapshot(self.model, servers, self.taken_at, expires)

    def adapters(self) -> set[str]:
        """The LoRA adapters some online server holds."""
        return {name for record in self.online().values() for name in record.adapters}


def carry_over(previous: SwarmSnapshot, fresh: SwarmSnapshot) -> SwarmSnapshot:
    """``fresh`` plus the servers of ``previous`` it lacks whose records have not expired.

    A DHT read can miss records that are still valid: the peers storing a key may be the
    ones that just died, or slow to answer. A server must not vanish from routing before
    its record would, or one lost read turns a whole covered span into a 503.
    """
    kept = {
        peer: record
        for peer, record in previous.servers.items()
        if peer not in fresh.servers and previous.expires.get(peer, 0.0) > fresh.taken_at
    }
    if not kept or fresh.model != previous.model:
        return fresh
    expires = {**{p: previous.expires[p] for p in kept}, **fresh.expires}
    return SwarmSnapshot(fresh.model, {**kept, **fresh.servers}, fresh.taken_at, expires)


def coverage(servers: Mapping[str, ServerRecord], num_blocks: int) -> list[int]:
    """How many servers hold each block."""
    counts = [0] * num_blocks
    for record in servers.values():
        for block in range(record.start, min(record.end, num_blocks)):
            counts[block] += 1
    return counts
