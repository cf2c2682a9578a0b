"""Constrained decoding: JSON schemas and lark grammars become a token mask at every step.

    GrammarCompiler   one per gateway: wraps the tokenizer for llguidance once, compiles off
                      the event loop (bounded in size and in time), caches what it compiled
    Grammar           a compiled grammar: immutable, shared by every stream that uses it
    Matcher           one stream's place in its grammar: which tokens may come next

llguidance stays inside this module. It computes each mask on the fly, building its lexer
automata lazily, so a schema compiles in milliseconds with no per-schema precomputation of
masks; its parser limits ("fuel") bound the work of each mask.

JSON may have whitespace wherever JSON allows it, but at most ``WHITESPACE`` at one place:
unbounded, small models can fill their whole max_tokens with blank lines.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import llguidance
import llguidance.hf
import torch
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from protocol.errors import CapacityExceeded, InvalidRequest

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

CACHE_SIZE = 256  # compiled grammars kept
COMPILE_TIMEOUT_S = 5.0  # a request waits this long for its grammar (typically ~2 ms)
COMPILE_THREADS = 2
MAX_GRAMMAR_CHARS = 100_000  # of a schema (as compact JSON) or of a lark grammar
# What may stand at each place JSON allows whitespace: one line break and indentation, or a
# few spaces. Enough for any usual formatting; no blank lines, no endless runs.
WHITESPACE = r"\r?\n[\x20\x09]{0,24}|[\x20\x09]{1,24}"

_BITS = torch.arange(8, dtype=torch.uint8)


class GrammarError(RuntimeError):
    """A stream's matcher failed: it refused a token or hit a limit mid-stream."""


class _Rejected(Exception):
    """llguidance refused a grammar, with its reason (a client's error)."""


class Matcher:
    """One stream's place in its grammar. Not thread-safe: one stream, one step at a time
    (the sampler uses it on the head thread)."""

    def __init__(self, matcher: llguidance.LLMatcher) -> None:
        self._matcher = matcher

    @property
    def accepting(self) -> bool:
        """What was consumed so far is a complete match (EOS is allowed now)."""
        return bool(self._matcher.is_accepting())

    @property
    def stopped(self) -> bool:
        """Complete, and nothing may follow: the generation is over."""
        return bool(self._matcher.is_stopped()) and not self._matcher.is_error()

    def allowed(self) -> torch.Tensor:
        """[n] bool, n ≥ the tokenizer's vocabulary: the tokens the grammar allows next
        (EOS only while ``accepting``)."""
        packed = self._matcher.compute_bitmask()  # one bit per token, little-endian
        self._check()
        words = torch.frombuffer(bytearray(packed), dtype=torch.uint8)
        return ((words.unsqueeze(1) >> _BITS) & 1).view(-1).bool()

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """logits: [vocab] → a copy with every token the grammar forbids at -inf."""
        allowed = self.allowed()
        vocab = logits.shape[-1]
        if allowed.numel() < vocab:  # rows past the tokenizer's tokens: never allowed
            allowed = torch.cat([allowed, allowed.new_zeros(vocab - allowed.numel())])
        allowed = allowed[:vocab]
        if not bool(allowed.any()):
            raise GrammarError("the grammar allows no token of the model's vocabulary")
        return logits.masked_fill(~allowed, float("-inf"))

    def consume(self, token: int) -> None:
        if not self._matcher.consume_token(token):
            raise GrammarError(f"the grammar refused token {token}: {self._matcher.get_error()}")

    def _check(self) -> None:
        if self._matcher.is_error():
            raise GrammarError(f"the grammar failed: {self._matcher.get_error()}")


@dataclass(frozen=True, eq=False)
class Grammar:
    """A compiled grammar, immutable and shared by every stream (and choice) using it."""

    _start: llguidance.LLMatcher  # never advanced: each stream advances its own copy

    def matcher(self) -> Matcher:
        """A fresh matcher at the grammar's start (a copy: microseconds)."""
        return Matcher(self._start.deep_copy())


def lark_json(
    schema: dict[str, Any], *, strict: bool | None = None, canonical: bool = False
) -> str:
    """``%json{...}``: ``schema`` as a lark rule body, under the same JSON options as
    ``GrammarCompiler.json_schema`` (e.g. ``'start: "<tool_call>\\n" ' + lark_json(s)``).
    ``canonical``: written exactly as ``json.dumps`` writes it (``", "`` and ``": "``, no
    other whitespace), so that text rendered again from the parsed value is the same."""
    options = _json_options(strict)
    if canonical:
        options = {
            "whitespace_flexible": False,
            "item_separator": ", ",
            "key_separator": ": ",
            "lenient": not strict,
        }
    return "%json" + _compact({**schema, "x-guidance": options})


