"""Route planning at swarm scale, and what the swarm's records weigh in the DHT.

Prints one JSON object. A synthetic swarm (seeded): 1,000 servers over an 80-block model,
spans of 8..40 blocks, random speeds, loads and round trips. ``plan_route`` is timed over
200 plans whose gateway state varies as a busy gateway's would: its own open sessions,
a few banned peers, and the previous plan's hops as the session's cache.

Record volume: each server stores its record under every block it holds, so the swarm
stores ``sum(record bytes * blocks held)``; the largest key holds every record of one block.
Bytes are of ``json.dumps(record.to_wire())``: hivemind's msgpack is of the same order.

    python bench/planner.py [--servers 1000] [--blocks 80] [--plans 200] [--seed 0] [--record]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import string
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import routing.planner as planner
from bench.common import add_record_flag, finish
from protocol.swarm import ModelRecord, NodeState, ServerRecord
from routing.costs import RouteCosts
from routing.planner import plan_route
from routing.snapshot import Hop, SwarmSnapshot

BASE58 = "".join(c for c in string.ascii_letters + string.digits if c not in "0OIl")


def peer_id(rng: random.Random) -> str:
    return "12D3KooW" + "".join(rng.choices(BASE58, k=44))  # the shape of a libp2p id


def swarm(rng: random.Random, servers: int, blocks: int) -> SwarmSnapshot:
    model = ModelRecord(
        name="bench", architecture="llama", num_blocks=blocks, hidden_size=8192, max_length=8192
    )
    records = {}
    for _ in range(servers):
        length = rng.randint(8, min(40, blocks))
        start = rng.randint(0, blocks - length)
        records[peer_id(rng)] = ServerRecord(
            state=NodeState.ONLINE if rng.random() < 0.95 else NodeState.DRAINING,
            start=start,
            end=start + length,
            throughput=rng.uniform(50.0, 500.0) / length,  # block-steps/s shared by the span
            load=float(rng.randint(0, 4)),
            cache_bytes_free=rng.randint(0, 2**34),
            cached_sessions=rng.randint(0, 200),
        )
    return SwarmSnapshot(model=model, servers=records)


def gateway_costs(rng: random.Random, peers: list[str], previous: list[Hop]) -> RouteCosts:
    return RouteCosts(
        rtt_s={p: rng.uniform(0.001, 0.1) for p in peers},
        local_load={p: rng.randint(1, 3) for p in rng.sample(peers, 50)},
        banned=frozenset(rng.sample(peers, rng.randint(0, 5))),
        cached_hops=tuple(previous) if rng.random() < 0.5 else (),
        cached_tokens=rng.randint(0, 1000),
        prompt_tokens=rng.randint(1, 2000),
    )


def counting(calls: list[int], fn: Callable[..., Any]) -> Callable[..., Any]:
    def counted(*args: Any) -> Any:
        calls[-1] += 1
        return fn(*args)

    return counted


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--servers", type=int, default=1000)
    parser.add_argument("--blocks", type=int, default=80)
    parser.add_argument("--plans", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    add_record_flag(parser)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    snapshot = swarm(rng, args.servers, args.blocks)
    peers = sorted(snapshot.servers)

    sweeps: list[int] = []  # sweeps per plan: more than 1 when a chain revisited a server
    planner._cheapest_chain = counting(sweeps, planner._cheapest_chain)  # type: ignore[assignment]
    times_ms, cpu_ms, hops, route = [], [], [], []
    for _ in range(args.plans):
        costs = gateway_costs(rng, peers, route)
        sweeps.append(0)
        began, began_cpu = time.perf_counter(), time.process_time()
        route = plan_route(snapshot, snapshot.num_blocks, costs=costs)
        cpu_ms.append((time.process_time() - began_cpu) * 1000)
        times_ms.append((time.perf_counter() - began) * 1000)
        hops.append(len(route))

    sizes = {p: len(json.dumps(r.to_wire())) for p, r in snapshot.servers.items()}
    held = {p: min(r.end, args.blocks) - r.start for p, r in snapshot.servers.items()}
    keys = [
        len(
            json.dumps(
                {p: r.to_wire() for p, r in snapshot.servers.items() if r.start <= b < r.end}
            )
        )
        for b in range(args.blocks)
    ]
    result = {
        "servers": args.servers,
        "blocks": args.blocks,
        "online": len(snapshot.online()),
        "plans": args.plans,
        "plan_ms_median": round(statistics.median(times_ms), 2),
        "plan_ms_p99": round(percentile(times_ms, 0.99), 2),
        "plan_ms_max": round(max(times_ms), 2),
        "plan_cpu_ms_median": round(statistics.median(cpu_ms), 2),  # on a busy machine
        "plan_cpu_ms_p99": round(percentile(cpu_ms, 0.99), 2),
        "sweeps_per_plan_max": max(sweeps),
        "plans_with_revisit_split": sum(1 for s in sweeps if s > 1),
        "route_hops_median": statistics.median(hops),
        "route_hops_min": min(hops),
        "route_hops_max": max(hops),
        "record_bytes_median": statistics.median(sizes.values()),
        "dht_bytes_total": sum(sizes[p] * held[p] for p in sizes),
        "dht_largest_key_bytes": max(keys),
        "dht_records_per_key_max": max(
            sum(1 for r in snapshot.servers.values() if r.start <= b < r.end)
            for b in range(args.blocks)
        ),
    }
    finish("planner", result, args)
    return result


if __name__ == "__main__":
    main()
