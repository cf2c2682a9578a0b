"""OpenAI Responses API wire models (`POST /v1/responses`), named after the official schema.

Requests ignore unknown fields, as OpenAI does. Fields and item kinds that this gateway
cannot honour (built-in tools, images, background runs ...) are still parsed, loosely, so
that the gateway can refuse them by name (gateway/responses/refusals.py) instead of
ignoring what a client asked for.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator

from gateway.openai.models import (
    FUNCTION_NAME,
    MAX_MESSAGES,
    MAX_TOOLS,
    OpenAIModel,
    null_is_default,
    valid_unicode,
)


class Loose(OpenAIModel):
    """Something of a kind we do not support, kept (with its fields) only to be refused."""

    model_config = ConfigDict(extra="allow")
    type: str


def _tag(known: tuple[str, ...], default: str | None = None) -> Any:
    """A discriminator by ``type`` that sends every unknown type to the ``Loose`` model."""

    def tag(value: Any) -> str | None:
        if isinstance(value, dict):
            kind = value.get("type", default)
        elif isinstance(value, BaseModel):
            kind = getattr(value, "type", default)
        else:
            return None  # not an object: pydantic reports it
        return kind if kind in known else "other"

    return Discriminator(tag)


# ---- requests: input items ----


class InputText(OpenAIModel):
    """`input_text` (what people and instructions say) or `output_text` (what the model
    said, replayed in a later input)."""

    type: Literal["input_text", "output_text"]
    text: str

    @field_validator("text")
    @classmethod
    def _unicode(cls, value: str) -> str:
        return valid_unicode(value)


class InputRefusal(OpenAIModel):
    type: Literal["refusal"]
    refusal: str

    @field_validator("refusal")
    @classmethod
    def _unicode(cls, value: str) -> str:
        return valid_unicode(value)


ContentPart = Annotated[
    Annotated[InputText, Tag("input_text")]
    | Annotated[InputText, Tag("output_text")]
    | Annotated[InputRefusal, Tag("refusal")]
    | Annotated[Loose, Tag("other")],
    _tag(("input_text", "output_text", "refusal")),
]


def part_text(part: InputText | InputRefusal) -> str:
    return part.text if isinstance(part, InputText) else part.refusal


class InputMessage(OpenAIModel):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[ContentPart]
    id: str | None = None  # kept for the input items list, which names items by id

    @field_validator("content")
    @classmethod
    def _unicode(cls, value: str | list[Any]) -> str | list[Any]:
        return valid_unicode(value) if isinstance(value, str) else value


class FunctionCallItem(OpenAIModel):
    """A call the model made earlier, replayed as input."""

    type: Literal["function_call"]
    call_id: str = Field(min_length=1, max_length=256)
    name: str = Field(pattern=FUNCTION_NAME)
    arguments: str
    id: str | None = None

    @field_validator("arguments")
    @classmethod
    def _unicode(cls, value: str) -> str:
        return valid_unicode(value)


class FunctionCallOutputItem(OpenAIModel):
    """What the client's function returned for the call ``call_id``."""

    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1, max_length=256)
    output: str | list[ContentPart]
    id: str | None = None

    @field_validator("output")
    @classmethod
    def _unicode(cls, value: str | list[Any]) -> str | list[Any]:
        return valid_unicode(value) if isinstance(value, str) else value


