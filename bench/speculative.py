"""Speculative decoding (``--speculate``) against decoding a token per pass: one greedy stream
on `swarmgate up` over simulated WAN round trips, per task, with drafts off, from prompt
lookup and from a draft model.

Prints JSON. For each ``--rtt-ms`` value ``r`` (0 is always run as well) and each mode,
`swarmgate up` (a DHT, ``--nodes`` block servers, the gateway, all on loopback) starts with
``SWARMGATE_SIMULATED_RTT_MS=r`` in its environment, as in ``bench/wan.py``: every link
costs ``r`` per round trip, so a pushed pass through 2 hops costs ``1.5 r``. Modes, each a
flag of the gateway:

- ``off`` (``--speculate off``): one token per pass. Always run: it is the baseline.
- ``lookup`` (``--speculate lookup``): prompt lookup's drafts, no model.
- ``draft`` (``--speculate draft --draft-model M``): drafts from a small model on the
  gateway. Here it is the served model itself made worse, so that its drafts are right
  less often than always: its blocks in nf4 (``--draft-quantization``, the default) or its
  first N blocks only (``--draft-layers``), against the served model in fp32.

Tasks (``--tasks``), each a new conversation of its own:

- ``edit``: rewrite a given paragraph with two small edits, copying the rest: the answer
  repeats its prompt, where prompt lookup should pay most.
- ``chat``: an open question, whose answer repeats little of anything.

Per swarm: a warm-up request, then each task's stream is timed (greedy, ``--tokens``
tokens), the gateway's ``/metrics`` read before and after it; the swarm is then stopped
(always, errors too) before the next run starts its own.

How to read it, per RTT, task and mode (``rtt["100"]["edit"]["lookup"]``):

- ``ttft_s``: from sending the request to its first text; ``decode_tok_s``: (completion
  tokens - 1) / (time from the first text to the last).
- ``draft_tokens`` / ``draft_tokens_accepted``: drafts the stream's passes verified and
  kept (``swarmgate_draft_tokens_total`` and ``..._accepted_total``); ``acceptance``: their
  ratio; ``drafted_passes``: passes that carried drafts; ``tokens_per_pass``: tokens such a
  pass yielded on average, accepted drafts plus one (``swarmgate_tokens_per_pass``'s sum
  over its count); ``tokens_per_decode_pass``: completion tokens after the first over all
  decode passes, drafted or not (a pass without drafts yields one token).
- ``identical``: the text equals speculation off's for the same task at the same RTT and at
  RTT 0 (``first_difference`` says where it parts, if it does); ``equals_generate``: it
  equals `transformers` ``generate``'s greedy answer.
- ``vs_off``: ``decode_tok_s`` and ``ttft_s`` divided by off's at the same RTT and task.

``target``: the issue's, ``edit`` at 100 ms per hop: lookup's decode tok/s at least twice
off's (each mode's ratio is given).

``concurrent``: at RTT 0, after the single streams, ``--concurrent`` streams (16) sent at
once to the same swarm, the tasks in turn, each a cold conversation of its own: per mode,
``tok_s`` (completion tokens of all over the wall time from the first sent to the last
done), ``failures`` and the drafts verified; ``vs_off`` divides ``tok_s`` by off's.
``concurrent_target``: the issue's other target, every mode at least 0.9 of off's.

    python bench/speculative.py [--model smollm2] [--rtt-ms 0 20 100]
                                [--modes off lookup draft] [--tasks edit chat]
                                [--tokens 128] [--speculate-tokens 8] [--draft-model smollm2]
                                [--draft-quantization nf4] [--draft-layers N]
                                [--concurrent 16] [--record]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import (
    Streamed,
    add_record_flag,
    astream_chat,
    complete,
    finish,
    greedy_reference,
    running_swarm,
    served_model,
    stream_chat,
)
from models.resolve import resolve_model
from protocol.latency import SIMULATED_RTT_ENV, parse_rtt_ms
from tests.processes import alarms

MODES = ("off", "lookup", "draft")
PARAGRAPH = (
    "The old mill stood at the edge of the village, beside a slow river that turned its "
    "wheel for more than two hundred years. Every morning the miller opend the heavy doors "
    "and let the light fall across the sacks of grain. Children from the school would stop "
    "on their way home to watch the great stones turn, and the miller would give each of "
    "them a handful of flour to take to their mothers. In the spring the river rose high "
    "and fast, and the whole building shook with its force. In the summer it ran low and "
    "quiet, and the wheel turned so slowly that you could count its paddles. When the "
    "miller grew old, his daughter took over the work. She kept the doors open in the "
    "morning, she still gave flour to the children, and she painted the wheel a bright red "
    "so that travellers on the road could see it from the hill."
)
TASKS: dict[str, list[dict[str, Any]]] = {
    "edit": [
        {
            "role": "system",
            "content": "You are a careful copy editor. Reply with the rewritten paragraph only.",
        },
        {
            "role": "user",
            "content": "Rewrite this paragraph: replace the word 'river' with 'stream' and fix "
            "the typo in the second sentence. Otherwise copy it exactly.\n\n" + PARAGRAPH,
        },
    ],
    "chat": [{"role": "user", "content": "Tell me about the history of tea."}],
}
# Long enough for drafts to be proposed and verified (a repeated phrase), so that a
# drafting gateway's first multi-token passes are not the measured ones.
WARM_UP = [
    {
        "role": "user",
        "content": "Repeat this line twice: the quick brown fox jumps over the lazy dog.",
    }
]
WARM_UP_TOKENS = 24
METRICS = {
    "draft_tokens": "swarmgate_draft_tokens_total",
    "draft_tokens_accepted": "swarmgate_draft_tokens_accepted_total",
    "pass_count": "swarmgate_tokens_per_pass_count",
    "pass_sum": "swarmgate_tokens_per_pass_sum",
}


def speculation_counters(url: str) -> dict[str, float]:
    """The gateway's speculation counters, summed over drafters (a gateway has one)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    found = dict.fromkeys(METRICS, 0.0)
    names = {metric: key for key, metric in METRICS.items()}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in names:
            found[names[name]] += float(line.rsplit(" ", 1)[1])
    return found


