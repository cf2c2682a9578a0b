"""Bad input and greedy or slow clients cannot exhaust the gateway (in-process swarm).

Every refusal comes before a swarm session opens; every request that ends early, however
it ends, closes its session and frees its slot.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from starlette.testclient import TestClient
from starlette.types import Message

from gateway.app import create_app
from gateway.openai.models import ChatCompletionRequest
from gateway.openai.prepare import RequestLimits, ServedModel, generation_request
from gateway.openai.templating import PromptBuilder
from gateway.settings import GatewaySettings
from protocol.errors import ContextLengthExceeded
from tests.fakes import LocalSwarmClient

MODEL_ID = "tiny"
CHAT = {"model": MODEL_ID, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}
FORCED = {"temperature": 0, "logit_bias": {"42": 100}}  # the same token every step, no EOS
BOUND = 10.0  # seconds any wait below may take before the test fails


def post_raw(client: TestClient, path: str, body: dict[str, Any]) -> httpx.Response:
    """JSON with ASCII escapes, as `json.dumps` writes it: a lone surrogate survives as
    ``\\ud800`` (httpx's own encoder would refuse to send it)."""
    content = json.dumps(body).encode()
    return client.post(path, content=content, headers={"Content-Type": "application/json"})


def settings(tiny_model: Path, **overrides: Any) -> GatewaySettings:
    return GatewaySettings(model_id=MODEL_ID, model_path=tiny_model, **overrides)


@pytest.fixture
def swarm(tiny_model: Path) -> LocalSwarmClient:
    return LocalSwarmClient(tiny_model, MODEL_ID)


@pytest.fixture
def client(tiny_model: Path, swarm: LocalSwarmClient) -> Iterator[TestClient]:
    with TestClient(create_app(settings(tiny_model, default_max_tokens=3), swarm)) as c:
        yield c


def _invalid(param: str, message: str) -> dict[str, Any]:
    return {
        "error": {
            "message": f"{param}: {message}",
            "type": "invalid_request_error",
            "param": param,
            "code": None,
        }
    }


SURROGATE = "contains a lone surrogate (\\ud800-\\udfff), which is not valid Unicode"


@pytest.mark.parametrize(
    ("path", "body", "expected"),
    [
        (
            "/v1/chat/completions",
            {**CHAT, "seed": 2**64},
            _invalid("seed", "Input should be less than or equal to 9223372036854775807"),
        ),
        (
            "/v1/chat/completions",
            {**CHAT, "seed": -(2**63) - 1},
            _invalid("seed", "Input should be greater than or equal to -9223372036854775808"),
        ),
        (
            "/v1/chat/completions",
            {**CHAT, "messages": [{"role": "user", "content": "sea \ud800 shore"}]},
            _invalid("messages.0.content", SURROGATE),
        ),
        (
            "/v1/chat/completions",
            {
                **CHAT,
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": [{"type": "text", "text": "\udfff"}]},
                ],
            },
            _invalid("messages.1.content", SURROGATE),
        ),
        (
            "/v1/chat/completions",
            {**CHAT, "stop": ["fine", "\ud83d"]},
            _invalid("stop", SURROGATE),
        ),
        (
            "/v1/chat/completions",
            {**CHAT, "stop": "x" * 257},
            _invalid("stop", "a stop sequence may have at most 256 characters"),
        ),
        (
            "/v1/completions",
            {"model": MODEL_ID, "prompt": "tide \udc00"},
            _invalid("prompt", SURROGATE),
        ),
        (
            "/v1/completions",
            {"model": MODEL_ID, "prompt": ["fine", "\ud800"]},
            _invalid("prompt", SURROGATE),
        ),
        (
            "/v1/completions",
            {"model": MODEL_ID, "prompt": "Hi", "stop": "\ud800"},
            _invalid("stop", SURROGATE),
        ),
        (
            "/v1/chat/completions",
            {**CHAT, "top_logprobs": 3},
            _invalid("top_logprobs", "top_logprobs requires logprobs to be true"),
        ),
        (
            "/v1/chat/completions",
            {**CHAT, "logprobs": False, "top_logprobs": 3},
            _invalid("top_logprobs", "top_logprobs requires logprobs to be true"),
        ),
    ],
    ids=[
        "seed-above-int64",
        "seed-below-int64",
        "surrogate-in-message",
        "surrogate-in-text-part",
        "surrogate-in-stop",
        "stop-too-long",
        "surrogate-in-prompt",
        "surrogate-in-prompt-list",
        "surrogate-in-completion-stop",
        "top-logprobs-without-logprobs",
        "top-logprobs-with-logprobs-false",
    ],
)
def test_bad_input_is_a_400_naming_the_parameter_before_any_session_opens(
    client: TestClient,
    swarm: LocalSwarmClient,
    path: str,
    body: dict[str, Any],
    expected: dict[str, Any],
) -> None:
    r = post_raw(client, path, body)
    assert (r.status_code, r.json()) == (400, expected)
    assert swarm.opened == 0
    assert client.post("/v1/chat/completions", json=CHAT).status_code == 200


