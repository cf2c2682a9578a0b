"""The Responses API's stream events (`POST /v1/responses` with `stream`), named after the
official schema: each names itself in `type`, which is also its SSE event name.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from gateway.openai.models import OpenAIModel
from gateway.responses.models import OutputItem, OutputText, Response


class ResponseEvent(OpenAIModel):
    type: str
    sequence_number: int


class ResponseLifecycleEvent(ResponseEvent):
    """`response.created`, `.in_progress`, `.completed`, `.incomplete` or `.failed`."""

    type: Literal[
        "response.created",
        "response.in_progress",
        "response.completed",
        "response.incomplete",
        "response.failed",
    ]
    response: Response


class OutputItemEvent(ResponseEvent):
    type: Literal["response.output_item.added", "response.output_item.done"]
    output_index: int
    item: OutputItem


class ContentPartEvent(ResponseEvent):
    type: Literal["response.content_part.added", "response.content_part.done"]
    item_id: str
    output_index: int
    content_index: int = 0
    part: OutputText


class DeltaLogprobTop(OpenAIModel):
    token: str
    logprob: float


class DeltaLogprob(DeltaLogprobTop):
    top_logprobs: list[DeltaLogprobTop] = Field(default_factory=list)


class OutputTextDelta(ResponseEvent):
    type: Literal["response.output_text.delta"] = "response.output_text.delta"
    item_id: str
    output_index: int
    content_index: int = 0
    delta: str
    logprobs: list[DeltaLogprob] = Field(default_factory=list)


class OutputTextDone(ResponseEvent):
    type: Literal["response.output_text.done"] = "response.output_text.done"
    item_id: str
    output_index: int
    content_index: int = 0
    text: str
    logprobs: list[DeltaLogprob] = Field(default_factory=list)


class FunctionCallArgumentsDelta(ResponseEvent):
    type: Literal["response.function_call_arguments.delta"] = (
        "response.function_call_arguments.delta"
    )
    item_id: str
    output_index: int
    delta: str


class FunctionCallArgumentsDone(ResponseEvent):
    type: Literal["response.function_call_arguments.done"] = "response.function_call_arguments.done"
    item_id: str
    output_index: int
    arguments: str


class ErrorEvent(ResponseEvent):
    """An error in the middle of a stream; `response.failed` follows it."""

    type: Literal["error"] = "error"
    code: str | None = None
    message: str
    param: str | None = None
