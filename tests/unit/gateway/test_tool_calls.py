"""Reading calls out of generated text, in each family's format, whole or in pieces."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from gateway.engine.grammar import GrammarCompiler
from gateway.openai.models import ChatTool
from gateway.openai.tool_calls import (
    FALLBACK,
    HERMES,
    CallFound,
    JsonListFormat,
    JsonObjectFormat,
    ParsedCall,
    ToolCallStream,
    ToolFormat,
    format_for_template,
    template_knows_tools,
    tool_grammar,
)
from models.loading import load_tokenizer

WEATHER = ChatTool.model_validate(
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
)
TIME = ChatTool.model_validate({"type": "function", "function": {"name": "get_time"}})
TOOLS = [WEATHER, TIME]


def read(
    fmt: ToolFormat, text: str, *, pieces: int = 1, parallel: bool = True
) -> tuple[str, list[ParsedCall]]:
    """``text`` pushed in ``pieces`` roughly equal parts: the content and the calls."""
    reader = ToolCallStream(fmt, TOOLS, parallel=parallel)
    size = max(1, -(-len(text) // pieces))
    out: list[str | CallFound] = []
    for at in range(0, len(text), size):
        out += reader.push(text[at : at + size])
    out += reader.finish()
    found = [piece for piece in out if isinstance(piece, CallFound)]
    assert [f.index for f in found] == list(range(len(found)))
    assert [f.call for f in found] == reader.calls
    return "".join(piece for piece in out if isinstance(piece, str)), reader.calls


def call(name: str, **arguments: object) -> ParsedCall:
    return ParsedCall(name, json.dumps(arguments))


HERMES_TWO = (
    "Let me look.\n<tool_call>\n"
    '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
)


@pytest.mark.parametrize("pieces", [1, 3, 17, len(HERMES_TWO)])
def test_hermes_calls_come_out_of_text_however_it_is_split(pieces: int) -> None:
    content, calls = read(HERMES, HERMES_TWO, pieces=pieces)
    assert content == "Let me look.\n"
    assert calls == [call("get_weather", city="Paris"), call("get_time")]


def test_a_stream_sends_each_call_once_it_is_closed() -> None:
    def names(pieces: list[str | CallFound]) -> list[str]:
        return [p.call.name for p in pieces if isinstance(p, CallFound)]

    reader = ToolCallStream(HERMES, TOOLS)
    first_end = HERMES_TWO.index("</tool_call>") + len("</tool_call>")
    out = reader.push(HERMES_TWO[:first_end])
    assert out[0] == "Let me look.\n" and names(out) == ["get_weather"]
    assert names(reader.push(HERMES_TWO[first_end:-3])) == []  # the second is still open
    assert names(reader.push(HERMES_TWO[-3:])) == ["get_time"]
    assert reader.finish() == []


def test_an_unclosed_last_call_still_counts_and_arguments_may_be_a_string() -> None:
    text = '<tool_call>\n{"name": "get_weather", "arguments": "{\\"city\\": \\"Oslo\\"}"}'
    assert read(HERMES, text, pieces=5) == ("", [call("get_weather", city="Oslo")])


@pytest.mark.parametrize(
    "text",
    [
        "Plain text with a < sign and <tool_ in it.",
        "<tool_call>\nnot json at all",  # a call begun and then abandoned
        '<tool_call>\n{"name": "launch_missiles", "arguments": {}}\n</tool_call>',  # not offered
        '<tool_call>\n{"name": "get_weather", "arguments": [1]}\n</tool_call>',
    ],
)
def test_text_that_is_not_a_valid_call_stays_content(text: str) -> None:
    assert read(HERMES, text, pieces=4) == (text, [])


def test_one_call_at_most_unless_parallel() -> None:
    assert read(HERMES, HERMES_TWO, parallel=False)[1] == [call("get_weather", city="Paris")]


def test_mistral_lists_and_llama_objects() -> None:
    mistral = (
        '[{"name": "get_weather", "arguments": {"city": "Rome"}}, '
        '{"name": "get_time", "arguments": {}}]'
    )
    assert read(JsonListFormat(), mistral, pieces=7) == (
        "",
        [call("get_weather", city="Rome"), call("get_time")],
    )
    llama = (
        '{"name": "get_weather", "parameters": {"city": "Lima"}}; '
        '{"name": "get_time", "parameters": {}}'
    )
    assert read(JsonObjectFormat(), "  " + llama, pieces=9) == (
        "",
        [call("get_weather", city="Lima"), call("get_time")],
    )
    # Text answers of those families pass through whole, even one that opens a bracket.
    for fmt in (JsonListFormat(), JsonObjectFormat()):
        assert read(fmt, "Sunny, 21 degrees.", pieces=3) == ("Sunny, 21 degrees.", [])
        assert read(fmt, "[1] is a citation", pieces=3) == ("[1] is a citation", [])


def test_formats_are_recognised_from_templates() -> None:
    assert format_for_template(None) is FALLBACK
    assert format_for_template("{{ messages }}") is FALLBACK
    assert format_for_template("{% for t in tools %}<tool_call>{% endfor %}") is HERMES
    assert isinstance(format_for_template("{{ tools }} [TOOL_CALLS]"), JsonListFormat)
    assert isinstance(format_for_template("<|python_tag|>{{ tools }}"), JsonObjectFormat)
    assert template_knows_tools("{% if tools %}...{% endif %}")
    assert not template_knows_tools("{{ messages }}")


@pytest.mark.parametrize(
    ("fmt", "one", "two"),
    [
        (
            HERMES,
            '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>',
            '\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>',
        ),
        (
            JsonObjectFormat(),
            '{"name": "get_time", "parameters": {}}',
            '; {"name": "get_weather", "parameters": {"city": "Oslo"}}',
        ),
    ],
)
def test_forced_grammars_take_exactly_the_calls_their_format_reads(
    tiny_model: Path, fmt: ToolFormat, one: str, two: str
) -> None:
    tokenizer = load_tokenizer(tiny_model)
    compiler = GrammarCompiler(tokenizer, [tokenizer.eos_token_id])

    def accepts(grammar: str, text: str) -> bool:
        matcher = asyncio.run(compiler.lark(grammar, param="tools")).matcher()
        for token in tokenizer(text, add_special_tokens=False)["input_ids"]:
            if not matcher.allowed()[token]:
                return False
            matcher.consume(token)
        return matcher.accepting

    try:
        parallel = tool_grammar(fmt, TOOLS, parallel=True)
        single = tool_grammar(fmt, TOOLS, parallel=False)
        assert accepts(parallel, one) and accepts(parallel, one + two)
        assert accepts(single, one) and not accepts(single, one + two)
        assert read(fmt, one + two)[1] == [call("get_time"), call("get_weather", city="Oslo")]
        bad = one.replace("get_time", "get_tim")
        assert not accepts(parallel, bad)
        # The fallback format, forced, writes one call however parallel the request.
        assert not accepts(tool_grammar(FALLBACK, TOOLS, parallel=True), one + two)
        # Calls are written as json.dumps writes them, so the call rendered again into the
        # next turn's prompt is the very text generated: that turn reuses the whole cache.
        assert not accepts(parallel, one.replace(": ", ":"))
        assert not accepts(parallel, one.replace(", ", ",\n  "))
    finally:
        compiler.close()