_NOT_AN_OBJECT = "The request body must be a JSON object"


@pytest.mark.parametrize(
    ("path", "content_type", "content", "message"),
    [
        (
            "/v1/chat/completions",
            "text/plain",
            b"Hello",
            f"{_NOT_AN_OBJECT}, sent with Content-Type: application/json.",
        ),
        (  # JSON, but not said to be: FastAPI reads only JSON content types as JSON
            "/v1/chat/completions",
            "text/plain",
            json.dumps(CHAT).encode(),
            f"{_NOT_AN_OBJECT}, sent with Content-Type: application/json.",
        ),
        ("/v1/chat/completions", "application/json", b"[1, 2]", f"{_NOT_AN_OBJECT}, not an array."),
        ("/v1/completions", "application/json", b"[]", f"{_NOT_AN_OBJECT}, not an array."),
        ("/v1/responses", "application/json", b'"Hello"', f"{_NOT_AN_OBJECT}, not a string."),
        (
            "/v1/chat/completions",
            "application/json",
            b'{"model": "tiny",',
            "We could not parse the JSON body of your request. The API expects a JSON object, "
            "but what was sent was not valid JSON (Expecting property name enclosed in double "
            "quotes at character 17).",
        ),
        (
            "/v1/chat/completions",
            "application/json",
            b"",
            "The request body is empty; it must be a JSON object.",
        ),
    ],
    ids=["text", "json-as-text", "array", "empty-array", "string", "invalid-json", "empty"],
)
def test_a_body_that_is_not_a_json_object_is_refused_saying_so(
    client: TestClient,
    swarm: LocalSwarmClient,
    path: str,
    content_type: str,
    content: bytes,
    message: str,
) -> None:
    r = client.post(path, content=content, headers={"Content-Type": content_type})
    error = {"message": message, "type": "invalid_request_error", "param": None, "code": None}
    assert (r.status_code, r.json()) == (400, {"error": error})
    assert swarm.opened == 0


@pytest.mark.parametrize(
    ("content", "message", "code"),
    [
        (
            [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {}}],
            "content part 1 is of type 'image_url', which is not supported: "
            "this model reads text only",
            "unsupported_parameter",
        ),
        (
            [{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}],
            "content part 0 is of type 'input_audio', which is not supported: "
            "this model reads text only",
            "unsupported_parameter",
        ),
        (5, "content must be a string or a list of text parts", None),
    ],
    ids=["image-part", "audio-part", "a-number"],
)
def test_content_that_is_not_text_is_refused_naming_the_message(
    client: TestClient, swarm: LocalSwarmClient, content: Any, message: str, code: str | None
) -> None:
    body = {**CHAT, "messages": [{"role": "user", "content": content}]}
    r = post_raw(client, "/v1/chat/completions", body)
    expected = {**_invalid("messages.0.content", message)["error"], "code": code}
    assert (r.status_code, r.json()) == (400, {"error": expected})
    assert swarm.opened == 0


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {**CHAT, "n": None, "stream": None}),
        (
            "/v1/chat/completions",
            {**CHAT, "stream": True, "stream_options": {"include_usage": None}},
        ),
        ("/v1/completions", {"model": MODEL_ID, "prompt": "Hi", "n": None, "echo": None}),
        ("/v1/responses", {"model": MODEL_ID, "input": "Hi", "stream": None}),
    ],
    ids=["chat", "chat-stream-options", "completions", "responses"],
)
def test_null_means_the_default_for_fields_openai_documents_as_nullable(
    client: TestClient, path: str, body: dict[str, Any]
) -> None:
    r = post_raw(client, path, {**body, "max_tokens": 2} if "messages" in body else body)
    assert r.status_code == 200, r.text


