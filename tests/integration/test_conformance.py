"""The OpenAI surface against a real uvicorn on the loopback swarm, driven by the official
SDK and raw httpx: every parameter, every error with its exact body, chunk validation."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from pydantic import BaseModel, Field
from transformers import LogitsProcessorList

from tests.integration.conftest import Swarm, running_gateway, start_gateway
from tests.integration.test_swarm_chat import hf_greedy
from tests.processes import wait_for
from tests.reference import OpenAIPenalties, token_texts
from tests.reference import tokenizer as reference_tokenizer

pytestmark = pytest.mark.integration

HELLO = [{"role": "user", "content": "Say hello to the sea."}]


def sdk(url: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)


def raw_chat(url: str, body: dict) -> list[dict]:
    """Every event of a streamed chat completion, validated with the SDK's chunk type."""
    with httpx.stream(
        "POST", f"{url}/v1/chat/completions", json={**body, "stream": True}, timeout=60
    ) as r:
        assert r.status_code == 200
        events = [e for e in r.read().decode().split("\n\n") if e.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    for chunk in chunks:
        ChatCompletionChunk.model_validate(chunk)
    return chunks


def test_every_chat_parameter_is_honoured(swarm: Swarm) -> None:
    client = sdk(swarm.base_url)
    base = {"model": swarm.model_id, "messages": HELLO, "max_tokens": 6}
    greedy = client.chat.completions.create(**base, temperature=0)
    ChatCompletion.model_validate(greedy.model_dump())
    assert greedy.id.startswith("chatcmpl-") and greedy.system_fingerprint

    # max_completion_tokens wins over max_tokens; finish_reason says why it stopped
    short = client.chat.completions.create(**base, max_completion_tokens=2, temperature=0)
    assert short.usage.completion_tokens <= 2

    # n: several choices, each with its index; greedy choices agree
    two = client.chat.completions.create(**base, n=2, temperature=0)
    assert [c.index for c in two.choices] == [0, 1]
    assert two.choices[0].message.content == two.choices[1].message.content

    # seed: same seed, same sample
    a = client.chat.completions.create(**base, temperature=1.2, top_p=0.9, seed=11)
    b = client.chat.completions.create(**base, temperature=1.2, top_p=0.9, seed=11)
    assert a.choices[0].message.content == b.choices[0].message.content

    # logit_bias: a +100 bias makes greedy decoding repeat that token, which it does not
    # pick unbiased
    biased = client.chat.completions.create(
        **base, temperature=0, logit_bias={"42": 100}, logprobs=True
    )
    assert biased.usage.completion_tokens == 6
    assert [t.token for t in biased.choices[0].logprobs.content] == token_texts(
        swarm.model_path, [42] * 6
    )
    assert biased.choices[0].message.content != greedy.choices[0].message.content

    # penalties: OpenAI's, subtracted from the logits of tokens generated so far; the
    # answer is transformers' with the same penalties, and differs from plain greedy's
    penalties = {"presence_penalty": 0.5, "frequency_penalty": 1.0}
    tokenizer = reference_tokenizer(swarm.model_path)
    # 64 tokens: the first where plain greedy repeats a token on this prompt, so that the
    # penalties have something to change
    prompt, plain = hf_greedy(swarm.model_path, HELLO, 64)
    _, penalised = hf_greedy(
        swarm.model_path,
        HELLO,
        64,
        LogitsProcessorList([OpenAIPenalties(len(prompt), **penalties)]),
    )
    assert penalised != plain, "the penalties must matter on this prompt"
    answer = client.chat.completions.create(
        **{**base, "max_tokens": 64}, temperature=0, **penalties
    )
    assert answer.choices[0].message.content == tokenizer.decode(
        penalised, skip_special_tokens=True
    )

    # logprobs with alternatives
    lp = client.chat.completions.create(**base, temperature=0, logprobs=True, top_logprobs=3)
    assert len(lp.choices[0].logprobs.content) == lp.usage.completion_tokens
    assert all(len(t.top_logprobs) == 3 for t in lp.choices[0].logprobs.content)

    # stop: cut before the sequence, also in streams
    long = {**base, "max_tokens": 24, "temperature": 0}
    text = client.chat.completions.create(**long).choices[0].message.content or ""
    assert len(text) > 4, "the answer must be long enough to stop inside"
    stop = text[2:4]
    cut = client.chat.completions.create(**long, stop=[stop])
    assert cut.choices[0].message.content == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    chunks = raw_chat(swarm.base_url, {**long, "stop": [stop]})
    streamed = "".join(
        c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]
    )
    assert streamed == text[: text.index(stop)]

    # user, prompt_cache_key, developer role, text parts, text response_format, unknown field
    extra = client.chat.completions.create(
        model=swarm.model_id,
        max_tokens=3,
        temperature=0,
        user="u-1",
        prompt_cache_key="k-1",
        response_format={"type": "text"},
        messages=[
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
        ],
        extra_body={"some_future_field": True},
    )
    assert extra.choices[0].finish_reason in ("stop", "length")


