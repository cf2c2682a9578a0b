"""The Responses API as chat completions: requests in, responses and stream events out.

Pure functions (and one event builder that only counts): no I/O, no HTTP. The service
(gateway/responses/service.py) runs them around the chat completions service.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Iterable, Sequence
from typing import Any, Literal

from pydantic import ValidationError

from gateway.openai.models import (
    MAX_MESSAGES,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionMessage,
    ChatCompletionRequest,
    ChatCompletionTokenLogprob,
    ChatMessage,
    ChatTool,
    ChatToolChoice,
    ChoiceDeltaToolCall,
    ChoiceLogprobs,
    CompletionUsage,
    FinishReason,
    NamedToolChoice,
    ResponseFormat,
    StreamOptions,
    ToolCall,
    ToolCallFunction,
)
from gateway.responses.models import (
    ContentPartEvent,
    DeltaLogprob,
    DeltaLogprobTop,
    ErrorEvent,
    FunctionCall,
    FunctionCallArgumentsDelta,
    FunctionCallArgumentsDone,
    FunctionCallItem,
    FunctionCallOutput,
    FunctionCallOutputItem,
    FunctionToolChoice,
    IncompleteDetails,
    InputItem,
    InputMessage,
    InputRefusal,
    InputText,
    InputTokensDetails,
    Logprob,
    LogprobTop,
    Loose,
    MessageItem,
    OutputItem,
    OutputItemEvent,
    OutputMessage,
    OutputText,
    OutputTextDelta,
    OutputTextDone,
    Response,
    ResponseError,
    ResponseEvent,
    ResponseItem,
    ResponseItemList,
    ResponseLifecycleEvent,
    ResponsesRequest,
    ResponseUsage,
    TextConfig,
    TextFormatJSONObject,
    TextFormatJSONSchema,
    part_text,
)
from protocol.errors import InvalidRequest

LOGPROBS = "message.output_text.logprobs"
# `include` values honoured: logprobs; and encrypted reasoning, which a model that does not
# reason apart from its answer never has (so there is never anything to include).
SUPPORTED_INCLUDE = frozenset({LOGPROBS, "reasoning.encrypted_content"})


def new_id(prefix: str) -> str:
    """``resp_…``, ``msg_…``, ``fc_…``: 192 random bits, unguessable."""
    return f"{prefix}_{secrets.token_hex(24)}"


# ---- requests ----


def _unsupported(message: str, param: str) -> InvalidRequest:
    return InvalidRequest(message, param=param, code="unsupported_parameter")


def refuse_unsupported(request: ResponsesRequest) -> None:
    """A 400 naming what this gateway cannot honour, rather than silently ignoring it."""
    for name in ("background", "conversation", "prompt", "context_management"):
        if getattr(request, name):
            raise _unsupported(f"{name} is not supported by this gateway", name)
    if request.truncation == "auto":
        raise _unsupported(
            "truncation 'auto' is not supported: a conversation longer than the model's "
            "context is refused (context_length_exceeded), never cut",
            "truncation",
        )
    _refuse_reasoning(request)
    for i, value in enumerate(request.include or []):
        if value not in SUPPORTED_INCLUDE:
            raise _unsupported(f"include {value!r} is not supported", f"include.{i}")
    if request.text is not None and request.text.verbosity not in (None, "medium"):
        raise _unsupported("text.verbosity is not supported by this model", "text.verbosity")
    for i, tool in enumerate(request.tools or []):
        if isinstance(tool, Loose):
            raise _unsupported(
                f"the {tool.type!r} tool is not supported; only function tools are",
                f"tools.{i}",
            )
    if isinstance(request.tool_choice, Loose):
        raise _unsupported(
            f"tool_choice of type {request.tool_choice.type!r} is not supported",
            "tool_choice",
        )
    for i, item in enumerate(request.input if isinstance(request.input, list) else []):
        _refuse_item(item, f"input.{i}")


def _refuse_reasoning(request: ResponsesRequest) -> None:
    # As OpenAI answers for its models that do not reason: an effort cannot be honoured.
    reasoning = request.reasoning
    if reasoning is None:
        return
    if reasoning.effort not in (None, "none"):
        raise _unsupported("reasoning.effort is not supported by this model", "reasoning.effort")
    if reasoning.summary is not None or reasoning.generate_summary is not None:
        raise _unsupported("reasoning.summary is not supported by this model", "reasoning.summary")


def _refuse_item(item: InputItem, param: str) -> None:
    if isinstance(item, Loose):
        raise _unsupported(f"input items of type {item.type!r} are not supported", param)
    parts: Any = ()
    if isinstance(item, InputMessage):
        parts, param = item.content, f"{param}.content"
    elif isinstance(item, FunctionCallOutputItem):
        parts, param = item.output, f"{param}.output"
    for j, part in enumerate(parts if isinstance(parts, list) else ()):
        if isinstance(part, Loose):
            raise _unsupported(
                f"{part.type!r} content is not supported: this model reads text only",
                f"{param}.{j}",
            )


def _text(content: str | list[Any]) -> str:
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
            messages.append(ChatMessage(role=item.role, content=_text(item.content)))
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
                ChatMessage(role="tool", tool_call_id=item.call_id, content=_text(item.output))
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


def response_skeleton(request: ResponsesRequest, response_id: str, model: str) -> Response:
    """The response before any output: its id and the parameters it echoes, as OpenAI's."""
    choice = request.tool_choice
    return Response(
        id=response_id,
        model=model,
        instructions=request.instructions,
        max_output_tokens=request.max_output_tokens,
        parallel_tool_calls=request.parallel_tool_calls is not False,
        previous_response_id=request.previous_response_id,
        prompt_cache_key=request.prompt_cache_key,
        safety_identifier=request.safety_identifier,
        store=request.stores(),
        temperature=1.0 if request.temperature is None else request.temperature,
        text=request.text or TextConfig(),
        tool_choice="auto" if choice is None or isinstance(choice, Loose) else choice,
        tools=[tool for tool in request.tools or [] if not isinstance(tool, Loose)],
        top_logprobs=request.top_logprobs or 0,
        top_p=1.0 if request.top_p is None else request.top_p,
        user=request.user,
        metadata=request.metadata or {},
    )


