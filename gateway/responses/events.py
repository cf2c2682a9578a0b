"""A chat completion stream as a Responses event stream: the state machine that opens and
closes each output item and content part and numbers every event.

Pure: no I/O, no HTTP.
"""

from __future__ import annotations

from typing import Any, Literal

from gateway.engine.finish import FinishReason
from gateway.openai.answers import ChatCompletionChunk, ChoiceDeltaToolCall
from gateway.responses.models import (
    FunctionCall,
    Logprob,
    OutputItem,
    OutputMessage,
    OutputText,
    Response,
    ResponseError,
    ResponseUsage,
)
from gateway.responses.output import delta_logprobs, finished, new_id, output_logprobs, usage_of
from gateway.responses.stream_events import (
    ContentPartEvent,
    ErrorEvent,
    FunctionCallArgumentsDelta,
    FunctionCallArgumentsDone,
    OutputItemEvent,
    OutputTextDelta,
    OutputTextDone,
    ResponseEvent,
    ResponseLifecycleEvent,
)


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
            logprobs = output_logprobs(choice.logprobs)
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
                logprobs=delta_logprobs(logprobs),
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
            logprobs = delta_logprobs(part.logprobs)
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
