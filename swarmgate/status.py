"""What `swarmgate status` prints: pure formatting of swarm snapshots."""

from __future__ import annotations

from typing import Any

from protocol.errors import NoRouteError
from routing.planner import plan_route
from routing.snapshot import SwarmSnapshot, coverage


def health(snapshot: SwarmSnapshot) -> str:
    try:
        route = plan_route(snapshot, snapshot.num_blocks)
    except NoRouteError as e:
        return f"unavailable: {e}"
    return f"ok, {len(route)} hops"


def runs(counts: list[int]) -> list[tuple[int, int, int]]:
    """(start, end, count) for each run of blocks with the same count."""
    found: list[tuple[int, int, int]] = []
    for block, count in enumerate(counts):
        if found and found[-1][2] == count and found[-1][1] == block:
            found[-1] = (found[-1][0], block + 1, count)
        else:
            found.append((block, block + 1, count))
    return found


def weakest(counts: list[int]) -> tuple[int, list[tuple[int, int]]]:
    """The fewest online servers any block has, and the block ranges that have that few."""
    if not counts:
        return 0, []
    least = min(counts)
    return least, [(start, end) for start, end, n in runs(counts) if n == least]


def summarize(snapshot: SwarmSnapshot) -> dict[str, Any]:
    counts = coverage(snapshot.online(), snapshot.num_blocks)
    least, ranges = weakest(counts)
    return {
        "model": snapshot.model.name if snapshot.model else None,
        "revision": snapshot.model.revision if snapshot.model else "",  # Hub commit; "" local
        "num_blocks": snapshot.num_blocks,
        "health": health(snapshot),
        "coverage": counts,  # online servers per block
        "weakest": {"servers": least, "blocks": [f"{a}:{b}" for a, b in ranges]},
        "servers": [
            {"peer_id": p, **r.to_wire(), "precision": r.precision} for p, r in _by_span(snapshot)
        ],
    }


def format_table(snapshots: list[SwarmSnapshot]) -> str:
    if not snapshots:
        return "no models announced in this swarm"
    lines = []
    for snapshot in snapshots:
        name = snapshot.model.name if snapshot.model else "?"
        revision = snapshot.model.revision if snapshot.model else ""
        at = f", revision {revision}" if revision else ""  # a Hub model's commit
        lines.append(f"{name}: {snapshot.num_blocks} blocks, {health(snapshot)}{at}")
        counts = coverage(snapshot.online(), snapshot.num_blocks)
        spans = ", ".join(f"{a}:{b} ({n})" for a, b, n in runs(counts))
        lines.append(f"  online servers per block: {spans}")
        least, ranges = weakest(counts)
        where = ", ".join(f"{a}:{b}" for a, b in ranges)
        lines.append(f"  weakest: {where} ({least} server{'s' if least != 1 else ''})")
        lines.append(
            f"  {'peer id':<54} {'blocks':>9} {'state':<9} {'tok/s':>7} {'load':>5} "
            f"{'precision':<15} {'cache free':>10}"
        )
        for peer_id, r in _by_span(snapshot):
            span = f"{r.start}:{r.end}"
            lines.append(
                f"  {peer_id:<54} {span:>9} {r.state.value:<9} {r.throughput:>7.1f} "
                f"{r.load:>5.0f} {r.precision:<15} {_size(r.cache_bytes_free):>10}"
            )
    return "\n".join(lines)


def _size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{size:.0f} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def _by_span(snapshot: SwarmSnapshot) -> list[tuple[str, Any]]:
    return sorted(snapshot.servers.items(), key=lambda kv: (kv[1].start, kv[0]))