def test_a_seed_at_the_int64_edges_works_for_every_choice(client: TestClient) -> None:
    for seed in (2**63 - 1, -(2**63)):
        r = client.post("/v1/chat/completions", json={**CHAT, "seed": seed, "n": 8})
        assert r.status_code == 200, r.text
        assert len(r.json()["choices"]) == 8


@pytest.mark.parametrize("temperature", [1e-45, 5e-324, 1e-5])
def test_a_vanishing_temperature_samples_greedily(client: TestClient, temperature: float) -> None:
    greedy = client.post("/v1/chat/completions", json={**CHAT, "temperature": 0}).json()
    r = client.post(
        "/v1/chat/completions", json={**CHAT, "temperature": temperature, "stream": True}
    )
    assert r.status_code == 200 and "event: error" not in r.text
    cold = client.post("/v1/chat/completions", json={**CHAT, "temperature": temperature})
    assert cold.status_code == 200
    assert cold.json()["choices"] == greedy["choices"]


# ---- how long a generation may run ----


def test_chat_without_max_tokens_gets_the_gateway_default(client: TestClient) -> None:
    body = {**CHAT, **FORCED}
    del body["max_tokens"]
    r = client.post("/v1/chat/completions", json=body).json()  # default_max_tokens=3 here
    assert r["usage"]["completion_tokens"] == 3
    assert r["choices"][0]["finish_reason"] == "length"
    asked = client.post("/v1/chat/completions", json={**body, "max_completion_tokens": 5}).json()
    assert asked["usage"]["completion_tokens"] == 5  # what a client asks for still wins


def test_completions_keep_openais_default_of_16(client: TestClient) -> None:
    r = client.post("/v1/completions", json={"model": MODEL_ID, "prompt": "Hi", **FORCED})
    assert r.json()["usage"]["completion_tokens"] == 16


def test_the_default_is_cut_to_the_context_instead_of_refused() -> None:
    model = ServedModel(MODEL_ID, max_length=100, vocab_size=1000, created=0)
    request = ChatCompletionRequest.model_validate(CHAT | {"max_tokens": None})
    limits = RequestLimits(default_max_tokens=1024)
    prepared = generation_request(
        model, [1] * 90, request, conversation_key=None, param="messages", limits=limits
    )
    assert prepared.max_new_tokens == 10


@pytest.mark.parametrize(
    ("param", "prompt", "max_tokens", "message"),
    [
        (
            "prompt",
            [1] * 90,
            20,
            "This model's maximum context length is 100 tokens. However, you requested 110 "
            "tokens (90 in the prompt, 20 in the completion). Please reduce the length of "
            "the prompt or completion.",
        ),
        (
            "messages",
            [1] * 100,
            None,
            "This model's maximum context length is 100 tokens. However, you requested 101 "
            "tokens (100 in the messages, 1 in the completion). Please reduce the length of "
            "the messages or completion.",
        ),
    ],
)
def test_a_context_overflow_is_worded_as_openai_words_it(
    param: str, prompt: list[int], max_tokens: int | None, message: str
) -> None:
    # Clients and frameworks match this text ("maximum context length", "you requested").
    model = ServedModel(MODEL_ID, max_length=100, vocab_size=1000, created=0)
    request = ChatCompletionRequest.model_validate(CHAT | {"max_tokens": max_tokens})
    with pytest.raises(ContextLengthExceeded) as raised:
        generation_request(
            model, prompt, request, conversation_key=None, param=param, limits=RequestLimits()
        )
    assert (raised.value.message, raised.value.param) == (message, param)


def test_a_generation_past_its_deadline_ends_with_length(tiny_model: Path) -> None:
    app = create_app(
        settings(tiny_model, max_generation_s=0.0), LocalSwarmClient(tiny_model, "tiny")
    )
    with TestClient(app) as client:
        r = client.post("/v1/chat/completions", json={**CHAT, **FORCED, "max_tokens": 50}).json()
        assert r["choices"][0]["finish_reason"] == "length"
        assert r["usage"]["completion_tokens"] == 1  # the token the prompt's pass gave


# ---- slots: per key, after admission, freed by clients that leave ----


