"""A Responses request as a chat completions request: its input items and instructions as
chat messages, its tools, tool choice and text format as chat's.

Pure: no I/O, no HTTP.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from pydantic import ValidationError

from gateway.openai.models import (
    MAX_MESSAGES,
    ChatCompletionRequest,
    ChatMessage,
    ChatTool,
    ChatToolChoice,
    NamedToolChoice,
    ResponseFormat,
    StreamOptions,
    ToolCall,
    ToolCallFunction,
)
from gateway.responses.models import (
    FunctionCallItem,
    FunctionCallOutputItem,
    FunctionToolChoice,
    InputItem,
    InputMessage,
    Loose,
    OutputItem,
    OutputMessage,
    ResponsesRequest,
    TextConfig,
    TextFormatJSONObject,
    TextFormatJSONSchema,
    part_text,
)
from protocol.errors import InvalidRequest

LOGPROBS = "message.output_text.logprobs"


def message_text(content: str | list[Any]) -> str:
    if isinstance(content, str):
        return content
    return "".join(part_text(part) for part in content)


def chat_messages(items: str | Iterable[InputItem]) -> list[ChatMessage]:
    """Input items as chat messages: a function call joins the assistant message before it
    (or starts one), and a function's output becomes a tool message."""
    if isinstance(items, str):
        return [ChatMessage(role="user", content=items)]
    messages: list[ChatMessage] = []
    for item in items:
        if isinstance(item, InputMessage):
            messages.append(ChatMessage(role=item.role, content=message_text(item.content)))
        elif isinstance(item, FunctionCallItem):
            call = ToolCall(
                id=item.call_id,
                function=ToolCallFunction(name=item.name, arguments=item.arguments),
            )
            last = messages[-1] if messages else None
            if last is not None and last.role == "assistant":
                calls = [*(last.tool_calls or []), call]
                messages[-1] = last.model_copy(update={"tool_calls": calls})
            else:
                messages.append(ChatMessage(role="assistant", tool_calls=[call]))
        elif isinstance(item, FunctionCallOutputItem):
            messages.append(
                ChatMessage(
                    role="tool", tool_call_id=item.call_id, content=message_text(item.output)
                )
            )
    return messages


def output_messages(output: Iterable[OutputItem]) -> list[ChatMessage]:
    """A response's output as the assistant turn of the conversation it continues."""
    items: list[InputItem] = [
        InputMessage(role="assistant", content=item.text())
        if isinstance(item, OutputMessage)
        else FunctionCallItem(
            type="function_call", call_id=item.call_id, name=item.name, arguments=item.arguments
        )
        for item in output
    ]
    return chat_messages(items)


def chat_request(
    request: ResponsesRequest, history: Sequence[ChatMessage] = ()
) -> tuple[ChatCompletionRequest, list[ChatMessage]]:
    """The chat completion request for ``request``, continuing ``history``; and the
    conversation to store (history and this turn's input, without the instructions)."""
    conversation = [*history, *chat_messages(request.input)]
    system = [ChatMessage(role="system", content=request.instructions)]
    messages = [*system, *conversation] if request.instructions else conversation
    if len(messages) > MAX_MESSAGES:
        raise InvalidRequest(
            f"the conversation has {len(messages)} messages, more than the {MAX_MESSAGES} "
            "one request may have",
            param="input",
        )
    logprobs = LOGPROBS in (request.include or []) or bool(request.top_logprobs)
    tools = [
        ChatTool.model_validate({"type": "function", "function": tool.model_dump()})
        for tool in request.tools or []
        if not isinstance(tool, Loose)
    ]
    try:
        chat = ChatCompletionRequest(
            model=request.model,
            messages=messages,
            max_completion_tokens=request.max_output_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            stream=request.stream,
            # The usage of a streamed response comes in the chat stream's last chunk.
            stream_options=StreamOptions(include_usage=True) if request.stream else None,
            user=request.user,
            speculate=request.speculate,
            prompt_cache_key=request.prompt_cache_key,
            tools=tools or None,
            tool_choice=_chat_tool_choice(request),
            parallel_tool_calls=request.parallel_tool_calls,
            response_format=_response_format(request.text),
            logprobs=logprobs or None,
            top_logprobs=request.top_logprobs if logprobs else None,
        )
    except ValidationError as e:  # limits that only the merged conversation can break
        first = e.errors()[0]
        message = str(first["msg"]).removeprefix("Value error, ")  # pydantic's, not OpenAI's
        raise InvalidRequest(f"input: {message}", param="input") from e
    return chat, conversation


def _chat_tool_choice(request: ResponsesRequest) -> ChatToolChoice | None:
    choice = request.tool_choice
    if isinstance(choice, FunctionToolChoice):
        return NamedToolChoice.model_validate(
            {"type": "function", "function": {"name": choice.name}}
        )
    return None if isinstance(choice, Loose) else choice


def _response_format(text: TextConfig | None) -> ResponseFormat | None:
    """`text.format` as chat's `response_format` (None for plain text, the default)."""
    form = None if text is None else text.format
    if isinstance(form, TextFormatJSONObject):
        return ResponseFormat(type="json_object")
    if isinstance(form, TextFormatJSONSchema):
        schema = form.model_dump(by_alias=True, exclude={"type"})
        return ResponseFormat.model_validate({"type": "json_schema", "json_schema": schema})
    return None
