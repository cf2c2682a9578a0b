"""OpenAI chat completions on top of the decode loop; knows nothing about HTTP."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass, replace

from gateway.engine.finish import FinishReason
from gateway.engine.generation import (
    Finished,
    Generation,
    GenerationRequest,
    Generator,
    PromptLogprobs,
    TextDelta,
    TokenLogprob,
)
from gateway.engine.grammar import GrammarCompiler
from gateway.openai.answers import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionMessage,
    ChatCompletionTokenLogprob,
    Choice,
    ChoiceDelta,
    ChoiceDeltaFunction,
    ChoiceDeltaToolCall,
    ChoiceLogprobs,
    ChunkChoice,
    TopLogprob,
)
from gateway.openai.chat_request import (
    ToolPlan,
    check_tools,
    refuse_unsupported,
    response_grammar,
    tool_plan,
)
from gateway.openai.choices import SYSTEM_FINGERPRINT, choices, collected, usage_of
from gateway.openai.models import ChatCompletionRequest, ToolCall, ToolCallFunction
from gateway.openai.prepare import RequestLimits, ServedModel, generation_request, requested_adapter
from gateway.openai.templating import PromptBuilder
from gateway.openai.tool_calls import CallFound, ToolCallStream, new_call_id
from routing.planner import Hop


@dataclass(frozen=True)
class PreparedChat:
    """A checked chat request, ready to run: one generation per choice, and its tool plan."""

    generations: list[GenerationRequest]
    tools: ToolPlan | None


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
        refuse_unsupported(request, structured=self._grammars is not None)
        check_tools(request)

    def generations(self, request: ChatCompletionRequest) -> int:
        """How many generations the request runs at once: its choices."""
        return request.n

    async def prepare(
        self,
        request: ChatCompletionRequest,
        conversation_key: str | None = None,
        *,
        received_at: float | None = None,
        tenant: str = "",
        prompt_param: str = "messages",
    ) -> PreparedChat:
        """A checked request as one generation per choice. The chat template and tokenizer
        run on a thread: megabytes of messages take a while, and other requests go on; so
        does the response format's grammar, on the compiler's threads. ``prompt_param``
        names the prompt in a context overflow's message as the client sent it."""
        tools = tool_plan(request)
        fmt = self._prompts.tool_format
        grammar = await response_grammar(request, tools, self._grammars, fmt)
        prepared = await asyncio.to_thread(
            self._prepare, request, tools, conversation_key, received_at, tenant, prompt_param
        )
        if grammar:
            prepared = [replace(p, grammar=grammar) for p in prepared]
        return PreparedChat(prepared, tools)

    def _prepare(
        self,
        request: ChatCompletionRequest,
        tools: ToolPlan | None,
        conversation_key: str | None,
        received_at: float | None,
        tenant: str,
        prompt_param: str,
    ) -> list[GenerationRequest]:
        prompt = self._prompts.chat_prompt(request.messages, tools.offered if tools else ())
        key = request.prompt_cache_key or conversation_key or request.user
        first = generation_request(
            self.model,
            prompt,
            request,
            conversation_key=key,
            param=prompt_param,
            limits=self._limits,
            received_at=received_at,
            tenant=tenant,
        )
        if request.logprobs:
            first = replace(first, logprobs=request.top_logprobs or 0)
        return [first] + [_another_choice(first, i) for i in range(1, request.n)]

    async def open(self, prepared: PreparedChat) -> Generation:
        """The first choice's generation."""
        return await self._generator.open(prepared.generations[0])

    async def close(self, generation: Generation) -> None:
        await self._generator.close(generation)

    async def complete(
        self, request: ChatCompletionRequest, prepared: PreparedChat
    ) -> tuple[ChatCompletion, tuple[Hop, ...]]:
        """The whole completion, collected from its stream, and the route its first choice
        was generated on."""
        first = await self.open(prepared)
        stream = self._chunks(request, prepared, first, usage=True)
        chunks = await collected(self._generator, first, stream)
        return _completion(request, chunks), first.route

    def stream(
        self, request: ChatCompletionRequest, prepared: PreparedChat, first: Generation
    ) -> AsyncGenerator[ChatCompletionChunk, None]:
        """Each choice's role, text and finish reason (``first`` is already open), then the
        usage if asked for. Choices generate at once (gateway/openai/choices.py): the first
        leads, the others start once its prompt is on the servers, from a copy of that
        cache, and decode alongside it, batched; their chunks interleave as they come, each
        with its choice's index."""
        return self._chunks(request, prepared, first, usage=request.include_usage())

    async def _chunks(
        self,
        request: ChatCompletionRequest,
        prepared: PreparedChat,
        first: Generation,
        *,
        usage: bool,
    ) -> AsyncGenerator[ChatCompletionChunk, None]:
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

        async def chunks(
            index: int, generation: Generation, prompt_done: Callable[[], None]
        ) -> AsyncGenerator[ChatCompletionChunk, None]:
            yield chunk(index, ChoiceDelta(role="assistant", content=""))
            choice = prepared.generations[index]
            events = self._events(choice, generation, prepared.tools, prompt_done)
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

        merged = choices(self._generator, prepared.generations, first, chunks, lead=True)
        async with aclosing(merged):
            async for made in merged:
                yield made
        if usage:
            yield ChatCompletionChunk(
                id=completion_id,
                created=created,
                model=request.model,
                choices=[],
                system_fingerprint=SYSTEM_FINGERPRINT,
                usage=usage_of(*(finished[i] for i in sorted(finished))),
            )

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


def _completion(
    request: ChatCompletionRequest, chunks: list[ChatCompletionChunk]
) -> ChatCompletion:
    """The completion that a stream's chunks add up to, as a client assembles them: each
    choice's text and calls, its logprobs and finish reason, and the usage."""
    texts: dict[int, list[str]] = {}
    calls: dict[int, list[ToolCall]] = {}
    logprobs: dict[int, list[ChatCompletionTokenLogprob]] = {}
    reasons: dict[int, FinishReason] = {}
    usage = None
    for chunk in chunks:
        usage = chunk.usage or usage
        for part in chunk.choices:
            i, delta = part.index, part.delta
            texts.setdefault(i, []).append(delta.content or "")
            for call in delta.tool_calls or []:
                made = calls.setdefault(i, [])
                if call.id is not None:  # a call's first piece: its id and name
                    name = call.function.name if call.function else None
                    function = ToolCallFunction(name=name or "", arguments="")
                    made.append(ToolCall(id=call.id, function=function))
                if call.function and call.function.arguments:
                    made[-1].function.arguments += call.function.arguments
            if part.logprobs is not None:
                logprobs.setdefault(i, []).extend(part.logprobs.content or [])
            if part.finish_reason is not None:
                reasons[i] = part.finish_reason
    if usage is None:
        raise RuntimeError("the stream ended without its usage")  # it always has it
    made_choices = []
    for i in sorted(reasons):
        content, tool_calls = "".join(texts.get(i, [])), calls.get(i)
        message = ChatCompletionMessage(
            # With calls, OpenAI's content is null unless the model also wrote text.
            content=(content.strip() or None) if tool_calls else content,
            tool_calls=tool_calls or None,
        )
        made_choices.append(
            Choice(
                index=i,
                message=message,
                finish_reason=reasons[i],
                logprobs=ChoiceLogprobs(content=logprobs.get(i, [])) if request.logprobs else None,
            )
        )
    return ChatCompletion(
        id=_completion_id(),
        model=request.model,
        choices=made_choices,
        usage=usage,
        system_fingerprint=SYSTEM_FINGERPRINT,
    )


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
