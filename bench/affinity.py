"""Time to first token of a conversation's next turn: cache hit vs miss, in one run.

Prints JSON. One swarm (a DHT, 2 nodes splitting the embedded model, started as the README
shows) and two gateways on it: one with session affinity, one with `--no-affinity`. A
conversation with about 1000 tokens of history is warmed through the first gateway; its
next turn is then sent to both, streaming, and the time to the first text is measured.

Then, under `"shared_system_prompt"`, on the same swarm and the affinity gateway: two
conversations A and B share a long system prompt (about 400 tokens) and interleave their
turns, A1 B1 A2 B2 A3 B3 (`--turns` each), greedy and streamed. They are plain OpenAI
clients: no `prompt_cache_key`, `user` or `X-Session-ID`, and every request resends the
whole history (system prompt, earlier questions and the answers it got). Per request,
`turns` lists `prompt_tokens`, `completion_tokens`, `cached_tokens`
(`usage.prompt_tokens_details.cached_tokens`) and `ttft_s`. How to read it:

- `own_history_reused`, for each turn after a conversation's first: cached tokens over that
  conversation's previous request's `prompt_tokens + completion_tokens`, all from `usage`.
  A full hit is under 1: servers reuse whole matching 32-token blocks (the tail after the
  last full block, up to 31 tokens, is recomputed), the last answer token was never fed to
  the model, and the gateway always recomputes the last prompt token. With a ~400-token
  system prompt that costs at most about 7%. `target_own_history_met`: every such turn is
  at least 0.9, although the other conversation ran in between.
- `system_prompt_reused`: B1's cached tokens over `system_prompt_tokens`, which is the
  `prompt_tokens` of a request carrying only the system message (its chat-template turn
  plus the few tokens that open the assistant's turn, as many as open B1's user turn),
  measured at the end through the `--no-affinity` gateway so that it seeds nothing. B1
  has no cache of its own: it can only be seeded from A's blocks, and servers share a
  prefix in whole 32-token blocks (hashes of 32-token blocks), so at most
  `system_prompt_tokens` rounded down to a multiple of 32 can come back.
  `target_system_prompt_met`: B1 reused at least 0.9 of that rounded-down count.

    python bench/affinity.py [--model smollm2] [--repeats 3] [--turns 3]
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


BLOCK_TOKENS = 32  # servers index and share cached prefixes in blocks of this many tokens
DESKS = ["lending", "reference", "archives", "maps", "music", "newspapers", "children's books"]
QUESTIONS = {
    "A": [
        "I want to borrow an old atlas of Europe. Can I take it home?",
        "Then where can I read it, and may I photograph a few pages?",
        "Who should I ask if a page is torn when I open it?",
        "Can I reserve the atlas for next Saturday morning?",
    ],
    "B": [
        "My daughter is six. Which desk has picture books for her?",
        "Can she get her own library card, and what does it cost?",
        "Are there reading hours for children on weekends?",
        "How many books may she borrow at once?",
    ],
}


def system_prompt() -> str:
    """A help-desk system prompt of about 400 tokens with the embedded model's tokenizer."""
    rules = [
        f"The {desk} desk is open from nine to five on weekdays and from ten to two on "
        f"Saturdays; visitors with questions about {desk} should be sent there, and staff "
        f"at the {desk} desk can renew, reserve or locate items in their collection."
        for desk in DESKS
    ]
    return " ".join(
        [
            "You are the help desk assistant of the Northwind Public Library.",
            "Answer in one or two short, friendly sentences, and never invent a service.",
            *rules,
            "Rare items never leave the building, photographs are allowed without flash,",
            "and damaged pages must be reported to a librarian before the item is returned.",
        ]
    )


def streamed_turn(client: openai.OpenAI, model: str, messages: list[dict], max_tokens: int) -> dict:
    """One streamed, greedy request: its text, time to first text and usage."""
    start = time.perf_counter()
    stream = client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    first, text, usage = None, [], None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter()
            text.append(chunk.choices[0].delta.content)
        usage = chunk.usage or usage
    assert first is not None and usage is not None, "no text or no usage streamed"
    return {
        "text": "".join(text),
        "ttft_s": first - start,
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "cached_tokens": usage.prompt_tokens_details.cached_tokens,
    }


def shared_system_prompt(client: openai.OpenAI, model: str, turns: int) -> list[dict]:
    """A and B share the system prompt and interleave turns, each resending its history."""
    histories = {name: [{"role": "system", "content": system_prompt()}] for name in "AB"}
    results, previous = [], {}
    for turn in range(turns):
        for name, history in histories.items():
            questions = QUESTIONS[name]
            history.append({"role": "user", "content": questions[turn % len(questions)]})
            result = streamed_turn(client, model, history, max_tokens=20)
            history.append({"role": "assistant", "content": result.pop("text")})
            if name in previous:  # what the servers could hold of this conversation
                own = previous[name]["prompt_tokens"] + previous[name]["completion_tokens"]
                result["own_history_reused"] = result["cached_tokens"] / own
            previous[name] = result
            results.append({"request": f"{name}{turn + 1}", **result})
    return results


def summarize(turns: list[dict], system_tokens: int) -> dict:
    reused = [t["own_history_reused"] for t in turns if "own_history_reused" in t]
    b1 = next(t for t in turns if t["request"] == "B1")
    shareable = system_tokens // BLOCK_TOKENS * BLOCK_TOKENS
    return {
        "system_prompt_tokens": system_tokens,
        "system_prompt_shareable_tokens": shareable,
        "system_prompt_reused": b1["cached_tokens"] / system_tokens,
        "target_system_prompt_met": b1["cached_tokens"] >= 0.9 * shareable,
        "min_own_history_reused": min(reused),
        "target_own_history_met": min(reused) >= 0.9,
        "turns": turns,
    }


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
    parser.add_argument("--turns", type=int, default=3, help="turns of each conversation")
    args = parser.parse_args()
    if args.turns < 2:
        parser.error("--turns must be at least 2: reuse is measured from each second turn")
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
        shared = shared_system_prompt(clients["hit"], source.name, args.turns)
        system_tokens = (  # after the case, and without affinity, so that it seeds nothing
            clients["miss"]
            .chat.completions.create(
                model=source.name,
                messages=[{"role": "system", "content": system_prompt()}],
                max_tokens=1,
                temperature=0,
            )
            .usage.prompt_tokens
        )
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
                "shared_system_prompt": summarize(shared, system_tokens),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
