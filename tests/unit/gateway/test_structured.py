"""Structured outputs through chat completions: a random-weight model writes garbage, so
every valid JSON document below is the grammar's doing, not the model's."""

from __future__ import annotations

import asyncio
import json
import threading
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import llguidance
import openai.types.chat
import pytest
from fastapi import FastAPI
from starlette.testclient import TestClient

from gateway.app import create_app
from gateway.engine import grammar as grammar_module
from gateway.settings import GatewaySettings
from tests.fakes import LocalSwarmClient

MODEL_ID = "tiny"
CHAT = {"model": MODEL_ID, "messages": [{"role": "user", "content": "A pet, please."}]}
PET = {
    "type": "object",
    "properties": {
        "kind": {"enum": ["cat", "dog", "bird"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 30},
        "weight": {"type": "number", "minimum": 0, "maximum": 100},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
        "owner": {
            "type": "object",
            "properties": {"vip": {"type": "boolean"}, "id": {"type": "integer"}},
            "required": ["vip"],
            "additionalProperties": False,
        },
    },
    "required": ["kind", "age", "owner"],
    "additionalProperties": False,
}


def json_schema(schema: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "pet", "schema": schema, **extra}}


def settings(tiny_model: Path, **overrides: Any) -> GatewaySettings:
    return GatewaySettings(model_id=MODEL_ID, model_path=tiny_model, **overrides)


@pytest.fixture(scope="module")
def client(tiny_model: Path) -> Iterator[TestClient]:
    app = create_app(settings(tiny_model), LocalSwarmClient(tiny_model, MODEL_ID))
    with TestClient(app) as c:
        yield c


def chat(client: TestClient, **body: Any) -> openai.types.chat.ChatCompletion:
    r = client.post("/v1/chat/completions", json={**CHAT, **body})
    assert r.status_code == 200, r.text
    return openai.types.chat.ChatCompletion.model_validate(r.json())


def streamed(client: TestClient, **body: Any) -> dict[int, tuple[str, str]]:
    """Each choice's (text, finish_reason) from a stream."""
    r = client.post("/v1/chat/completions", json={**CHAT, **body, "stream": True})
    assert r.status_code == 200, r.text
    events = [e[6:] for e in r.text.split("\n\n") if e.startswith("data: ")]
    assert events[-1] == "[DONE]"
    text: dict[int, str] = defaultdict(str)
    finish: dict[int, str] = {}
    for event in events[:-1]:
        for choice in json.loads(event)["choices"]:
            text[choice["index"]] += choice["delta"].get("content") or ""
            if choice["finish_reason"]:
                finish[choice["index"]] = choice["finish_reason"]
    return {i: (text[i], finish[i]) for i in finish}


@pytest.mark.parametrize("stream", [False, True])
def test_schema_responses_validate_at_temperature_one(client: TestClient, stream: bool) -> None:
    body = {
        "response_format": json_schema(PET),
        "temperature": 1.0,
        "n": 8,
        "seed": 10 if stream else 0,
        "max_tokens": 96,
    }
    if stream:
        results = list(streamed(client, **body).values())
    else:
        completion = chat(client, **body)
        results = [(c.message.content or "", c.finish_reason) for c in completion.choices]
    assert len(results) == 8
    complete = [text for text, finish in results if finish == "stop"]
    assert len(complete) >= 2  # random weights ramble; enough of them end to tell
    for text in complete:
        jsonschema.validate(json.loads(text), PET)
    for text, finish in results:
        assert finish in ("stop", "length") and text.startswith("{")


def test_a_truncated_response_finishes_with_length(client: TestClient) -> None:
    completion = chat(client, response_format=json_schema(PET), max_tokens=4, temperature=1.0)
    choice = completion.choices[0]
    assert choice.finish_reason == "length"
    assert completion.usage is not None and completion.usage.completion_tokens == 4
    with pytest.raises(json.JSONDecodeError):
        json.loads(choice.message.content or "")


