"""Tool calls in the model's own words: how a family writes them, how to read them back out
of the text it generates (also while streaming), and the grammar that forces them.

A chat template that knows tools puts them in the prompt itself, and the family's format
is recognised from the template. A template that knows none (SmolLM2's) gets the Hermes
format, which Qwen2.5 and Hermes use too, through a system prompt (``fallback_system``):
calls are ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks.

Pure: no tokenizer, no I/O (grammars are text here; gateway/engine/grammar.py compiles them).
Calls that do not parse, or that name a function the request did not offer, are left as
text: a client never receives a call it cannot dispatch.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from gateway.engine.grammar import lark_json
from gateway.openai.models import ChatTool

NO_ARGUMENTS: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": False}


@dataclass(frozen=True)
class ParsedCall:
    name: str
    arguments: str  # a JSON object, as text (OpenAI's `function.arguments`)


def new_call_id() -> str:
    return f"call_{secrets.token_urlsafe(18)}"


def parameters_of(tool: ChatTool) -> dict[str, Any]:
    return tool.function.parameters or NO_ARGUMENTS


def _call_of(value: Any, arguments_key: str, names: set[str]) -> ParsedCall | None:
    """``{"name": ..., "<arguments_key>": {...}}`` → a call, if it is one of ``names``."""
    if not isinstance(value, dict) or value.get("name") not in names:
        return None
    arguments = value.get(arguments_key, {})
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ParsedCall(value["name"], json.dumps(arguments, ensure_ascii=False))


def _json_values(text: str) -> list[Any] | None:
    """Every JSON value in ``text``, separated by whitespace or ``;``; None if any part
    is not JSON."""
    decoder = json.JSONDecoder()
    values: list[Any] = []
    at = 0
    while True:
        while at < len(text) and (text[at].isspace() or text[at] == ";"):
            at += 1
        if at == len(text):
            return values
        try:
            value, at = decoder.raw_decode(text, at)
        except json.JSONDecodeError:
            return None
        values.append(value)


class ToolFormat:
    """How one model family writes calls. ``start`` marks the text where calls begin;
    ``at_start`` formats only write calls as the whole answer (not after some text)."""

    name: str
    start: str
    at_start = False

    def parse_calls(self, text: str, names: set[str]) -> list[ParsedCall] | None:
        """``text`` from ``start`` on → its calls; None unless every call is well formed."""
        raise NotImplementedError

    def complete_calls(self, text: str) -> int:
        """How much of ``text`` (from ``start`` on) holds calls that are already closed, so
        that a stream can send them before the answer ends; 0 if none."""
        return 0

    def rules(self, tools: Sequence[ChatTool], parallel: bool) -> str:
        """Lark rules (llguidance's dialect) whose rule ``calls`` matches exactly the valid
        calls of ``tools`` in this format: one, or several when ``parallel``."""
        raise NotImplementedError


def _call_schema(tools: Sequence[ChatTool], arguments_key: str) -> dict[str, Any]:
    options = [
        {
            "type": "object",
            "properties": {
                "name": {"const": tool.function.name},
                arguments_key: parameters_of(tool),
            },
            "required": ["name", arguments_key],
            "additionalProperties": False,
        }
        for tool in tools
    ]
    return options[0] if len(options) == 1 else {"anyOf": options}


def _strict(tools: Sequence[ChatTool]) -> bool:
    # One grammar holds every tool's schema: one strict tool makes it strict.
    return any(tool.function.strict for tool in tools)


def tool_grammar(
    fmt: ToolFormat, tools: Sequence[ChatTool], parallel: bool, answer: str | None = None
) -> str:
    """A lark grammar: calls of ``tools`` only, or, given ``answer`` (a rule body such as
    ``%json{...}``), either calls or that answer."""
    top = "start: calls | answer\nanswer: " + answer if answer else "start: calls"
    return f"{top}\n{fmt.rules(tools, parallel)}"


class HermesFormat(ToolFormat):
    """``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``, one block per call
    (Hermes, Qwen2/2.5/3, and our fallback)."""

    name = "hermes"
    start = "<tool_call>"
    end = "</tool_call>"

    def parse_calls(self, text: str, names: set[str]) -> list[ParsedCall] | None:
        calls = []
        # The last block may be unclosed: models often end right after its JSON.
        for block in text.split(self.start)[1:]:
            body = block.split(self.end, 1)[0]
            values = _json_values(body)
            if not values or len(values) != 1:
                return None
            call = _call_of(values[0], "arguments", names)
            if call is None:
                return None
            calls.append(call)
        return calls or None

    def complete_calls(self, text: str) -> int:
        closed = text.rfind(self.end)
        return 0 if closed < 0 else closed + len(self.end)

    def __init__(self, *, forced_parallel: bool = True) -> None:
        self.forced_parallel = forced_parallel

    def rules(self, tools: Sequence[ChatTool], parallel: bool) -> str:
        body = lark_json(_call_schema(tools, "arguments"), strict=_strict(tools), canonical=True)
        repeat = ' ("\\n" call)*' if parallel and self.forced_parallel else ""
        return f'calls: call{repeat}\ncall: "{self.start}\\n" body "\\n{self.end}"\nbody: {body}\n'


class JsonListFormat(ToolFormat):
    """``[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]`` (Mistral). ``[TOOL_CALLS]``
    is a special token that decoding drops, so the list itself marks the calls."""

    name = "mistral"
    start = "["
    at_start = True

    def parse_calls(self, text: str, names: set[str]) -> list[ParsedCall] | None:
        values = _json_values(text)
        if not values or len(values) != 1 or not isinstance(values[0], list):
            return None
        calls = [_call_of(value, "arguments", names) for value in values[0]]
        return [c for c in calls if c is not None] if calls and None not in calls else None

    def rules(self, tools: Sequence[ChatTool], parallel: bool) -> str:
        array = {"type": "array", "items": _call_schema(tools, "arguments"), "minItems": 1}
        if not parallel:
            array["maxItems"] = 1
        return f"calls: {lark_json(array, strict=_strict(tools), canonical=True)}\n"


class JsonObjectFormat(ToolFormat):
    """``{"name": ..., "parameters": {...}}`` as the whole answer, several joined by ``;``
    (Llama 3.1+ with JSON tool calling; ``<|python_tag|>`` is a special token, dropped)."""

    name = "llama"
    start = "{"
    at_start = True

    def parse_calls(self, text: str, names: set[str]) -> list[ParsedCall] | None:
        values = _json_values(text)
        if not values:
            return None
        calls = [
            _call_of(v, "parameters", names) or _call_of(v, "arguments", names) for v in values
        ]
        return None if None in calls else [c for c in calls if c is not None]

    def rules(self, tools: Sequence[ChatTool], parallel: bool) -> str:
        body = lark_json(_call_schema(tools, "parameters"), strict=_strict(tools), canonical=True)
        repeat = ' ("; " call)*' if parallel else ""
        return f"calls: call{repeat}\ncall: {body}\n"


HERMES = HermesFormat()
# A model taught the format only by the fallback prompt, forced to call, writes one call:
# one that was never trained on it (SmolLM2) repeats its call until max_tokens otherwise.
FALLBACK = HermesFormat(forced_parallel=False)


def format_for_template(template: str | None) -> ToolFormat:
    """The format a chat template teaches its model; Hermes when it shows none, and the
    fallback (Hermes taught by ``fallback_system``) when the template knows no tools."""
    if not template_knows_tools(template):
        return FALLBACK
    text = template or ""
    if "[TOOL_CALLS]" in text:
        return JsonListFormat()
    if "<|python_tag|>" in text or ('"parameters"' in text and "ipython" in text):
        return JsonObjectFormat()
    return HERMES


def template_knows_tools(template: str | None) -> bool:
    return bool(template) and re.search(r"\btools\b", template or "") is not None


def fallback_system(tools: Sequence[ChatTool]) -> str:
    """The tools, and how to call them, for a model whose template knows no tools."""
    listed = "\n".join(json.dumps(tool.model_dump(exclude_none=True)) for tool in tools)
    return (
        "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n"
        f"<tools>\n{listed}\n</tools>\n\n"
        "For each function call, return a json object with function name and arguments "
        "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
    )


def hermes_calls_text(calls: Iterable[tuple[str, str]]) -> str:
    """An assistant's earlier calls (name, arguments JSON) as the fallback writes them."""
    blocks = []
    for name, arguments in calls:
        try:
            parsed = json.loads(arguments)
        except json.JSONDecodeError:
            parsed = arguments  # kept as the client sent it
        call = json.dumps({"name": name, "arguments": parsed}, ensure_ascii=False)
        blocks.append(f"<tool_call>\n{call}\n</tool_call>")
    return "\n".join(blocks)


@dataclass(frozen=True)
class CallFound:
    call: ParsedCall
    index: int  # of the call within the message, as OpenAI's deltas number them


class ToolCallStream:
    """Text as it is generated in; text for the message's content and calls out, as soon
    as each is certain. Text that might begin a call is held back until it is clear."""

    def __init__(
        self, fmt: ToolFormat, tools: Sequence[ChatTool], *, parallel: bool = True
    ) -> None:
        self._format = fmt
        self._names = {tool.function.name for tool in tools}
        self._parallel = parallel
        self._held = ""  # text that may begin a call
        self._in_calls = False
        self._pending = ""  # text of calls not yet closed
        self._raw = ""  # all text from the first call on: content again if no call parses
        self._text_begun = False  # an at_start format saw an answer that is text
        self.calls: list[ParsedCall] = []

    def push(self, text: str) -> list[str | CallFound]:
        if self._in_calls:
            self._pending += text
            self._raw += text
            return self._closed_calls()
        buffer, self._held = self._held + text, ""
        start = self._format.start
        if self._format.at_start:
            if self._text_begun:
                return [buffer] if buffer else []
            stripped = buffer.lstrip()
            if stripped.startswith(start):
                return self._enter(stripped)
            if start.startswith(stripped):  # only whitespace so far: undecided
                self._held = buffer
                return []
            self._text_begun = True
            return [buffer]
        at = buffer.find(start)
        if at >= 0:
            return ([buffer[:at]] if at else []) + self._enter(buffer[at:])
        keep = _partial_suffix(buffer, start)
        self._held = buffer[len(buffer) - keep :]
        emitted = buffer[: len(buffer) - keep]
        return [emitted] if emitted else []

    def finish(self) -> list[str | CallFound]:
        """At the end of the answer: the last calls, or the held text as content when it
        turned out not to be calls."""
        if not self._in_calls:
            held, self._held = self._held, ""
            return [held] if held else []
        pending, self._pending = self._pending, ""
        if not pending.strip():
            return [] if self.calls else [self._raw]
        found = self._parse(pending)
        if found is None:  # the model began a call and wrote something else
            return [] if self.calls else [self._raw]
        return found

    def _enter(self, calls_text: str) -> list[str | CallFound]:
        self._in_calls = True
        self._pending = self._raw = calls_text
        return self._closed_calls()

    def _closed_calls(self) -> list[str | CallFound]:
        done = self._format.complete_calls(self._pending)
        if not done:
            return []
        closed, self._pending = self._pending[:done], self._pending[done:]
        return self._parse(closed) or []

    def _parse(self, text: str) -> list[str | CallFound] | None:
        calls = self._format.parse_calls(text, self._names)
        if calls is None:
            return None
        out: list[str | CallFound] = []
        for call in calls:
            if self.calls and not self._parallel:
                break  # one call at most
            out.append(CallFound(call, len(self.calls)))
            self.calls.append(call)
        return out


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``marker``."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0
