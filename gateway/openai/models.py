"""OpenAI API request models, named and ordered after the official schema (what the
endpoints answer is in ``answers.py``).

Requests ignore unknown fields, as OpenAI does.
"""

from __future__ import annotations

import re
from typing import Any, Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError


class OpenAIModel(BaseModel):
    model_config = ConfigDict(extra="ignore")


def null_is_default(cls: type[BaseModel], value: Any, info: ValidationInfo) -> Any:
    """A ``mode="before"`` field validator: JSON ``null`` means the field's default. OpenAI
    documents these fields as nullable, and clients that serialise unset options as
    ``null`` (``"n": null``, ``"stream": null``) must not get a 400 for it."""
    if value is None and info.field_name is not None:
        return cls.model_fields[info.field_name].default
    return value


# JSON's \ud800-style escapes can carry a lone UTF-16 surrogate, which is no character:
# the tokenizer, Redis and our own responses cannot encode it.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


# A pydantic error type: the gateway answers it with OpenAI's code "unsupported_parameter".
UNSUPPORTED = "unsupported_parameter"


def valid_unicode(value: str) -> str:
    if _LONE_SURROGATE.search(value):
        raise ValueError("contains a lone surrogate (\\ud800-\\udfff), which is not valid Unicode")
    return value


class TextContentPart(OpenAIModel):
    type: Literal["text"]
    text: str


class ToolCallFunction(OpenAIModel):
    name: str
    arguments: str  # JSON text, as the model wrote it


class ToolCall(OpenAIModel):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(OpenAIModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool message: the call it answers

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, value: Any) -> Any:
        # Without this, pydantic reports the failed `str` branch of the union first
        # ("messages.0.content.str: Input should be a valid string") for an image part.
        if value is None or isinstance(value, str):
            return value
        if not isinstance(value, list):
            raise ValueError("content must be a string or a list of text parts")
        for j, part in enumerate(value):
            kind = part.get("type") if isinstance(part, dict) else None
            if isinstance(kind, str) and kind != "text":
                raise PydanticCustomError(
                    UNSUPPORTED,
                    "content part {index} is of type {kind}, which is not supported: "
                    "this model reads text only",
                    {"index": j, "kind": repr(kind)},
                )
        return value

    @field_validator("content")
    @classmethod
    def _content_is_unicode(
        cls, value: str | list[TextContentPart] | None
    ) -> str | list[TextContentPart] | None:
        # Checked here rather than per part, so that the error names `messages.N.content`.
        for part in [value] if isinstance(value, str) else value or []:
            valid_unicode(part if isinstance(part, str) else part.text)
        return value

    @field_validator("name")
    @classmethod
    def _name_is_unicode(cls, value: str | None) -> str | None:
        return None if value is None else valid_unicode(value)

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(OpenAIModel):
    include_usage: bool = False

    _null_include_usage = field_validator("include_usage", mode="before")(null_is_default)


# OpenAI's limits on function names; the name also appears in prompts and grammars.
FUNCTION_NAME = r"^[a-zA-Z0-9_-]{1,64}$"
MAX_TOOLS = 128


class JSONSchemaFormat(OpenAIModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    # `schema` would shadow pydantic's BaseModel.schema
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(OpenAIModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> Self:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("a json_schema response format needs its json_schema")
        return self


class FunctionDefinition(OpenAIModel):
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; none: no arguments
    strict: bool | None = None


class ChatTool(OpenAIModel):
    type: Literal["function"]
    function: FunctionDefinition


class ToolChoiceFunction(OpenAIModel):
    name: str


class NamedToolChoice(OpenAIModel):
    type: Literal["function"]
    function: ToolChoiceFunction


ChatToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


MAX_MESSAGES = 2048  # a request with more is refused before it is tokenized
MAX_CHOICES = 8  # `n`: choices are generated one after another
MAX_STOP_CHARS = 256  # per stop sequence: each is looked for after every generated token
SEED_RANGE = (-(2**63), 2**63 - 1)  # int64; seed + choice index still fits torch's seeds
MAX_LOGIT_BIAS = 300  # tokens in `logit_bias`, as OpenAI allows


class SamplingRequest(OpenAIModel):
    """Fields that chat and text completions share, in the order OpenAI documents them."""

    model: str
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    seed: int | None = Field(default=None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    user: str | None = Field(default=None, max_length=1024)
    # swarmgate's own: false turns the gateway's speculative decoding (--speculate) off for
    # this request (the output is the same either way; only its speed differs).
    speculate: bool | None = None

    _null_n_stream = field_validator("n", "stream", mode="before")(null_is_default)

    @field_validator("stop")
    @classmethod
    def _at_most_four_stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > 4:
            raise ValueError("at most 4 stop sequences are allowed")
        for stop in [value] if isinstance(value, str) else value or []:
            if len(stop) > MAX_STOP_CHARS:
                raise ValueError(f"a stop sequence may have at most {MAX_STOP_CHARS} characters")
            valid_unicode(stop)
        return value

    @field_validator("logit_bias")
    @classmethod
    def _bias_in_range(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value is not None and len(value) > MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias may hold at most {MAX_LOGIT_BIAS} tokens")
        for token, bias in (value or {}).items():
            if not token.lstrip("-").isdigit() or int(token) < 0:
                raise ValueError(f"logit_bias keys must be token ids, got {token!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {bias}")
        return value

    def stop_sequences(self) -> list[str]:
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else self.stop
        return [s for s in stops if s]

    def token_limit(self) -> int | None:
        return self.max_tokens

    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    logprobs: bool | None = None
    max_completion_tokens: int | None = Field(default=None, ge=1)
    prompt_cache_key: str | None = Field(default=None, max_length=1024)
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    tool_choice: ChatToolChoice | None = None
    tools: list[ChatTool] | None = Field(default=None, max_length=MAX_TOOLS)
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_need_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        # A field validator (logprobs is declared, so validated, before) so that the error
        # names its parameter, `top_logprobs`, as OpenAI does.
        if value and not info.data.get("logprobs"):
            raise ValueError("top_logprobs requires logprobs to be true")
        return value

    def token_limit(self) -> int | None:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens


class CompletionRequest(SamplingRequest):
    """`POST /v1/completions`: raw text (or token ids) in, text out."""

    # Required, but may be empty ("", [], [""]): it then starts from the BOS token.
    prompt: str | list[str] | list[int] | list[list[int]]
    best_of: int | None = Field(default=None, ge=1, le=1)
    n: int = Field(default=1, ge=1, le=1)  # several choices: send several prompts
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=5)
    # OpenAI's default for completions; 0 with echo and logprobs scores a prompt.
    max_tokens: int | None = Field(default=16, ge=0)
    suffix: str | None = None

    _null_echo = field_validator("n", "echo", mode="before")(null_is_default)

    @field_validator("prompt")
    @classmethod
    def _prompt_is_unicode(
        cls, value: str | list[str] | list[int] | list[list[int]]
    ) -> str | list[str] | list[int] | list[list[int]]:
        for text in [value] if isinstance(value, str) else value:
            if isinstance(text, str):
                valid_unicode(text)
        return value

    def prompts(self) -> list[str | list[int]]:
        """One entry per choice: text, or token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]
