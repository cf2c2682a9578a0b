"""OpenAI chat completions on top of the decode loop; knows nothing about HTTP."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

from gateway.generation import Finished, Generation, GenerationRequest, Generator, TextDelta
from gateway.prepare import ServedModel, check_model, generation_request
from gateway.templating import PromptBuilder
from protocol.errors import InvalidRequest
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


class ChatService:
    def __init__(self, model: ServedModel, prompts: PromptBuilder, generator: Generator) -> None:
        self.model = model
        self._prompts = prompts
        self._generator = generator

    def prepare(
        self, request: ChatCompletionRequest, session_key: str | None = None
    ) -> GenerationRequest:
        """Validate a request against the model and turn it into prompt tokens."""
        check_model(self.model, request.model)
        _refuse_unsupported(request)
        prompt = self._prompts.chat_prompt(request.messages)
        key = request.prompt_cache_key or session_key or request.user
        return generation_request(self.model, prompt, request, session_key=key, param="messages")

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
            usage=usage_of(finished),
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
                if request.include_usage():
                    yield ChatCompletionChunk(
                        id=completion_id,
                        created=created,
                        model=self.model.id,
                        choices=[],
                        system_fingerprint=SYSTEM_FINGERPRINT,
                        usage=usage_of(event),
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


def usage_of(finished: Finished) -> CompletionUsage:
    return CompletionUsage(
        prompt_tokens=finished.prompt_tokens,
        completion_tokens=finished.completion_tokens,
        total_tokens=finished.prompt_tokens + finished.completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=finished.cached_tokens),
    )
