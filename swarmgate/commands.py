"""What each `swarmgate` subcommand does once its arguments are parsed."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import threading

from models.resolve import resolve_model


def _wait_for_signal() -> None:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()


def dht(args: argparse.Namespace) -> None:
    from hivemind import DHT

    peer = DHT(
        initial_peers=args.initial_peers,
        host_maddrs=args.host_maddrs,
        announce_maddrs=args.announce_maddrs or None,
        identity_path=args.identity,
        start=True,
    )
    try:
        maddrs = " ".join(str(m) for m in peer.get_visible_maddrs())
        print(f"swarmgate dht: running as {peer.peer_id}", flush=True)
        print(f"swarmgate dht: connect with --initial-peers {maddrs}", flush=True)
        _wait_for_signal()
    finally:
        peer.shutdown()


def node(args: argparse.Namespace) -> None:
    from swarm_node.node import run_node
    from swarm_node.settings import NodeSettings

    run_node(
        NodeSettings(
            model=args.model,
            model_name=args.model_name,
            initial_peers=tuple(args.initial_peers),
            blocks=args.blocks,
            num_blocks=args.num_blocks,
            dtype=args.dtype,
            quant=args.quant,
            cache_bytes=args.cache_bytes,
            host_maddrs=tuple(args.host_maddrs),
            announce_maddrs=tuple(args.announce_maddrs),
            identity_path=args.identity,
            namespace=args.namespace,
            announce_period_s=args.announce_period,
        )
    )


def gateway(args: argparse.Namespace) -> None:
    import uvicorn

    from gateway.app import create_app
    from gateway.settings import GatewaySettings

    source = resolve_model(args.model, name=args.model_name)
    settings = GatewaySettings(
        model_id=source.name,
        model_path=source.path,
        initial_peers=tuple(args.initial_peers),
        host=args.host,
        port=args.port,
        namespace=args.namespace,
        redis_url=args.redis_url,
        api_keys=tuple(args.api_key),
        prefill_chunk_tokens=args.prefill_chunk_tokens,
    )
    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level="info")


def status(args: argparse.Namespace) -> int:
    from hivemind import DHT

    from routing.discovery import fetch_models, fetch_snapshot
    from routing.planner import plan_route
    from protocol.errors import NoRouteError

    async def read() -> list[tuple[str, object]]:
        models = await fetch_models(client, args.namespace)
        return [(prefix, await fetch_snapshot(client, prefix, m)) for prefix, m in models.items()]

    client = DHT(initial_peers=args.initial_peers, client_mode=True, start=True)
    try:
        snapshots = asyncio.run(read())
    finally:
        client.shutdown()
    report = []
    for _prefix, snapshot in snapshots:
        try:
            route = plan_route(snapshot, snapshot.num_blocks)  # type: ignore[attr-defined]
            health = f"ok, {len(route)} hops"
        except NoRouteError as e:
            health = f"unavailable: {e}"
        report.append((snapshot, health))
    if args.json:
        print(json.dumps([
            {"model": s.model.name, "num_blocks": s.num_blocks, "health": h,  # type: ignore[attr-defined]
             "servers": [{"peer_id": p, **r.to_wire()} for p, r in s.servers.items()]}  # type: ignore[attr-defined]
            for s, h in report
        ], indent=2))
        return 0
    if not report:
        print("no models announced in this swarm")
        return 1
    for snapshot, health in report:
        print(f"{snapshot.model.name}: {snapshot.num_blocks} blocks, {health}")  # type: ignore[attr-defined]
        print(f"  {'peer id':<54} {'blocks':>9} {'state':<9} {'tok/s':>7} {'load':>5}")
        for peer_id, r in sorted(snapshot.servers.items(), key=lambda kv: kv[1].start):  # type: ignore[attr-defined]
            print(f"  {peer_id:<54} {f'{r.start}:{r.end}':>9} {r.state.value:<9} "
                  f"{r.throughput:>7.1f} {r.load:>5.0f}")
    return 0


def up(args: argparse.Namespace) -> int:
    from swarmgate.local_swarm import LocalSwarm

    source = resolve_model(args.model, name=args.model_name)
    swarm = LocalSwarm(source, args)
    return swarm.run()


