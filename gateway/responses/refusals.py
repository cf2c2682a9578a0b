"""What the Responses API asks for that this gateway cannot honour: refused by name (a 400
with its parameter), never silently ignored.

Pure: no I/O, no HTTP.
"""

from __future__ import annotations

from typing import Any

from gateway.responses.models import (
    FunctionCallOutputItem,
    InputItem,
    InputMessage,
    Loose,
    ResponsesRequest,
)
from gateway.responses.to_chat import LOGPROBS
from protocol.errors import InvalidRequest

# `include` values honoured: logprobs; and encrypted reasoning, which a model that does not
# reason apart from its answer never has (so there is never anything to include).
SUPPORTED_INCLUDE = frozenset({LOGPROBS, "reasoning.encrypted_content"})


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