def mode_flags(args: argparse.Namespace, mode: str) -> list[str]:
    """The gateway flags of ``mode`` (`up` passes them on)."""
    if mode == "off":
        return ["--speculate", "off"]
    flags = ["--speculate", mode, "--speculate-tokens", str(args.speculate_tokens)]
    if mode == "draft":
        flags += ["--draft-model", args.draft_model]
        flags += ["--draft-quantization", args.draft_quantization]
        if args.draft_layers is not None:
            flags += ["--draft-layers", str(args.draft_layers)]
    return flags


def measure(url: str, model: str, messages: list[dict[str, Any]], tokens: int) -> dict[str, Any]:
    """One greedy stream of ``tokens``: its timing, text and what its passes drafted."""
    before = speculation_counters(url)
    streamed = stream_chat(url, model, messages, tokens)
    after = speculation_counters(url)
    if streamed.ttft_s is None or streamed.tokens < 2:
        raise RuntimeError(f"the stream produced {streamed.tokens} tokens; nothing to time")
    delta = {key: after[key] - before[key] for key in METRICS}
    drafted, accepted = int(delta["draft_tokens"]), int(delta["draft_tokens_accepted"])
    passes, yielded = int(delta["pass_count"]), int(delta["pass_sum"])
    # Tokens after the first came from passes with drafts (``yielded`` in all) and from
    # passes without, one each.
    decode_passes = passes + max(0, streamed.tokens - 1 - yielded)
    return {
        "ttft_s": streamed.ttft_s,
        "decode_tok_s": streamed.decode_tok_s,
        "decode_ms_per_token": 1000 * streamed.decode_s / (streamed.tokens - 1),
        "completion_tokens": streamed.tokens,
        "finish_reason": streamed.finish_reason,
        "hops": streamed.hops,
        "draft_tokens": drafted,
        "draft_tokens_accepted": accepted,
        "acceptance": accepted / drafted if drafted else None,
        "drafted_passes": passes,
        "tokens_per_pass": yielded / passes if passes else None,
        "tokens_per_decode_pass": (
            (streamed.tokens - 1) / decode_passes if decode_passes else None
        ),
        "text": streamed.text,
    }


