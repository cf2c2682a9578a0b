"""OpenAI chat completions on top of the decode loop; knows nothing about HTTP."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass, replace
from typing import Any

from gateway.engine.generation import (
    Finished,
    Generation,
    GenerationRequest,
    Generator,
    PromptLogprobs,
    TextDelta,
    TokenLogprob,
)
from gateway.engine.grammar import Grammar, GrammarCompiler, lark_json
from gateway.openai.fanout import fan_in, fan_out
from gateway.openai.models import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionMessage,
    ChatCompletionRequest,
    ChatCompletionTokenLogprob,
    ChatTool,
    Choice,
    ChoiceDelta,
    ChoiceDeltaFunction,
    ChoiceDeltaToolCall,
    ChoiceLogprobs,
    ChunkChoice,
    CompletionUsage,
    FinishReason,
    NamedToolChoice,
    PromptTokensDetails,
    ToolCall,
    ToolCallFunction,
    TopLogprob,
)
from gateway.openai.prepare import RequestLimits, ServedModel, generation_request, requested_adapter
from gateway.openai.templating import PromptBuilder
from gateway.openai.tool_calls import (
    CallFound,
    ToolCallStream,
    ToolFormat,
    new_call_id,
    tool_grammar,
)
from protocol.errors import InvalidRequest
from routing.planner import Hop

SYSTEM_FINGERPRINT = "swarmgate-v1"


class ChatService:
    def __init__(
        self,
        model: ServedModel,
        prompts: PromptBuilder,
        generator: Generator,
        limits: RequestLimits | None = None,
        grammars: GrammarCompiler | None = None,  # None: only text responses
    ) -> None:
        self.model = model
        self._prompts = prompts
        self._generator = generator
        self._limits = limits or RequestLimits()
        self._grammars = grammars

    def check(self, request: ChatCompletionRequest) -> None:
        """Refusals that need no tokenizer, made before the request waits for a slot."""
        requested_adapter(self.model, request.model)
        _refuse_unsupported(request, structured=self._grammars is not None)
        _check_tools(request)

    def generations(self, request: ChatCompletionRequest) -> int:
        """How many generations the request runs at once: its choices."""
        return request.n

    async def prepare(
        self,
        request: ChatCompletionRequest,
        session_key: str | None = None,
        *,
        received_at: float | None = None,
        tenant: str = "",
        prompt_param: str = "messages",
    ) -> list[GenerationRequest]:
        """A checked request as one generation per choice. The chat template and tokenizer
        run on a thread: megabytes of messages take a while, and other requests go on; so
        does the response format's grammar, on the compiler's threads. ``prompt_param``
        names the prompt in a context overflow's message as the client sent it."""
        grammar = await response_grammar(request, self._grammars, self._prompts.tool_format)
        prepared = await asyncio.to_thread(
            self._prepare, request, session_key, received_at, tenant, prompt_param
        )
        return [replace(p, grammar=grammar) for p in prepared] if grammar else prepared

    def _prepare(
        self,
        request: ChatCompletionRequest,
        session_key: str | None,
        received_at: float | None,
        tenant: str,
        prompt_param: str,
    ) -> list[GenerationRequest]:
        tools = tool_plan(request)
        prompt = self._prompts.chat_prompt(request.messages, tools.offered if tools else ())
        key = request.prompt_cache_key or session_key or request.user
        first = generation_request(
            self.model,
            prompt,
            request,
            session_key=key,
            param=prompt_param,
            limits=self._limits,
            received_at=received_at,
            tenant=tenant,
        )
        if request.logprobs:
            first = replace(first, logprobs=request.top_logprobs or 0)
        return [first] + [_another_choice(first, i) for i in range(1, request.n)]

    async def open(self, prepared: GenerationRequest) -> Generation:
        return await self._generator.open(prepared)

    async def close(self, generation: Generation) -> None:
        await self._generator.close(generation)

    async def complete(
        self, request: ChatCompletionRequest, prepared: list[GenerationRequest]
    ) -> tuple[ChatCompletion, tuple[Hop, ...]]:
        """The whole completion, and the route its first choice was generated on.

        Choices generate at once (gateway/openai/fanout.py): the first leads, the others start
        once its prompt is on the servers, from a copy of that cache, and decode alongside
        it, batched."""
        tools = tool_plan(request)
        lead: list[tuple[Hop, ...]] = []  # the first choice's route, once open

        async def run(index: int, prompt_done: Callable[[], None]) -> tuple[Choice, Finished]:
            choice = prepared[index]
            generation = await self._generator.open(choice, near=lead[0] if lead else ())
            if index == 0:
                lead.append(generation.route)
            try:
                return await self._choice(request, index, choice, generation, tools, prompt_done)
            finally:  # also when cancelled before its generation began
                await self._generator.close(generation)

        outcomes = await fan_out(run, len(prepared), lead=True)
        completion = ChatCompletion(
            id=_completion_id(),
            model=request.model,
            choices=[choice for choice, _ in outcomes],
            usage=usage_of(*(finished for _, finished in outcomes)),
            system_fingerprint=SYSTEM_FINGERPRINT,
        )
        return completion, lead[0] if lead else ()

    async def _choice(
        self,
        request: ChatCompletionRequest,
        index: int,
        choice: GenerationRequest,
        generation: Generation,
        tools: ToolPlan | None,
        prompt_done: Callable[[], None],
    ) -> tuple[Choice, Finished]:
        parts: list[str] = []
        calls: list[ToolCall] = []
        logprobs: list[TokenLogprob] = []
        outcome: tuple[Choice, Finished] | None = None
        events = self._events(choice, generation, tools, prompt_done)
        async with aclosing(events):
            async for event in events:
                if isinstance(event, TextDelta):
                    parts.append(event.text)
                    logprobs += event.logprobs
                elif isinstance(event, CallFound):
                    calls.append(_tool_call(event))
                else:
                    content = "".join(parts)
                    message = ChatCompletionMessage(
                        # With calls, OpenAI's content is null unless the model also wrote
                        # text.
                        content=(content.strip() or None) if calls else content,
                        tool_calls=calls or None,
                    )
                    made = Choice(
                        index=index,
                        message=message,
                        finish_reason=event.finish_reason,
                        logprobs=_logprobs(logprobs) if request.logprobs else None,
                    )
                    outcome = made, event  # read on to the end: leaving early cancels it
        if outcome is None:
            raise RuntimeError("the generation ended without finishing")  # it always does
        return outcome

    async def _events(
        self,
        choice: GenerationRequest,
        generation: Generation,
        tools: ToolPlan | None,
        prompt_done: Callable[[], None] = lambda: None,
    ) -> AsyncGenerator[TextDelta | CallFound | Finished, None]:
        """The generation's events, with the calls found in its text when tools are
        offered (the text around them stays content)."""
        generated = self._generator.generate(choice, generation, prompt_done=prompt_done)
        async with aclosing(generated) as events:
            if tools is None:
                async for event in events:
                    if not isinstance(event, PromptLogprobs):  # chat never asks for them
                        yield event
                return
            reader = ToolCallStream(
                self._prompts.tool_format, tools.offered, parallel=tools.parallel
            )
            held: list[TokenLogprob] = []  # of text not yet known to be content
            async for event in events:
                if isinstance(event, PromptLogprobs):
                    continue
                if isinstance(event, TextDelta):
                    pieces = reader.push(event.text)
                    held += event.logprobs
                else:
                    pieces = reader.finish()
                for piece in pieces:
                    if isinstance(piece, str):
                        yield TextDelta(piece, tuple(held))
                        held.clear()
                    else:
                        yield piece
                if isinstance(event, Finished):
                    called = reader.calls and event.finish_reason == "stop"
                    yield replace(event, finish_reason="tool_calls") if called else event

    async def stream(
        self,
        request: ChatCompletionRequest,
        prepared: list[GenerationRequest],
        first: Generation,
    ) -> AsyncGenerator[ChatCompletionChunk, None]:
        """Each choice's role, text and finish reason (``first`` is already open), then the
        usage if asked for. Choices generate at once, as in ``complete``, and their chunks
        interleave as they come, each with its choice's index."""
        completion_id, created = _completion_id(), int(time.time())

        def chunk(
            index: int,
            delta: ChoiceDelta,
            finish: FinishReason | None = None,
            logprobs: ChoiceLogprobs | None = None,
        ) -> ChatCompletionChunk:
            choice = ChunkChoice(index=index, delta=delta, finish_reason=finish, logprobs=logprobs)
            return ChatCompletionChunk(
                id=completion_id,
                created=created,
                model=request.model,
                choices=[choice],
                system_fingerprint=SYSTEM_FINGERPRINT,
            )

        finished: dict[int, Finished] = {}  # by choice: the first's prompt counts
        tools = tool_plan(request)

        async def chunks(
            index: int, prompt_done: Callable[[], None]
        ) -> AsyncGenerator[ChatCompletionChunk, None]:
            choice = prepared[index]
            generation = first if index == 0 else None
            try:
                generation = generation or await self._generator.open(choice, near=first.route)
                yield chunk(index, ChoiceDelta(role="assistant", content=""))
                # Closed with the stream, even when its reader stops at a `yield`.
                events = self._events(choice, generation, tools, prompt_done)
                async with aclosing(events):
                    async for event in events:
                        if isinstance(event, TextDelta):
                            logprobs = _logprobs(event.logprobs) if request.logprobs else None
                            yield chunk(index, ChoiceDelta(content=event.text), logprobs=logprobs)
                        elif isinstance(event, CallFound):
                            for delta in _call_deltas(event):
                                yield chunk(index, ChoiceDelta(tool_calls=[delta]))
                        else:
                            finished[index] = event
                            yield chunk(index, ChoiceDelta(), event.finish_reason)
            finally:  # also when the client leaves before its generation began
                if generation is not None:
                    await self._generator.close(generation)

        try:
            async with aclosing(fan_in(chunks, len(prepared), lead=True)) as merged:
                async for made in merged:
                    yield made
            if request.include_usage():
                yield ChatCompletionChunk(
                    id=completion_id,
                    created=created,
                    model=request.model,
                    choices=[],
                    system_fingerprint=SYSTEM_FINGERPRINT,
                    usage=usage_of(*(finished[i] for i in sorted(finished))),
                )
        finally:  # the first choice's, when the stream ended before it began
            await self._generator.close(first)


