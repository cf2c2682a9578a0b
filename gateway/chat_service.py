"""OpenAI chat completions on top of the decode loop; knows nothing about HTTP."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from gateway.generation import Finished, Generation, GenerationRequest, Generator, TextDelta
from gateway.sampling import SamplingParams
from gateway.templating import PromptBuilder
from protocol.errors import ContextLengthExceeded, InvalidRequest, ModelNotFound
from protocol.openai import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionMessage,
    ChatCompletionRequest,
    Choice,
    ChoiceDelta,
    ChunkChoice,
    CompletionUsage,
    FinishReason,
    PromptTokensDetails,
)

SYSTEM_FINGERPRINT = "swarmgate-v1"


@dataclass(frozen=True)
class ServedModel:
    id: str
    max_length: int  # the model's context window in tokens
    vocab_size: int
    created: int


class ChatService:
    def __init__(self, model: ServedModel, prompts: PromptBuilder, generator: Generator) -> None:
        self.model = model
        self._prompts = prompts
        self._generator = generator

    def prepare(
        self, request: ChatCompletionRequest, session_key: str | None = None
    ) -> GenerationRequest:
        """Validate a request against the model and turn it into prompt tokens."""
        if request.model != self.model.id:
            raise ModelNotFound(
                f"the model {request.model!r} does not exist; this gateway serves {self.model.id!r}"
            )
        _refuse_unsupported(request)
        prompt = self._prompts.chat_prompt(request.messages)
        room = self.model.max_length - len(prompt)
        limit = request.token_limit()
        if room <= 0 or (limit is not None and limit > room):
            raise ContextLengthExceeded(
                f"this model's maximum context length is {self.model.max_length} tokens; the "
                f"messages use {len(prompt)} and {limit or 1} more were requested",
                param="messages",
            )
        sampling = SamplingParams(
            temperature=1.0 if request.temperature is None else request.temperature,
            top_p=1.0 if request.top_p is None else request.top_p,
            seed=request.seed,
            presence_penalty=request.presence_penalty or 0.0,
            frequency_penalty=request.frequency_penalty or 0.0,
            logit_bias=self._logit_bias(request.logit_bias),
        )
        return GenerationRequest(
            prompt,
            limit or room,
            sampling,
            request.stop_sequences(),
            session_key=request.prompt_cache_key or session_key or request.user,
        )

    def _logit_bias(self, bias: dict[str, float] | None) -> dict[int, float]:
        parsed = {int(token): value for token, value in (bias or {}).items()}
        for token in parsed:
            if token >= self.model.vocab_size:
                raise InvalidRequest(
                    f"logit_bias: token {token} is outside the vocabulary of "
                    f"{self.model.vocab_size} tokens",
                    param="logit_bias",
                )
        return parsed

    async def complete(
        self, request: ChatCompletionRequest, session_key: str | None = None
    ) -> ChatCompletion:
        prepared = self.prepare(request, session_key)
        generation = await self._generator.open(prepared)
        parts: list[str] = []
        async for event in self._generator.generate(prepared, generation):
            if isinstance(event, TextDelta):
                parts.append(event.text)
            else:
                finished = event
        return ChatCompletion(
            id=_completion_id(),
            model=self.model.id,
            choices=[
                Choice(
                    message=ChatCompletionMessage(content="".join(parts)),
                    finish_reason=finished.finish_reason,
                )
            ],
            usage=_usage(finished),
            system_fingerprint=SYSTEM_FINGERPRINT,
        )

    async def open(self, prepared: GenerationRequest) -> Generation:
        return await self._generator.open(prepared)

    async def stream(
        self,
        request: ChatCompletionRequest,
        prepared: GenerationRequest,
        generation: Generation,
    ) -> AsyncIterator[ChatCompletionChunk]:
        """Chunks of a prepared request: role first, then text, then the finish reason."""
        completion_id, created = _completion_id(), int(time.time())

        def chunk(delta: ChoiceDelta, finish: FinishReason | None = None) -> ChatCompletionChunk:
            return ChatCompletionChunk(
                id=completion_id,
                created=created,
                model=self.model.id,
                choices=[ChunkChoice(delta=delta, finish_reason=finish)],
                system_fingerprint=SYSTEM_FINGERPRINT,
            )

        try:
            yield chunk(ChoiceDelta(role="assistant", content=""))
            async for event in self._generator.generate(prepared, generation):
                if isinstance(event, TextDelta):
                    yield chunk(ChoiceDelta(content=event.text))
                    continue
                yield chunk(ChoiceDelta(), event.finish_reason)
                if request.stream_options is not None and request.stream_options.include_usage:
                    yield ChatCompletionChunk(
                        id=completion_id,
                        created=created,
                        model=self.model.id,
                        choices=[],
                        system_fingerprint=SYSTEM_FINGERPRINT,
                        usage=_usage(event),
                    )
        finally:  # also when the client leaves before generation began
            await self._generator.close(generation)


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
    if request.logprobs or request.top_logprobs:
        raise InvalidRequest(
            "logprobs are not supported yet", param="logprobs", code="unsupported_parameter"
        )


def _completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def _usage(finished: Finished) -> CompletionUsage:
    return CompletionUsage(
        prompt_tokens=finished.prompt_tokens,
        completion_tokens=finished.completion_tokens,
        total_tokens=finished.prompt_tokens + finished.completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=finished.cached_tokens),
    )