@asynccontextmanager
async def running(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            yield client


async def until(condition: Callable[[], bool], what: str) -> None:
    """Bounded wait on the event loop (the app runs on the same loop)."""
    try:
        async with asyncio.timeout(BOUND):
            while not condition():
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"timed out after {BOUND} s waiting for {what}") from None


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_one_key_gets_429_beyond_its_share_while_others_get_in(
    tiny_model: Path, swarm: LocalSwarmClient
) -> None:
    # Without a queue timeout a request over its key's cap is refused at once.
    app = create_app(settings(tiny_model, max_concurrent_per_key=2, queue_timeout_s=0), swarm)

    async def scenario() -> None:
        async with running(app) as client:
            swarm.gate = asyncio.Event()  # every generation waits: the slots stay taken

            def post(key: str) -> asyncio.Task[httpx.Response]:
                url = "/v1/chat/completions"
                return asyncio.create_task(client.post(url, json=CHAT, headers=bearer(key)))

            held = [post("greedy"), post("greedy")]
            await until(lambda: swarm.opened == 2, "both requests to open sessions")
            refused = await client.post("/v1/chat/completions", json=CHAT, headers=bearer("greedy"))
            assert refused.status_code == 429 and int(refused.headers["retry-after"]) > 0
            assert refused.json() == {
                "error": {
                    "message": "this API key already has 2 generations in flight, and 2 is "
                    "the most one key may have; retry when one has finished",
                    "type": "rate_limit_error",
                    "param": None,
                    "code": "rate_limit_exceeded",
                }
            }
            other = post("modest")
            await until(lambda: swarm.opened == 3, "another key's request to get in")
            swarm.gate.set()
            assert [r.status_code for r in await asyncio.gather(*held, other)] == [200] * 3
            again = await client.post("/v1/chat/completions", json=CHAT, headers=bearer("greedy"))
            assert again.status_code == 200

    asyncio.run(scenario())


def test_prompts_are_built_after_admission_and_off_the_event_loop(
    tiny_model: Path, swarm: LocalSwarmClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = create_app(settings(tiny_model, max_concurrent=1, max_queue=1), swarm)
    built_on: list[threading.Thread] = []
    chat_prompt = PromptBuilder.chat_prompt

    def recording(self: PromptBuilder, messages: Any, tools: Any = ()) -> list[int]:
        built_on.append(threading.current_thread())
        return chat_prompt(self, messages, tools)

    monkeypatch.setattr(PromptBuilder, "chat_prompt", recording)
    big = {**CHAT, "messages": [{"role": "user", "content": "word " * 200_000}]}

    async def scenario() -> None:
        async with running(app) as client:
            swarm.gate = asyncio.Event()
            first = asyncio.create_task(client.post("/v1/chat/completions", json=CHAT))
            await until(lambda: swarm.opened == 1, "the first request to take the slot")
            queued = asyncio.create_task(client.post("/v1/chat/completions", json=big))
            await until(lambda: app.state.admission.in_flight("anonymous") == 2, "the queue")
            flood = [await client.post("/v1/chat/completions", json=big) for _ in range(3)]
            assert [r.status_code for r in flood] == [429] * 3
            assert len(built_on) == 1  # neither the queued nor the refused were templated
            assert threading.current_thread() not in built_on
            swarm.gate.set()
            # The queued one is refused with 400 (its prompt overflows the context), but only
            # once it holds a slot and has been tokenized.
            assert (await first).status_code == 200
            assert (await queued).json()["error"]["code"] == "context_length_exceeded"
            assert len(built_on) == 2

    asyncio.run(scenario())


class RawClient:
    """One ASGI request driven by hand: the body, then whatever the test makes of the
    client (leave, or stop reading)."""

    def __init__(self, body: dict[str, Any]) -> None:
        self.body = json.dumps(body).encode()
        self.sent = False
        self.gone = asyncio.Event()
        self.messages: list[Message] = []
        self.stop_reading_after: int | None = None  # body messages read before stalling

    async def receive(self) -> Message:
        if not self.sent:
            self.sent = True
            return {"type": "http.request", "body": self.body, "more_body": False}
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        self.messages.append(message)
        bodies = [m for m in self.messages if m["type"] == "http.response.body"]
        if self.stop_reading_after is not None and len(bodies) > self.stop_reading_after:
            await asyncio.Event().wait()  # the socket buffers are full: this never returns

    def status(self) -> int:
        return next(m["status"] for m in self.messages if m["type"] == "http.response.start")

    def call(self, app: FastAPI, path: str = "/v1/chat/completions") -> Awaitable[None]:
        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.4"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "root_path": "",
            "headers": [(b"content-type", b"application/json"), (b"host", b"gateway")],
            "client": ("127.0.0.1", 5000),
            "server": ("127.0.0.1", 8000),
            "state": {},
        }
        return app(scope, self.receive, self.send)


