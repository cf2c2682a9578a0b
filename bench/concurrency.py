"""Aggregate throughput and time to first token under concurrent streams, in one run.

Prints JSON. First, in this process and before the swarm starts (so neither competes with
the other for the CPU), `transformers` `generate` runs on the whole model (fp32, greedy,
exactly ``--tokens`` new tokens per row) with batch 1 and with batch N, the largest of
``--streams``, left-padded: batch N is the ceiling of what this machine can decode at once.
Then `swarmgate up` (a DHT, 2 nodes, the gateway on loopback) is started and warmed up as
the baseline is (one stream, then N at once, 4 tokens each: the first batch of a size
allocates what later ones reuse), and for each level ``c`` of ``--streams``, ``c`` greedy
streams are sent at once through the OpenAI SDK.

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
import json
import math
import os
import signal
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
import torch
from openai.types.chat import ChatCompletionMessageParam
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from models.devices import Placement
from models.resolve import resolve_model
from tests.processes import alarms, start_up

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


def messages(round_: str, index: int) -> list[ChatCompletionMessageParam]:
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


@dataclass
class StreamResult:
    started: float = 0.0
    ended: float | None = None
    ttft_s: float | None = None
    tokens: int = 0
    finish_reason: str | None = None
    error: str | None = None
    usage: bool = False  # whether the stream ended with a usage chunk
    chunks: int = field(default=0, repr=False)  # content deltas: the count without usage

    @property
    def failed(self) -> bool:
        return (
            self.error is not None
            or self.ttft_s is None
            or self.finish_reason not in ("length", "stop")
        )


async def one_stream(
    client: openai.AsyncOpenAI,
    model: str,
    prompt: list[ChatCompletionMessageParam],
    tokens: int,
    result: StreamResult,
) -> None:
    """Fills ``result`` as the stream goes, so a stream cancelled by the level's timeout
    still reports what it got."""
    result.started = time.perf_counter()
    try:
        stream = await client.chat.completions.create(
            model=model,
            messages=prompt,
            max_tokens=tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        async with stream:
            async for chunk in stream:
                if chunk.choices:
                    choice = chunk.choices[0]
                    if choice.delta.content:
                        if result.ttft_s is None:
                            result.ttft_s = time.perf_counter() - result.started
                        result.chunks += 1
                    if choice.finish_reason is not None:
                        result.finish_reason = choice.finish_reason
                if chunk.usage is not None:
                    result.usage = True
                    result.tokens = chunk.usage.completion_tokens
        if not result.usage:
            result.tokens = result.chunks  # a chunk can hold several tokens: a lower bound
    except Exception as e:  # a failed stream is a result, not the end of the benchmark
        result.error = f"{type(e).__name__}: {e}"[:300]
    finally:
        result.ended = time.perf_counter()


def nearest_rank(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


async def run_level(
    url: str, model: str, level: int, tokens: int, timeout_s: float, round_: str
) -> dict[str, Any]:
    """``level`` streams at once, each with its own prompt (named by ``round_``) and bearer
    token."""
    clients = [
        openai.AsyncOpenAI(
            base_url=f"{url}/v1",
            api_key=f"bench-concurrency-{level}-{i}",
            max_retries=0,
            timeout=timeout_s,
        )
        for i in range(level)
    ]
    results = [StreamResult() for _ in range(level)]
    start = time.perf_counter()
    tasks = [
        asyncio.create_task(one_stream(c, model, messages(round_, i), tokens, r))
        for i, (c, r) in enumerate(zip(clients, results, strict=True))
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
        for client in clients:
            await client.close()

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
        "failures": sum(r.failed for r in results),
        "without_usage": sum(not r.usage for r in results),
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


def main() -> None:
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
    args = parser.parse_args()
    levels = sorted(set(args.streams))
    if levels[0] < 1 or args.tokens < 1 or args.repeats < 1:
        parser.error("--streams, --tokens and --repeats must be positive")
    # SIGTERM unwinds like Ctrl-C, so the `finally` below still stops the swarm.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    source = resolve_model(args.model)
    source.fetch_whole()  # a Hub model: `generate` needs all of it
    top = levels[-1]
    placement = Placement.of(args.device, args.dtype)
    hf = bench_hf(source.path, top, args.tokens, placement)

    log_dir = Path(__file__).resolve().parent / "results"
    log_dir.mkdir(exist_ok=True)
    flags = ["--device", args.device, "--dtype", args.dtype]
    swarm, url = start_up(args.model, NODES, log_dir, "bench-concurrency-up", flags=flags)
    try:
        levels_out = asyncio.run(
            bench_swarm(url, source.name, levels, args.tokens, args.timeout, args.repeats)
        )
        counters = alarms(url)
    finally:
        swarm.stop(timeout_s=60)

    one = levels_out.get("1")
    for result in levels_out.values():
        result["speedup_vs_1"] = result["tok_s"] / one["tok_s"] if one and one["tok_s"] else None
    best = levels_out[str(top)]
    print(
        json.dumps(
            {
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
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