# ---- input items ----


def input_items(input: str | Sequence[InputItem]) -> list[InputItem]:
    """A request's ``input`` as items, a string as one user message: what is stored to
    list it later."""
    if isinstance(input, str):
        return [InputMessage(role="user", content=input)]
    return list(input)


def _item_id(response_id: str, index: int, prefix: str) -> str:
    """The id of an input item that came without one: the same every time it is listed."""
    digest = hashlib.sha256(f"{response_id}\0{index}".encode()).hexdigest()
    return f"{prefix}_{digest[:48]}"


def listed_items(response_id: str, items: Sequence[InputItem]) -> list[ResponseItem]:
    """A response's input items as `GET /v1/responses/{id}/input_items` lists them, in
    input order. Each keeps the id the client gave it; one without (or whose id an earlier
    item already has, which would make it no cursor) gets one derived from the response's
    id and its index."""
    listed: list[ResponseItem] = []
    seen: set[str] = set()
    for index, item in enumerate(items):
        given = getattr(item, "id", None)
        if given is None or given in seen:
            given = None
        if isinstance(item, InputMessage):
            item_id = given or _item_id(response_id, index, "msg")
            listed.append(MessageItem(id=item_id, role=item.role, content=_parts(item)))
        elif isinstance(item, FunctionCallItem):
            item_id = given or _item_id(response_id, index, "fc")
            listed.append(
                FunctionCall(
                    id=item_id,
                    status="completed",
                    call_id=item.call_id,
                    name=item.name,
                    arguments=item.arguments,
                )
            )
        elif isinstance(item, FunctionCallOutputItem):
            item_id = given or _item_id(response_id, index, "fco")
            output = item.output if isinstance(item.output, str) else _text_parts(item.output)
            listed.append(FunctionCallOutput(id=item_id, call_id=item.call_id, output=output))
        else:  # refused when the response was created, so never stored
            continue
        seen.add(item_id)
    return listed


