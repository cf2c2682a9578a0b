"""`/v1/completions` on an in-process swarm, validated with the OpenAI SDK's own types."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import openai.types
import pytest
from starlette.testclient import TestClient

from gateway.app import create_app
from gateway.settings import GatewaySettings
from tests.fakes import LocalSwarmClient

MODEL_ID = "tiny"
BASE = {"model": MODEL_ID, "max_tokens": 4, "temperature": 0}


@pytest.fixture
def client(tiny_model: Path) -> Iterator[TestClient]:
    settings = GatewaySettings(model_id=MODEL_ID, model_path=tiny_model)
    with TestClient(create_app(settings, LocalSwarmClient(tiny_model, MODEL_ID))) as c:
        yield c


def complete(client: TestClient, **body: object) -> openai.types.Completion:
    r = client.post("/v1/completions", json={**BASE, **body})
    assert r.status_code == 200, r.text
    return openai.types.Completion.model_validate(r.json())


def test_text_prompt_completion_has_openai_shape(client: TestClient) -> None:
    c = complete(client, prompt="Once upon a time")
    assert c.id.startswith("cmpl-") and c.object == "text_completion"
    assert c.choices[0].finish_reason in ("stop", "length") and c.usage is not None
    assert c.usage.completion_tokens <= 4


def test_echo_token_ids_and_several_prompts(client: TestClient) -> None:
    plain = complete(client, prompt="Once upon a time").choices[0].text
    echoed = complete(client, prompt="Once upon a time", echo=True).choices[0].text
    assert echoed == "Once upon a time" + plain

    tokenizer = client.app.state.completions._tokenizer  # type: ignore[attr-defined]
    ids = tokenizer("Once upon a time")["input_ids"]
    assert complete(client, prompt=ids).choices[0].text == plain

    many = complete(client, prompt=["Once upon a time", "The sea"])
    assert [c.index for c in many.choices] == [0, 1]
    assert many.choices[0].text == plain
    assert many.usage is not None and many.usage.prompt_tokens > len(ids)


def test_streamed_completion_chunks_validate_and_end_with_done(client: TestClient) -> None:
    body = {
        **BASE,
        "prompt": "Once upon a time",
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    r = client.post("/v1/completions", json=body)
    events = [e for e in r.text.split("\n\n") if e.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    raw = [json.loads(e[6:]) for e in events[:-1]]
    # OpenAI streams `finish_reason: null` until the end, which its strict type refuses: the
    # SDK builds chunks without validation. Validate the ones that are complete.
    for chunk in raw:
        if all(c["finish_reason"] for c in chunk["choices"]):
            openai.types.Completion.model_validate(chunk)
    chunks = [openai.types.Completion.model_construct(**c) for c in raw]
    text = "".join(c["choices"][0]["text"] for c in raw if c["choices"])
    assert text == complete(client, prompt="Once upon a time").choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert {c["id"] for c in raw} == {raw[0]["id"]}


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "x", "suffix": "y"}, "suffix"),
        ({"prompt": "x", "logprobs": 6}, "logprobs"),
        ({"prompt": [10**9]}, "prompt"),
        ({"prompt": "x", "model": "other"}, "model"),
    ],
)
def test_bad_completion_requests_are_refused(client: TestClient, body: dict, param: str) -> None:
    r = client.post("/v1/completions", json={**BASE, **body})
    assert r.status_code in (400, 404), r.text
    assert (r.json()["error"]["param"] or "").startswith(param)


@pytest.mark.parametrize(
    "prompt",
    [
        pytest.param("", id="empty-text"),
        pytest.param([""], id="list-of-empty-text"),
        pytest.param([], id="no-token-ids"),
        pytest.param([[]], id="list-of-no-token-ids"),
    ],
)
def test_an_empty_prompt_starts_from_the_bos_token(client: TestClient, prompt: object) -> None:
    tokenizer = client.app.state.completions._tokenizer  # type: ignore[attr-defined]
    from_bos = complete(client, prompt=[tokenizer.bos_token_id]).choices[0].text
    c = complete(client, prompt=prompt, echo=True)
    assert c.choices[0].text == from_bos  # the echo is the empty prompt, not the BOS text
    assert c.usage is not None and c.usage.prompt_tokens == 1  # the BOS token


def test_an_empty_prompt_without_a_bos_token_is_refused(client: TestClient) -> None:
    client.app.state.completions._tokenizer.bos_token = None  # type: ignore[attr-defined]
    r = client.post("/v1/completions", json={**BASE, "prompt": ["Once upon a time", ""]})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", "prompt")
    assert "BOS" in error["message"]


def test_completion_logprobs_line_up_with_the_text(client: TestClient) -> None:
    c = complete(client, prompt="Once upon a time", logprobs=2, echo=True)
    logprobs = c.choices[0].logprobs
    assert logprobs is not None and c.usage is not None
    assert len(logprobs.tokens) == c.usage.completion_tokens
    generated = c.choices[0].text[len("Once upon a time") :]
    assert "".join(logprobs.tokens) == generated
    assert logprobs.text_offset[0] == len("Once upon a time")
    for token, offset in zip(logprobs.tokens, logprobs.text_offset, strict=True):
        assert c.choices[0].text[offset : offset + len(token)] == token
    assert all(
        len(top) == 2 and max(top.values()) == lp
        for top, lp in zip(logprobs.top_logprobs, logprobs.token_logprobs, strict=True)
    )

    body = {**BASE, "prompt": "Once upon a time", "logprobs": 2, "stream": True}
    events = [
        e
        for e in client.post("/v1/completions", json=body).text.split("\n\n")
        if e.startswith("data: {")
    ]
    streamed = [
        t
        for e in events
        for t in (json.loads(e[6:])["choices"][0]["logprobs"] or {}).get("tokens", [])
    ]
    assert streamed == logprobs.tokens