InputItem = Annotated[
    Annotated[InputMessage, Tag("message")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")]
    | Annotated[Loose, Tag("other")],
    # A message may leave out its type, as in `{"role": "user", "content": "Hi"}`.
    _tag(("message", "function_call", "function_call_output"), default="message"),
]


# ---- requests: tools and formats ----


class FunctionTool(OpenAIModel):
    """A function tool in the Responses API's flat shape."""

    type: Literal["function"]
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


Tool = Annotated[
    Annotated[FunctionTool, Tag("function")] | Annotated[Loose, Tag("other")],
    _tag(("function",)),
]


class FunctionToolChoice(OpenAIModel):
    type: Literal["function"]
    name: str


ToolChoice = (
    Literal["none", "auto", "required"]
    | Annotated[
        Annotated[FunctionToolChoice, Tag("function")] | Annotated[Loose, Tag("other")],
        _tag(("function",)),
    ]
)


class TextFormatText(OpenAIModel):
    type: Literal["text"] = "text"


class TextFormatJSONObject(OpenAIModel):
    type: Literal["json_object"]


class TextFormatJSONSchema(OpenAIModel):
    """A JSON schema format: name, schema and strict sit flat in the format object."""

    # `schema` would shadow pydantic's BaseModel.schema; on the wire it is `schema`.
    model_config = ConfigDict(extra="ignore", populate_by_name=True, serialize_by_alias=True)

    type: Literal["json_schema"]
    name: str = Field(pattern=FUNCTION_NAME)
    schema_: dict[str, Any] = Field(alias="schema")
    description: str | None = None
    strict: bool | None = None


TextFormat = Annotated[
    TextFormatText | TextFormatJSONObject | TextFormatJSONSchema, Field(discriminator="type")
]


class TextConfig(OpenAIModel):
    format: TextFormat = Field(default_factory=TextFormatText)
    verbosity: Literal["low", "medium", "high"] | None = "medium"


class ReasoningConfig(OpenAIModel):
    effort: str | None = None
    summary: str | None = None
    generate_summary: str | None = None  # the deprecated name of `summary`


# ---- requests ----

MAX_METADATA = 16  # key-value pairs, as OpenAI allows
MAX_INCLUDE = 16


class ResponsesRequest(OpenAIModel):
    """`POST /v1/responses`, fields in the order OpenAI documents them."""

    model: str
    background: bool | None = None
    context_management: list[Any] | None = None
    conversation: str | dict[str, Any] | None = None
    include: list[str] | None = Field(default=None, max_length=MAX_INCLUDE)
    input: (
        Annotated[str, Field(min_length=1)]
        | Annotated[list[InputItem], Field(min_length=1, max_length=MAX_MESSAGES)]
    )
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    metadata: dict[str, str] | None = None
    parallel_tool_calls: bool | None = None
    previous_response_id: str | None = Field(default=None, min_length=1, max_length=256)
    prompt: dict[str, Any] | None = None
    prompt_cache_key: str | None = Field(default=None, max_length=1024)
    reasoning: ReasoningConfig | None = None
    safety_identifier: str | None = Field(default=None, max_length=1024)
    store: bool | None = True
    stream: bool = False
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    text: TextConfig | None = None
    tool_choice: ToolChoice | None = None
    tools: list[Tool] | None = Field(default=None, max_length=MAX_TOOLS)
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    truncation: Literal["auto", "disabled"] | None = None
    user: str | None = Field(default=None, max_length=1024)
    speculate: bool | None = None  # swarmgate's own, as on chat: false turns drafts off

    _null_stream = field_validator("stream", mode="before")(null_is_default)

    @field_validator("input")
    @classmethod
    def _input_is_unicode(cls, value: str | list[Any]) -> str | list[Any]:
        return valid_unicode(value) if isinstance(value, str) else value

    @field_validator("instructions")
    @classmethod
    def _instructions_are_unicode(cls, value: str | None) -> str | None:
        return None if value is None else valid_unicode(value)

    @field_validator("metadata")
    @classmethod
    def _metadata_bounded(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is None:
            return None
        if len(value) > MAX_METADATA:
            raise ValueError(f"metadata may hold at most {MAX_METADATA} pairs")
        for key, item in value.items():
            if len(key) > 64 or len(item) > 512:
                raise ValueError("metadata keys have at most 64 characters, values 512")
            valid_unicode(key)
            valid_unicode(item)
        return value

    def stores(self) -> bool:
        return self.store is not False


# ---- responses ----


class LogprobTop(OpenAIModel):
    token: str
    bytes: list[int]
    logprob: float


class Logprob(LogprobTop):
    top_logprobs: list[LogprobTop] = Field(default_factory=list)


class OutputText(OpenAIModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[Logprob] = Field(default_factory=list)


ItemStatus = Literal["in_progress", "completed", "incomplete"]


class OutputMessage(OpenAIModel):
    id: str
    type: Literal["message"] = "message"
    status: ItemStatus
    role: Literal["assistant"] = "assistant"
    content: list[OutputText]

    def text(self) -> str:
        return "".join(part.text for part in self.content)


class FunctionCall(OpenAIModel):
    id: str
    type: Literal["function_call"] = "function_call"
    status: ItemStatus
    call_id: str
    name: str
    arguments: str


OutputItem = Annotated[OutputMessage | FunctionCall, Field(discriminator="type")]


class InputTokensDetails(OpenAIModel):
    cached_tokens: int = 0
    # Tokens computed and kept in the session's KV cache for the conversation's next turn.
    cache_write_tokens: int = 0


class OutputTokensDetails(OpenAIModel):
    reasoning_tokens: int = 0  # this gateway's models do not reason apart from their answer


class ResponseUsage(OpenAIModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails = Field(default_factory=InputTokensDetails)
    output_tokens: int
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int


class IncompleteDetails(OpenAIModel):
    reason: Literal["max_output_tokens", "content_filter"]


class ResponseError(OpenAIModel):
    code: Literal["server_error", "rate_limit_exceeded"]
    message: str


class Reasoning(OpenAIModel):
    effort: str | None = None
    summary: str | None = None


ResponseStatus = Literal["completed", "failed", "in_progress", "incomplete"]


class Response(OpenAIModel):
    id: str
    object: Literal["response"] = "response"
    created_at: int = Field(default_factory=lambda: int(time.time()))
    status: ResponseStatus = "in_progress"
    background: bool = False
    completed_at: int | None = None
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    model: str
    output: list[OutputItem] = Field(default_factory=list)
    parallel_tool_calls: bool = True
    previous_response_id: str | None = None
    prompt_cache_key: str | None = None
    reasoning: Reasoning = Field(default_factory=Reasoning)
    safety_identifier: str | None = None
    service_tier: Literal["default"] = "default"
    store: bool = True
    temperature: float = 1.0
    text: TextConfig = Field(default_factory=TextConfig)
    tool_choice: Literal["none", "auto", "required"] | FunctionToolChoice = "auto"
    tools: list[FunctionTool] = Field(default_factory=list)
    top_logprobs: int = 0
    top_p: float = 1.0
    truncation: Literal["auto", "disabled"] = "disabled"
    usage: ResponseUsage | None = None
    user: str | None = None
    metadata: dict[str, str] = Field(default_factory=dict)


# ---- `GET /v1/responses/{id}/input_items` ----


class MessageItem(OpenAIModel):
    """A message of a response's input as listed: its content always a list of parts (an
    assistant's text as `output_text`, as OpenAI lists a replayed answer)."""

    id: str
    type: Literal["message"] = "message"
    status: ItemStatus = "completed"
    role: Literal["user", "system", "developer", "assistant"]
    content: list[InputText | InputRefusal | OutputText]


class FunctionCallOutput(OpenAIModel):
    """A function's output, given in a response's input, as listed."""

    id: str
    type: Literal["function_call_output"] = "function_call_output"
    status: ItemStatus = "completed"
    call_id: str
    output: str | list[InputText | InputRefusal]


ResponseItem = MessageItem | FunctionCall | FunctionCallOutput


class ResponseItemList(OpenAIModel):
    """One page of a response's input items; ``first_id``/``last_id`` are None on an empty
    page."""

    object: Literal["list"] = "list"
    data: list[ResponseItem]
    first_id: str | None
    last_id: str | None
    has_more: bool


class DeletedResponse(BaseModel):
    id: str
    object: Literal["response"] = "response"
    deleted: bool = True
