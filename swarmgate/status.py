"""What `swarmgate status` prints: pure formatting of swarm snapshots."""

from __future__ import annotations

from typing import Any

from protocol.errors import NoRouteError
from routing.planner import plan_route
from routing.snapshot import SwarmSnapshot


def health(snapshot: SwarmSnapshot) -> str:
    try:
        route = plan_route(snapshot, snapshot.num_blocks)
    except NoRouteError as e:
        return f"unavailable: {e}"
    return f"ok, {len(route)} hops"


def summarize(snapshot: SwarmSnapshot) -> dict[str, Any]:
    return {
        "model": snapshot.model.name if snapshot.model else None,
        "num_blocks": snapshot.num_blocks,
        "health": health(snapshot),
        "servers": [{"peer_id": p, **r.to_wire()} for p, r in _by_span(snapshot)],
    }


def format_table(snapshots: list[SwarmSnapshot]) -> str:
    if not snapshots:
        return "no models announced in this swarm"
    lines = []
    for snapshot in snapshots:
        name = snapshot.model.name if snapshot.model else "?"
        lines.append(f"{name}: {snapshot.num_blocks} blocks, {health(snapshot)}")
        lines.append(f"  {'peer id':<54} {'blocks':>9} {'state':<9} {'tok/s':>7} {'load':>5}")
        for peer_id, r in _by_span(snapshot):
            span = f"{r.start}:{r.end}"
            lines.append(
                f"  {peer_id:<54} {span:>9} {r.state.value:<9} {r.throughput:>7.1f} {r.load:>5.0f}"
            )
    return "\n".join(lines)


def _by_span(snapshot: SwarmSnapshot) -> list[tuple[str, Any]]:
    return sorted(snapshot.servers.items(), key=lambda kv: (kv[1].start, kv[0]))