def _logprobs(tokens: Sequence[TokenLogprob]) -> ChoiceLogprobs:
    def entry(token: str, logprob: float) -> TopLogprob:
        return TopLogprob(token=token, logprob=logprob, bytes=list(token.encode()))

    return ChoiceLogprobs(
        content=[
            ChatCompletionTokenLogprob(
                **entry(t.token, t.logprob).model_dump(),
                top_logprobs=[entry(tok, lp) for tok, lp in t.top],
            )
            for t in tokens
        ]
    )


def _another_choice(first: GenerationRequest, index: int) -> GenerationRequest:
    """Choice ``index`` of ``n``: the same request, its own seed when one was given."""
    seed = first.sampling.seed
    sampling = replace(first.sampling, seed=None if seed is None else seed + index)
    return replace(first, sampling=sampling, received_at=time.monotonic())


def _refuse_unsupported(request: ChatCompletionRequest, *, structured: bool) -> None:
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


async def response_grammar(
    request: ChatCompletionRequest, grammars: GrammarCompiler | None, fmt: ToolFormat
) -> Grammar | None:
    """What the response must match (None: any text).

    Tools the model must call (``required`` or a named function) allow only their calls.
    Tools it may call, with a JSON response format, allow calls or that JSON. Without tools,
    the format alone. Errors name the parameter whose schema failed."""
    tools = tool_plan(request)
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


def _check_tools(request: ChatCompletionRequest) -> None:
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


def _tool_call(found: CallFound) -> ToolCall:
    call = found.call
    return ToolCall(
        id=new_call_id(), function=ToolCallFunction(name=call.name, arguments=call.arguments)
    )


def _call_deltas(found: CallFound) -> list[ChoiceDeltaToolCall]:
    """OpenAI's pieces of one call: its id, type and name first, then its arguments."""
    call = found.call
    return [
        ChoiceDeltaToolCall(
            index=found.index,
            id=new_call_id(),
            type="function",
            function=ChoiceDeltaFunction(name=call.name, arguments=""),
        ),
        ChoiceDeltaToolCall(
            index=found.index, function=ChoiceDeltaFunction(arguments=call.arguments)
        ),
    ]


def _completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage_of(*finished: Finished) -> CompletionUsage:
    """Usage of one choice, or of several choices of the same prompt (counted once)."""
    prompt = finished[0].prompt_tokens if finished else 0
    completion = sum(f.completion_tokens for f in finished)
    return CompletionUsage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        prompt_tokens_details=PromptTokensDetails(
            cached_tokens=finished[0].cached_tokens if finished else 0
        ),
    )
