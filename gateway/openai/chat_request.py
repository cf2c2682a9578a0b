"""What a chat request asks of the model, checked and planned before it runs: the
parameters it cannot have, its tools, the tool plan (computed once per request) and the
grammar its response must match. No I/O apart from the grammar compiler's threads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gateway.engine.grammar import Grammar, GrammarCompiler, lark_json
from gateway.openai.models import ChatCompletionRequest, ChatTool, NamedToolChoice
from gateway.openai.tool_calls import ToolFormat, tool_grammar
from protocol.errors import InvalidRequest


def refuse_unsupported(request: ChatCompletionRequest, *, structured: bool) -> None:
    """Say so, rather than silently ignoring what a client asked for."""
    response_format = request.response_format
    if response_format is None or response_format.type == "text":
        return
    if not structured:
        raise InvalidRequest(
            f"response_format {response_format.type!r} is not supported by this "
            "model; only 'text' is",
            param="response_format",
            code="unsupported_parameter",
        )
    json_schema = response_format.json_schema
    if response_format.type == "json_schema" and json_schema and json_schema.schema_ is None:
        raise InvalidRequest(
            "response_format: json_schema.schema is required", param="response_format"
        )


def check_tools(request: ChatCompletionRequest) -> None:
    names = [tool.function.name for tool in request.tools or []]
    if len(set(names)) < len(names):
        twice = next(name for name in names if names.count(name) > 1)
        raise InvalidRequest(f"tools: the function {twice!r} is given twice", param="tools")
    choice = request.tool_choice
    if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
        raise InvalidRequest(
            f"tool_choice names the function {choice.function.name!r}, which is not among "
            "the tools",
            param="tool_choice",
        )
    if choice == "required" and not names:
        raise InvalidRequest("tool_choice 'required' needs tools", param="tool_choice")
    for i, message in enumerate(request.messages):
        if message.role == "tool" and not message.tool_call_id:
            raise InvalidRequest(
                "a tool message needs the tool_call_id of the call it answers",
                param=f"messages.{i}.tool_call_id",
            )


@dataclass(frozen=True)
class ToolPlan:
    """The tools a request offers the model, and those it must call (none: it may answer
    in text)."""

    offered: tuple[ChatTool, ...]
    forced: tuple[ChatTool, ...]
    parallel: bool


def tool_plan(request: ChatCompletionRequest) -> ToolPlan | None:
    """None when the model is offered no tools (none given, or tool_choice "none": then the
    prompt leaves them out, so that the model does not write calls nobody will read)."""
    choice = request.tool_choice
    if not request.tools or choice == "none":
        return None
    offered = tuple(request.tools)
    parallel = request.parallel_tool_calls is not False
    if isinstance(choice, NamedToolChoice):
        # One call of the named function: a small model otherwise tends to repeat it until
        # max_tokens.
        forced = tuple(t for t in offered if t.function.name == choice.function.name)
        parallel = False
    else:
        forced = offered if choice == "required" else ()
    return ToolPlan(offered, forced, parallel)


async def response_grammar(
    request: ChatCompletionRequest,
    tools: ToolPlan | None,
    grammars: GrammarCompiler | None,
    fmt: ToolFormat,
) -> Grammar | None:
    """What the response must match (None: any text).

    Tools the model must call (``required`` or a named function) allow only their calls.
    Tools it may call, with a JSON response format, allow calls or that JSON. Without tools,
    the format alone. Errors name the parameter whose schema failed."""
    response_format = request.response_format
    if grammars is None:
        return None
    if tools is not None and tools.forced:
        grammar = tool_grammar(fmt, tools.forced, tools.parallel)
        return await grammars.lark(grammar, param="tools")
    if response_format is None or response_format.type == "text":
        return None
    json_schema = response_format.json_schema
    if response_format.type == "json_object":
        schema: dict[str, Any] = {"type": "object"}
        strict = None
    else:
        assert json_schema is not None and json_schema.schema_ is not None  # checked before
        schema, strict = json_schema.schema_, json_schema.strict
    if tools is not None:
        answer = lark_json(schema, strict=strict)
        grammar = tool_grammar(fmt, tools.offered, tools.parallel, answer=answer)
        return await grammars.lark(grammar, param="response_format")
    return await grammars.json_schema(schema, param="response_format", strict=strict)
