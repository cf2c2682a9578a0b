"""Aggregate throughput and time to first token under concurrent streams, in one run.

Prints JSON. First, in this process and before the swarm starts (so neither competes with
the other for the CPU), `transformers` `generate` runs on the whole model (fp32, greedy,
exactly ``--tokens`` new tokens per row) with batch 1 and with batch N, the largest of
``--streams``, left-padded: batch N is the ceiling of what this machine can decode at once.
Then `swarmgate up` (a DHT, 2 nodes, the gateway on loopback) is started and warmed up as
the baseline is (one stream, then N at once, 4 tokens each: the first batch of a size
allocates what later ones reuse), and for each level ``c`` of ``--streams``, ``c`` greedy
streams are sent at once (streamed chat completions, each over its own connection).
With ``--url`` the swarm is the one behind that gateway, as it runs.

How to read it:

- ``hf.batch_1`` / ``hf.batch_N``: generated tokens / wall time of one ``generate`` call;
  ``hf.batch_ratio`` is how much batching alone gains on this machine.
- ``swarm["c"].tok_s``: completion tokens of all ``c`` streams (from ``usage``) / wall time
  from the first request sent to the last stream done, in the median of ``--repeats``
  rounds (``tok_s_rounds`` lists them all; the TTFTs are that round's, ``failures`` count
  every round's). ``speedup_vs_1`` divides it by the 1-stream level's, ``vs_hf_batch``
  divides the largest level's by HF's batch N.
- ``ttft_p50_s`` / ``ttft_p99_s``: from sending a request to its first text, over the
  streams that got one. p99 is nearest-rank, so with fewer than 100 streams it is the max.
- ``failures``: streams that raised, got no text, ended with a finish reason other than
  ``length``/``stop``, or were still running when the level's ``--timeout`` ran out.
- ``target_met``: the issue's target, the largest level >= 5x one stream with no failures
  at any level (``target`` names the levels it compared).

Every stream asks for a story on its own topic with its round's name and its own number,
and these sit in the first block of prompt tokens, so no stream (of any round) shares a
cached prefix with another: each is a cold conversation. Each stream also sends its own
bearer token, as concurrent users would; one token for all would hit the gateway's
``--max-concurrent-per-key`` (4) and measure its 429s instead. A stream may stop before
``--tokens`` at the end of its story (finish reason ``stop``); ``tok_s`` counts what it did
generate and ``finish_reasons`` shows how often that happened.

    python bench/concurrency.py [--model smollm2] [--streams 1 4 16] [--tokens 48]
                                [--timeout 300] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import signal
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import (
    Streamed,
    add_record_flag,
    astream_chat,
    finish,
    running_swarm,
    served_model,
)
from models.devices import Placement
from models.resolve import resolve_model
from tests.processes import alarms

NODES = 2
TARGET_SPEEDUP = 5.0
TOPICS = [
    "a lighthouse keeper and the sea",
    "a dragon who collects teapots",
    "a robot learning to paint",
    "two rival bakers in a small town",
    "a lost map of an underground city",
    "a girl who can talk to birds",
    "the last train across the mountains",
    "a detective who is afraid of the dark",
    "a garden that grows overnight",
    "a ship of explorers in the Arctic",
    "a clockmaker and a stolen hour",
    "a village that forgot how to sing",
    "an astronaut stranded on a quiet moon",
    "a library where books rewrite themselves",
    "a fox who runs a hotel",
    "a storm that lasted a hundred days",
]


def story(round_: str, index: int) -> str:
    """Stream ``index`` of a round's own request (the round's name and the stream's number
    come first, see above)."""
    topic = TOPICS[index % len(TOPICS)]
    return f"Story {round_}-{index}: write a very long story about {topic}, with many chapters."


def messages(round_: str, index: int) -> list[dict[str, Any]]:
    return [{"role": "user", "content": story(round_, index)}]


# --- transformers baseline ---------------------------------------------------------------


def hf_generate(model: Any, tokenizer: Any, prompts: list[str], tokens: int) -> dict[str, float]:
    """One greedy ``generate`` over ``prompts`` as a left-padded batch, exactly ``tokens``
    new tokens per row."""
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    batch = batch.to(model.device)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            **batch,
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    wall = time.perf_counter() - start
    generated = (out.shape[1] - batch["input_ids"].shape[1]) * out.shape[0]
    return {"batch": len(prompts), "tokens": generated, "wall_s": wall, "tok_s": generated / wall}


def bench_hf(path: Path, batch: int, tokens: int, placement: Placement) -> dict[str, Any]:
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model: Any = AutoModelForCausalLM.from_pretrained(path, dtype=placement.dtype)
    model.eval().to(placement.device)
    prompts: list[str] = []
    for i in range(batch):
        chat = [{"role": "user", "content": story("0", i)}]
        text = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        assert isinstance(text, str)
        prompts.append(text)
    for rows in (prompts[:1], prompts):  # warm-up, both shapes
        hf_generate(model, tokenizer, rows, 2)
    one = hf_generate(model, tokenizer, prompts[:1], tokens)
    many = hf_generate(model, tokenizer, prompts, tokens)
    return {"batch_1": one, f"batch_{batch}": many, "batch_ratio": many["tok_s"] / one["tok_s"]}


# --- the swarm ----------------------------------------------------------------------------


def failed(result: Streamed) -> bool:
    return (
        result.error is not None
        or result.ttft_s is None
        or result.finish_reason not in ("length", "stop")
    )


def nearest_rank(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


async def run_level(
    url: str, model: str, level: int, tokens: int, timeout_s: float, round_: str
) -> dict[str, Any]:
    """``level`` streams at once, each with its own prompt (named by ``round_``) and bearer
    token."""
    limits = httpx.Limits(max_connections=level)
    client = httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits)
    results = [Streamed() for _ in range(level)]
    start = time.perf_counter()
    tasks = [
        asyncio.create_task(
            astream_chat(
                client,
                model,
                messages(round_, i),
                tokens,
                r,
                api_key=f"bench-concurrency-{level}-{i}",
            )
        )
        for i, r in enumerate(results)
    ]
    try:
        _, pending = await asyncio.wait(tasks, timeout=timeout_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        now = time.perf_counter()
        for task, result in zip(tasks, results, strict=True):
            if task in pending:
                result.error = f"still running when the level's {timeout_s:.0f} s ran out"
                result.ended = now
    finally:
        await client.aclose()

    wall = max(r.ended or start for r in results) - start
    total = sum(r.tokens for r in results)
    ttfts = [r.ttft_s for r in results if r.ttft_s is not None]
    return {
        "streams": level,
        "completion_tokens": total,
        "wall_s": wall,
        "tok_s": total / wall if wall > 0 else 0.0,
        "ttft_p50_s": statistics.median(ttfts) if ttfts else None,
        "ttft_p99_s": nearest_rank(ttfts, 0.99) if ttfts else None,
        "failures": sum(failed(r) for r in results),
        "without_usage": sum(r.completion_tokens is None for r in results),
        "finish_reasons": dict(Counter(str(r.finish_reason) for r in results)),
        "errors": sorted({r.error for r in results if r.error})[:5],
    }


async def bench_swarm(
    url: str, model: str, levels: list[int], tokens: int, timeout_s: float, repeats: int
) -> dict[str, dict[str, Any]]:
    # Warm-up, like the HF baseline's: one stream, then the largest level, a few tokens
    # each (their own prompts, so no measured stream reuses their caches).
    for level in (1, levels[-1]):
        await run_level(url, model, level, 4, timeout_s, f"warmup{level}")
    out: dict[str, dict[str, Any]] = {}
    for c in levels:
        rounds = [
            await run_level(url, model, c, tokens, timeout_s, f"{c}.{r}") for r in range(repeats)
        ]
        median = sorted(rounds, key=lambda result: result["tok_s"])[(len(rounds) - 1) // 2]
        out[str(c)] = {
            **median,
            "tok_s_rounds": [result["tok_s"] for result in rounds],
            "failures": sum(result["failures"] for result in rounds),
            "errors": sorted({e for result in rounds for e in result["errors"]})[:5],
        }
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument(
        "--timeout", type=float, default=300.0, help="seconds each level may take at most"
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="rounds per level; the median round is reported"
    )
    parser.add_argument("--device", default="auto", help="of HF's baseline and the swarm alike")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument(
        "--url", help="measure the gateway at URL (its swarm as it runs) instead of starting one"
    )
    add_record_flag(parser)
    args = parser.parse_args(argv)
    levels = sorted(set(args.streams))
    if levels[0] < 1 or args.tokens < 1 or args.repeats < 1:
        parser.error("--streams, --tokens and --repeats must be positive")
    source = resolve_model(args.model)
    source.fetch_whole()  # a Hub model: `generate` needs all of it
    top = levels[-1]
    flags = ["--device", args.device, "--dtype", args.dtype]
    placement = Placement.of(args.device, args.dtype)
    hf = bench_hf(source.path, top, args.tokens, placement)

    with running_swarm(args.url, args.model, NODES, "bench-concurrency-up", flags) as url:
        model_id = served_model(url)
        levels_out = asyncio.run(
            bench_swarm(url, model_id, levels, args.tokens, args.timeout, args.repeats)
        )
        counters = alarms(url)

    one = levels_out.get("1")
    for result in levels_out.values():
        result["speedup_vs_1"] = result["tok_s"] / one["tok_s"] if one and one["tok_s"] else None
    best = levels_out[str(top)]
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": placement.describe(),
        "model": source.name,
        "nodes": NODES,
        "tokens": args.tokens,
        "streams": levels,
        "hf": hf,
        "swarm": levels_out,
        "vs_hf_batch": best["tok_s"] / hf[f"batch_{top}"]["tok_s"],
        # Servers given up on during the run: under load alone, none should be.
        "alarms": counters,
        "target": f"{top} streams >= {TARGET_SPEEDUP:g}x 1 stream, no failures",
        "target_met": bool(
            best["speedup_vs_1"] is not None
            and best["speedup_vs_1"] >= TARGET_SPEEDUP
            and not any(r["failures"] for r in levels_out.values())
        ),
    }
    finish("concurrency", result, args)
    return result


if __name__ == "__main__":
    # SIGTERM unwinds like Ctrl-C, so the swarm is still stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    main()
