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

Every answer is greedy: ``hit_equals_miss`` checks the two gateways' answers are equal, and
``greedy_equal`` that every answer is `transformers` ``generate``'s on the whole model.

    python bench/affinity.py [--model smollm2] [--repeats 3] [--turns 3]
                             [--urls HIT MISS] [--record]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import (
    add_record_flag,
    complete,
    finish,
    greedy_check,
    greedy_texts,
    log_dir,
    served_model,
    stream_chat,
)
from models.loading import load_config
from models.resolve import ModelSource, resolve_model
from routing.block_selection import split_evenly
from tests.processes import Process, free_port, http_ok, stop_all, wait_for

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


NEXT_TURN_TOKENS = 8  # the measured next turn's answer
TURN_TOKENS = 20  # each answer of the shared-system-prompt case
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


def streamed_turn(url: str, model: str, messages: list[dict], max_tokens: int) -> dict:
    """One streamed, greedy request: its text, time to first text and usage."""
    streamed = stream_chat(url, model, messages, max_tokens)
    assert streamed.ttft_s is not None and streamed.prompt_tokens is not None, "no text or usage"
    return {
        "text": streamed.text,
        "ttft_s": streamed.ttft_s,
        "prompt_tokens": streamed.prompt_tokens,
        "completion_tokens": streamed.completion_tokens,
        "cached_tokens": streamed.cached_tokens,
    }


def shared_system_prompt(
    url: str, model: str, turns: int, asked: list[tuple[list[dict], str]]
) -> list[dict]:
    """A and B share the system prompt and interleave turns, each resending its history;
    each request and its answer is added to ``asked``."""
    histories = {name: [{"role": "system", "content": system_prompt()}] for name in "AB"}
    results, previous = [], {}
    for turn in range(turns):
        for name, history in histories.items():
            questions = QUESTIONS[name]
            history.append({"role": "user", "content": questions[turn % len(questions)]})
            result = streamed_turn(url, model, history, TURN_TOKENS)
            asked.append((list(history), result["text"]))
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


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--turns", type=int, default=3, help="turns of each conversation")
    parser.add_argument(
        "--urls",
        nargs=2,
        metavar=("HIT", "MISS"),
        help="measure these two gateways of one running swarm (with and without affinity) "
        "instead of starting one",
    )
    add_record_flag(parser)
    args = parser.parse_args(argv)
    if args.turns < 2:
        parser.error("--turns must be at least 2: reuse is measured from each second turn")
    source = resolve_model(args.model)
    with gateways(args.urls, source) as urls:
        model = served_model(urls["hit"])
        runs: dict[str, list[float]] = {"hit": [], "miss": []}
        cached: list[int] = []
        asked: list[tuple[list[dict], str]] = []  # every measured request and its answer
        conversation = history()
        for i in range(args.repeats):
            reply = complete(urls["hit"], model, conversation, 8)  # warms the session's caches
            conversation = [
                *conversation,
                {"role": "assistant", "content": reply["choices"][0]["message"]["content"]},
                {"role": "user", "content": f"Give me one more example, number {i}."},
            ]
            hit = streamed_turn(urls["hit"], model, conversation, NEXT_TURN_TOKENS)
            miss = streamed_turn(urls["miss"], model, conversation, NEXT_TURN_TOKENS)
            asked += [(conversation, hit["text"]), (conversation, miss["text"])]
            runs["hit"].append(hit["ttft_s"])
            runs["miss"].append(miss["ttft_s"])
            cached.append(hit["cached_tokens"])
            conversation = conversation[:-2]  # the next repeat branches from the same history
        turns_asked: list[tuple[list[dict], str]] = []
        shared = shared_system_prompt(urls["hit"], model, args.turns, turns_asked)
        # After the case, and without affinity, so that it seeds nothing.
        system_only = [{"role": "system", "content": system_prompt()}]
        system_tokens = complete(urls["miss"], model, system_only, 1)["usage"]["prompt_tokens"]
        prompt_tokens = complete(urls["miss"], model, conversation, 1)["usage"]["prompt_tokens"]

    # Greedy: the swarm's every answer must be `generate`'s on the whole model.
    tokens = [NEXT_TURN_TOKENS] * len(asked) + [TURN_TOKENS] * len(turns_asked)
    reference = greedy_texts(source.path, [c for c, _ in asked + turns_asked], tokens)
    hit_s, miss_s = statistics.median(runs["hit"]), statistics.median(runs["miss"])
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "model": model,
        "nodes": 2,
        "history_tokens": prompt_tokens,
        "repeats": args.repeats,
        "cached_tokens_on_hit": cached,
        "ttft_hit_s": hit_s,
        "ttft_miss_s": miss_s,
        "hit_over_miss": hit_s / miss_s,
        "hit_equals_miss": all(asked[i][1] == asked[i + 1][1] for i in range(0, len(asked), 2)),
        "runs": runs,
        "shared_system_prompt": summarize(shared, system_tokens),
        **greedy_check([text for _, text in asked + turns_asked], reference),
    }
    finish("affinity", result, args)
    return result


@contextlib.contextmanager
def gateways(urls: list[str] | None, source: ModelSource) -> Iterator[dict[str, str]]:
    """The two gateways to compare: ``urls`` as given, else a swarm of a DHT and 2 nodes
    splitting the model (started as the README shows) with one gateway with affinity and
    one with ``--no-affinity``, all stopped on exit."""
    if urls is not None:
        yield {"hit": urls[0], "miss": urls[1]}
        return
    blocks = load_config(source.path).num_hidden_layers
    logs = log_dir()
    model = ["--model", str(source.path), "--model-name", source.name]
    processes: list[Process] = []
    try:
        dht = Process("bench-affinity-dht", ["dht"], logs)
        processes.append(dht)
        wait_for(lambda: "--initial-peers" in dht.output(), 60, "the DHT")
        peers = dht.output().split("--initial-peers", 1)[1].split()
        for start, end in split_evenly(blocks, 2):
            argv = ["node", *model, "--initial-peers", *peers, "--blocks", f"{start}:{end}"]
            processes.append(Process(f"bench-affinity-node-{start}", argv, logs))
        started = {}
        for name, flags in (("hit", []), ("miss", ["--no-affinity"])):
            port = free_port()
            argv = ["gateway", *model, "--initial-peers", *peers, "--port", str(port), *flags]
            processes.append(Process(f"bench-affinity-gateway-{name}", argv, logs))
            started[name] = f"http://127.0.0.1:{port}"
        for url in started.values():
            wait_for(lambda u=url: http_ok(f"{u}/health"), 600, "the swarm")
        yield started
    finally:
        stop_all(processes)


if __name__ == "__main__":
    main()
