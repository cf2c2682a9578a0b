"""A frozen view of the swarm at one instant, and the hops that routes through it are made of."""

from __future__ import annotations

from collections.abc import Container, Mapping
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


def carry_over(
    previous: SwarmSnapshot, fresh: SwarmSnapshot, vouched: Container[str] | None = None
) -> SwarmSnapshot:
    """``fresh`` plus the servers of ``previous`` it lacks whose records have not expired
    (and, given ``vouched``, that are still in it: a revoked server goes at once).

    A DHT read can miss records that are still valid: the peers storing a key may be the
    ones that just died, or slow to answer. A server must not vanish from routing before
    its record would, or one lost read turns a whole covered span into a 503.
    """
    kept = {
        peer: record
        for peer, record in previous.servers.items()
        if peer not in fresh.servers
        and previous.expires.get(peer, 0.0) > fresh.taken_at
        and (vouched is None or peer in vouched)
    }
    if not kept or fresh.model != previous.model:
        return fresh
    expires = {**{p: previous.expires[p] for p in kept}, **fresh.expires}
    return SwarmSnapshot(fresh.model, {**kept, **fresh.servers}, fresh.taken_at, expires)


def settled(previous: SwarmSnapshot, fresh: SwarmSnapshot) -> bool:
    """Whether ``fresh`` shows the swarm as ``previous`` did, with every block online: the
    same servers, in the same states, on the same blocks, with the same adapters. Load and
    counters are left out (they change with every announcement)."""
    if fresh.num_blocks == 0 or fresh.model != previous.model:
        return False
    if min(coverage(fresh.online(), fresh.num_blocks)) == 0:
        return False

    def shape(snapshot: SwarmSnapshot) -> dict[str, tuple[object, ...]]:
        return {p: (r.state, r.start, r.end, r.adapters) for p, r in snapshot.servers.items()}

    return shape(previous) == shape(fresh)


def next_refresh_s(wait_s: float, *, settled: bool, fastest: float, slowest: float) -> float:
    """How long until the next read of a swarm last read ``wait_s`` after the one before:
    twice that while the swarm stays ``settled`` (up to ``slowest``), else ``fastest``."""
    return min(2 * wait_s, slowest) if settled else fastest


def coverage(servers: Mapping[str, ServerRecord], num_blocks: int) -> list[int]:
    """How many servers hold each block."""
    counts = [0] * num_blocks
    for record in servers.values():
        for block in range(record.start, min(record.end, num_blocks)):
            counts[block] += 1
    return counts
