"""Failover: how long a stream stalls when a server of its chain dies or hangs, and what it
costs.

Prints JSON for one run. A swarm of a DHT, two servers for each half of the model and a
gateway runs on loopback. For the first and then the last hop, a greedy stream runs once
undisturbed (the baseline), then again with a fault struck on that hop's server right after
token ``--fault-at``: ``--fault kill`` sends its whole process group `kill -9` (its machine
died), ``--fault hang`` sends it SIGSTOP (a frozen process or a partition: its connections
stay open, nothing breaks). Reported per hop, over ``--repeats``:

- ``stall_s`` (median) and ``stall_s_max``: the longest wait for text from the fault on,
  the fault to the next chunk or any later gap between two chunks, whichever is longest
  (a step already under way when the fault struck can still deliver a token, so the first
  chunk after the fault need not be the stall); ``baseline_stall_s``: the same from the
  same token of the undisturbed stream, what a stream stalls anyway;
- ``resume_s``: from the fault to the next chunk (median), for comparison;
- ``slowdown``: the disturbed stream's total time over the baseline's (median);
- ``identical``: every disturbed answer equals its baseline; ``greedy_equal``: every answer
  equals `transformers` ``generate``'s on the whole model (greedy, so both must hold).

After each fault the struck server is killed for good and a fresh one replaces it (started
once the stream is done, so its loading does not slow the measured stream), so every run
starts with two servers per span.

    python bench/failover.py [--model smollm2] [--fault kill|hang] [--tokens 64]
                             [--fault-at 16] [--repeats 3] [--hops first last] [--record]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import (
    Streamed,
    add_record_flag,
    finish,
    greedy_check,
    greedy_reference,
    log_dir,
    stream_chat,
)
from models.loading import load_config
from models.resolve import resolve_model
from tests.processes import Process, free_port, http_ok, no_orphans, node_identity, wait_for

MESSAGES = [
    {"role": "user", "content": "Write a long story about a lighthouse keeper and the sea."}
]
FAULTS = ("kill", "hang")


@dataclass
class Run:
    streamed: Streamed
    fault_at: float | None  # perf_counter when the fault was struck

    @property
    def total_s(self) -> float:
        assert self.streamed.ended is not None
        return self.streamed.ended - self.streamed.started

    def stall_s(self) -> float | None:
        return None if self.fault_at is None else self.streamed.longest_gap_from(self.fault_at)

    def resume_s(self) -> float | None:
        after = [t for t in self.streamed.times if self.fault_at and t > self.fault_at]
        return after[0] - self.fault_at if after and self.fault_at else None


def strike(fault: str, victim: Process) -> None:
    """``kill``: `kill -9` of the server's process group; ``hang``: SIGSTOP of it."""
    if fault == "kill":
        with contextlib.suppress(ProcessLookupError):
            os.killpg(victim.popen.pid, signal.SIGKILL)
    else:
        os.killpg(victim.popen.pid, signal.SIGSTOP)


def disturbed(
    url: str, model: str, tokens: int, fault_at: int, on_fault: Callable[[str], None]
) -> Run:
    """One greedy stream; ``on_fault(route)`` is called after text chunk ``fault_at``."""
    struck: list[float] = []

    def on_text(streamed: Streamed) -> None:
        if len(streamed.times) == fault_at:
            struck.append(time.perf_counter())
            on_fault(streamed.route)

    streamed = stream_chat(url, model, MESSAGES, tokens, on_text=on_text, timeout_s=300)
    return Run(streamed, struck[0] if struck else None)


def summary(runs: list[tuple[Run, Run]]) -> dict[str, Any]:
    def med(values: list[float | None]) -> float | None:
        known = [v for v in values if v is not None]
        return statistics.median(known) if known else None

    stalls = [r.stall_s() for _, r in runs]
    return {
        "stall_s": med(stalls),
        "stall_s_max": max((s for s in stalls if s is not None), default=None),
        "baseline_stall_s": med([same_token_gap(b, r) for b, r in runs]),
        "resume_s": med([r.resume_s() for _, r in runs]),
        "slowdown": statistics.median(r.total_s / b.total_s for b, r in runs),
        "baseline_s": statistics.median(b.total_s for b, _ in runs),
        "identical": all(r.streamed.text == b.streamed.text for b, r in runs),
        "faults_struck": sum(r.fault_at is not None for _, r in runs),
    }