def concurrent_conversations(streams: int) -> list[list[dict[str, Any]]]:
    """``streams`` conversations, the tasks in turn, each opened by a line of its own: no
    two share a cached prefix (the line is in the first block of prompt tokens)."""
    tasks = list(TASKS.values())
    conversations = []
    for i in range(streams):
        task = tasks[i % len(tasks)]
        first = {**task[0], "content": f"Request {i}. {task[0]['content']}"}
        conversations.append([first, *task[1:]])
    return conversations


def measure_concurrent(url: str, model: str, streams: int, tokens: int) -> dict[str, Any]:
    """``streams`` greedy streams sent at once: completion tokens of all over the wall time
    from the first sent to the last done, and the drafts their passes verified."""
    conversations = concurrent_conversations(streams)
    outs = [Streamed() for _ in conversations]

    async def run() -> float:
        limits = httpx.Limits(max_connections=streams)
        async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
            began = time.perf_counter()
            await asyncio.gather(
                *(
                    astream_chat(client, model, c, tokens, out, api_key=f"bench-{i}")
                    for i, (c, out) in enumerate(zip(conversations, outs, strict=True))
                )
            )
            return time.perf_counter() - began

    before = speculation_counters(url)
    wall_s = asyncio.run(run())
    after = speculation_counters(url)
    failures = [out.error for out in outs if out.error or not out.tokens]
    generated = sum(out.tokens for out in outs)
    return {
        "streams": streams,
        "tok_s": generated / wall_s,
        "completion_tokens": generated,
        "wall_s": wall_s,
        "failures": len(failures),
        "errors": failures[:3],
        "draft_tokens": int(after["draft_tokens"] - before["draft_tokens"]),
        "draft_tokens_accepted": int(
            after["draft_tokens_accepted"] - before["draft_tokens_accepted"]
        ),
    }


def run_one(
    args: argparse.Namespace,
    rtt_ms: float,
    mode: str,
    tasks: list[str],
    reference: Callable[[], object],
) -> dict[str, dict[str, Any]]:
    """One `up` at ``rtt_ms`` with ``mode``'s gateway: a warm-up, then each task timed
    (once ``reference``, generate's answers computed while the first swarm starts, is in)."""
    env = {SIMULATED_RTT_ENV: f"{rtt_ms:g}"}
    name = f"bench-speculative-up-{mode}-{rtt_ms:g}ms"
    flags = mode_flags(args, mode)
    with running_swarm(None, args.model, args.nodes, name, flags=flags, env=env) as url:
        model = served_model(url)
        reference()
        complete(url, model, WARM_UP, WARM_UP_TOKENS)
        runs: dict[str, dict[str, Any]] = {
            task: measure(url, model, TASKS[task], args.tokens) for task in tasks
        }
        if rtt_ms == 0 and args.concurrent:
            runs["concurrent"] = measure_concurrent(url, model, args.concurrent, args.tokens)
        found = alarms(url)
    for run in runs.values():
        run["alarms"] = found
    return runs


def first_difference(got: str, want: str) -> dict[str, Any] | None:
    """Where ``got`` parts from ``want`` (None: equal), and both texts."""
    if got == want:
        return None
    at = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), None)
    if at is None:
        at = min(len(got), len(want))
    return {"position": at, "text": got, "off_text": want}


def compare(run: dict[str, Any], off: dict[str, Any], off_0: dict[str, Any]) -> dict[str, Any]:
    """``run`` against speculation off's run of its task at its RTT (``off``) and at 0."""
    return {
        "identical": run["text"] == off["text"] == off_0["text"],
        "first_difference": first_difference(run["text"], off["text"])
        or first_difference(run["text"], off_0["text"]),
        "vs_off": {
            "decode_tok_s": run["decode_tok_s"] / off["decode_tok_s"],
            "ttft_s": run["ttft_s"] / off["ttft_s"],
        },
    }


