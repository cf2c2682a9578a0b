"""The HTTP surface on an in-process swarm: status codes, error bodies and stream endings."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import openai.types.chat
import pytest
from starlette.testclient import TestClient

from gateway.app import create_app
from gateway.settings import GatewaySettings
from gateway.web.routes import ROUTE_HEADER, route_header
from routing.planner import Hop
from tests.fakes import LocalSwarmClient

MODEL_ID = "tiny"
CHAT = {"model": MODEL_ID, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 6}


def _client(tiny_model: Path, swarm: LocalSwarmClient) -> Iterator[TestClient]:
    app = create_app(GatewaySettings(model_id=MODEL_ID, model_path=tiny_model), swarm_client=swarm)
    with TestClient(app) as client:
        yield client


@pytest.fixture
def covered(tiny_model: Path) -> Iterator[tuple[TestClient, LocalSwarmClient]]:
    swarm = LocalSwarmClient(tiny_model, MODEL_ID)
    for client in _client(tiny_model, swarm):
        yield client, swarm


@pytest.fixture
def uncovered(tiny_model: Path) -> Iterator[TestClient]:
    yield from _client(tiny_model, LocalSwarmClient(tiny_model, MODEL_ID, covered=False))


def _events(body: str) -> list[str]:
    return [e for e in body.split("\n\n") if e and not e.startswith(":")]


def test_no_route_is_503_with_retry_after(uncovered: TestClient) -> None:
    for stream in (False, True):
        r = uncovered.post("/v1/chat/completions", json={**CHAT, "stream": stream})
        assert r.status_code == 503
        assert r.headers["retry-after"].isdigit()
        assert r.json()["error"]["code"] == "no_route"


def test_health_and_models_reflect_coverage(uncovered: TestClient, covered: tuple) -> None:
    down = uncovered.get("/health")
    assert down.status_code == 503 and down.json()["reason"]
    assert uncovered.get("/health/live").status_code == 200  # alive, though not ready
    assert uncovered.get("/v1/models").json() == {"object": "list", "data": []}
    assert uncovered.get(f"/v1/models/{MODEL_ID}").status_code == 404

    client, _ = covered
    assert client.get("/health").status_code == 200
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == [MODEL_ID]
    assert client.get(f"/v1/models/{MODEL_ID}").json()["id"] == MODEL_ID


def test_every_session_is_closed(covered: tuple) -> None:
    client, swarm = covered
    assert client.post("/v1/chat/completions", json=CHAT).status_code == 200
    r = client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    assert _events(r.text)[-1] == "data: [DONE]"
    assert swarm.opened == swarm.closed == 2


def test_failure_mid_stream_sends_error_then_done(tiny_model: Path) -> None:
    swarm = LocalSwarmClient(tiny_model, MODEL_ID, fail_after_steps=3)
    for client in _client(tiny_model, swarm):
        r = client.post("/v1/chat/completions", json={**CHAT, "stream": True, "max_tokens": 10})
        assert r.status_code == 200
        events = _events(r.text)
        assert events[-1] == "data: [DONE]"
        error = events[-2]
        assert error.startswith("event: error\ndata: ")
        body = json.loads(error.split("data: ", 1)[1])
        assert body["error"]["code"] == "peer_unavailable"
        assert swarm.closed == swarm.opened == 1


def test_unknown_route_and_method_are_openai_shaped(covered: tuple) -> None:
    client, _ = covered
    for r in (client.get("/v1/nope"), client.get("/v1/chat/completions")):
        assert r.status_code in (404, 405)
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_max_tokens_sets_length_and_usage(covered: tuple) -> None:
    client, _ = covered
    r = client.post(
        "/v1/chat/completions", json={**CHAT, "max_completion_tokens": 3, "temperature": 0}
    ).json()
    assert r["usage"]["completion_tokens"] <= 3
    if r["usage"]["completion_tokens"] == 3:
        assert r["choices"][0]["finish_reason"] == "length"
    assert (
        r["usage"]["total_tokens"] == r["usage"]["prompt_tokens"] + r["usage"]["completion_tokens"]
    )


def test_api_keys_guard_all_but_the_health_probes(tiny_model: Path) -> None:
    swarm = LocalSwarmClient(tiny_model, MODEL_ID)
    settings = GatewaySettings(model_id=MODEL_ID, model_path=tiny_model, api_keys=("k1", "k2"))
    with TestClient(create_app(settings, swarm_client=swarm)) as client:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "k1"}):
            r = client.get("/v1/models", headers=headers)
            assert r.status_code == 401
            assert r.json()["error"]["code"] == "invalid_api_key"
        assert client.post("/v1/chat/completions", json=CHAT).status_code == 401
        # Refused before the body is read: malformed JSON is not even looked at.
        garbage = client.post(
            "/v1/chat/completions",
            content=b"{" * 100_000,
            headers={"content-type": "application/json"},
        )
        assert garbage.status_code == 401
        for key in ("k1", "k2"):
            assert (
                client.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code
                == 200
            )
        assert client.get("/health").status_code == 200
        assert client.get("/health/live").status_code == 200
        assert client.get("/swarm").status_code == 401
        assert client.get("/swarm", headers={"Authorization": "Bearer k1"}).status_code == 200


def test_the_swarm_route_shows_each_servers_precision(covered: tuple) -> None:
    client, swarm = covered
    [(peer, record)] = swarm.snapshot().servers.items()
    quantized = record.model_copy(update={"dtype": "bfloat16", "quant": "nf4"})
    swarm._snapshot = dataclasses.replace(swarm.snapshot(), servers={peer: quantized})
    [server] = client.get("/swarm").json()["servers"]
    assert (server["dtype"], server["quant"], server["precision"]) == (
        "bfloat16",
        "nf4",
        "bfloat16/nf4",
    )


def test_metrics_count_requests_and_tokens(covered: tuple) -> None:
    client, _ = covered
    client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 4, "temperature": 0})
    client.post("/v1/chat/completions", json={**CHAT, "model": "nope"})
    text = client.get("/metrics").text
    samples = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    assert samples['swarmgate_requests_total{outcome="ok"}'] == 1
    assert samples['swarmgate_requests_total{outcome="404"}'] == 1
    assert 1 <= samples["swarmgate_generated_tokens_total"] <= 4
    assert samples["swarmgate_time_to_first_token_seconds_count"] == 1
    assert samples["swarmgate_active_generations"] == 0


def test_n_choices_each_with_their_index(covered: tuple) -> None:
    client, swarm = covered
    greedy = client.post("/v1/chat/completions", json={**CHAT, "n": 2, "temperature": 0}).json()
    assert [c["index"] for c in greedy["choices"]] == [0, 1]
    texts = greedy["choices"]
    assert texts[0]["message"] == texts[1]["message"]  # greedy: the same answer twice
    completion = greedy["usage"]["completion_tokens"]
    single = client.post("/v1/chat/completions", json={**CHAT, "temperature": 0}).json()
    assert completion == 2 * single["usage"]["completion_tokens"]
    assert greedy["usage"]["prompt_tokens"] == single["usage"]["prompt_tokens"]

    sampled = {**CHAT, "n": 3, "seed": 5, "max_tokens": 8}
    first = client.post("/v1/chat/completions", json=sampled).json()
    again = client.post("/v1/chat/completions", json=sampled).json()
    assert first["choices"] == again["choices"]  # seeded: reproducible, choice by choice

    r = client.post("/v1/chat/completions", json={**CHAT, "n": 2, "stream": True, "temperature": 0})
    chunks = [json.loads(e[6:]) for e in _events(r.text)[:-1]]
    by_index: dict[int, list[dict]] = {0: [], 1: []}
    for c in chunks:  # choices stream at once: their chunks may interleave
        by_index[c["choices"][0]["index"]].append(c["choices"][0])
    for choice in by_index.values():
        assert choice[0]["delta"]["role"] == "assistant"
        assert choice[-1]["finish_reason"] and not any(c["finish_reason"] for c in choice[:-1])
        text = "".join(c["delta"].get("content") or "" for c in choice)
        assert text == texts[0]["message"]["content"]
    assert swarm.opened == swarm.closed

    assert client.post("/v1/chat/completions", json={**CHAT, "n": 9}).status_code == 400


def test_logprobs_of_each_token_and_its_top_alternatives(covered: tuple) -> None:
    client, _ = covered
    body = {**CHAT, "temperature": 0, "logprobs": True, "top_logprobs": 2}
    raw = client.post("/v1/chat/completions", json=body).json()
    response = openai.types.chat.ChatCompletion.model_validate(raw)
    content = response.choices[0].logprobs.content
    assert len(content) == response.usage.completion_tokens
    assert "".join(t.token for t in content) == response.choices[0].message.content
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 2
        assert t.top_logprobs[0].logprob == t.logprob  # greedy took the most likely token
        assert bytes(t.bytes) == t.token.encode()

    r = client.post("/v1/chat/completions", json={**body, "stream": True})
    streamed = [
        entry
        for e in _events(r.text)[:-1]
        for entry in ((json.loads(e[6:])["choices"][0].get("logprobs") or {}).get("content") or [])
    ]
    assert [e["token"] for e in streamed] == [t.token for t in content]

    plain = client.post("/v1/chat/completions", json={**CHAT, "temperature": 0}).json()
    assert plain["choices"][0]["logprobs"] is None
    assert client.post("/v1/chat/completions", json={**CHAT, "top_logprobs": 2}).status_code == 400


def test_route_header_lists_each_hop_with_its_half_open_blocks() -> None:
    route = [Hop("12D3KooWA", 0, 2), Hop("12D3KooWB", 2, 4)]
    assert route_header(route) == "12D3KooWA:0-2,12D3KooWB:2-4"
    assert route_header([Hop("solo", 0, 30)]) == "solo:0-30"
    assert route_header([]) == ""


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_every_completion_names_its_route(covered: tuple, stream: bool) -> None:
    client, _ = covered
    text = {"model": MODEL_ID, "prompt": "Hello", "max_tokens": 3, "stream": stream}
    for path, body in (
        ("/v1/chat/completions", {**CHAT, "stream": stream}),
        ("/v1/chat/completions", {**CHAT, "stream": stream, "n": 2}),
        ("/v1/completions", text),
        ("/v1/completions", {**text, "prompt": ["Hello", "Bye"]}),
    ):
        r = client.post(path, json=body)
        assert r.status_code == 200
        assert r.headers[ROUTE_HEADER] == "local-peer:0-4", (path, body)
    refused = client.post("/v1/chat/completions", json={**CHAT, "model": "nope"})
    assert refused.status_code == 404 and ROUTE_HEADER not in refused.headers


def test_every_response_names_its_request(covered: tuple) -> None:
    client, _ = covered
    mine = client.post("/v1/chat/completions", json=CHAT, headers={"X-Request-ID": "trace-7.a"})
    assert mine.headers["x-request-id"] == "trace-7.a"  # the client's own id, kept
    made = client.post("/v1/chat/completions", json=CHAT, headers={"X-Request-ID": "no spaces!"})
    assert len(made.headers["x-request-id"]) == 32  # not a sane token: replaced
    assert client.get("/health").headers["x-request-id"] != made.headers["x-request-id"]