def _text_parts(parts: Iterable[Any]) -> list[InputText | InputRefusal]:
    return [part for part in parts if isinstance(part, InputText | InputRefusal)]


def _parts(message: InputMessage) -> list[InputText | InputRefusal | OutputText]:
    """A message's content as a list of parts; an assistant's text as `output_text`."""
    content = message.content
    parts: list[InputText | InputRefusal] = (
        [InputText(type="input_text", text=content)]
        if isinstance(content, str)
        else _text_parts(content)
    )
    if message.role != "assistant":
        return list(parts)
    return [OutputText(text=p.text) if isinstance(p, InputText) else p for p in parts]


def items_page(
    items: Sequence[ResponseItem],
    *,
    after: str | None = None,
    before: str | None = None,
    limit: int = 20,
    order: Literal["asc", "desc"] = "desc",
) -> ResponseItemList:
    """One page of ``items`` (in input order), as OpenAI pages lists: in ``order``, those
    after the item ``after`` and before the item ``before``; the first ``limit`` of them,
    or, when paging back with ``before`` alone, the ``limit`` nearest to it. ``has_more``:
    the page left some of those out. A cursor that names no item is a 400."""
    ordered = list(items) if order == "asc" else list(reversed(items))
    ids = [item.id for item in ordered]
    start = _position(ids, after, "after") + 1 if after is not None else 0
    end = _position(ids, before, "before") if before is not None else len(ordered)
    window = ordered[start:end]
    page = window[-limit:] if before is not None and after is None else window[:limit]
    return ResponseItemList(
        data=page,
        first_id=page[0].id if page else None,
        last_id=page[-1].id if page else None,
        has_more=len(page) < len(window),
    )


def _position(ids: list[str], cursor: str, param: str) -> int:
    try:
        return ids.index(cursor)
    except ValueError:
        raise InvalidRequest(
            f"No input item with id {cursor!r} in this response.", param=param
        ) from None


# ---- responses ----


def usage_of(usage: CompletionUsage) -> ResponseUsage:
    cached = usage.prompt_tokens_details.cached_tokens
    return ResponseUsage(
        input_tokens=usage.prompt_tokens,
        input_tokens_details=InputTokensDetails(
            cached_tokens=cached, cache_write_tokens=usage.prompt_tokens - cached
        ),
        output_tokens=usage.completion_tokens,
        total_tokens=usage.total_tokens,
    )


def finished(
    response: Response,
    output: Sequence[OutputItem],
    finish_reason: FinishReason | None,
    usage: ResponseUsage | None,
) -> Response:
    """``response`` with its output: completed, or incomplete when out of tokens."""
    complete = finish_reason != "length"
    return response.model_copy(
        update={
            "status": "completed" if complete else "incomplete",
            "completed_at": int(time.time()) if complete else None,
            "incomplete_details": None
            if complete
            else IncompleteDetails(reason="max_output_tokens"),
            "output": list(output),
            "usage": usage,
        }
    )


def response_from_completion(response: Response, completion: ChatCompletion) -> Response:
    choice = completion.choices[0]
    items = output_items(choice.message, choice.finish_reason, choice.logprobs)
    return finished(response, items, choice.finish_reason, usage_of(completion.usage))


def output_items(
    message: ChatCompletionMessage,
    finish_reason: FinishReason,
    logprobs: ChoiceLogprobs | None = None,
) -> list[OutputItem]:
    """A chat message as output items: its text as a message (also when empty, unless the
    model only called functions), then one item per call."""
    items: list[OutputItem] = []
    if message.content is not None or not message.tool_calls:
        text = OutputText(text=message.content or "", logprobs=_logprobs(logprobs))
        status: Literal["completed", "incomplete"] = (
            "incomplete" if finish_reason == "length" else "completed"
        )
        items.append(OutputMessage(id=new_id("msg"), status=status, content=[text]))
    for call in message.tool_calls or []:
        items.append(
            FunctionCall(
                id=new_id("fc"),
                status="completed",
                call_id=call.id,
                name=call.function.name,
                arguments=call.function.arguments,
            )
        )
    return items


