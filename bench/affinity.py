"""Time to first token of a conversation's next turn: cache hit vs miss, in one run.

Prints JSON. One swarm (a DHT, 2 nodes splitting the embedded model, started as the README
shows) and two gateways on it: one with session affinity, one with `--no-affinity`. A
conversation with about 1000 tokens of history is warmed through the first gateway; its
next turn is then sent to both, streaming, and the time to the first text is measured.

    python bench/affinity.py [--model smollm2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import openai

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from models.loading import load_config
from models.resolve import resolve_model
from routing.block_selection import split_evenly
from tests.processes import Process, free_port, http_ok, wait_for

TOPICS = [
    "rivers",
    "mountains",
    "deserts",
    "forests",
    "oceans",
    "islands",
    "glaciers",
    "caves",
    "volcanoes",
    "lakes",
    "canyons",
    "waterfalls",
]


def history() -> list[dict]:
    """A long conversation: about 1000 tokens with the embedded model's tokenizer."""
    messages = [{"role": "system", "content": "You are a knowledgeable, concise geography tutor."}]
    for topic in TOPICS:
        question = f"Tell me about famous {topic} of the world and why people visit them."
        answer = (
            f"Famous {topic} attract travellers for their beauty, history and wildlife. "
            f"Many {topic} are protected areas, and guides explain how they formed. "
        ) * 2
        messages += [
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ]
    return messages


def ttft(client: openai.OpenAI, model: str, messages: list[dict]) -> tuple[float, str]:
    start = time.perf_counter()
    stream = client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    first, text, cached = None, [], 0
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter()
            text.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            cached = chunk.usage.prompt_tokens_details.cached_tokens
    assert first is not None, "no text streamed"
    return first - start, json.dumps({"text": "".join(text), "cached": cached})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    source = resolve_model(args.model)
    blocks = load_config(source.path).num_hidden_layers
    logs = Path(__file__).resolve().parent / "results"
    logs.mkdir(exist_ok=True)
    model = ["--model", str(source.path), "--model-name", source.name]
    processes: list[Process] = []
    try:
        dht = Process("bench-dht", ["dht"], logs)
        processes.append(dht)
        wait_for(lambda: "--initial-peers" in dht.output(), 60, "the DHT")
        peers = dht.output().split("--initial-peers", 1)[1].split()
        for start, end in split_evenly(blocks, 2):
            argv = ["node", *model, "--initial-peers", *peers, "--blocks", f"{start}:{end}"]
            processes.append(Process(f"bench-node-{start}", argv, logs))
        urls = {}
        for name, flags in (("hit", []), ("miss", ["--no-affinity"])):
            port = free_port()
            argv = ["gateway", *model, "--initial-peers", *peers, "--port", str(port), *flags]
            processes.append(Process(f"bench-gateway-{name}", argv, logs))
            urls[name] = f"http://127.0.0.1:{port}"
        for url in urls.values():
            wait_for(lambda u=url: http_ok(f"{u}/health"), 600, "the swarm")
        clients = {
            k: openai.OpenAI(base_url=f"{u}/v1", api_key="x", max_retries=0)
            for k, u in urls.items()
        }

        runs: dict[str, list[float]] = {"hit": [], "miss": []}
        cached: list[int] = []
        conversation = history()
        for i in range(args.repeats):
            reply = clients["hit"].chat.completions.create(  # warms the session's caches
                model=source.name, messages=conversation, max_tokens=8, temperature=0
            )
            conversation = [
                *conversation,
                {"role": "assistant", "content": reply.choices[0].message.content},
                {"role": "user", "content": f"Give me one more example, number {i}."},
            ]
            hit_s, hit = ttft(clients["hit"], source.name, conversation)
            miss_s, miss = ttft(clients["miss"], source.name, conversation)
            assert json.loads(hit)["text"] == json.loads(miss)["text"], (hit, miss)
            runs["hit"].append(hit_s)
            runs["miss"].append(miss_s)
            cached.append(json.loads(hit)["cached"])
            conversation = conversation[:-2]  # the next repeat branches from the same history
        prompt_tokens = (
            clients["miss"]
            .chat.completions.create(
                model=source.name, messages=conversation, max_tokens=1, temperature=0
            )
            .usage.prompt_tokens
        )
    finally:
        for process in reversed(processes):
            process.stop()

    hit, miss = statistics.median(runs["hit"]), statistics.median(runs["miss"])
    print(
        json.dumps(
            {
                "date": time.strftime("%Y-%m-%d"),
                "model": source.name,
                "nodes": 2,
                "history_tokens": prompt_tokens,
                "repeats": args.repeats,
                "cached_tokens_on_hit": cached,
                "ttft_hit_s": hit,
                "ttft_miss_s": miss,
                "hit_over_miss": hit / miss,
                "runs": runs,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
