"""Conversations come back to the servers that hold their KV caches, and stay exact."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import pytest

from protocol.prefix import BLOCK_TOKENS
from tests.integration.conftest import Swarm, node_infos, running_gateway, start_gateway
from tests.integration.test_swarm_chat import _reference, hf_greedy
from tests.processes import Process, RedisServer, http_ok, wait_for

pytestmark = pytest.mark.integration

MAX_TOKENS = 10


@dataclass
class Turn:
    messages: list[dict]
    text: str
    prompt: list[int]
    fed: list[int]  # what the session's caches hold afterwards
    cached: int
    computed: int = 0  # positions run through the span by each node, this turn


@dataclass
class Conversation:
    swarm: Swarm
    base_url: str
    key: str | None = None
    turns: list[Turn] = field(default_factory=list)

    def ask(self, messages: list[dict], *, check_nodes: bool = False) -> Turn:
        before = node_infos(self.swarm.initial_peers) if check_nodes else {}
        client = openai.OpenAI(base_url=f"{self.base_url}/v1", api_key="x", max_retries=0)
        extra = {"prompt_cache_key": self.key} if self.key else {}
        r = client.chat.completions.create(
            model=self.swarm.model_id,
            messages=messages,
            max_tokens=MAX_TOKENS,
            temperature=0,
            **extra,
        )
        prompt, expected = hf_greedy(self.swarm.model_path, messages, MAX_TOKENS)
        tokenizer = _reference(self.swarm.model_path)[1]
        text = r.choices[0].message.content or ""
        assert text == tokenizer.decode(expected, skip_special_tokens=True)
        assert r.usage.prompt_tokens == len(prompt)
        fed = len(expected) - (r.choices[0].finish_reason == "length")
        turn = Turn(
            messages,
            text,
            prompt,
            prompt + expected[:fed],
            r.usage.prompt_tokens_details.cached_tokens,
        )
        if check_nodes:
            after = node_infos(self.swarm.initial_peers)
            deltas = {after[p].tokens_computed - before[p].tokens_computed for p in after}
            assert len(deltas) == 1, deltas  # every hop ran the same positions
            turn.computed = deltas.pop()
            assert turn.computed == len(prompt) - turn.cached + fed
        self.turns.append(turn)
        return turn


def reusable(previous: list[int], prompt: list[int]) -> int:
    """What a cache holding ``previous`` can give ``prompt``: all of it when ``prompt``
    continues it exactly (the conversation's session resumes), else whole common blocks
    (a fork, seeded from them); never the prompt's last token (its logits start the answer)."""
    if len(previous) < len(prompt) and prompt[: len(previous)] == previous:
        return len(previous)
    common = 0
    for a, b in zip(previous, prompt, strict=False):
        if a != b:
            break
        common += 1
    return min(common // BLOCK_TOKENS * BLOCK_TOKENS, len(prompt) - 1)


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(turn: Turn) -> dict:
    return {"role": "assistant", "content": turn.text}


def test_multi_turn_conversation_reuses_caches_and_stays_exact(swarm: Swarm) -> None:
    chat = Conversation(swarm, swarm.base_url)
    system = {"role": "system", "content": "You are a patient tutor of geography. " * 4}
    t1 = chat.ask([system, user("Tell me about the rivers of Europe, please.")], check_nodes=True)
    assert t1.cached == 0

    m2 = [*t1.messages, assistant(t1), user("And which is the longest one of them?")]
    t2 = chat.ask(m2, check_nodes=True)
    assert t2.cached == reusable(t1.fed, t2.prompt) > 0
    assert t2.computed < len(t2.prompt)  # the second turn sent only what was new

    t3 = chat.ask(m2)  # regenerate the same turn
    assert t3.cached == reusable(t2.fed, t3.prompt) >= t2.cached

    t4 = chat.ask([*m2, assistant(t3), user("What about its source?")])
    assert t4.cached == reusable(t3.fed, t4.prompt) > t3.cached

    edited = [*t1.messages, assistant(t1), user("Which river crosses the most countries?")]
    t5 = chat.ask(edited, check_nodes=True)  # an edited turn: the cache is trimmed
    assert t5.cached == reusable(t4.fed, t5.prompt) > 0

    t6 = chat.ask([*edited, assistant(t5), user("Name two of those countries.")])
    assert t6.cached == reusable(t5.fed, t6.prompt) > 0


def test_chats_sharing_a_system_prompt_keep_their_own_caches_turn_after_turn(
    swarm: Swarm,
) -> None:
    system = {"role": "system", "content": "You answer as a careful ship's navigator. " * 6}
    a, b = Conversation(swarm, swarm.base_url), Conversation(swarm, swarm.base_url)
    # Questions of several blocks each, so that a history outlasts the shared prompt by whole
    # blocks even if a tiny random model's answer does not survive re-tokenization.
    a1 = a.ask([system, user("Plot a course from Lisbon to the Azores, step by step. " * 5)])
    b1 = b.ask([system, user("Which stars guide a sailor at night in the north? " * 5)])
    assert b1.cached == reusable(a1.fed, b1.prompt) > 0  # the system prompt, seeded
    a2 = a.ask([*a1.messages, assistant(a1), user("And back again?")])
    b2 = b.ask([*b1.messages, assistant(b1), user("And in the south?")])
    # Each turn reuses its own whole history: neither conversation cropped the other's.
    assert a2.cached == reusable(a1.fed, a2.prompt) > b1.cached
    assert b2.cached == reusable(b1.fed, b2.prompt) > b1.cached


def test_without_affinity_nothing_is_reused(swarm: Swarm, tmp_path: Path) -> None:
    gateway, url = start_gateway(
        swarm.model_path, swarm.initial_peers, tmp_path, "--no-affinity", name="gateway-no-affinity"
    )
    try:
        wait_for(lambda: http_ok(f"{url}/health") or not gateway.alive(), 120, "the gateway")
        chat = Conversation(swarm, url)
        t1 = chat.ask([user("Count some stars for me. " * 8)])
        t2 = chat.ask([*t1.messages, assistant(t1), user("More!")])
        assert t1.cached == t2.cached == 0  # and both still equal HF (checked in ask)
    finally:
        gateway.stop()


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def two_gateways(swarm: Swarm, redis_server: RedisServer, tmp_path: Path) -> Iterator[list[str]]:
    started: list[Process] = []
    urls = []
    try:
        for name in ("gateway-a", "gateway-b"):
            gateway, url = start_gateway(
                swarm.model_path,
                swarm.initial_peers,
                tmp_path,
                "--redis-url",
                redis_server.url,
                name=name,
            )
            started.append(gateway)
            urls.append(url)
        for gateway, url in zip(started, urls, strict=True):
            wait_for(
                lambda g=gateway, u=url: http_ok(f"{u}/health") or not g.alive(), 120, "a gateway"
            )
        yield urls
    finally:
        for gateway in started:
            gateway.stop()


def test_two_gateways_share_sessions_through_redis(swarm: Swarm, two_gateways: list[str]) -> None:
    a, b = two_gateways
    t1 = Conversation(swarm, a).ask([user("Describe a quiet harbour at dawn. " * 4)])
    follow = [*t1.messages, assistant(t1), user("Now at night.")]
    t2 = Conversation(swarm, b).ask(follow)
    # The pinned session is resumed if this turn extends its whole history; a fork of it
    # (the tiny model's answer may not survive re-tokenization) is seeded by prefix only
    # from the sessions of the gateway that asks, so b computes it afresh (issue 24 §4).
    extends = t2.prompt[: len(t1.fed)] == t1.fed
    assert t2.cached == (len(t1.fed) if extends else 0)

    keyed = Conversation(swarm, a, key="conversation-42")
    k1 = keyed.ask([user("Plan a walk in the hills. " * 4)])
    keyed.base_url = b
    k2 = keyed.ask([*k1.messages, assistant(k1), user("Shorter, please.")])
    assert k2.cached == reusable(k1.fed, k2.prompt) > 0


def test_requests_survive_redis_going_away_and_hits_resume(
    swarm: Swarm, two_gateways: list[str], redis_server: RedisServer
) -> None:
    a, _ = two_gateways
    chat = Conversation(swarm, a)
    t1 = chat.ask([user("Tell a story about a lighthouse keeper. " * 3)])
    redis_server.stop()
    t2 = chat.ask([*t1.messages, assistant(t1), user("What happened next?")])
    # No pin without Redis: a fresh session, which the servers seed from the prefix they
    # still hold (their own index of block hashes), and the answer is still exact.
    assert t2.cached == reusable(t1.fed, t2.prompt) > 0
    metrics = httpx.get(f"{a}/metrics").text
    assert "swarmgate_affinity_errors_total 0.0" not in metrics

    redis_server.start()  # empty: the next turn misses, then hits resume
    t3 = chat.ask([*t2.messages, assistant(t2), user("And then?")])
    t4 = chat.ask([*t3.messages, assistant(t3), user("How did it end?")])
    assert t4.cached == reusable(t3.fed, t4.prompt) > 0


def test_concurrent_requests_on_one_conversation_key_are_both_exact(
    swarm: Swarm, two_gateways: list[str]
) -> None:
    a, b = two_gateways
    messages = [user("Write a limerick about a cat who loves the sea. " * 3)]
    errors: list[BaseException] = []

    def ask(url: str) -> None:
        try:
            Conversation(swarm, url, key="shared-key").ask(messages)
        except BaseException as e:  # reported below, in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=ask, args=(url,)) for url in (a, b, a)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors


def test_one_api_key_never_reuses_or_sees_another_keys_cached_prefix(
    swarm: Swarm, tmp_path: Path
) -> None:
    question = [user(" ".join(f"Fact {i}: rivers run to the sea." for i in range(20)))]
    flags = ("--api-key", "key-a", "--api-key", "key-b")
    with running_gateway(swarm, tmp_path, *flags, name="gateway-tenants") as url:

        def cached(key: str) -> int:
            sdk = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)
            reply = sdk.chat.completions.create(
                model=swarm.model_id, messages=question, max_tokens=2, temperature=0
            )
            return reply.usage.prompt_tokens_details.cached_tokens

        assert cached("key-a") == 0
        assert cached("key-a") >= BLOCK_TOKENS  # the same key reuses its prompt
        assert cached("key-b") == 0  # another key cannot tell that it was ever sent


def test_choices_of_one_request_share_the_first_ones_prompt_and_stay_exact(
    swarm: Swarm,
) -> None:
    """n > 1: the first choice computes the prompt, the others start from a copy of its
    cache on the servers and decode alongside it; every greedy choice is `generate`'s."""
    messages = [
        {"role": "system", "content": "You keep the logbook of a lighthouse. " * 12},
        user("What did you see tonight?"),
    ]
    prompt, expected = hf_greedy(swarm.model_path, messages, MAX_TOKENS)
    text = _reference(swarm.model_path)[1].decode(expected, skip_special_tokens=True)
    before = node_infos(swarm.initial_peers)
    client = openai.OpenAI(base_url=f"{swarm.base_url}/v1", api_key="x", max_retries=0)
    r = client.chat.completions.create(
        model=swarm.model_id, messages=messages, max_tokens=MAX_TOKENS, temperature=0, n=3
    )
    assert [c.message.content for c in r.choices] == [text] * 3
    after = node_infos(swarm.initial_peers)
    computed = {after[p].tokens_computed - before[p].tokens_computed for p in after}
    assert len(computed) == 1, computed
    # Each follower computes at most its prompt's last partial block, plus its answer.
    assert len(prompt) >= 4 * BLOCK_TOKENS
    assert computed.pop() <= len(prompt) + 2 * BLOCK_TOKENS + 3 * MAX_TOKENS