def same_token_gap(baseline: Run, run: Run) -> float | None:
    """The baseline's longest gap from the chunk at which ``run``'s fault was struck."""
    if run.fault_at is None:
        return None
    index = sum(t <= run.fault_at for t in run.streamed.times)
    times = baseline.streamed.times
    return baseline.streamed.longest_gap_from(times[index - 1]) if 0 < index <= len(times) else None


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--fault", choices=FAULTS, default="kill")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--fault-at", type=int, default=16, help="text chunk after which")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hops", nargs="+", choices=("first", "last"), default=["first", "last"])
    add_record_flag(parser)
    args = parser.parse_args(argv)
    if not 0 < args.fault_at < args.tokens:
        parser.error("--fault-at must be within the stream: 0 < --fault-at < --tokens")
    source = resolve_model(args.model)
    source.fetch_whole()  # a Hub model: the greedy reference needs all of it
    blocks = load_config(source.path).num_hidden_layers
    half = blocks // 2
    logs = log_dir()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    processes: list[Process] = []
    peers: list[str] = []
    nodes: list[Process] = []
    gateway: list[Process] = []

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
        for process in [dht, *nodes, *gateway]:
            if not process.alive():
                raise RuntimeError(f"{process.name} exited:\n{process.output()[-2000:]}")
        live = {node_identity(n)[0] for n in nodes if "serving blocks" in n.output()}
        return online_servers() == live and len(live) == 4

    results: dict[str, dict[str, Any]] = {}
    texts: list[str] = []
    # `generate`'s answer is computed in a child while the swarm starts.
    with greedy_reference(source.path, [MESSAGES], args.tokens) as reference, no_orphans():
        try:
            dht = Process("bench-failover-dht", ["dht"], logs)
            processes.append(dht)
            wait_for(lambda: "--initial-peers" in dht.output(), 60, "the DHT")
            peers += dht.output().split("--initial-peers", 1)[1].split()
            spans = [(0, half), (0, half), (half, blocks), (half, blocks)]
            nodes += [start_node(span, f"bench-failover-node-{i}") for i, span in enumerate(spans)]
            gateway_argv = ["gateway", "--model", args.model, "--initial-peers", *peers]
            gateway_argv += ["--port", str(port)]
            gateway.append(Process("bench-failover-gateway", gateway_argv, logs))
            processes += gateway
            wait_for(lambda: http_ok(f"{url}/health") and four_live_servers(), 600, "the swarm")
            want = reference()[0]  # before any stream: the child is gone when they run
            stream_chat(url, source.name, MESSAGES, 4)  # warm-up
            for hop in args.hops:
                runs: list[tuple[Run, Run]] = []
                for repeat in range(args.repeats):
                    baseline = Run(stream_chat(url, source.name, MESSAGES, args.tokens), None)
                    struck: list[Process] = []

                    def fault(route: str, hop: str = hop, struck: list[Process] = struck) -> None:
                        parts = [p.rsplit(":", 1)[0] for p in route.split(",")]
                        peer = parts[0 if hop == "first" else -1]
                        victim = next(n for n in nodes if node_identity(n)[0] == peer)
                        strike(args.fault, victim)
                        struck.append(victim)

                    run = disturbed(url, source.name, args.tokens, args.fault_at, fault)
                    runs.append((baseline, run))
                    texts += [baseline.streamed.text, run.streamed.text]
                    # The struck server goes for good (a hung one too: SIGKILL ends a
                    # stopped process), and a fresh one takes its span unless this was the
                    # last run.
                    last = hop == args.hops[-1] and repeat == args.repeats - 1
                    for victim in struck:
                        victim.kill_group()
                        nodes.remove(victim)
                        name = f"bench-failover-node-{len(processes)}"
                        if not last:
                            nodes.append(start_node(node_identity(victim)[1], name))
                    if not last:
                        wait_for(four_live_servers, 600, "the replacement server")
                results[hop] = summary(runs)
        finally:
            for process in reversed(processes):
                process.stop(timeout_s=30)
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "model": source.name,
        "blocks": blocks,
        "servers": f"2 x [0, {half}) + 2 x [{half}, {blocks})",
        "fault": args.fault,
        "max_tokens": args.tokens,
        "fault_after_token": args.fault_at,
        "repeats": args.repeats,
        **results,
        **greedy_check(texts, [want] * len(texts)),
    }
    finish("failover", result, args)
    return result


if __name__ == "__main__":
    main()
