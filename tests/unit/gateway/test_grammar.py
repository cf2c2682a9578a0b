"""Grammars for constrained decoding: compiled once and cached, refused with the reason,
bounded in time without holding anything else up, and masks that only a match gets
through (the tiny model's tokenizer is SmolLM2's own)."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import llguidance
import pytest
import torch
from transformers import PreTrainedTokenizerBase

from gateway.engine import grammar as grammar_module
from gateway.engine.grammar import Grammar, GrammarCompiler, GrammarError, lark_json
from gateway.engine.sampling import SamplingParams, StreamSampler
from models.loading import load_tokenizer
from protocol.errors import CapacityExceeded, InvalidRequest

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
BOUND = 10.0  # seconds any wait below may take before the test fails


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path) -> PreTrainedTokenizerBase:
    return load_tokenizer(tiny_model)


@pytest.fixture(scope="module")
def compiler(tokenizer: PreTrainedTokenizerBase) -> Iterator[GrammarCompiler]:
    compiler = GrammarCompiler(tokenizer, [tokenizer.eos_token_id])
    yield compiler
    compiler.close()


def ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def walk(grammar: Grammar, tokens: list[int]) -> bool:
    """Whether the grammar lets ``tokens`` through, each one allowed by the mask before it."""
    matcher = grammar.matcher()
    for token in tokens:
        if not matcher.allowed()[token]:
            return False
        matcher.consume(token)
    return matcher.accepting


def schema(compiler: GrammarCompiler, value: dict[str, Any], strict: bool | None = None) -> Grammar:
    return asyncio.run(compiler.json_schema(value, param="response_format", strict=strict))


def test_a_schema_is_compiled_once_then_served_from_the_cache(compiler: GrammarCompiler) -> None:
    first = schema(compiler, PERSON)
    assert schema(compiler, json.loads(json.dumps(PERSON))) is first
    assert schema(compiler, PERSON, strict=True) is not first  # other options, other grammar
    # llguidance keeps properties in the schema's order: reordered keys are another grammar.
    reordered = {**PERSON, "properties": dict(reversed(PERSON["properties"].items()))}
    assert schema(compiler, reordered) is not first


def test_the_cache_forgets_the_least_recently_used(tokenizer: PreTrainedTokenizerBase) -> None:
    compiler = GrammarCompiler(tokenizer, [tokenizer.eos_token_id], cache_size=2)
    try:
        a, b = schema(compiler, {"type": "integer"}), schema(compiler, {"type": "boolean"})
        assert schema(compiler, {"type": "integer"}) is a  # a is now the most recent
        schema(compiler, {"type": "null"})  # evicts b
        assert schema(compiler, {"type": "integer"}) is a
        assert schema(compiler, {"type": "boolean"}) is not b
    finally:
        compiler.close()


def test_a_grammar_lets_through_its_matches_and_nothing_else(
    compiler: GrammarCompiler, tokenizer: PreTrainedTokenizerBase
) -> None:
    grammar = schema(compiler, PERSON)
    assert walk(grammar, ids(tokenizer, '{"name": "Ada", "age": 36}'))
    assert walk(grammar, ids(tokenizer, '{\n  "name": "Ada",\n  "age": 36\n}'))
    assert not walk(grammar, ids(tokenizer, '{"name": "Ada"}'))  # age is required
    assert not walk(grammar, ids(tokenizer, '{"name": "Ada", "age": "36"}'))
    assert not walk(grammar, ids(tokenizer, '{"name": "Ada", "age": 36, "x": 1}'))
    # Whitespace is bounded: a model cannot spend its tokens on blank lines or indentation.
    assert not walk(grammar, ids(tokenizer, '{\n\n  "name": "Ada", "age": 36}'))
    assert not walk(grammar, ids(tokenizer, "{" + " " * 40 + '"name": "Ada", "age": 36}'))


def test_a_complete_match_stops_the_matcher(
    compiler: GrammarCompiler, tokenizer: PreTrainedTokenizerBase
) -> None:
    matcher = schema(compiler, PERSON).matcher()
    tokens = ids(tokenizer, '{"name": "Ada", "age": 36}')
    for token in tokens[:-1]:
        matcher.consume(token)
    assert not matcher.accepting and not matcher.stopped
    matcher.consume(tokens[-1])
    assert matcher.accepting and matcher.stopped
    # Only EOS may follow.
    assert matcher.allowed().nonzero().flatten().tolist() == [tokenizer.eos_token_id]


def test_a_refused_token_is_a_grammar_error(
    compiler: GrammarCompiler, tokenizer: PreTrainedTokenizerBase
) -> None:
    matcher = schema(compiler, PERSON).matcher()
    with pytest.raises(GrammarError):
        matcher.consume(ids(tokenizer, "hello")[0])
    with pytest.raises(GrammarError):  # and it stays failed
        matcher.allowed()


@pytest.mark.parametrize(
    ("value", "strict", "reason"),
    [
        ({"type": "strin"}, None, "Invalid type"),
        ({"properties": 5}, None, "properties must be an object"),
        ({"type": "integer", "minimum": 5, "maximum": 1}, None, "Unsatisfiable"),
        ({"$ref": "https://example.com/schema.json"}, None, "https://example.com"),
        ({"type": "string", "pattern": "(?=a)b"}, None, "look-around"),
        # What llguidance cannot enforce is refused when strict, ignored otherwise.
        ({"not": {"type": "string"}}, True, "not"),
        ({"type": "string", "format": "color"}, True, "color"),
    ],
)
def test_invalid_schemas_are_refused_with_the_reason(
    compiler: GrammarCompiler, value: dict[str, Any], strict: bool | None, reason: str
) -> None:
    with pytest.raises(InvalidRequest) as refused:
        schema(compiler, value, strict)
    assert refused.value.param == "response_format"
    assert reason in refused.value.message


def test_keywords_it_cannot_enforce_are_ignored_unless_strict(compiler: GrammarCompiler) -> None:
    assert isinstance(schema(compiler, {"not": {"type": "string"}}), Grammar)
    assert isinstance(schema(compiler, {"type": "string", "format": "color"}), Grammar)


def test_oversized_grammars_are_refused_before_compiling(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    compiler = GrammarCompiler(tokenizer, [tokenizer.eos_token_id], max_chars=1000)
    try:
        big = {"enum": ["x" * 100] * 20}
        with pytest.raises(InvalidRequest, match="at most 1000 characters") as refused:
            schema(compiler, big)
        assert refused.value.param == "response_format"
        with pytest.raises(InvalidRequest):
            asyncio.run(compiler.lark('start: "' + "x" * 2000 + '"', param="tools"))
        assert compiler._tokenizer is None  # nothing was compiled, not even the tokenizer
    finally:
        compiler.close()


def test_lark_with_an_embedded_json_schema(
    compiler: GrammarCompiler, tokenizer: PreTrainedTokenizerBase
) -> None:
    arguments = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    call = {
        "type": "object",
        "properties": {"name": {"const": "get_weather"}, "arguments": arguments},
        "required": ["name", "arguments"],
    }
    text = 'start: "<tool_call>\\n" ' + lark_json(call) + ' "\\n</tool_call>"'
    grammar = asyncio.run(compiler.lark(text, param="tool_choice"))
    good = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    assert walk(grammar, ids(tokenizer, good))
    assert not walk(grammar, ids(tokenizer, good.replace("get_weather", "get_time")))
    assert not walk(grammar, ids(tokenizer, good.replace('"Paris"', "7")))
    # The raw form works too (llguidance's own JSON options).
    raw = 'start: "<t>" %json{"type": "integer"} "</t>"'
    assert walk(asyncio.run(compiler.lark(raw, param="tool_choice")), ids(tokenizer, "<t>42</t>"))

    with pytest.raises(InvalidRequest, match="unknown name") as refused:
        asyncio.run(compiler.lark("start: missing_rule", param="tool_choice"))
    assert refused.value.param == "tool_choice"


def test_eos_is_chosen_only_when_the_grammar_accepts(
    compiler: GrammarCompiler, tokenizer: PreTrainedTokenizerBase
) -> None:
    """The model wants to end at every step; the grammar lets it once a number is whole."""
    eos = tokenizer.eos_token_id
    grammar = schema(compiler, {"type": "integer", "minimum": 100})
    digits = ids(tokenizer, "1234")
    assert len(digits) == 4
    for params in (SamplingParams(temperature=0.0), SamplingParams(temperature=2.0, seed=1)):
        sampler = StreamSampler.of(params, constraint=grammar.matcher())
        logits = torch.full((len(tokenizer),), -10.0)
        logits[eos] = 50.0
        chosen = []
        for digit in digits:
            logits[digit] = 10.0  # the next digit is the best token after EOS
            chosen.append(sampler.choose(logits).token)
            logits[digit] = -10.0
            if chosen[-1] == eos:
                break
        assert chosen == [*digits[:3], eos]  # "123" is the first number ≥ 100


async def _slow_compiles(
    compiler: GrammarCompiler, entered: threading.Event, ticks: list[int]
) -> None:
    slow = asyncio.create_task(
        compiler.json_schema({"title": "slow", "type": "object"}, param="response_format")
    )
    async with asyncio.timeout(BOUND):
        while not entered.is_set():  # the slow compile holds one thread
            ticks.append(1)
            await asyncio.sleep(0)
    # Meanwhile the event loop runs and another grammar compiles on the other thread.
    fast = await compiler.json_schema({"type": "boolean"}, param="response_format")
    assert isinstance(fast, Grammar) and not slow.done()
    with pytest.raises(InvalidRequest, match="too complex") as refused:
        await slow
    assert refused.value.param == "response_format"


@pytest.fixture
def stuck(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """Compiles of grammars that mention "slow" block until the test ends (as a grammar
    that takes forever would); ``entered`` is set once one has begun."""
    entered, release = threading.Event(), threading.Event()
    real = grammar_module.new_matcher

    def new_matcher(tokenizer: llguidance.LLTokenizer, grammar: str) -> llguidance.LLMatcher:
        if "slow" in grammar:
            entered.set()
            release.wait(BOUND)
        return real(tokenizer, grammar)

    monkeypatch.setattr(grammar_module, "new_matcher", new_matcher)
    yield entered
    release.set()


def test_a_compile_past_its_time_is_refused_and_holds_nothing_up(
    tokenizer: PreTrainedTokenizerBase, stuck: threading.Event
) -> None:
    compiler = GrammarCompiler(
        tokenizer, [tokenizer.eos_token_id], compile_timeout_s=0.5, threads=2
    )
    ticks: list[int] = []
    try:
        asyncio.run(_slow_compiles(compiler, stuck, ticks))
    finally:
        compiler.close()
    assert ticks  # the loop went on while the compile thread was busy


def test_a_compile_that_never_got_a_thread_is_a_retryable_busy(
    tokenizer: PreTrainedTokenizerBase, stuck: threading.Event
) -> None:
    compiler = GrammarCompiler(
        tokenizer, [tokenizer.eos_token_id], compile_timeout_s=0.5, threads=1
    )

    async def scenario() -> None:
        await compiler.json_schema({"type": "null"}, param="response_format")  # warm
        slow = asyncio.create_task(compiler.json_schema({"title": "slow"}, param="p"))
        await asyncio.to_thread(stuck.wait, BOUND)
        with pytest.raises(CapacityExceeded):
            await compiler.json_schema({"type": "boolean"}, param="response_format")
        with pytest.raises(InvalidRequest):
            await slow

    try:
        asyncio.run(scenario())
    finally:
        compiler.close()