class Lookup(BaseModel):
    query: str = Field(max_length=12)
    limit: int = Field(ge=1, le=9)


class Verdict(BaseModel):
    label: Literal["yes", "no"]
    score: int = Field(ge=0, le=100)


def test_a_tool_round_trip_and_parsed_outputs_through_the_sdk(swarm: Swarm) -> None:
    """The SDK's own helpers (pydantic_function_tool, parse, stream) on a random model:
    only the constraint makes the calls and the JSON valid."""
    client = sdk(swarm.base_url)
    tool = openai.pydantic_function_tool(Lookup, name="lookup")
    ask = [{"role": "user", "content": "Find the sea."}]
    # Room for the bounded whitespace a random model may write at every place JSON allows.
    base = {"model": swarm.model_id, "max_tokens": 300, "temperature": 1, "seed": 5}
    called = client.chat.completions.parse(
        **base, messages=ask, tools=[tool], tool_choice="required"
    )
    choice = called.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    call = (choice.message.tool_calls or [])[0]
    assert call.function.name == "lookup" and isinstance(call.function.parsed_arguments, Lookup)

    # The call and its result go back; the answer is text (or another valid call).
    history = [
        *ask,
        choice.message.model_dump(exclude_none=True, exclude={"parsed"}),
        {"role": "tool", "tool_call_id": call.id, "content": "the sea is wet"},
    ]
    answer = client.chat.completions.create(**base, messages=history, tools=[tool])
    assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")

    with client.chat.completions.stream(
        **base,
        messages=ask,
        tools=[tool],
        tool_choice={"type": "function", "function": {"name": "lookup"}},
    ) as stream:
        final = stream.get_final_completion().choices[0]
    assert final.finish_reason == "tool_calls"
    assert isinstance((final.message.tool_calls or [])[0].function.parsed_arguments, Lookup)

    parsed = client.chat.completions.parse(**base, messages=ask, response_format=Verdict)
    assert parsed.choices[0].finish_reason == "stop"
    assert isinstance(parsed.choices[0].message.parsed, Verdict)


def test_streams_validate_chunk_by_chunk(swarm: Swarm) -> None:
    body = {
        "model": swarm.model_id,
        "messages": HELLO,
        "max_tokens": 5,
        "n": 2,
        "stream_options": {"include_usage": True},
        "logprobs": True,
    }
    chunks = raw_chat(swarm.base_url, body)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0
    assert {c["choices"][0]["index"] for c in chunks[:-1]} == {0, 1}


@pytest.mark.parametrize(
    ("body", "status", "error"),
    [
        (
            {"temperature": 3},
            400,
            {"type": "invalid_request_error", "param": "temperature", "code": None},
        ),
        ({"top_p": 0}, 400, {"type": "invalid_request_error", "param": "top_p", "code": None}),
        ({"n": 0}, 400, {"type": "invalid_request_error", "param": "n", "code": None}),
        (
            {"max_tokens": 0},
            400,
            {"type": "invalid_request_error", "param": "max_tokens", "code": None},
        ),
        (
            {"stop": ["a", "b", "c", "d", "e"]},
            400,
            {"type": "invalid_request_error", "param": "stop", "code": None},
        ),
        (
            {"stop": "x" * 257},
            400,
            {"type": "invalid_request_error", "param": "stop", "code": None},
        ),
        ({"seed": 2**64}, 400, {"type": "invalid_request_error", "param": "seed", "code": None}),
        (
            {"messages": []},
            400,
            {"type": "invalid_request_error", "param": "messages", "code": None},
        ),
        (
            {"messages": [{"role": "robot", "content": "x"}]},
            400,
            {"type": "invalid_request_error", "param": "messages.0.role", "code": None},
        ),
        (
            {
                "tools": [{"type": "function", "function": {"name": "f"}}],
                "tool_choice": {"type": "function", "function": {"name": "g"}},
            },
            400,
            {"type": "invalid_request_error", "param": "tool_choice", "code": None},
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "nonsense"}},
                }
            },
            400,
            {"type": "invalid_request_error", "param": "response_format", "code": None},
        ),
        (
            {"max_tokens": 5000},
            400,
            {
                "type": "invalid_request_error",
                "param": "messages",
                "code": "context_length_exceeded",
            },
        ),
        (
            {"model": "gpt-nope"},
            404,
            {"type": "invalid_request_error", "param": "model", "code": "model_not_found"},
        ),
    ],
)
def test_each_error_has_its_exact_body_and_the_server_keeps_serving(
    swarm: Swarm, body: dict, status: int, error: dict
) -> None:
    request = {"model": swarm.model_id, "messages": HELLO, "max_tokens": 2, **body}
    r = httpx.post(f"{swarm.base_url}/v1/chat/completions", json=request, timeout=30)
    assert r.status_code == status
    got = r.json()["error"]
    assert set(got) == {"message", "type", "param", "code"} and got["message"]
    assert {k: got[k] for k in ("type", "param", "code")} == error
    after = sdk(swarm.base_url).chat.completions.create(
        model=swarm.model_id, messages=HELLO, max_tokens=1
    )
    assert after.choices[0].finish_reason in ("stop", "length")


