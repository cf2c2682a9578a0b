"""Chaos on a real loopback swarm: servers die mid-generation and streams go on, exactly.

The module shares one DHT and a pool of nodes started command by command (tests/integration/
pool.py): each test holds the spans it needs, killed servers are replaced, and each test gets
a gateway of its own, so no ban or cache carries over. Kills are `kill -9` of a node's whole
process group, as a machine dying.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import MODEL_ID, Swarm
from tests.integration.pool import NodePool, node_pool
from tests.integration.test_push import hop_inputs
from tests.integration.test_swarm_chat import _reference, hf_greedy
from tests.processes import Process, alarms, node_identity, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

HALF = 2  # the tiny model's 4 blocks, split in two
MESSAGES = [{"role": "user", "content": "Tell me a long story about a river and a mountain."}]
MAX_TOKENS = 40


@dataclass
class Streamed:
    text: str = ""
    tokens: int = 0
    errors: list[dict] = field(default_factory=list)
    done: bool = False
    route: str = ""


def stream_chat(
    base_url: str, on_token: Callable[[int, Streamed], None] = lambda n, s: None
) -> Streamed:
    """A greedy streamed chat read as raw SSE; ``on_token`` runs after each content delta."""
    body = {
        "model": MODEL_ID,
        "messages": MESSAGES,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "stream": True,
    }
    result = Streamed()
    event = None
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200, r.read()
        result.route = r.headers.get("x-swarmgate-route", "")
        for line in r.iter_lines():
            if line.startswith("event: "):
                event = line.removeprefix("event: ")
            elif line.startswith("data: "):
                data = line.removeprefix("data: ")
                if data == "[DONE]":
                    result.done = True
                    break
                payload = json.loads(data)
                if event == "error":
                    result.errors.append(payload)
                elif payload["choices"] and payload["choices"][0]["delta"].get("content"):
                    result.text += payload["choices"][0]["delta"]["content"]
                    result.tokens += 1
                    on_token(result.tokens, result)
                event = None
    return result


def expected_text(model_path: Path) -> tuple[str, int]:
    _, tokens = hf_greedy(model_path, MESSAGES, MAX_TOKENS)
    return _reference(model_path)[1].decode(tokens, skip_special_tokens=True), len(tokens)


def peers_of(nodes: list[Process]) -> dict[str, tuple[Process, tuple[int, int]]]:
    """peer id → (its process, its span)."""
    return {peer: (process, span) for process in nodes for peer, span in [node_identity(process)]}


def servers(swarm: Swarm) -> list[dict]:
    return list(httpx.get(f"{swarm.base_url}/swarm", timeout=5).json()["servers"])


def online(swarm: Swarm) -> list[dict]:
    return [s for s in servers(swarm) if s["state"] == "online"]


REPLICATED = [(0, HALF), (0, HALF), (HALF, 4), (HALF, 4)]  # two servers for each half
SINGLE = [(0, HALF), (HALF, 4)]  # one for each half: nothing to fail over to


@pytest.fixture(scope="module")
def pool(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodePool]:
    """One DHT and its servers for the whole module; each test holds the spans it needs
    and gets a fresh gateway (`NodePool.gateway`), and servers it kills are replaced."""
    with node_pool(tiny_model, tmp_path_factory.mktemp("failover-logs")) as running:
        yield running


@pytest.fixture
def replicated(pool: NodePool) -> Iterator[Swarm]:
    """Two servers for each half of the model, a fresh gateway."""
    with pool.gateway(REPLICATED) as swarm:
        yield swarm


@pytest.fixture
def single(pool: NodePool) -> Iterator[tuple[Swarm, NodePool]]:
    """One server for each half, a fresh gateway."""
    with pool.gateway(SINGLE) as swarm:
        yield swarm, pool


@pytest.mark.parametrize("hop", ["first", "last"])
def test_a_stream_survives_its_server_dying_and_stays_token_exact(
    replicated: Swarm, pool: NodePool, hop: str
) -> None:
    expected, length = expected_text(replicated.model_path)
    assert length > 24, "the reference must be long enough to kill mid-stream"
    # Early in the stream: the gateway runs ahead of the client that reads it, and a kill
    # after the gateway's last step would test no failover.
    kill_at = random.Random(f"chaos-{hop}").randrange(2, 10)
    print(f"killing the {hop} hop's server after token {kill_at}")
    nodes = peers_of(replicated.nodes)
    killed: list[str] = []
    failovers = alarms(replicated.base_url)["swarmgate_failovers_total"]

    def kill(tokens: int, so_far: Streamed) -> None:
        if tokens != kill_at:
            return
        route = [part.rsplit(":", 1) for part in so_far.route.split(",")]
        peer = route[0 if hop == "first" else -1][0]
        pool.kill(nodes[peer][0], replace=True)
        killed.append(peer)

    result = stream_chat(replicated.base_url, kill)

    assert killed, f"the stream ended before token {kill_at}: {result}"
    assert not result.errors and result.done
    assert result.text == expected
    assert hop_inputs(replicated.base_url).get("push", 0) > 0, "the chain pushed (the default)"
    # The gateway counted what it did: the dead server's span went to its replica, once.
    assert alarms(replicated.base_url)["swarmgate_failovers_total"] == failovers + 1
    # And the next request plans around the dead server (its record may still be in the DHT).
    again = stream_chat(replicated.base_url)
    assert again.text == expected and not again.errors
    assert killed[0] not in again.route


def test_a_conversation_whose_server_died_between_turns_keeps_the_live_caches(
    replicated: Swarm, pool: NodePool
) -> None:
    import openai

    sdk = openai.OpenAI(base_url=f"{replicated.base_url}/v1", api_key="unused", max_retries=0)
    first = sdk.chat.completions.with_raw_response.create(
        model=MODEL_ID, messages=MESSAGES, max_tokens=24, temperature=0
    )
    answer = first.parse().choices[0].message.content
    route = [part.rsplit(":", 1) for part in first.headers["x-swarmgate-route"].split(",")]
    assert [span for _, span in route] == ["0-2", "2-4"]
    # Between turns the swarm is idle: wait until the gateway sees it so. A record announced
    # while the first turn ran says its servers are busy, and a busy server rightly loses
    # to an idle replica, cache or not; that is not what this test is about.
    first_hop = route[0][0]
    wait_for(
        lambda: all(s["load"] == 0 for s in servers(replicated) if s["peer_id"] == first_hop),
        30,
        "the first hop's announced load to settle",
    )
    # No replacement: the tests after this one hold one server per span.
    pool.kill(peers_of(replicated.nodes)[route[-1][0]][0], replace=False)

    follow_up = [
        *MESSAGES,
        {"role": "assistant", "content": answer},
        {"role": "user", "content": "And then what happened to the river?"},
    ]
    _, expected = hf_greedy(replicated.model_path, follow_up, 24)
    second = sdk.chat.completions.with_raw_response.create(
        model=MODEL_ID, messages=follow_up, max_tokens=24, temperature=0
    )
    reply = second.parse()
    tokenizer = _reference(replicated.model_path)[1]
    assert reply.choices[0].message.content == tokenizer.decode(expected, skip_special_tokens=True)
    # The first hop kept the conversation's cache; only the lost span was recomputed.
    new_route = second.headers["x-swarmgate-route"]
    assert reply.usage.prompt_tokens_details.cached_tokens >= 32, (
        f"first route {route}, then {new_route}; the gateway said:\n"
        + replicated.gateway.output()[-4000:]
    )
    assert route[0][0] in new_route and route[-1][0] not in new_route


def test_with_no_replacement_the_stream_ends_cleanly_then_recovers(
    single: tuple[Swarm, NodePool],
) -> None:
    swarm, pool = single
    expected, _length = expected_text(swarm.model_path)
    last = next(p for p, (_, span) in peers_of(swarm.nodes).items() if span == (HALF, 4))
    victim = peers_of(swarm.nodes)[last][0]

    result = stream_chat(
        swarm.base_url, lambda n, s: pool.kill(victim, replace=False) if n == 3 else None
    )

    assert result.done, "a failed stream still ends with [DONE]"
    assert len(result.errors) == 1
    error = result.errors[0]["error"]
    assert error["type"] == "service_unavailable_error" and "2:4" in error["message"]
    assert expected.startswith(result.text)

    # New requests get 503 + Retry-After until the blocks are served again...
    body = {"model": MODEL_ID, "messages": MESSAGES, "max_tokens": 4, "temperature": 0}
    refused = httpx.post(f"{swarm.base_url}/v1/chat/completions", json=body, timeout=60)
    assert refused.status_code == 503
    assert int(refused.headers["retry-after"]) > 0
    assert refused.json()["error"]["type"] == "service_unavailable_error"

    # ...and succeed, exactly, once a server for them joins.
    fresh = pool.start((HALF, 4), name="fresh")  # stays in the pool for the next tests

    def serves() -> bool:
        assert fresh.alive(), fresh.output()[-2000:]
        r = httpx.post(f"{swarm.base_url}/v1/chat/completions", json=body, timeout=60)
        return r.status_code == 200

    wait_for(serves, 120, "the gateway to serve again", poll_s=1.0)
    assert stream_chat(swarm.base_url).text == expected


def test_a_server_answering_garbage_gets_a_clean_error_and_is_routed_around(
    single: tuple[Swarm, NodePool],
) -> None:
    swarm, pool = single
    expected, _ = expected_text(swarm.model_path)
    nodes = peers_of(swarm.nodes)
    good = next(p for p, (_, span) in nodes.items() if span == (HALF, 4))
    pool.kill(nodes[good][0], replace=False)
    faulty = [
        pool.start(
            (HALF, 4),
            name=f"faulty {fault}",
            module="tests.fake_node",
            env={"FAKE_NODE_FAULT": fault},
        )
        for fault in ("nan", "dtype")
    ]
    try:

        def only_faulty_serve_2_4() -> bool:
            held = [s["peer_id"] for s in online(swarm) if s["start"] == HALF]
            return len(held) == 2 and good not in held

        wait_for(only_faulty_serve_2_4, 120, "the faulty servers to replace the dead one")
        # Only servers that answer NaN or bfloat16 hold blocks 2:4: each request gets a
        # clean 503 (a NaN never becomes a token), and the gateway keeps serving.
        body = {"model": MODEL_ID, "messages": MESSAGES, "max_tokens": 4, "temperature": 0}
        for _ in range(2):
            r = httpx.post(f"{swarm.base_url}/v1/chat/completions", json=body, timeout=60)
            assert r.status_code == 503, r.text
            assert r.json()["error"]["type"] == "service_unavailable_error"
            assert int(r.headers["retry-after"]) > 0
        log = swarm.gateway.output()
        assert "non-finite" in log and "bfloat16" in log, "both faulty servers were tried"
        streamed = stream_chat(swarm.base_url)
        assert streamed.done and len(streamed.errors) == 1 and streamed.text == ""

        # A good server joins: every request is answered exactly, whichever faulty server
        # a request tries first (bans expire, so they may be tried again) is routed around.
        fresh = pool.start((HALF, 4), name="good")  # stays in the pool for the next tests

        def serves_exactly() -> bool:
            assert fresh.alive(), fresh.output()[-2000:]
            result = stream_chat(swarm.base_url)
            return not result.errors and result.text == expected

        wait_for(serves_exactly, 120, "exact answers once a good server joins", poll_s=1.0)
        for _ in range(3):
            result = stream_chat(swarm.base_url)
            assert not result.errors and result.text == expected
    finally:
        for process in faulty:  # the pool must not hand them to the next test
            pool.lost(process)
            process.stop()