def target(results: dict[str, Any], modes: list[str]) -> dict[str, Any] | None:
    """The issue's target: ``edit`` at 100 ms per hop, lookup at least 2x off's tok/s."""
    runs = results.get("100", {}).get("edit")
    if runs is None:
        return None
    ratios = {m: runs[m]["vs_off"]["decode_tok_s"] for m in modes if m != "off"}
    met = ratios["lookup"] >= 2.0 if "lookup" in ratios else None
    return {"task": "edit", "rtt_ms": 100, "at_least": 2.0, "vs_off": ratios, "met": met}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument(
        "--rtt-ms", type=parse_rtt_ms, nargs="+", default=[0.0, 20.0, 100.0],
        help="simulated round trips per hop, in milliseconds (0 is always added)",
    )  # fmt: skip
    parser.add_argument(
        "--modes", nargs="+", choices=MODES, default=list(MODES),
        help="speculation modes (off is always run: the baseline)",
    )  # fmt: skip
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--speculate-tokens", type=int, default=8)
    parser.add_argument("--draft-model", default=None, help="default: --model")
    parser.add_argument(
        "--draft-quantization", choices=("none", "int8", "nf4"), default="nf4"
    )  # fmt: skip
    parser.add_argument("--draft-layers", type=int, default=None)
    parser.add_argument(
        "--concurrent", type=int, default=16,
        help="streams sent at once at RTT 0, per mode, after the single streams (0: none)",
    )  # fmt: skip
    add_record_flag(parser)
    args = parser.parse_args(argv)
    if args.tokens < 2 or args.nodes < 1 or args.speculate_tokens < 1:
        parser.error("--tokens must be at least 2, --nodes and --speculate-tokens at least 1")
    args.draft_model = args.draft_model or args.model
    modes = ["off", *(m for m in MODES if m in args.modes and m != "off")]
    tasks = list(dict.fromkeys(args.tasks))
    rtts = sorted({0.0, *args.rtt_ms})
    source = resolve_model(args.model)  # converts the model once, before any swarm
    # generate's answers, computed while the first swarm starts (and in before its first
    # request, so that no timed stream runs beside it).
    conversations = [TASKS[t] for t in tasks]
    with greedy_reference(source.path, conversations, args.tokens) as reference:
        by_rtt = {f"{r:g}": {m: run_one(args, r, m, tasks, reference) for m in modes} for r in rtts}
        wanted = dict(zip(tasks, reference(), strict=True))
    concurrent = {m: by_rtt["0"][m].pop("concurrent") for m in modes} if args.concurrent else None
    if concurrent is not None:
        for m in modes:
            concurrent[m]["vs_off"] = concurrent[m]["tok_s"] / concurrent["off"]["tok_s"]
    results: dict[str, dict[str, dict[str, Any]]] = {
        rtt: {task: {m: runs[m][task] for m in modes} for task in tasks}
        for rtt, runs in by_rtt.items()
    }
    texts: dict[str, str] = {}
    for by_task in results.values():
        for task, runs in by_task.items():
            for run in runs.values():
                run.update(compare(run, runs["off"], results["0"][task]["off"]))
                run["equals_generate"] = run["text"] == wanted[task]
            texts.setdefault(task, runs["off"]["text"])
    everything = [
        run for by_task in results.values() for runs in by_task.values() for run in runs.values()
    ]
    for run in everything:
        del run["text"]  # equal to off's at RTT 0 where identical, which is kept below
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "model": source.name,
        "nodes": args.nodes,
        "cores": os.cpu_count(),
        "max_tokens": args.tokens,
        "speculate_tokens": args.speculate_tokens,
        "modes": modes,
        "tasks": tasks,
        "rtt_ms_per_hop": rtts,
        "draft": (
            {
                "model": args.draft_model,
                "quantization": args.draft_quantization,
                "layers": args.draft_layers,
            }
            if "draft" in modes
            else None
        ),
        "identical": all(run["identical"] for run in everything),
        "equals_generate": all(run["equals_generate"] for run in everything),
        "target": target(results, modes),
        # The issue's other target: at RTT 0, these streams at once lose at most 10% of
        # aggregate tok/s with speculation on (each mode's ratio to off's).
        "concurrent": concurrent,
        "concurrent_target": (
            {
                "streams": args.concurrent,
                "at_least": 0.9,
                "vs_off": {m: concurrent[m]["vs_off"] for m in modes if m != "off"},
                "met": all(
                    concurrent[m]["vs_off"] >= 0.9 and not concurrent[m]["failures"] for m in modes
                ),
            }
            if concurrent is not None
            else None
        ),
        "rtt": results,
        "off_text": texts,
    }
    finish("speculative", result, args)
    return result


if __name__ == "__main__":
    # SIGTERM unwinds like Ctrl-C, so each run's `finally` still stops its swarm.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    main()