def metric(app: FastAPI, name: str, **labels: str) -> float:
    value = app.state.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else float(value)


def test_a_client_that_leaves_a_json_request_stops_its_generation(
    tiny_model: Path, swarm: LocalSwarmClient
) -> None:
    app = create_app(settings(tiny_model, max_concurrent=1, max_queue=1), swarm)

    async def scenario() -> None:
        async with running(app) as client:
            swarm.gate = asyncio.Event()
            generating = RawClient({**CHAT, "max_tokens": 50})
            call = asyncio.create_task(generating.call(app))
            await until(lambda: swarm.opened == 1, "the generation to start")
            queued = RawClient(CHAT)
            waiting = asyncio.create_task(queued.call(app))
            await until(lambda: app.state.admission.in_flight("anonymous") == 2, "the queue")

            queued.gone.set()  # leaves the queue: its place is given back
            await asyncio.wait_for(waiting, BOUND)
            assert app.state.admission.in_flight("anonymous") == 1 and swarm.opened == 1

            generating.gone.set()  # leaves mid-generation
            await asyncio.wait_for(call, BOUND)
            assert swarm.closed == swarm.opened == 1
            assert app.state.admission.in_flight("anonymous") == 0
            assert metric(app, "swarmgate_active_generations") == 0
            assert metric(app, "swarmgate_requests_total", outcome="cancelled") == 1
            assert generating.status() == queued.status() == 499
            swarm.gate.set()
            assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200

    asyncio.run(scenario())


def test_a_client_that_leaves_between_two_choices_is_counted_as_cancelled(
    tiny_model: Path, swarm: LocalSwarmClient
) -> None:
    """The second choice opens once the first one's prompt is computed; a client that
    leaves while it opens ends the request too."""
    app = create_app(settings(tiny_model, max_concurrent=1, max_queue=1), swarm)
    opener, never = swarm.open_session, asyncio.Event()

    async def open_session(*args: Any, **kwargs: Any) -> Any:
        if swarm.opened:  # the second choice's open waits
            await never.wait()
        return await opener(*args, **kwargs)

    swarm.open_session = open_session  # type: ignore[method-assign]

    async def scenario() -> None:
        async with running(app):
            leaving = RawClient({**CHAT, "n": 2, "max_tokens": 3})
            call = asyncio.create_task(leaving.call(app))
            await until(lambda: swarm.closed == 1, "the first choice to end")
            assert metric(app, "swarmgate_active_generations") == 0
            leaving.gone.set()
            await asyncio.wait_for(call, BOUND)
            assert leaving.status() == 499 and swarm.opened == 1
            assert metric(app, "swarmgate_requests_total", outcome="cancelled") == 1
            assert app.state.admission.in_flight("anonymous") == 0

    asyncio.run(scenario())


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_a_stream_whose_client_stops_reading_is_cancelled_after_the_send_timeout(
    tiny_model: Path, swarm: LocalSwarmClient, path: str
) -> None:
    app = create_app(settings(tiny_model, max_concurrent=1, send_timeout_s=0.2), swarm)
    body = {"model": MODEL_ID, "stream": True, "max_tokens": 200, **FORCED}
    body |= {"messages": CHAT["messages"]} if "chat" in path else {"prompt": "Hello"}

    async def scenario() -> None:
        async with running(app) as client:
            stalled = RawClient(body)
            stalled.stop_reading_after = 2
            await asyncio.wait_for(stalled.call(app, path), BOUND)  # it ends by itself
            assert stalled.status() == 200
            assert swarm.closed == swarm.opened == 1
            assert app.state.admission.in_flight("anonymous") == 0
            assert metric(app, "swarmgate_active_generations") == 0
            assert metric(app, "swarmgate_generated_tokens_total") < 200
            assert metric(app, "swarmgate_requests_total", outcome="cancelled") == 1
            # the only slot is free again
            r = await client.post(path, json={**body, "stream": False, "max_tokens": 2})
            assert r.status_code == 200

    asyncio.run(scenario())
