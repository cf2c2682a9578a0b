"""OpenAI chat completions on top of the decode loop; knows nothing about HTTP."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing
from dataclasses import replace

from gateway.generation import (
    Finished,
    Generation,
    GenerationRequest,
    Generator,
    TextDelta,
    TokenLogprob,
)
from gateway.prepare import RequestLimits, ServedModel, check_model, generation_request
from gateway.templating import PromptBuilder
from protocol.errors import InvalidRequest
from protocol.openai import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionMessage,
    ChatCompletionRequest,
    ChatCompletionTokenLogprob,
    Choice,
    ChoiceDelta,
    ChoiceLogprobs,
    ChunkChoice,
    CompletionUsage,
    FinishReason,
    PromptTokensDetails,
    TopLogprob,
)
from routing.planner import Hop

SYSTEM_FINGERPRINT = "swarmgate-v1"


class ChatService:
    def __init__(
        self,
        model: ServedModel,
        prompts: PromptBuilder,
        generator: Generator,
        limits: RequestLimits | None = None,
    ) -> None:
        self.model = model
        self._prompts = prompts
        self._generator = generator
        self._limits = limits or RequestLimits()

    def check(self, request: ChatCompletionRequest) -> None:
        """Refusals that need no tokenizer, made before the request waits for a slot."""
        check_model(self.model, request.model)
        _refuse_unsupported(request)

    async def prepare(
        self,
        request: ChatCompletionRequest,
        session_key: str | None = None,
        *,
        received_at: float | None = None,
        tenant: str = "",
    ) -> list[GenerationRequest]:
        """A checked request as one generation per choice. The chat template and tokenizer
        run on a thread: megabytes of messages take a while, and other requests go on."""
        return await asyncio.to_thread(self._prepare, request, session_key, received_at, tenant)

    def _prepare(
        self,
        request: ChatCompletionRequest,
        session_key: str | None,
        received_at: float | None,
        tenant: str,
    ) -> list[GenerationRequest]:
        prompt = self._prompts.chat_prompt(request.messages)
        key = request.prompt_cache_key or session_key or request.user
        first = generation_request(
            self.model,
            prompt,
            request,
            session_key=key,
            param="messages",
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
        """The whole completion, and the route its first choice was generated on."""
        choices, finished = [], []
        route: tuple[Hop, ...] = ()
        # Choices run one after another: each reuses the prompt the previous one cached.
        for index, choice in enumerate(prepared):
            generation = await self._generator.open(choice)
            route = route or generation.route
            parts: list[str] = []
            logprobs: list[TokenLogprob] = []
            async for event in self._generator.generate(choice, generation):
                if isinstance(event, TextDelta):
                    parts.append(event.text)
                    logprobs += event.logprobs
                else:
                    finished.append(event)
                    choices.append(
                        Choice(
                            index=index,
                            message=ChatCompletionMessage(content="".join(parts)),
                            finish_reason=event.finish_reason,
                            logprobs=_logprobs(logprobs) if request.logprobs else None,
                        )
                    )
        completion = ChatCompletion(
            id=_completion_id(),
            model=self.model.id,
            choices=choices,
            usage=usage_of(*finished),
            system_fingerprint=SYSTEM_FINGERPRINT,
        )
        return completion, route

    async def stream(
        self,
        request: ChatCompletionRequest,
        prepared: list[GenerationRequest],
        first: Generation,
    ) -> AsyncGenerator[ChatCompletionChunk, None]:
        """Each choice in turn (``first`` is already open): its role, text and finish reason;
        then the usage if asked for."""
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
                model=self.model.id,
                choices=[choice],
                system_fingerprint=SYSTEM_FINGERPRINT,
            )

        finished: list[Finished] = []
        generation: Generation | None = first
        try:
            for index, choice in enumerate(prepared):
                generation = generation or await self._generator.open(choice)
                yield chunk(index, ChoiceDelta(role="assistant", content=""))
                # Closed with the stream, even when its reader stops at a `yield`.
                async with aclosing(self._generator.generate(choice, generation)) as events:
                    async for event in events:
                        if isinstance(event, TextDelta):
                            logprobs = _logprobs(event.logprobs) if request.logprobs else None
                            yield chunk(index, ChoiceDelta(content=event.text), logprobs=logprobs)
                        else:
                            finished.append(event)
                            yield chunk(index, ChoiceDelta(), event.finish_reason)
                generation = None
            if request.include_usage():
                yield ChatCompletionChunk(
                    id=completion_id,
                    created=created,
                    model=self.model.id,
                    choices=[],
                    system_fingerprint=SYSTEM_FINGERPRINT,
                    usage=usage_of(*finished),
                )
        finally:  # also when the client leaves before a generation began
            if generation is not None:
                await self._generator.close(generation)


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


def _refuse_unsupported(request: ChatCompletionRequest) -> None:
    """Say so, rather than silently ignoring what a client asked for."""
    if request.tools:
        raise InvalidRequest(
            "tools are not supported by this model", param="tools", code="unsupported_parameter"
        )
    if request.response_format is not None and request.response_format.type != "text":
        raise InvalidRequest(
            f"response_format {request.response_format.type!r} is not supported by this "
            "model; only 'text' is",
            param="response_format",
            code="unsupported_parameter",
        )


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
