"""Single-stream decode speed and time to first token over simulated WAN round trips, with
hidden states relayed through the gateway and pushed from node to node.

Prints JSON. For each ``--rtt-ms`` value ``r`` (0 is always run as well, as the baseline)
and each mode, `swarmgate up` (a DHT, ``--nodes`` block servers, the gateway, all on
loopback) starts with ``SWARMGATE_SIMULATED_RTT_MS=r`` in its environment, which its
children inherit: every message on a link reaches its peer ``r/2`` later, and every reply
comes back ``r/2`` after it was sent (see ``protocol/latency.py``), on the gateway's hop
streams and on the nodes' pushes alike. Modes:

- ``relay`` (``SWARMGATE_NO_PUSH=1``): hidden states go gateway → hop 1 → gateway → hop 2
  → ..., so each decoded token costs one round trip per hop: ``hops * r``.
- ``push`` (the default): the gateway sends hop 1 its input and tells the other hops to
  expect theirs; each hop pushes its output to the next, the last answers the gateway:
  ``(hops + 1) * r / 2`` per token.

After a warm-up request, one greedy streamed chat request is timed;
the swarm is then stopped (always, errors too) before the next run starts its own.

How to read it, per RTT and mode (``rtt["100"]["push"]``):

- ``ttft_s``: from sending the request to its first text. The measured request is a cold
  conversation (the warm-up asks something else), so it pays the opening of every hop (in
  parallel: one round trip) and the prompt's prefill through the chain.
- ``decode_tok_s``: (completion tokens - 1) / (time from the first text to the last).
- ``hops``: servers on the request's route (from the gateway's ``X-Swarmgate-Route``).
- ``vs_rtt_0``: ``decode_tok_s`` and ``ttft_s`` divided by the same mode's baseline.
- ``extra_ms_per_token`` / ``expected_extra_ms_per_token``: the decode interval's growth
  over the same mode's baseline, measured and as the injection implies (above).
- ``extra_ttft_ms`` / ``expected_extra_ttft_ms``: the same for TTFT: the parallel openings
  (``r``), then the prefill (prompts here fit one message): ``hops * r`` relayed,
  ``(hops + 1) * r / 2`` pushed.

And per RTT, ``push_vs_relay``: push's ``decode_tok_s`` and ``ttft_s`` divided by relay's.

    python bench/wan.py [--model smollm2] [--rtt-ms 0 20 100] [--modes relay push]
                        [--tokens 32] [--nodes 2] [--record]
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import (
    add_record_flag,
    complete,
    finish,
    running_swarm,
    served_model,
    stream_chat,
)
from models.resolve import resolve_model
from protocol.latency import SIMULATED_RTT_ENV, parse_rtt_ms
from tests.processes import alarms

# Each mode's environment for `swarmgate up` (and so its gateway).
MODES = {"relay": {"SWARMGATE_NO_PUSH": "1"}, "push": {"SWARMGATE_NO_PUSH": "0"}}
WARM_UP = [{"role": "user", "content": "Say hello."}]
MESSAGES = [
    {"role": "user", "content": "Write a long story about a lighthouse keeper and the sea."}
]


def measure(url: str, model: str, tokens: int) -> dict[str, Any]:
    """One warm-up request, then one greedy stream of ``tokens``: its TTFT and decode rate."""
    complete(url, model, WARM_UP, 4)
    streamed = stream_chat(url, model, MESSAGES, tokens)
    if streamed.ttft_s is None or streamed.tokens < 2:
        raise RuntimeError(f"the stream produced {streamed.tokens} tokens; nothing to time")
    return {
        "ttft_s": streamed.ttft_s,
        "decode_tok_s": streamed.decode_tok_s,
        "decode_ms_per_token": 1000 * streamed.decode_s / (streamed.tokens - 1),
        "completion_tokens": streamed.tokens,
        "finish_reason": streamed.finish_reason,
        "hops": streamed.hops,
        "route": streamed.route,
    }


def run_one(args: argparse.Namespace, rtt_ms: float, mode: str) -> dict[str, Any]:
    env = {SIMULATED_RTT_ENV: f"{rtt_ms:g}", **MODES[mode]}
    name = f"bench-wan-up-{mode}-{rtt_ms:g}ms"
    with running_swarm(None, args.model, args.nodes, name, env=env) as url:
        return {**measure(url, served_model(url), args.tokens), "alarms": alarms(url)}


def crossings(mode: str, hops: int) -> float:
    """Round trips one message's trip through the chain costs: a relayed hop one each, a
    pushed chain one link per hop plus the way back, each half a round trip."""
    return float(hops) if mode == "relay" else (hops + 1) / 2


def compare(
    result: dict[str, Any], base: dict[str, Any], rtt_ms: float, mode: str
) -> dict[str, Any]:
    """What ``result`` adds to its mode's baseline, next to what ``rtt_ms`` per hop implies."""
    hops = result["hops"] or 0
    return {
        "vs_rtt_0": {
            "decode_tok_s": result["decode_tok_s"] / base["decode_tok_s"],
            "ttft_s": result["ttft_s"] / base["ttft_s"],
        },
        "extra_ms_per_token": result["decode_ms_per_token"] - base["decode_ms_per_token"],
        "expected_extra_ms_per_token": crossings(mode, hops) * rtt_ms,
        "extra_ttft_ms": 1000 * (result["ttft_s"] - base["ttft_s"]),
        "expected_extra_ttft_ms": (1 + crossings(mode, hops)) * rtt_ms,
    }


def push_vs_relay(runs: dict[str, dict[str, Any]]) -> dict[str, float]:
    push, relay = runs["push"], runs["relay"]
    return {
        "decode_tok_s": push["decode_tok_s"] / relay["decode_tok_s"],
        "ttft_s": push["ttft_s"] / relay["ttft_s"],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument(
        "--rtt-ms", type=parse_rtt_ms, nargs="+", default=[0.0, 20.0, 100.0],
        help="simulated round trips per hop, in milliseconds (0 is always added)",
    )  # fmt: skip
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--nodes", type=int, default=2)
    add_record_flag(parser)
    args = parser.parse_args(argv)
    if args.tokens < 2 or args.nodes < 1:
        parser.error("--tokens must be at least 2 and --nodes at least 1")
    rtts = sorted({0.0, *args.rtt_ms})
    model_id = resolve_model(args.model).name  # converts the model once, before any swarm
    results: dict[str, dict[str, Any]] = {
        f"{r:g}": {mode: run_one(args, r, mode) for mode in args.modes} for r in rtts
    }
    for rtt_ms, runs in zip(rtts, results.values(), strict=True):
        for mode in args.modes:
            runs[mode].update(compare(runs[mode], results["0"][mode], rtt_ms, mode))
        if {"push", "relay"} <= set(args.modes):
            runs["push_vs_relay"] = push_vs_relay(runs)
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "modes": args.modes,
        "model": model_id,
        "nodes": args.nodes,
        "cores": os.cpu_count(),
        "max_tokens": args.tokens,
        "rtt_ms_per_hop": rtts,
        "rtt": results,
    }
    finish("wan", result, args)
    return result


if __name__ == "__main__":
    # SIGTERM unwinds like Ctrl-C, so each run's `finally` still stops its swarm.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    main()
