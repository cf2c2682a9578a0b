"""`/v1/completions` on an in-process swarm, validated with the OpenAI SDK's own types."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai.types
import pytest
from starlette.testclient import TestClient

from gateway.app import create_app
from gateway.settings import GatewaySettings
from protocol.errors import NoRouteError
from tests import reference
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
    c = complete(client, prompt="Once upon a time", logprobs=2)
    logprobs = c.choices[0].logprobs
    assert logprobs is not None and c.usage is not None
    assert len(logprobs.tokens) == c.usage.completion_tokens
    assert "".join(logprobs.tokens) == c.choices[0].text
    assert logprobs.text_offset[0] == 0
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


def complete_json(client: TestClient, **body: object) -> dict[str, Any]:
    """The raw body: an echoed prompt's first token has null logprobs, as OpenAI sends,
    which the SDK's types (parsed without validation by the SDK itself) do not allow."""
    r = client.post("/v1/completions", json={**BASE, **body})
    assert r.status_code == 200, r.text
    body = r.json()
    assert isinstance(body, dict)
    return body


def test_echo_with_logprobs_scores_the_prompt_as_transformers_does(
    client: TestClient, tiny_model: Path
) -> None:
    """`max_tokens: 0, echo: true, logprobs: k` is how evaluation harnesses score text:
    every prompt token after the first gets the whole model's logprob given those before
    it, the first gets none, as at OpenAI. Computed whole even when a cache holds it."""
    tokenizer = reference.tokenizer(tiny_model)
    ids = tokenizer("Once upon a time there was a lighthouse")["input_ids"]
    want = reference.prompt_logprobs(tiny_model, ids)
    texts = reference.token_texts(tiny_model, ids)
    for _ in range(2):  # the second time, the swarm holds the prompt's cache
        c = complete_json(client, prompt=ids, max_tokens=0, echo=True, logprobs=3)
        choice, lp = c["choices"][0], c["choices"][0]["logprobs"]
        assert choice["text"] == tokenizer.decode(ids)
        assert choice["finish_reason"] == "length"
        assert c["usage"]["completion_tokens"] == 0
        assert lp["tokens"] == texts
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        assert lp["text_offset"] == [sum(len(t) for t in texts[:i]) for i in range(len(ids))]
        for i, (token, got, top) in enumerate(
            zip(ids[1:], lp["token_logprobs"][1:], lp["top_logprobs"][1:], strict=True)
        ):
            assert got == pytest.approx(float(want[i, token]), abs=1e-4)
            assert max(top.values()) == pytest.approx(float(want[i].max()), abs=1e-4)


def test_echoed_prompt_logprobs_come_before_the_generated_ones(client: TestClient) -> None:
    prompt = "Once upon a time"
    plain = complete_json(client, prompt=prompt, logprobs=1)["choices"][0]
    c = complete_json(client, prompt=prompt, logprobs=1, echo=True)
    lp, generated = c["choices"][0]["logprobs"], plain["logprobs"]
    assert c["choices"][0]["text"] == prompt + plain["text"]
    prompt_tokens = c["usage"]["prompt_tokens"]
    assert lp["tokens"][prompt_tokens:] == generated["tokens"]
    assert lp["token_logprobs"][prompt_tokens:] == pytest.approx(generated["token_logprobs"])
    assert lp["text_offset"][prompt_tokens] == len(prompt)
    assert all(x is not None for x in lp["token_logprobs"][1:])

    body = {**BASE, "prompt": prompt, "logprobs": 1, "echo": True, "stream": True}
    events = client.post("/v1/completions", json=body).text.split("\n\n")
    chunks = [json.loads(e[6:]) for e in events if e.startswith("data: {")]
    first = chunks[0]["choices"][0]
    assert first["text"] == prompt  # the echo comes with the prompt's logprobs
    assert first["logprobs"]["tokens"] == lp["tokens"][:prompt_tokens]
    assert first["logprobs"]["token_logprobs"][0] is None
    streamed = [t for c in chunks for t in (c["choices"][0]["logprobs"] or {}).get("tokens", [])]
    assert streamed == lp["tokens"]


def test_a_requests_prompts_generate_at_once_and_fail_together(tiny_model: Path) -> None:
    """A list of prompts (an evaluation harness's batch) runs as concurrent streams, whose
    steps the swarm batches; each choice is what its prompt alone gives, and a prompt that
    fails fails the request, with every other session closed."""
    swarm = LocalSwarmClient(tiny_model, MODEL_ID)
    open_at_once: list[int] = []
    opener = swarm.open_session

    fail_open: list[int] = []  # which opens (by number) find no route

    async def open_session(*args: Any, **kwargs: Any) -> Any:
        if swarm.opened + 1 in fail_open:
            swarm.opened += 1  # counted as opened and closed, as a real failed open
            swarm.closed += 1
            raise NoRouteError("the servers of blocks 1:2 just left")
        session = await opener(*args, **kwargs)
        open_at_once.append(swarm.opened - swarm.closed)
        return session

    swarm.open_session = open_session  # type: ignore[method-assign]
    settings = GatewaySettings(model_id=MODEL_ID, model_path=tiny_model)
    with TestClient(create_app(settings, swarm)) as client:
        prompts = ["Once upon a time", "The sea", "A lighthouse keeper"]
        alone = [complete(client, prompt=p).choices[0].text for p in prompts]
        open_at_once.clear()
        together = complete(client, prompt=prompts)
        assert [c.text for c in together.choices] == alone
        assert [c.index for c in together.choices] == [0, 1, 2]
        assert max(open_at_once) == 3  # one after another, each would be the only one open

        fail_open.append(swarm.opened + 2)  # the second prompt's session
        r = client.post("/v1/completions", json={**BASE, "prompt": prompts})
        assert r.status_code == 503, r.text  # the failure itself, not a group of them
        assert r.json()["error"]["code"] == "no_route"
        assert swarm.opened == swarm.closed  # the others were closed
