"""Responses ⇄ chat completions, on constructed objects: tools, formats, calls and events.

The chat service's tool calls and structured outputs are tested on their own; here only
the translation, so that these paths are checked whatever the model writes.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from openai import omit
from openai.lib.streaming.responses._responses import ResponseStreamState
from openai.types.responses import Response as SDKResponse
from openai.types.responses import ResponseItemList as SDKResponseItemList
from openai.types.responses import ResponseStreamEvent
from pydantic import TypeAdapter

from gateway.openai.answers import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionMessage,
    ChoiceDelta,
    ChoiceDeltaFunction,
    ChoiceDeltaToolCall,
    ChunkChoice,
    CompletionUsage,
    PromptTokensDetails,
)
from gateway.openai.answers import Choice as ChatChoice
from gateway.openai.models import MAX_MESSAGES, ChatMessage, ToolCall, ToolCallFunction
from gateway.responses.events import ResponseEvents
from gateway.responses.items import input_items, items_page, listed_items
from gateway.responses.models import FunctionCall, MessageItem, OutputMessage, ResponsesRequest
from gateway.responses.output import output_items, response_from_completion, response_skeleton
from gateway.responses.to_chat import chat_messages, chat_request, output_messages
from protocol.errors import InvalidRequest

EVENT = TypeAdapter(ResponseStreamEvent)
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    "strict": True,
}
USAGE = CompletionUsage(
    prompt_tokens=20,
    completion_tokens=7,
    total_tokens=27,
    prompt_tokens_details=PromptTokensDetails(cached_tokens=16),
)


def request(**body: Any) -> ResponsesRequest:
    return ResponsesRequest.model_validate({"model": "m", "input": "Hi", **body})


def test_function_tools_and_choices_become_chats() -> None:
    chat, _ = chat_request(
        request(
            tools=[WEATHER],
            tool_choice={"type": "function", "name": "get_weather"},
            parallel_tool_calls=False,
        )
    )
    assert chat.tools is not None
    tool = chat.tools[0]
    assert (tool.type, tool.function.name, tool.function.strict) == (
        "function",
        "get_weather",
        True,
    )
    assert tool.function.parameters == WEATHER["parameters"]
    assert tool.function.description == WEATHER["description"]
    assert chat.tool_choice is not None and not isinstance(chat.tool_choice, str)
    assert chat.tool_choice.function.name == "get_weather"
    assert chat.parallel_tool_calls is False
    for choice in ("none", "auto", "required"):
        assert chat_request(request(tools=[WEATHER], tool_choice=choice))[0].tool_choice == choice


def test_text_formats_become_response_formats() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    form = {"type": "json_schema", "name": "thing", "schema": schema, "strict": True}
    chat, _ = chat_request(request(text={"format": form}))
    assert chat.response_format is not None and chat.response_format.type == "json_schema"
    spec = chat.response_format.json_schema
    assert spec is not None and (spec.name, spec.schema_, spec.strict) == ("thing", schema, True)

    chat, _ = chat_request(request(text={"format": {"type": "json_object"}}))
    assert chat.response_format is not None and chat.response_format.type == "json_object"
    assert chat_request(request(text={"format": {"type": "text"}}))[0].response_format is None

    echoed = response_skeleton(request(text={"format": form}), "resp_1", "m")
    assert echoed.model_dump(mode="json")["text"]["format"]["schema"] == schema
    SDKResponse.model_validate(echoed.model_dump(mode="json"))


def test_a_response_may_turn_speculation_off_as_a_chat_does() -> None:
    assert chat_request(request(speculate=False))[0].speculate is False
    assert chat_request(request())[0].speculate is None


def test_calls_and_their_outputs_become_chat_turns() -> None:
    items = [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {
            "type": "message",
            "role": "assistant",
            "content": [{"type": "output_text", "text": "Let me look."}],
        },
        {
            "type": "function_call",
            "call_id": "call_1",
            "name": "get_weather",
            "arguments": '{"city": "Paris"}',
        },
        {
            "type": "function_call",
            "call_id": "call_2",
            "name": "get_weather",
            "arguments": '{"city": "Rome"}',
        },
        {"type": "function_call_output", "call_id": "call_1", "output": "18 C"},
        {
            "type": "function_call_output",
            "call_id": "call_2",
            "output": [{"type": "input_text", "text": "21 C"}],
        },
    ]
    chat, conversation = chat_request(request(input=items, instructions="Be brief."))
    system, user, assistant, tool1, tool2 = chat.messages
    assert (system.role, system.text()) == ("system", "Be brief.")
    assert (user.role, user.text()) == ("user", "Weather in Paris and Rome?")
    assert assistant.role == "assistant" and assistant.text() == "Let me look."
    assert [(c.id, c.function.arguments) for c in assistant.tool_calls or []] == [
        ("call_1", '{"city": "Paris"}'),
        ("call_2", '{"city": "Rome"}'),
    ]
    assert [(t.role, t.tool_call_id, t.text()) for t in (tool1, tool2)] == [
        ("tool", "call_1", "18 C"),
        ("tool", "call_2", "21 C"),
    ]
    assert conversation == chat.messages[1:]  # stored without the instructions

    # A call with no message before it starts an assistant turn of its own.
    alone = chat_messages(request(input=items[2:3]).input)  # type: ignore[arg-type]
    assert alone[0].role == "assistant" and alone[0].content is None


def test_a_stored_conversation_plus_input_is_bounded_like_chat_messages() -> None:
    history = [ChatMessage(role="user", content="x")] * MAX_MESSAGES
    with pytest.raises(InvalidRequest) as refused:
        chat_request(request(), history)
    assert refused.value.param == "input"


def test_output_with_calls_round_trips_into_the_stored_conversation() -> None:
    calls = [ToolCall(id="call_9", function=ToolCallFunction(name="get_weather", arguments="{}"))]
    items = output_items(ChatCompletionMessage(content=None, tool_calls=calls), "tool_calls")
    assert [type(i) for i in items] == [FunctionCall]  # no empty message beside the call
    assert (items[0].call_id, items[0].status) == ("call_9", "completed")
    assert items[0].id.startswith("fc_")
    assert output_messages(items) == [ChatMessage(role="assistant", tool_calls=calls)]

    both = output_items(ChatCompletionMessage(content="Checking.", tool_calls=calls), "tool_calls")
    assert [type(i) for i in both] == [OutputMessage, FunctionCall]
    [message] = output_messages(both)
    assert message.text() == "Checking." and message.tool_calls == calls


def test_a_completion_becomes_a_response() -> None:
    completion = ChatCompletion(
        id="chatcmpl-1",
        model="m",
        choices=[
            ChatChoice(message=ChatCompletionMessage(content="Hello"), finish_reason="length")
        ],
        usage=USAGE,
    )
    response = response_from_completion(response_skeleton(request(), "resp_1", "m"), completion)
    sdk = SDKResponse.model_validate(response.model_dump(mode="json"))
    assert sdk.status == "incomplete" and sdk.incomplete_details is not None
    assert sdk.incomplete_details.reason == "max_output_tokens"
    assert sdk.output_text == "Hello" and sdk.output[0].status == "incomplete"
    assert sdk.usage is not None and sdk.usage.input_tokens_details.cached_tokens == 16
    assert sdk.usage.input_tokens_details.cache_write_tokens == 4


def chunk(delta: ChoiceDelta, finish: Any = None) -> ChatCompletionChunk:
    return ChatCompletionChunk(
        id="c", created=0, model="m", choices=[ChunkChoice(delta=delta, finish_reason=finish)]
    )


def call_chunks(index: int, call_id: str, arguments: str) -> list[ChatCompletionChunk]:
    """As the chat service streams a call: its id and name, then its arguments."""
    first = ChoiceDeltaToolCall(
        index=index,
        id=call_id,
        type="function",
        function=ChoiceDeltaFunction(name="get_weather", arguments=""),
    )
    rest = ChoiceDeltaToolCall(index=index, function=ChoiceDeltaFunction(arguments=arguments))
    return [chunk(ChoiceDelta(tool_calls=[first])), chunk(ChoiceDelta(tool_calls=[rest]))]


def translate(chunks: list[ChatCompletionChunk]) -> tuple[list[Any], Any]:
    """The events, validated as the SDK's types and replayed through the SDK's own stream
    state (which refuses events that do not fit the ones before); and the final response."""
    events = ResponseEvents(response_skeleton(request(tools=[WEATHER]), "resp_1", "m"))
    produced = events.started()
    for c in [*chunks, ChatCompletionChunk(id="c", created=0, model="m", choices=[], usage=USAGE)]:
        produced += events.push(c)
    final = events.result()
    produced += events.ended(final)
    parsed = [EVENT.validate_python(json.loads(e.model_dump_json())) for e in produced]
    assert [e.sequence_number for e in parsed] == list(range(len(parsed)))
    state: ResponseStreamState[Any] = ResponseStreamState(input_tools=omit, text_format=omit)
    for event in parsed:
        state.handle_event(event)
    return parsed, final


def test_streamed_text_then_calls_become_items_in_order() -> None:
    parsed, final = translate(
        [
            chunk(ChoiceDelta(role="assistant", content="")),
            chunk(ChoiceDelta(content="Let me ")),
            chunk(ChoiceDelta(content="check.")),
            *call_chunks(0, "call_a", '{"city": "Paris"}'),
            *call_chunks(1, "call_b", '{"city": "Rome"}'),
            chunk(ChoiceDelta(), "tool_calls"),
        ]
    )
    assert [e.type for e in parsed] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    message, call_a, call_b = final.output
    assert message.text() == "Let me check."
    assert (call_a.call_id, call_a.arguments) == ("call_a", '{"city": "Paris"}')
    assert (call_b.call_id, call_b.name, call_b.status) == ("call_b", "get_weather", "completed")
    added = [e.item for e in parsed if e.type == "response.output_item.added"]
    assert [i.id for i in added] == [i.id for i in final.output]
    assert added[1].status == "in_progress" and added[1].arguments == ""
    assert parsed[-1].response.usage.input_tokens == 20


def test_whitespace_before_a_call_leaves_no_message() -> None:
    _, final = translate(
        [
            chunk(ChoiceDelta(role="assistant", content="")),
            chunk(ChoiceDelta(content="\n")),
            *call_chunks(0, "call_a", "{}"),
            chunk(ChoiceDelta(content="\n")),
            chunk(ChoiceDelta(), "tool_calls"),
        ]
    )
    assert [i.type for i in final.output] == ["function_call"]


@pytest.mark.parametrize("text", ["", "\n\n"])
def test_an_answer_of_nothing_is_still_a_message(text: str) -> None:
    _, final = translate([chunk(ChoiceDelta(content=text)), chunk(ChoiceDelta(), "stop")])
    [message] = final.output
    assert message.type == "message" and message.text() == text
    assert final.status == "completed"


def test_a_broken_stream_fails_with_its_output_so_far() -> None:
    events = ResponseEvents(response_skeleton(request(), "resp_1", "m"))
    produced = [*events.started(), *events.push(chunk(ChoiceDelta(content="Half an")))]
    produced += events.failed("a server of the swarm failed", "peer_unavailable", None, 503)
    parsed = [EVENT.validate_python(json.loads(e.model_dump_json())) for e in produced]
    error, failed = parsed[-2:]
    assert (error.type, error.code) == ("error", "peer_unavailable")
    assert failed.type == "response.failed" and failed.response.status == "failed"
    assert failed.response.error.code == "server_error"
    [message] = failed.response.output
    assert message.status == "incomplete" and message.content[0].text == "Half an"


def test_input_items_are_listed_with_stable_ids_in_openais_shapes() -> None:
    items = [
        {"role": "developer", "content": "Be brief."},
        {"role": "assistant", "id": "msg_given", "content": "Earlier answer."},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "42", "id": "fco_given"},
        {"role": "user", "id": "msg_given", "content": [{"type": "input_text", "text": "Hm"}]},
    ]
    stored = input_items(request(input=items).input)
    listed = listed_items("resp_1", stored)
    assert listed == listed_items("resp_1", stored)  # the same ids every time
    assert [item.id for item in listed][1::2] == ["msg_given", "fco_given"]
    derived = [listed[0].id, listed[2].id, listed[4].id]  # the repeated id is no cursor
    assert len(set(derived)) == 3 and "msg_given" not in derived
    assert listed_items("resp_2", stored)[0].id != listed[0].id
    assert isinstance(listed[1], MessageItem) and listed[1].content[0].type == "output_text"
    page = items_page(listed, order="asc")
    SDKResponseItemList.model_validate(page.model_dump(mode="json"))

    [one] = listed_items("resp_1", input_items("Hello"))
    assert one.model_dump(mode="json") == {
        "id": one.id,
        "type": "message",
        "status": "completed",
        "role": "user",
        "content": [{"type": "input_text", "text": "Hello"}],
    }


def test_input_items_page_like_openais_lists() -> None:
    listed = listed_items(
        "resp_1",
        input_items(request(input=[{"role": "user", "content": str(i)} for i in range(5)]).input),
    )
    ids = [item.id for item in listed]

    def page_ids(**params: Any) -> tuple[list[str], bool]:
        page = items_page(listed, **params)
        got = [item.id for item in page.data]
        assert (page.first_id, page.last_id) == ((got[0], got[-1]) if got else (None, None))
        return got, page.has_more

    assert page_ids() == (ids[::-1], False)  # newest first by default
    assert page_ids(order="asc", limit=2) == (ids[:2], True)
    assert page_ids(order="asc", limit=2, after=ids[1]) == (ids[2:4], True)
    assert page_ids(order="asc", limit=2, after=ids[3]) == (ids[4:], False)
    assert page_ids(order="asc", after=ids[4]) == ([], False)
    assert page_ids(limit=2, after=ids[3]) == ([ids[2], ids[1]], True)
    # Paging back: the items nearest the cursor.
    assert page_ids(order="asc", limit=2, before=ids[4]) == (ids[2:4], True)
    assert page_ids(order="asc", limit=2, before=ids[1]) == (ids[:1], False)
    assert page_ids(order="asc", after=ids[0], before=ids[3]) == (ids[1:3], False)
    with pytest.raises(InvalidRequest) as refused:
        items_page(listed, after="msg_nope")
    assert refused.value.param == "after"