def test_json_object_gives_objects(client: TestClient) -> None:
    tokenizer = client.app.state.chat._prompts.tokenizer  # type: ignore[attr-defined]
    # Quotes and braces are favoured so that random weights close their strings and
    # objects now and then; where each may go is still the grammar's call.
    bias = {str(tokenizer.convert_tokens_to_ids(t)): 20 for t in ('"', "}")}
    body = {"response_format": {"type": "json_object"}, "n": 4, "max_tokens": 48, "seed": 3}
    completion = chat(client, **body, temperature=1.0, logit_bias=bias)
    outcomes = [(c.message.content or "", c.finish_reason) for c in completion.choices]
    outcomes += streamed(client, **body, temperature=2.0, logit_bias=bias).values()
    complete = [text for text, finish in outcomes if finish == "stop"]
    assert len(complete) >= 4
    assert all(isinstance(json.loads(text), dict) for text in complete)


def test_a_complete_document_ends_the_generation_without_waiting_for_eos(
    client: TestClient,
) -> None:
    swarm: LocalSwarmClient = client.app.state.swarm  # type: ignore[attr-defined]
    schema = {"enum": ["yes", "no", "maybe not"]}
    for seed in range(3):
        steps = swarm.steps
        completion = chat(
            client, response_format=json_schema(schema), temperature=1.0, seed=seed, max_tokens=20
        )
        choice = completion.choices[0]
        assert choice.finish_reason == "stop"
        assert json.loads(choice.message.content or "") in schema["enum"]
        # The prompt's step, then one per token but the last: no step to sample an EOS.
        assert completion.usage is not None
        assert swarm.steps - steps == completion.usage.completion_tokens


def test_stop_sequences_still_apply(client: TestClient) -> None:
    for seed in range(3):
        completion = chat(
            client, response_format=json_schema(PET), stop=[":"], max_tokens=40, seed=seed
        )
        choice = completion.choices[0]
        assert choice.finish_reason == "stop"
        # Cut in the first property, whatever whitespace the model chose around its name.
        assert "".join((choice.message.content or "").split()) == '{"kind"'


@pytest.mark.parametrize(
    "response_format",
    [
        json_schema({"type": "strin"}),
        json_schema({"not": {"type": "string"}}, strict=True),
        json_schema({"type": "integer", "minimum": 3, "maximum": 1}),
        {"type": "json_schema", "json_schema": {"name": "pet"}},  # no schema
    ],
)
def test_invalid_schemas_are_400_naming_response_format(
    client: TestClient, response_format: dict[str, Any]
) -> None:
    for stream in (False, True):
        body = {**CHAT, "response_format": response_format, "stream": stream}
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == "response_format" and error["type"] == "invalid_request_error"


def test_a_slow_schema_is_refused_while_other_requests_go_on(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    entered, release = threading.Event(), threading.Event()
    real = grammar_module.new_matcher

    def new_matcher(tokenizer: llguidance.LLTokenizer, grammar: str) -> llguidance.LLMatcher:
        if "slow" in grammar:  # as a schema that takes forever to compile would
            entered.set()
            release.wait(10.0)
        return real(tokenizer, grammar)

    monkeypatch.setattr(grammar_module, "new_matcher", new_matcher)
    swarm = LocalSwarmClient(tiny_model, MODEL_ID)
    app = create_app(settings(tiny_model, grammar_compile_timeout_s=2.0), swarm)
    try:
        asyncio.run(_slow_schema_scenario(app, entered))
    finally:
        release.set()


@asynccontextmanager
async def running(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            yield client


async def _slow_schema_scenario(app: FastAPI, entered: threading.Event) -> None:
    async with running(app) as client:

        def post(**body: Any) -> asyncio.Task[httpx.Response]:
            json_body = {**CHAT, "max_tokens": 3, **body}
            return asyncio.create_task(client.post("/v1/chat/completions", json=json_body))

        slow = post(response_format=json_schema({"title": "slow", "type": "object"}))
        await asyncio.wait_for(asyncio.to_thread(entered.wait, 10.0), 10.0)
        others = [post(), post(response_format=json_schema({"type": "boolean"}))]
        assert [r.status_code for r in await asyncio.gather(*others)] == [200, 200]
        assert not slow.done()  # the others finished while its compile was still stuck
        refused = await slow
        assert refused.status_code == 400
        assert refused.json()["error"]["param"] == "response_format"
        assert "too complex" in refused.json()["error"]["message"]