class GrammarCompiler:
    """Compiles and caches grammars against one model's tokenizer.

    Compiles run on their own threads (llguidance drops the GIL while it builds), so a
    slow one holds up neither the event loop nor the head thread's decoding. A request
    waits at most ``compile_timeout_s`` for its grammar; past that, a grammar whose compile
    had begun is refused as too complex (400), one still queued gets a 429.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        eos_ids: Iterable[int],
        *,
        vocab_size: int = 0,  # the model's logits rows, when more than the tokenizer's
        cache_size: int = CACHE_SIZE,
        compile_timeout_s: float = COMPILE_TIMEOUT_S,
        max_chars: int = MAX_GRAMMAR_CHARS,
        threads: int = COMPILE_THREADS,
    ) -> None:
        if not isinstance(tokenizer, PreTrainedTokenizerFast):
            raise ValueError("llguidance needs a fast (Rust) tokenizer")
        self._hf_tokenizer = tokenizer
        self._eos_ids = sorted(eos_ids)
        self._vocab_size = max(vocab_size, len(tokenizer))
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._tokenizer_lock = threading.Lock()
        self._cache: OrderedDict[tuple[str, ...], Grammar] = OrderedDict()
        self._cache_size = cache_size
        self._timeout_s = compile_timeout_s
        self._max_chars = max_chars
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="grammar")

    async def json_schema(
        self, schema: dict[str, Any], *, param: str, strict: bool | None = None
    ) -> Grammar:
        """Any JSON value ``schema`` allows. ``strict``: refuse keywords that llguidance
        cannot enforce (``not``, unknown formats, ...); otherwise they are ignored."""
        text = self._bounded(_compact(schema, param), param)
        options = _json_options(strict)
        key = ("json", _compact(options), text)
        return await self._compile(
            key,
            param,
            lambda: llguidance.LLMatcher.grammar_from_json_schema(text, overrides=options),
        )

    async def json_object(self, *, param: str) -> Grammar:
        """Any JSON object."""
        return await self.json_schema({"type": "object"}, param=param)

    async def lark(self, grammar: str, *, param: str) -> Grammar:
        """An llguidance lark grammar (``start`` is its top rule); ``%json{...}`` embeds a
        JSON schema (see ``lark_json``)."""
        text = self._bounded(grammar, param)
        return await self._compile(
            ("lark", text), param, lambda: llguidance.LLMatcher.grammar_from_lark(text)
        )

    def close(self) -> None:
        """Drop queued compiles; one in flight finishes on its thread."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _bounded(self, text: str, param: str) -> str:
        if len(text) > self._max_chars:
            raise InvalidRequest(
                f"{param}: at most {self._max_chars} characters are allowed, not {len(text)}",
                param=param,
            )
        return text

    async def _compile(
        self, key: tuple[str, ...], param: str, source: Callable[[], str]
    ) -> Grammar:
        if (cached := self._cache.get(key)) is not None:
            self._cache.move_to_end(key)
            return cached
        loop = asyncio.get_running_loop()
        tokenizer = self._tokenizer
        if tokenizer is None:  # once per gateway, not counted against a grammar's time
            tokenizer = await loop.run_in_executor(self._pool, self._wrap)
        started = threading.Event()
        job = loop.run_in_executor(self._pool, _build, tokenizer, source, started)
        try:
            grammar = await asyncio.wait_for(job, self._timeout_s)
        except TimeoutError:
            if not started.is_set():  # never began: the gateway is busy, not the grammar bad
                raise CapacityExceeded("the gateway is busy compiling grammars") from None
            raise InvalidRequest(
                f"{param}: too complex: not compiled within {self._timeout_s:g} s",
                param=param,
            ) from None
        except _Rejected as e:
            raise InvalidRequest(f"{param}: {e}", param=param) from None
        self._cache[key] = grammar
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return grammar

    def _wrap(self) -> llguidance.LLTokenizer:
        """On a compile thread: the tokenizer as llguidance's, made by the first compile
        rather than at startup (most gateways never need it)."""
        with self._tokenizer_lock:
            if self._tokenizer is None:
                self._tokenizer = llguidance.hf.from_tokenizer(
                    self._hf_tokenizer, n_vocab=self._vocab_size, eos_token=self._eos_ids
                )
            return self._tokenizer


def _build(
    tokenizer: llguidance.LLTokenizer, source: Callable[[], str], started: threading.Event
) -> Grammar:
    """On a compile thread: the grammar, with its first mask computed (so that its streams
    start warm, and a grammar that fails at its first step is refused here)."""
    started.set()
    try:
        matcher = new_matcher(tokenizer, source())
    except ValueError as e:  # a schema that is no JSON object
        raise _Rejected(str(e)) from None
    if not matcher.is_error():
        matcher.compute_bitmask()
    if matcher.is_error():
        raise _Rejected(matcher.get_error())
    return Grammar(matcher)


def new_matcher(tokenizer: llguidance.LLTokenizer, grammar: str) -> llguidance.LLMatcher:
    """A matcher at the start of ``grammar`` (llguidance's serialized form); errors are
    its state, not exceptions."""
    return llguidance.LLMatcher(tokenizer, grammar, log_level=0)


def _json_options(strict: bool | None) -> JsonCompileOptions:
    # Given as overrides: a schema's own "x-guidance" cannot lift them.
    return {"whitespace_pattern": WHITESPACE, "lenient": not strict}


def _compact(value: Mapping[str, object], param: str = "schema") -> str:
    """JSON without whitespace, keys in their given order: llguidance fixes the order of
    an object's properties to their order in the schema, so reordered keys are another
    grammar."""
    try:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (ValueError, TypeError, RecursionError) as e:
        raise InvalidRequest(f"{param}: not serializable as JSON: {e}", param=param) from None
