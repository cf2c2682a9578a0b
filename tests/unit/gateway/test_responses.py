"""`/v1/responses` on an in-process swarm, validated with the OpenAI SDK's own types."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest
from openai.types.responses import Response, ResponseItemList, ResponseStreamEvent
from pydantic import TypeAdapter
from starlette.testclient import TestClient

from gateway.app import create_app
from gateway.openai.models import ChatMessage
from gateway.settings import GatewaySettings
from tests.fakes import LocalSwarmClient

MODEL_ID = "tiny"
BASE: dict[str, Any] = {"model": MODEL_ID, "max_output_tokens": 4, "temperature": 0}
EVENT = TypeAdapter(ResponseStreamEvent)


@pytest.fixture
def swarm(tiny_model: Path) -> LocalSwarmClient:
    return LocalSwarmClient(tiny_model, MODEL_ID)


@pytest.fixture
def client(tiny_model: Path, swarm: LocalSwarmClient) -> Iterator[TestClient]:
    settings = GatewaySettings(model_id=MODEL_ID, model_path=tiny_model)
    with TestClient(create_app(settings, swarm)) as c:
        yield c


def create(client: TestClient, headers: dict[str, str] | None = None, **body: Any) -> Response:
    r = client.post("/v1/responses", json={**BASE, **body}, headers=headers)
    assert r.status_code == 200, r.text
    return Response.model_validate(r.json())


def events(text: str) -> list[Any]:
    """Each SSE frame's event, validated as the SDK's own type; its `event:` name is its type."""
    parsed = []
    for frame in text.split("\n\n"):
        if not frame or frame.startswith(":"):
            continue
        name, data = frame.split("\n", 1)
        assert name.startswith("event: ") and data.startswith("data: "), frame
        event = EVENT.validate_python(json.loads(data.removeprefix("data: ")))
        assert event.type == name.removeprefix("event: ")
        parsed.append(event)
    return parsed


def stream(client: TestClient, **body: Any) -> list[Any]:
    r = client.post("/v1/responses", json={**BASE, **body, "stream": True})
    assert r.status_code == 200, r.text
    assert "[DONE]" not in r.text  # OpenAI ends a response stream with its last event
    return events(r.text)


def test_a_text_response_has_openais_shape(client: TestClient) -> None:
    r = create(client, input="Hello", max_output_tokens=50, metadata={"k": "v"}, top_p=0.5)
    assert r.id.startswith("resp_") and r.object == "response" and r.model == MODEL_ID
    assert r.status in ("completed", "incomplete")
    message = r.output[0]
    assert message.type == "message" and message.id.startswith("msg_")
    assert message.content[0].type == "output_text" and r.output_text == message.content[0].text
    usage = r.usage
    assert usage is not None and usage.input_tokens > 0
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert usage.input_tokens_details.cached_tokens == 0
    assert usage.output_tokens_details.reasoning_tokens == 0
    assert (r.temperature, r.top_p, r.metadata, r.tools) == (0.0, 0.5, {"k": "v"}, [])
    assert (r.tool_choice, r.parallel_tool_calls, r.previous_response_id) == ("auto", True, None)
    assert r.text is not None and r.text.format is not None and r.text.format.type == "text"


def test_out_of_tokens_is_incomplete(client: TestClient) -> None:
    r = create(client, input="Tell me a long story", max_output_tokens=2)
    assert r.usage is not None and r.usage.output_tokens <= 2
    if r.usage.output_tokens == 2:  # a random model may still stop first
        assert r.status == "incomplete" and r.incomplete_details is not None
        assert r.incomplete_details.reason == "max_output_tokens"
        assert r.output[0].status == "incomplete"


def test_a_streamed_response_sends_openais_events_in_order(client: TestClient) -> None:
    plain = create(client, input="Hello", max_output_tokens=6)
    sent = stream(client, input="Hello", max_output_tokens=6)
    assert [e.sequence_number for e in sent] == list(range(len(sent)))
    kinds = [e.type for e in sent]
    deltas = kinds.count("response.output_text.delta")
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * deltas,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        f"response.{plain.status}",
    ]
    created, final = sent[0].response, sent[-1].response
    assert created.status == "in_progress" and created.output == [] and created.usage is None
    assert final.id == created.id and final.usage is not None
    text = "".join(e.delta for e in sent if e.type == "response.output_text.delta")
    assert text == plain.output_text == final.output_text
    item_id = sent[2].item.id
    assert {e.item_id for e in sent[3:-2] if hasattr(e, "item_id")} == {item_id}
    assert final.output[0].id == item_id


def test_instructions_lead_the_prompt_but_are_not_carried_over(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    prompts = client.app.state.chat._prompts  # type: ignore[attr-defined]
    seen: list[list[ChatMessage]] = []
    builder = prompts.chat_prompt
    monkeypatch.setattr(prompts, "chat_prompt", lambda m, t=(): seen.append(m) or builder(m, t))

    first = create(client, input="Hi", instructions="Answer in French.")
    assert [(m.role, m.text()) for m in seen[0]] == [
        ("system", "Answer in French."),
        ("user", "Hi"),
    ]
    assert first.instructions == "Answer in French."
    create(client, input="Again", previous_response_id=first.id, instructions="Be short.")
    # As OpenAI: a follow-up's instructions replace the earlier ones.
    assert [(m.role, m.text()) for m in seen[1]] == [
        ("system", "Be short."),
        ("user", "Hi"),
        ("assistant", first.output_text),
        ("user", "Again"),
    ]


def test_a_chain_of_three_turns_continues_one_session(
    client: TestClient, swarm: LocalSwarmClient
) -> None:
    r1 = create(client, input="One")
    r2 = create(client, input=[{"role": "user", "content": "Two"}], previous_response_id=r1.id)
    r3 = create(
        client,
        input=[
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "3"}]}
        ],
        previous_response_id=r2.id,
        stream=False,
    )
    assert r2.previous_response_id == r1.id and r3.previous_response_id == r2.id
    assert r3.usage is not None and r2.usage is not None and r1.usage is not None
    assert r1.usage.total_tokens < r2.usage.input_tokens < r3.usage.input_tokens
    sessions = [session for session, _ in swarm.opens]
    assert len(sessions) == 3 and len(set(sessions)) == 1, "each turn claims the same caches"

    for r in (r1, r2, r3):
        got = client.get(f"/v1/responses/{r.id}")
        assert got.status_code == 200
        assert Response.model_validate(got.json()) == r


def test_a_clients_cache_key_names_the_whole_conversation(
    client: TestClient, swarm: LocalSwarmClient
) -> None:
    r1 = create(client, input="One", prompt_cache_key="conversation-7")
    create(client, input="Two", previous_response_id=r1.id)  # the key comes along
    chat = {"model": MODEL_ID, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    r = client.post("/v1/chat/completions", json={**chat, "prompt_cache_key": "conversation-7"})
    assert r.status_code == 200
    assert len({session for session, _ in swarm.opens}) == 1


def test_a_conversation_with_function_calls_reaches_the_template(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    prompts = client.app.state.chat._prompts  # type: ignore[attr-defined]
    seen: list[list[ChatMessage]] = []
    builder = prompts.chat_prompt
    monkeypatch.setattr(prompts, "chat_prompt", lambda m, t=(): seen.append(m) or builder(m, t))
    tool = {"type": "function", "name": "get_weather", "parameters": {"type": "object"}}
    call = {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": "{}"}
    result = {"type": "function_call_output", "call_id": "call_1", "output": "Sunny"}
    r = create(client, input=[{"role": "user", "content": "Weather?"}, call, result], tools=[tool])
    assert [m.role for m in seen[0]] == ["user", "assistant", "tool"]
    assert seen[0][1].tool_calls is not None and seen[0][2].tool_call_id == "call_1"
    assert [t.name for t in r.tools] == ["get_weather"]


def test_a_conversation_too_long_for_the_model_names_the_input(client: TestClient) -> None:
    r = client.post("/v1/responses", json={**BASE, "input": "river " * 2000})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["code"], error["param"]) == ("context_length_exceeded", "input")
    assert "in the input" in error["message"] and "messages" not in error["message"]

    # Chat keeps the word of its own parameter.
    chat = {"model": MODEL_ID, "messages": [{"role": "user", "content": "river " * 2000}]}
    error = client.post("/v1/chat/completions", json=chat).json()["error"]
    assert (error["code"], error["param"]) == ("context_length_exceeded", "messages")
    assert "in the messages" in error["message"]


def test_a_streamed_turn_is_stored_once_completed(client: TestClient) -> None:
    sent = stream(client, input="Hello")
    final = sent[-1].response
    got = client.get(f"/v1/responses/{final.id}")
    assert got.status_code == 200 and Response.model_validate(got.json()) == final
    follow = create(client, input="More", previous_response_id=final.id)
    assert follow.usage is not None and final.usage is not None
    assert follow.usage.input_tokens > final.usage.total_tokens


def test_store_false_keeps_nothing(client: TestClient) -> None:
    r = create(client, input="Hello", store=False)
    assert client.get(f"/v1/responses/{r.id}").status_code == 404
    again = client.post("/v1/responses", json={**BASE, "input": "x", "previous_response_id": r.id})
    assert again.status_code == 400


def test_unknown_ids_are_refused(client: TestClient) -> None:
    missing = client.get("/v1/responses/resp_nope")
    assert missing.status_code == 404
    assert missing.json()["error"]["type"] == "invalid_request_error"
    r = client.post("/v1/responses", json={**BASE, "input": "x", "previous_response_id": "resp_x"})
    assert r.status_code == 400  # as OpenAI answers
    assert r.json()["error"]["code"] == "previous_response_not_found"
    assert r.json()["error"]["param"] == "previous_response_id"
    other = client.post("/v1/responses", json={**BASE, "input": "x", "model": "other"})
    assert other.status_code == 404 and other.json()["error"]["code"] == "model_not_found"


def test_a_response_can_be_deleted(client: TestClient) -> None:
    r = create(client, input="Hello")
    deleted = client.delete(f"/v1/responses/{r.id}")
    assert deleted.json() == {"id": r.id, "object": "response", "deleted": True}
    assert client.get(f"/v1/responses/{r.id}").status_code == 404
    assert client.delete(f"/v1/responses/{r.id}").status_code == 404


def input_items(client: TestClient, response_id: str, **params: Any) -> ResponseItemList:
    r = client.get(f"/v1/responses/{response_id}/input_items", params=params)
    assert r.status_code == 200, r.text
    return ResponseItemList.model_validate(r.json())


def test_input_items_are_the_requests_own_input(client: TestClient) -> None:
    first = create(client, input="Hello")
    [hello] = input_items(client, first.id).data
    assert hello.type == "message" and hello.role == "user"
    assert [(p.type, p.text) for p in hello.content] == [("input_text", "Hello")]  # type: ignore[union-attr]
    assert input_items(client, first.id).data[0].id == hello.id  # the same id every time

    call = {"type": "function_call", "call_id": "call_1", "name": "f", "arguments": "{}"}
    result = {"type": "function_call_output", "call_id": "call_1", "output": "42"}
    turn = [{"role": "user", "content": "Go", "id": "msg_mine"}, call, result]
    second = create(client, input=turn, previous_response_id=first.id)
    listed = input_items(client, second.id)  # as OpenAI: not the turns it continued
    assert [item.type for item in listed.data] == [
        "function_call_output",
        "function_call",
        "message",
    ]
    assert listed.data[-1].id == "msg_mine"
    assert (listed.first_id, listed.last_id) == (listed.data[0].id, "msg_mine")
    assert not listed.has_more and listed.object == "list"
    ascending = input_items(client, second.id, order="asc")
    assert [i.id for i in ascending.data] == [i.id for i in reversed(listed.data)]

    page = input_items(client, second.id, order="asc", limit=2)
    assert page.has_more and len(page.data) == 2
    rest = input_items(client, second.id, order="asc", limit=2, after=page.last_id)
    assert not rest.has_more and [i.id for i in rest.data] == [listed.data[0].id]
    back = input_items(client, second.id, order="asc", before=rest.first_id)
    assert back.data == page.data
    # `include` adds nothing that a text input could hold: accepted, and nothing changes.
    included = input_items(client, second.id, include=["message.input_image.image_url"])
    assert included == listed


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"limit": 0}, "limit"),
        ({"limit": 101}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"order": "newest"}, "order"),
        ({"after": "msg_nope"}, "after"),
        ({"before": "msg_nope"}, "before"),
    ],
)
def test_input_items_refuse_bad_paging(
    client: TestClient, params: dict[str, Any], param: str
) -> None:
    r = create(client, input="Hello")
    got = client.get(f"/v1/responses/{r.id}/input_items", params=params)
    assert got.status_code == 400, got.text
    assert got.json()["error"]["type"] == "invalid_request_error"
    assert got.json()["error"]["param"] == param


def test_input_items_of_an_unknown_or_unstored_response_are_404(client: TestClient) -> None:
    missing = client.get("/v1/responses/resp_nope/input_items")
    assert missing.status_code == 404
    assert missing.json() == client.get("/v1/responses/resp_nope").json()
    unstored = create(client, input="Hello", store=False)
    assert client.get(f"/v1/responses/{unstored.id}/input_items").status_code == 404
    deleted = create(client, input="Hello")
    client.delete(f"/v1/responses/{deleted.id}")
    assert client.get(f"/v1/responses/{deleted.id}/input_items").status_code == 404


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tools": [{"type": "web_search"}]}, "tools.0"),
        ({"tools": [{"type": "function", "name": "f"}, {"type": "file_search"}]}, "tools.1"),
        ({"tool_choice": {"type": "code_interpreter"}}, "tool_choice"),
        ({"background": True}, "background"),
        ({"conversation": "conv_1"}, "conversation"),
        ({"prompt": {"id": "pmpt_1"}}, "prompt"),
        ({"include": ["file_search_call.results"]}, "include.0"),
        ({"reasoning": {"effort": "high"}}, "reasoning.effort"),
        ({"truncation": "auto"}, "truncation"),
        ({"text": {"verbosity": "low"}}, "text.verbosity"),
        (
            {
                "input": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "input_text", "text": "What is this?"},
                            {"type": "input_image", "image_url": "https://example.com/a.png"},
                        ],
                    }
                ]
            },
            "input.0.content.1",
        ),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input.0"),
    ],
)
def test_what_cannot_be_honoured_is_refused_by_name(
    client: TestClient, swarm: LocalSwarmClient, extra: dict[str, Any], param: str
) -> None:
    r = client.post("/v1/responses", json={**BASE, "input": "Hi", **extra})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    assert swarm.opened == 0  # refused before any server was asked


def test_input_is_bounded_like_chat_messages(client: TestClient) -> None:
    r = client.post(
        "/v1/responses", json={**BASE, "input": [{"role": "user", "content": "x"}] * 2049}
    )
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("input")
    assert client.post("/v1/responses", json={**BASE, "input": []}).status_code == 400


def test_what_needs_no_honouring_is_accepted(client: TestClient) -> None:
    r = create(
        client,
        input="Hi",
        reasoning={"effort": None},
        include=["reasoning.encrypted_content"],
        truncation="disabled",
        text={"format": {"type": "text"}, "verbosity": "medium"},
        service_tier="auto",
        some_future_field=1,
    )
    assert r.status in ("completed", "incomplete")


def test_responses_of_one_api_key_are_invisible_to_another(tiny_model: Path) -> None:
    settings = GatewaySettings(model_id=MODEL_ID, model_path=tiny_model, api_keys=("ka", "kb"))
    swarm = LocalSwarmClient(tiny_model, MODEL_ID)
    a, b = {"Authorization": "Bearer ka"}, {"Authorization": "Bearer kb"}
    with TestClient(create_app(settings, swarm)) as client:
        r = create(client, headers=a, input="A secret")
        assert client.get(f"/v1/responses/{r.id}", headers=a).status_code == 200
        assert client.get(f"/v1/responses/{r.id}", headers=b).status_code == 404
        assert client.get(f"/v1/responses/{r.id}/input_items", headers=a).status_code == 200
        assert client.get(f"/v1/responses/{r.id}/input_items", headers=b).status_code == 404
        assert client.delete(f"/v1/responses/{r.id}", headers=b).status_code == 404
        body = {**BASE, "input": "And?", "previous_response_id": r.id}
        other = client.post("/v1/responses", json=body, headers=b)
        assert other.status_code == 400
        assert other.json()["error"]["code"] == "previous_response_not_found"
        assert client.post("/v1/responses", json=body, headers=a).status_code == 200


def test_a_failure_mid_stream_ends_with_response_failed(tiny_model: Path) -> None:
    swarm = LocalSwarmClient(tiny_model, MODEL_ID, fail_after_steps=3)
    settings = GatewaySettings(model_id=MODEL_ID, model_path=tiny_model)
    with TestClient(create_app(settings, swarm)) as client:
        sent = stream(client, input="Hello", max_output_tokens=10)
        assert [e.sequence_number for e in sent] == list(range(len(sent)))
        error, failed = sent[-2:]
        assert error.type == "error" and error.code == "peer_unavailable"
        assert failed.type == "response.failed" and failed.response.status == "failed"
        assert failed.response.error is not None
        assert failed.response.error.code == "server_error"
        assert client.get(f"/v1/responses/{failed.response.id}").status_code == 404
        assert swarm.opened == swarm.closed == 1


def test_every_session_is_closed(client: TestClient, swarm: LocalSwarmClient) -> None:
    create(client, input="Hello")
    stream(client, input="Hello")
    assert swarm.opened == swarm.closed == 2


def test_logprobs_when_included(client: TestClient) -> None:
    r = create(client, input="Hello", include=["message.output_text.logprobs"], top_logprobs=2)
    part = r.output[0].content[0]
    assert part.type == "output_text" and part.logprobs
    assert "".join(lp.token for lp in part.logprobs) == part.text
    assert all(len(lp.top_logprobs) == 2 for lp in part.logprobs)
    sent = stream(client, input="Hello", include=["message.output_text.logprobs"])
    streamed = [
        lp.token for e in sent if e.type == "response.output_text.delta" for lp in e.logprobs
    ]
    assert streamed == [lp.token for lp in part.logprobs]


def test_the_openai_sdk_creates_streams_and_retrieves(client: TestClient) -> None:
    sdk = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=client)
    r = sdk.responses.create(model=MODEL_ID, input="Hello", max_output_tokens=5, temperature=0)
    assert r.output_text and sdk.responses.retrieve(r.id) == r

    with sdk.responses.stream(
        model=MODEL_ID, input="Go on", previous_response_id=r.id, max_output_tokens=5
    ) as events:
        # The SDK's own stream state checks that every event fits the ones before it.
        seen = list(events)
    deltas = [e for e in seen if e.type == "response.output_text.delta"]
    final = seen[-1].response  # get_final_response() wants `completed`; 5 tokens may not do
    assert seen[-1].type in ("response.completed", "response.incomplete")
    assert final.output_text == deltas[-1].snapshot == "".join(e.delta for e in deltas)
    assert final.previous_response_id == r.id

    raw = list(sdk.responses.create(model=MODEL_ID, input="Hi", max_output_tokens=3, stream=True))
    assert raw[0].type == "response.created" and raw[-1].type.startswith("response.")
    assert sdk.responses.retrieve(raw[-1].response.id).id == raw[0].response.id

    with pytest.raises(openai.NotFoundError):
        sdk.responses.retrieve("resp_missing")
    with pytest.raises(openai.NotFoundError):
        sdk.responses.input_items.list("resp_missing")
    with pytest.raises(openai.BadRequestError):
        sdk.responses.create(model=MODEL_ID, input="x", tools=[{"type": "web_search"}])


def test_the_openai_sdk_lists_input_items_page_by_page(client: TestClient) -> None:
    sdk = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=client)
    turn = [{"role": "user", "content": f"Line {i}"} for i in range(5)]
    r = sdk.responses.create(model=MODEL_ID, input=turn, max_output_tokens=2)  # type: ignore[arg-type]
    first = sdk.responses.input_items.list(r.id, limit=2, order="asc")
    assert len(first.data) == 2 and first.has_more
    texts = [item.content[0].text for item in first]  # type: ignore[union-attr]
    assert texts == [f"Line {i}" for i in range(5)]  # the SDK follows `after` to the end
    newest = sdk.responses.input_items.list(r.id)
    assert newest.data[0].content[0].text == "Line 4"  # type: ignore[union-attr]


LOOKUP = {
    "type": "function",
    "name": "lookup",
    "strict": True,
    "parameters": {
        "type": "object",
        "properties": {"q": {"type": "string", "maxLength": 8}},
        "required": ["q"],
        "additionalProperties": False,
    },
}


@pytest.mark.parametrize("streamed", [False, True])
def test_a_forced_call_and_its_output_round_trip_through_the_sdk(
    client: TestClient, streamed: bool
) -> None:
    sdk = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=client)
    ask: dict[str, Any] = {
        "model": MODEL_ID,
        "input": "Find it",
        "tools": [LOOKUP],
        "tool_choice": "required",
        "temperature": 1,
        "max_output_tokens": 200,
    }
    if streamed:
        with sdk.responses.stream(**ask) as events:
            seen = list(events)
        kinds = [e.type for e in seen]
        assert "response.function_call_arguments.done" in kinds
        first = events.get_final_response()
    else:
        first = sdk.responses.create(**ask)
    assert first.status == "completed"
    calls = [item for item in first.output if item.type == "function_call"]
    assert len(calls) >= 1 and calls[0].name == "lookup"
    jsonschema.validate(json.loads(calls[0].arguments), LOOKUP["parameters"])

    answer = sdk.responses.create(
        model=MODEL_ID,
        previous_response_id=first.id,
        input=[{"type": "function_call_output", "call_id": calls[0].call_id, "output": "42"}],
        tools=[LOOKUP],
        max_output_tokens=4,
    )
    assert answer.previous_response_id == first.id and answer.output


def test_text_format_json_schema_constrains_the_answer(client: TestClient) -> None:
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer"}},
        "required": ["ok", "n"],
        "additionalProperties": False,
    }
    done = 0
    for seed in range(4):
        r = create(
            client,
            input="Answer",
            temperature=1,
            max_output_tokens=120,
            text={"format": {"type": "json_schema", "name": "a", "schema": schema, "strict": True}},
            metadata={"seed": str(seed)},
        )
        assert r.text is not None and r.text.format is not None
        assert r.text.format.type == "json_schema"
        if r.status == "completed":
            jsonschema.validate(json.loads(r.output_text), schema)
            done += 1
    assert done >= 2