def test_bad_json_and_oversized_bodies(swarm: Swarm) -> None:
    url = f"{swarm.base_url}/v1/chat/completions"
    r = httpx.post(url, content=b'{"model": ', headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    huge = {"model": swarm.model_id, "messages": [{"role": "user", "content": "x" * 5_000_000}]}
    r = httpx.post(url, json=huge, timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_sdk_maps_statuses_to_its_exceptions(swarm: Swarm) -> None:
    client = sdk(swarm.base_url)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-nope", messages=HELLO)
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=swarm.model_id, messages=HELLO, temperature=5)
    assert bad.value.param == "temperature"
    assert client.models.retrieve(swarm.model_id).id == swarm.model_id
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-nope")


@pytest.fixture
def keyed_gateway(swarm: Swarm, tmp_path: Path) -> Iterator[str]:
    keys = tmp_path / "keys.txt"
    keys.write_text("# team keys\nkey-from-file\n")
    with running_gateway(
        swarm, tmp_path, "--api-key", "key-a", "--api-key-file", str(keys), name="gateway-keys"
    ) as url:
        yield url


def test_api_keys_are_required_when_configured(swarm: Swarm, keyed_gateway: str) -> None:
    with pytest.raises(openai.AuthenticationError):
        sdk(keyed_gateway, "wrong").models.list()
    r = httpx.get(f"{keyed_gateway}/v1/models")
    assert r.status_code == 401
    assert r.json()["error"] == {
        "message": r.json()["error"]["message"],
        "type": "invalid_request_error",
        "param": None,
        "code": "invalid_api_key",
    }
    for key in ("key-a", "key-from-file"):
        assert [m.id for m in sdk(keyed_gateway, key).models.list()] == [swarm.model_id]
    assert httpx.get(f"{keyed_gateway}/health").status_code == 200
    # Everything but the health probes needs a key too.
    for path in ("/metrics", "/swarm", "/docs", "/openapi.json"):
        assert httpx.get(f"{keyed_gateway}{path}").status_code == 401, path
    key = {"Authorization": "Bearer key-from-file"}
    assert httpx.get(f"{keyed_gateway}/metrics", headers=key).status_code == 200


def test_no_full_chain_is_503_with_retry_after(swarm: Swarm, tmp_path: Path) -> None:
    # A gateway for a model no server holds: it joins the swarm but finds no chain.
    gateway, url = start_gateway(
        swarm.model_path,
        swarm.initial_peers,
        tmp_path,
        name="gateway-ghost",
        model_id="ghost-model",
    )
    try:
        wait_for(lambda: _listening(url) or not gateway.alive(), 120, "the gateway")
        assert gateway.alive(), gateway.output()[-2000:]
        health = httpx.get(f"{url}/health").json()
        assert health["status"] == "unavailable" and health["reason"]
        body = {"model": "ghost-model", "messages": HELLO, "max_tokens": 2}
        for stream in (False, True):
            r = httpx.post(f"{url}/v1/chat/completions", json={**body, "stream": stream})
            assert r.status_code == 503 and int(r.headers["retry-after"]) > 0
            assert r.json()["error"]["code"] == "no_route"
        assert sdk(url).models.list().data == []
    finally:
        gateway.stop()


def _listening(url: str) -> bool:
    try:
        httpx.get(f"{url}/health", timeout=2)
    except httpx.HTTPError:
        return False
    return True
