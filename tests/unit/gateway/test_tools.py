"""Tools through chat completions: the prompt the model sees, and the calls clients get back,
streamed or not, in OpenAI's shapes (checked with the SDK's own types and stream state)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import openai.types.chat as chat_types
import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState
from starlette.testclient import TestClient

from gateway.app import create_app
from gateway.engine.generation import Finished, Generation, GenerationRequest, TextDelta
from gateway.openai.chat_request import tool_plan
from gateway.openai.chat_service import ChatService
from gateway.openai.models import ChatCompletionRequest, ChatMessage, ChatTool
from gateway.openai.prepare import ServedModel
from gateway.openai.templating import PromptBuilder
from gateway.settings import GatewaySettings
from models.loading import load_tokenizer
from tests.fakes import LocalSwarmClient

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time"}}
ASK = [{"role": "user", "content": "Weather in Paris?"}]
CALL_TEXT = (
    "Checking.\n<tool_call>\n"
    '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
)


class ScriptedGenerator:
    """Writes the given text in small pieces, as a model would, then finishes."""

    def __init__(self, text: str, finish: str = "stop") -> None:
        self.text, self.finish = text, finish
        self.prompts: list[list[int]] = []

    async def open(self, request: GenerationRequest, *, near: object = ()) -> Generation:
        self.prompts.append(request.prompt_ids)
        return Generation(session=None, claim=None, history=None)  # type: ignore[arg-type]

    async def generate(
        self,
        request: GenerationRequest,
        generation: Generation,
        *,
        prompt_done: Callable[[], None] = lambda: None,
    ) -> AsyncGenerator[TextDelta | Finished, None]:
        prompt_done()
        for at in range(0, len(self.text), 5):
            yield TextDelta(self.text[at : at + 5])
        yield Finished(self.finish, len(request.prompt_ids), len(self.text) // 5)  # type: ignore[arg-type]

    async def close(self, generation: Generation) -> None:
        pass


@pytest.fixture(scope="module")
def prompts(tiny_model: Path) -> PromptBuilder:
    return PromptBuilder(load_tokenizer(tiny_model))


def service(prompts: PromptBuilder, text: str, finish: str = "stop") -> ChatService:
    model = ServedModel("tiny", 2048, len(prompts.tokenizer), 0)
    return ChatService(model, prompts, ScriptedGenerator(text, finish))  # type: ignore[arg-type]


def request(**fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"model": "tiny", "messages": ASK, "tools": [WEATHER, TIME], **fields}
    )


def complete(svc: ChatService, req: ChatCompletionRequest) -> chat_types.ChatCompletion:
    async def run() -> Any:
        svc.check(req)
        completion, _ = await svc.complete(req, await svc.prepare(req))
        return completion.model_dump(mode="json")

    return chat_types.ChatCompletion.model_validate(asyncio.run(run()))


def stream(svc: ChatService, req: ChatCompletionRequest) -> list[chat_types.ChatCompletionChunk]:
    async def run() -> list[Any]:
        prepared = await svc.prepare(req)
        first = await svc.open(prepared)
        return [chunk.model_dump(mode="json") async for chunk in svc.stream(req, prepared, first)]

    return [chat_types.ChatCompletionChunk.model_validate(c) for c in asyncio.run(run())]


def test_calls_come_back_as_tool_calls_with_their_finish_reason(prompts: PromptBuilder) -> None:
    completion = complete(service(prompts, CALL_TEXT), request())
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Checking."
    calls = choice.message.tool_calls or []
    assert [(c.type, c.function.name) for c in calls] == [
        ("function", "get_weather"),
        ("function", "get_time"),
    ]
    assert json.loads(calls[0].function.arguments) == {"city": "Paris"}
    assert len({c.id for c in calls}) == 2 and all(c.id.startswith("call_") for c in calls)


def test_streamed_calls_follow_openais_delta_shape(prompts: PromptBuilder) -> None:
    req = request(stream=True)
    chunks = stream(service(prompts, CALL_TEXT), req)
    deltas = [d for c in chunks for d in c.choices[0].delta.tool_calls or []]
    # Each call: index, id, type and name first; then its arguments.
    assert [(d.index, d.id is not None, d.function and d.function.name) for d in deltas] == [
        (0, True, "get_weather"),
        (0, False, None),
        (1, True, "get_time"),
        (1, False, None),
    ]
    state = ChatCompletionStreamState(input_tools=[WEATHER, TIME])  # type: ignore[list-item]
    for chunk in chunks:
        state.handle_chunk(chunk)
    final = state.get_final_completion().choices[0]
    assert final.finish_reason == "tool_calls"
    assert [c.function.name for c in final.message.tool_calls or []] == ["get_weather", "get_time"]
    assert json.loads((final.message.tool_calls or [])[0].function.arguments) == {"city": "Paris"}
    assert final.message.content == "Checking.\n"


def test_a_model_that_answers_in_text_gets_a_plain_message(prompts: PromptBuilder) -> None:
    text = "It is sunny in Paris <tool_ maybe."
    completion = complete(service(prompts, text), request())
    assert completion.choices[0].finish_reason == "stop"
    assert completion.choices[0].message.content == text
    assert completion.choices[0].message.tool_calls is None
    chunks = stream(service(prompts, text), request(stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text


def test_one_call_without_parallel_tool_calls(prompts: PromptBuilder) -> None:
    completion = complete(service(prompts, CALL_TEXT), request(parallel_tool_calls=False))
    assert [c.function.name for c in completion.choices[0].message.tool_calls or []] == [
        "get_weather"
    ]


def test_tool_choice_none_leaves_the_tools_out(prompts: PromptBuilder) -> None:
    svc = service(prompts, CALL_TEXT)
    completion = complete(svc, request(tool_choice="none"))
    assert completion.choices[0].message.tool_calls is None
    assert completion.choices[0].message.content == CALL_TEXT
    generator: ScriptedGenerator = svc._generator  # type: ignore[assignment]
    assert "get_weather" not in prompts.tokenizer.decode(generator.prompts[0])


def test_the_fallback_prompt_describes_tools_and_writes_history_as_taught(
    prompts: PromptBuilder,
) -> None:
    assert not prompts.native_tools  # SmolLM2's template knows no tools
    history = [
        ChatMessage(role="system", content="Be brief."),
        *[ChatMessage.model_validate(m) for m in ASK],
        ChatMessage.model_validate(
            {
                "role": "assistant",
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            }
        ),
        ChatMessage(role="tool", content="21C, sunny", tool_call_id="call_1"),
    ]
    tools = [ChatTool.model_validate(WEATHER)]
    text = prompts.tokenizer.decode(prompts.chat_prompt(history, tools))
    system = text.split("<|im_end|>")[0]
    assert system.startswith("<|im_start|>system\nBe brief.\n\n# Tools")
    assert '"name": "get_weather"' in system and "<tool_call>" in system
    assert (
        "<|im_start|>assistant\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Paris"}}' in text
    )
    assert "<|im_start|>user\n<tool_response>\n21C, sunny\n</tool_response>" in text


def test_a_template_that_knows_tools_renders_them_itself(tiny_model: Path) -> None:
    tokenizer = load_tokenizer(tiny_model)
    tokenizer.chat_template = (
        "{% if tools %}TOOLS:{% for t in tools %}{{ t.function.name }};{% endfor %}\n{% endif %}"
        "{% for m in messages %}{{ m.role }}: {{ m.content }}"
        "{% for c in m.tool_calls or [] %}<tool_call>{{ c.function.name }} "
        "{{ c.function.arguments.city }}</tool_call>{% endfor %}\n{% endfor %}"
    )
    builder = PromptBuilder(tokenizer)
    assert builder.native_tools and builder.tool_format.name == "hermes"
    call = {
        "id": "c",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
    }
    messages = [
        ChatMessage.model_validate(m)
        for m in [
            *ASK,
            {"role": "assistant", "tool_calls": [call]},
            {"role": "tool", "content": "cold", "tool_call_id": "c"},
        ]
    ]
    text = tokenizer.decode(builder.chat_prompt(messages, [ChatTool.model_validate(WEATHER)]))
    assert text.startswith("TOOLS:get_weather;")
    assert "<tool_call>get_weather Oslo</tool_call>" in text  # arguments given parsed
    assert "tool: cold" in text


def test_plans() -> None:
    assert tool_plan(request(tools=None)) is None
    assert tool_plan(request(tool_choice="none")) is None
    auto = tool_plan(request())
    assert auto is not None and auto.forced == () and auto.parallel
    named = tool_plan(request(tool_choice={"type": "function", "function": {"name": "get_time"}}))
    assert named is not None and [t.function.name for t in named.forced] == ["get_time"]
    assert not named.parallel
    required = tool_plan(request(tool_choice="required", parallel_tool_calls=False))
    assert required is not None and len(required.forced) == 2 and not required.parallel


@pytest.fixture
def client(tiny_model: Path) -> Iterator[TestClient]:
    settings = GatewaySettings(model_id="tiny", model_path=tiny_model)
    with TestClient(create_app(settings, LocalSwarmClient(tiny_model, "tiny"))) as c:
        yield c


@pytest.mark.parametrize(
    ("changes", "param"),
    [
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tool_choice": "required", "tools": []}, "tool_choice"),
        ({"tools": [WEATHER, WEATHER]}, "tools"),
        (
            {"tools": [{"type": "function", "function": {"name": "bad name!"}}]},
            "tools.0.function.name",
        ),
        ({"tools": [{"type": "retrieval"}]}, "tools.0.type"),
        ({"messages": [*ASK, {"role": "tool", "content": "x"}]}, "messages.1.tool_call_id"),
    ],
)
def test_bad_tool_requests_get_a_400_naming_the_parameter(
    client: TestClient, changes: dict[str, Any], param: str
) -> None:
    body = {"model": "tiny", "messages": ASK, "tools": [WEATHER], "max_tokens": 2, **changes}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_a_random_model_offered_tools_answers_in_openais_shape(client: TestClient) -> None:
    body = {"model": "tiny", "messages": ASK, "tools": [WEATHER], "max_tokens": 8}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    completion = chat_types.ChatCompletion.model_validate(r.json())
    assert completion.choices[0].finish_reason in ("stop", "length")


LOOKUP = {
    "type": "function",
    "function": {
        "name": "lookup",
        "strict": True,
        "parameters": {
            "type": "object",
            "properties": {
                "query": {"type": "string", "maxLength": 20},
                "limit": {"type": "integer", "minimum": 1, "maximum": 9},
                "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
            },
            "required": ["query", "limit"],
            "additionalProperties": False,
        },
    },
}
SCHEMAS = {
    tool["function"]["name"]: tool["function"].get("parameters", {})  # type: ignore[index]
    for tool in (WEATHER, TIME, LOOKUP)
}


def assert_valid_calls(message: chat_types.ChatCompletionMessage, names: set[str]) -> None:
    calls = message.tool_calls or []
    assert calls and {c.function.name for c in calls} <= names
    for call in calls:
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


@pytest.mark.parametrize(
    ("tool_choice", "names"),
    [
        ("required", {"get_weather", "get_time", "lookup"}),
        ({"type": "function", "function": {"name": "lookup"}}, {"lookup"}),
    ],
)
def test_forced_calls_always_validate_whatever_the_model_writes(
    client: TestClient, tool_choice: Any, names: set[str]
) -> None:
    """A random model, sampled at temperature 1: only the grammar can make these valid."""
    body = {
        "model": "tiny",
        "messages": ASK,
        "tools": [WEATHER, TIME, LOOKUP],
        "tool_choice": tool_choice,
        "temperature": 1,
        "max_tokens": 120,
        "parallel_tool_calls": False,
    }
    finished = []
    for seed in range(6):
        r = client.post("/v1/chat/completions", json={**body, "seed": seed})
        assert r.status_code == 200, r.text
        choice = chat_types.ChatCompletion.model_validate(r.json()).choices[0]
        finished.append(choice.finish_reason)
        if choice.finish_reason == "length":
            continue  # cut short, as OpenAI's are (an unbounded string can run on)
        assert choice.finish_reason == "tool_calls", choice
        assert len(choice.message.tool_calls or []) == 1  # parallel_tool_calls false
        assert_valid_calls(choice.message, names)
    assert finished.count("tool_calls") >= 3, finished


def test_forced_calls_stream_in_openais_shape(client: TestClient) -> None:
    body = {
        "model": "tiny",
        "messages": ASK,
        "tools": [TIME, LOOKUP],  # bounded arguments: the calls end in time
        "tool_choice": "required",
        "temperature": 1,
        "seed": 3,
        "max_tokens": 200,
        "stream": True,
    }
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    state = ChatCompletionStreamState(input_tools=[TIME, LOOKUP])  # type: ignore[list-item]
    for line in lines[:-1]:
        state.handle_chunk(chat_types.ChatCompletionChunk.model_validate_json(line))
    final = state.get_final_completion().choices[0]
    assert final.finish_reason == "tool_calls"
    assert_valid_calls(final.message, {"get_time", "lookup"})  # type: ignore[arg-type]


def test_tools_with_a_response_format_give_calls_or_that_json(client: TestClient) -> None:
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "string", "maxLength": 10}},
        "required": ["answer"],
        "additionalProperties": False,
    }
    body = {
        "model": "tiny",
        "messages": ASK,
        "tools": [WEATHER],
        "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}},
        "temperature": 1,
        "max_tokens": 80,
    }
    finished = []
    for seed in range(6):
        r = client.post("/v1/chat/completions", json={**body, "seed": seed})
        choice = chat_types.ChatCompletion.model_validate(r.json()).choices[0]
        finished.append(choice.finish_reason)
        if choice.finish_reason == "tool_calls":
            assert_valid_calls(choice.message, {"get_weather"})
        elif choice.finish_reason == "stop":
            jsonschema.validate(json.loads(choice.message.content or ""), schema)
    assert finished.count("length") <= 3, finished