def _logprobs(logprobs: ChoiceLogprobs | None) -> list[Logprob]:
    return [_logprob(t) for t in logprobs.content or []] if logprobs else []


def _logprob(token: ChatCompletionTokenLogprob) -> Logprob:
    def top(t: Any) -> LogprobTop:
        return LogprobTop(token=t.token, bytes=t.bytes or list(t.token.encode()), logprob=t.logprob)

    return Logprob(**top(token).model_dump(), top_logprobs=[top(t) for t in token.top_logprobs])


def _delta_logprobs(tokens: Iterable[Logprob]) -> list[DeltaLogprob]:
    return [
        DeltaLogprob(
            token=t.token,
            logprob=t.logprob,
            top_logprobs=[
                DeltaLogprobTop(token=x.token, logprob=x.logprob) for x in t.top_logprobs
            ],
        )
        for t in tokens
    ]


class ResponseEvents:
    """A chat completion stream as the Responses API's events, numbered in order.

    ``started`` opens the stream, ``push`` translates each chat chunk, ``result`` is the
    finished response, which ``ended`` announces; ``failed`` ends a stream that broke.
    Text opens a message item, each call a function call item; an item is done when the
    next one begins or the generation finishes. Whitespace before a message's first word is
    held back: a model that only calls functions leaves no empty message behind (as in the
    non-streamed response, whose text around calls is stripped).
    """

    def __init__(self, response: Response) -> None:
        self.response = response
        self._sequence = 0
        self._items: list[OutputItem] = []  # the last is still open while `_open`
        self._open = False
        self._text: list[str] = []  # of the open message, or the arguments of the open call
        self._logprobs: list[Logprob] = []  # of the open message
        self._held = ""  # whitespace that may begin a message
        self._held_logprobs: list[Logprob] = []
        self._finish: FinishReason | None = None
        self._usage: ResponseUsage | None = None

    def _number(self) -> int:
        self._sequence += 1
        return self._sequence - 1

    def _lifecycle(self, kind: Any, response: Response) -> ResponseLifecycleEvent:
        return ResponseLifecycleEvent(type=kind, sequence_number=self._number(), response=response)

    def started(self) -> list[ResponseEvent]:
        return [
            self._lifecycle("response.created", self.response),
            self._lifecycle("response.in_progress", self.response),
        ]

    def push(self, chunk: ChatCompletionChunk) -> list[ResponseEvent]:
        events: list[ResponseEvent] = []
        if chunk.usage is not None:
            self._usage = usage_of(chunk.usage)
        for choice in chunk.choices[:1]:  # a response has one choice
            logprobs = _logprobs(choice.logprobs)
            if choice.delta.content:
                events += self._add_text(choice.delta.content, logprobs)
            for call in choice.delta.tool_calls or []:
                events += self._add_call(call)
            if choice.finish_reason is not None:
                events += self._finished(choice.finish_reason)
        return events

    def result(self) -> Response:
        return finished(self.response, self._items, self._finish, self._usage)

    def ended(self, response: Response) -> list[ResponseEvent]:
        kind = "response.completed" if response.status == "completed" else "response.incomplete"
        return [self._lifecycle(kind, response)]

    def failed(
        self, message: str, code: str | None, param: str | None, status: int
    ) -> list[ResponseEvent]:
        """An `error` event with the gateway's error code, then `response.failed` with the
        output so far (an unfinished item as incomplete)."""
        output = list(self._items)
        if self._open:
            output[-1] = self._closed_item("incomplete")
        error = ResponseError(
            code="rate_limit_exceeded" if status == 429 else "server_error", message=message
        )
        response = self.response.model_copy(
            update={"status": "failed", "error": error, "output": output, "usage": self._usage}
        )
        return [
            ErrorEvent(sequence_number=self._number(), code=code, message=message, param=param),
            self._lifecycle("response.failed", response),
        ]

    def _add_text(self, text: str, logprobs: list[Logprob]) -> list[ResponseEvent]:
        events: list[ResponseEvent] = []
        if self._open and isinstance(self._items[-1], FunctionCall):
            events += self._close("completed")
        if not self._open:
            self._held += text
            self._held_logprobs += logprobs
            if not self._held.strip():
                return events
            events += self._open_message()
            text, logprobs = self._held, self._held_logprobs
            self._held, self._held_logprobs = "", []
        item = self._items[-1]
        self._text.append(text)
        self._logprobs += logprobs
        events.append(
            OutputTextDelta(
                sequence_number=self._number(),
                item_id=item.id,
                output_index=len(self._items) - 1,
                delta=text,
                logprobs=_delta_logprobs(logprobs),
            )
        )
        return events

    def _open_message(self) -> list[ResponseEvent]:
        item = OutputMessage(id=new_id("msg"), status="in_progress", content=[])
        events = self._opened(item)
        part = OutputText(text="")
        events.append(
            ContentPartEvent(
                type="response.content_part.added",
                sequence_number=self._number(),
                item_id=item.id,
                output_index=len(self._items) - 1,
                part=part,
            )
        )
        return events

    def _opened(self, item: OutputItem) -> list[ResponseEvent]:
        self._items.append(item)
        self._open = True
        self._text, self._logprobs = [], []
        added = OutputItemEvent(
            type="response.output_item.added",
            sequence_number=self._number(),
            output_index=len(self._items) - 1,
            item=item,
        )
        return [added]

    def _add_call(self, delta: ChoiceDeltaToolCall) -> list[ResponseEvent]:
        events: list[ResponseEvent] = []
        arguments = delta.function.arguments if delta.function else None
        if delta.id is not None:  # a new call begins
            events += self._close("completed")
            self._held, self._held_logprobs = "", []
            name = (delta.function.name if delta.function else None) or ""
            item = FunctionCall(
                id=new_id("fc"), status="in_progress", call_id=delta.id, name=name, arguments=""
            )
            events += self._opened(item)
        if arguments and self._open and isinstance(self._items[-1], FunctionCall):
            self._text.append(arguments)
            events.append(
                FunctionCallArgumentsDelta(
                    sequence_number=self._number(),
                    item_id=self._items[-1].id,
                    output_index=len(self._items) - 1,
                    delta=arguments,
                )
            )
        return events

    def _finished(self, reason: FinishReason) -> list[ResponseEvent]:
        events: list[ResponseEvent] = []
        if not self._items:  # nothing but whitespace, or nothing: still an answer
            events += self._open_message()
            if self._held:
                held, logprobs = self._held, self._held_logprobs
                self._held, self._held_logprobs = "", []
                events += self._add_text(held, logprobs)
        events += self._close("incomplete" if reason == "length" else "completed")
        self._finish = reason
        return events

    def _closed_item(self, status: Literal["completed", "incomplete"]) -> OutputItem:
        item, text = self._items[-1], "".join(self._text)
        if isinstance(item, FunctionCall):
            return item.model_copy(update={"status": "completed", "arguments": text})
        part = OutputText(text=text, logprobs=self._logprobs)
        return item.model_copy(update={"status": status, "content": [part]})

    def _close(self, status: Literal["completed", "incomplete"]) -> list[ResponseEvent]:
        if not self._open:
            return []
        index, done = len(self._items) - 1, self._closed_item(status)
        self._items[index], self._open = done, False
        events: list[ResponseEvent] = []
        if isinstance(done, FunctionCall):
            events.append(
                FunctionCallArgumentsDone(
                    sequence_number=self._number(),
                    item_id=done.id,
                    output_index=index,
                    arguments=done.arguments,
                )
            )
        else:
            part = done.content[0]
            logprobs = _delta_logprobs(part.logprobs)
            events += [
                OutputTextDone(
                    sequence_number=self._number(),
                    item_id=done.id,
                    output_index=index,
                    text=part.text,
                    logprobs=logprobs,
                ),
                ContentPartEvent(
                    type="response.content_part.done",
                    sequence_number=self._number(),
                    item_id=done.id,
                    output_index=index,
                    part=part,
                ),
            ]
        events.append(
            OutputItemEvent(
                type="response.output_item.done",
                sequence_number=self._number(),
                output_index=index,
                item=done,
            )
        )
        return events
