"""Failover: how long a stream pauses when a server of its chain dies, and what it costs.

Prints JSON for one run. A swarm of a DHT, two servers for each half of the model and a
gateway runs on loopback. For the first and then the last hop, a greedy stream runs once
undisturbed (the baseline), then again with that hop's server `kill -9`ed (its whole
process group) right after token ``--kill-at``. Reported per hop, medians over repeats:

- ``resume_s``: from the kill to the next token on the client;
- ``slowdown``: the disturbed stream's total time over the baseline's;
- ``identical``: whether every disturbed answer equals the baseline (greedy, so it must).

After each kill a fresh server replaces the dead one, so every run starts with two.

    python bench/failover.py [--model smollm2] [--tokens 64] [--kill-at 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from models.loading import load_config
from models.resolve import resolve_model
from tests.processes import Process, free_port, http_ok, no_orphans, node_identity, wait_for

MESSAGES = [
    {"role": "user", "content": "Write a long story about a lighthouse keeper and the sea."}
]


@dataclass
class Run:
    text: str
    total_s: float
    resume_s: float | None
    route: str


def stream(url: str, model: str, tokens: int, kill_at: int | None, victim: object) -> Run:
    """One greedy stream; ``victim(route)`` is called after token ``kill_at`` and kills."""
    body = {
        "model": model,
        "messages": MESSAGES,
        "max_tokens": tokens,
        "temperature": 0,
        "stream": True,
    }
    text, seen, killed_at, resume = "", 0, None, None
    began = time.perf_counter()
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=300) as r:
        route = r.headers.get("x-swarmgate-route", "")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line.removeprefix("data: "))
            if "error" in chunk:
                raise RuntimeError(f"the stream failed: {chunk}")
            delta = chunk["choices"][0]["delta"].get("content") if chunk["choices"] else None
            if not delta:
                continue
            now = time.perf_counter()
            if killed_at is not None and resume is None:
                resume = now - killed_at
            text += delta
            seen += 1
            if seen == kill_at:
                victim(route)  # type: ignore[operator]
                killed_at = time.perf_counter()
    return Run(text, time.perf_counter() - began, resume, route)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--kill-at", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    source = resolve_model(args.model)
    blocks = load_config(source.path).num_hidden_layers
    half = blocks // 2
    logs = Path(__file__).resolve().parent / "results"
    logs.mkdir(exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    processes: list[Process] = []

    def start_node(span: tuple[int, int], name: str) -> Process:
        argv = ["node", "--model", args.model, "--initial-peers", *peers]
        argv += ["--blocks", f"{span[0]}:{span[1]}", "--announce-period", "2"]
        node = Process(name, argv, logs)
        processes.append(node)
        return node

    def online_servers() -> set[str]:
        try:
            servers = httpx.get(f"{url}/swarm", timeout=5).json()["servers"]
        except httpx.HTTPError:
            return set()
        return {s["peer_id"] for s in servers if s["state"] == "online"}

    def four_live_servers() -> bool:
        live = {node_identity(n)[0] for n in nodes if "serving blocks" in n.output()}
        return online_servers() == live and len(live) == 4

    results: dict[str, dict[str, object]] = {}
    with no_orphans():
        try:
            dht = Process("bench-dht", ["dht"], logs)
            processes.append(dht)
            wait_for(lambda: "--initial-peers" in dht.output(), 60, "the DHT")
            peers = dht.output().split("--initial-peers", 1)[1].split()
            nodes = [
                start_node(span, f"bench-node-{i}")
                for i, span in enumerate([(0, half), (0, half), (half, blocks), (half, blocks)])
            ]
            gateway_argv = ["gateway", "--model", args.model, "--initial-peers", *peers]
            processes.append(Process("bench-gateway", [*gateway_argv, "--port", str(port)], logs))
            wait_for(lambda: http_ok(f"{url}/health") and four_live_servers(), 600, "the swarm")
            stream(url, source.name, 4, None, None)  # warm-up
            for hop in ("first", "last"):
                runs: list[tuple[Run, Run]] = []
                for _ in range(args.repeats):
                    baseline = stream(url, source.name, args.tokens, None, None)
                    killed: list[Process] = []

                    def kill(route: str, hop: str = hop, killed: list[Process] = killed) -> None:
                        parts = [p.rsplit(":", 1)[0] for p in route.split(",")]
                        peer = parts[0 if hop == "first" else -1]
                        victim = next(n for n in nodes if node_identity(n)[0] == peer)
                        victim.kill_group()
                        killed.append(victim)

                    runs.append(
                        (baseline, stream(url, source.name, args.tokens, args.kill_at, kill))
                    )
                    # A fresh server for the dead one's span, started once the stream is done
                    # so that its loading does not slow the measured stream down.
                    for victim in killed:
                        nodes.remove(victim)
                        name = f"bench-node-{len(processes)}"
                        nodes.append(start_node(node_identity(victim)[1], name))
                    wait_for(four_live_servers, 600, "the replacement server")
                results[hop] = {
                    "resume_s": statistics.median(r.resume_s or float("nan") for _, r in runs),
                    "resume_s_max": max(r.resume_s or float("nan") for _, r in runs),
                    "slowdown": statistics.median(r.total_s / b.total_s for b, r in runs),
                    "baseline_s": statistics.median(b.total_s for b, _ in runs),
                    "identical": all(r.text == b.text for b, r in runs),
                }
        finally:
            for process in reversed(processes):
                process.stop(timeout_s=30)
    print(
        json.dumps(
            {
                "date": time.strftime("%Y-%m-%d"),
                "model": source.name,
                "blocks": blocks,
                "servers": f"2 x [0, {half}) + 2 x [{half}, {blocks})",
                "max_tokens": args.tokens,
                "kill_after_token": args.kill_at,
                "repeats": args.repeats,
                **results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
