"""OpenAI text completions (`/v1/completions`) on top of the decode loop; no HTTP here."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass, replace

from transformers import PreTrainedTokenizerBase

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
from gateway.openai.answers import Completion, CompletionChoice, CompletionLogprobs, CompletionUsage
from gateway.openai.choices import SYSTEM_FINGERPRINT, choices, collected, usage_of
from gateway.openai.models import CompletionRequest
from gateway.openai.prepare import (
    RequestLimits,
    ServedModel,
    check_token_ids,
    generation_request,
    requested_adapter,
)
from protocol.errors import InvalidRequest
from routing.planner import Hop

MAX_PROMPTS = 16  # choices one request may ask for


@dataclass(frozen=True)
class PreparedPrompt:
    generation: GenerationRequest
    text: str  # the prompt as text, for `echo`


class CompletionService:
    def __init__(
        self,
        model: ServedModel,
        tokenizer: PreTrainedTokenizerBase,
        generator: Generator,
        limits: RequestLimits | None = None,
    ) -> None:
        self.model = model
        self._tokenizer = tokenizer
        self._generator = generator
        self._limits = limits or RequestLimits()

    def check(self, request: CompletionRequest) -> None:
        """Refusals that need no tokenizer, made before the request waits for a slot."""
        requested_adapter(self.model, request.model)
        if request.suffix:
            raise InvalidRequest(
                "suffix is not supported by this model",
                param="suffix",
                code="unsupported_parameter",
            )
        if len(request.prompts()) > MAX_PROMPTS:
            raise InvalidRequest(f"at most {MAX_PROMPTS} prompts per request", param="prompt")

    def generations(self, request: CompletionRequest) -> int:
        """How many generations the request runs at once: one per prompt."""
        return len(request.prompts())

    async def prepare(
        self,
        request: CompletionRequest,
        conversation_key: str | None = None,
        *,
        received_at: float | None = None,
        tenant: str = "",
    ) -> list[PreparedPrompt]:
        """A checked request as one generation per prompt, tokenized on a thread."""
        return await asyncio.to_thread(
            self._prepare, request, conversation_key, received_at, tenant
        )

    def _prepare(
        self,
        request: CompletionRequest,
        conversation_key: str | None,
        received_at: float | None,
        tenant: str,
    ) -> list[PreparedPrompt]:
        prepared = []
        for prompt in request.prompts():
            if isinstance(prompt, str):
                ids = list(self._tokenizer(prompt)["input_ids"])
                text = prompt
            else:
                check_token_ids(self.model, prompt, "prompt")
                ids, text = prompt, str(self._tokenizer.decode(prompt))
            generation = generation_request(
                self.model,
                ids or self._start(),
                request,
                conversation_key=conversation_key,
                param="prompt",
                limits=self._limits,
                received_at=received_at,
                tenant=tenant,
            )
            if request.logprobs is not None:
                generation = replace(generation, logprobs=request.logprobs)
                if request.echo and ids:  # the BOS start of an empty prompt is not echoed
                    generation = replace(generation, prompt_logprobs=request.logprobs)
            prepared.append(PreparedPrompt(generation, text))
        return prepared

    def _start(self) -> list[int]:
        """What an empty prompt generates from: the BOS token, as `transformers` `generate`
        starts without input ids. Its text stays out of `echo`, its token stays in usage."""
        bos = self._tokenizer.bos_token_id
        if bos is None:
            raise InvalidRequest(
                "the prompt is empty, and this model's tokenizer has no BOS token to start from",
                param="prompt",
            )
        return [int(bos)]

    def _first_token(self, prompt: PreparedPrompt) -> str:
        """The prompt's first token as text: the one token that gets no logprob."""
        first = prompt.generation.prompt_ids[0]
        return str(self._tokenizer.decode([first], skip_special_tokens=False))

    async def open(self, prepared: list[PreparedPrompt]) -> Generation:
        """The first prompt's generation."""
        return await self._generator.open(prepared[0].generation)

    async def close(self, generation: Generation) -> None:
        await self._generator.close(generation)

    async def complete(
        self, request: CompletionRequest, prepared: list[PreparedPrompt]
    ) -> tuple[Completion, tuple[Hop, ...]]:
        """The whole completion, collected from its stream, and the route its first prompt
        was generated on."""
        first = await self.open(prepared)
        stream = self._chunks(request, prepared, first, usage=True)
        chunks = await collected(self._generator, first, stream)
        return _completion(request, chunks), first.route

    def stream(
        self, request: CompletionRequest, prepared: list[PreparedPrompt], first: Generation
    ) -> AsyncGenerator[Completion, None]:
        """Chunks of each prompt's choice (``first`` is already open), then usage.

        Its prompts generate at once (gateway/openai/choices.py): a list of prompts is how
        evaluation harnesses batch. The first leads, the others start once its prompt is
        on the servers, so a few-shot prefix they share is computed once; prompts scored
        whole (echo with logprobs) reuse nothing and all start at once. Their chunks
        interleave as they come, each with its choice's index."""
        return self._chunks(request, prepared, first, usage=request.include_usage())

    async def _chunks(
        self,
        request: CompletionRequest,
        prepared: list[PreparedPrompt],
        first: Generation,
        *,
        usage: bool,
    ) -> AsyncGenerator[Completion, None]:
        completion_id, created = _completion_id(), int(time.time())

        def chunk(
            index: int,
            text: str,
            finish: Finished | None = None,
            logprobs: CompletionLogprobs | None = None,
        ) -> Completion:
            choice = CompletionChoice(
                index=index,
                text=text,
                finish_reason=finish.finish_reason if finish else None,
                logprobs=logprobs,
            )
            return Completion(
                id=completion_id,
                created=created,
                model=request.model,
                choices=[choice],
                system_fingerprint=SYSTEM_FINGERPRINT,
            )

        finished: list[Finished] = []

        async def chunks(
            index: int, generation: Generation, prompt_done: Callable[[], None]
        ) -> AsyncGenerator[Completion, None]:
            prompt = prepared[index]
            offsets = _Offsets(len(prompt.text) if request.echo else 0)
            if request.echo and prompt.generation.prompt_logprobs is None:
                yield chunk(index, prompt.text)
            events = self._generator.generate(
                prompt.generation, generation, prompt_done=prompt_done
            )
            async with aclosing(events):
                async for event in events:
                    if isinstance(event, PromptLogprobs):  # the echo, with its logprobs
                        first_token = self._first_token(prompt)
                        scored = offsets.add_prompt(first_token, event.logprobs, prompt.text)
                        yield chunk(index, prompt.text, logprobs=scored)
                    elif isinstance(event, TextDelta):
                        logprobs = offsets.add(event.logprobs)
                        yield chunk(
                            index,
                            event.text,
                            logprobs=logprobs if request.logprobs is not None else None,
                        )
                    else:
                        finished.append(event)
                        yield chunk(index, "", event)

        requests = [p.generation for p in prepared]
        scoring = any(r.prompt_logprobs is not None for r in requests)
        merged = choices(self._generator, requests, first, chunks, lead=not scoring)
        async with aclosing(merged):
            async for made in merged:
                yield made
        if usage:
            yield Completion(
                id=completion_id,
                created=created,
                model=request.model,
                choices=[],
                system_fingerprint=SYSTEM_FINGERPRINT,
                usage=_total_usage(finished),
            )


def _completion(request: CompletionRequest, chunks: list[Completion]) -> Completion:
    """The completion that a stream's chunks add up to: each choice's text, its logprobs
    (the chunks' parts, end to end) and finish reason, and the usage."""
    texts: dict[int, list[str]] = {}
    logprobs: dict[int, CompletionLogprobs] = {}
    reasons: dict[int, FinishReason] = {}
    usage = None
    for made in chunks:
        usage = made.usage or usage
        for part in made.choices:
            i = part.index
            texts.setdefault(i, []).append(part.text)
            if part.logprobs is not None:
                whole = logprobs.setdefault(i, CompletionLogprobs())
                for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                    getattr(whole, name).extend(getattr(part.logprobs, name))
            if part.finish_reason is not None:
                reasons[i] = part.finish_reason
    if usage is None:
        raise RuntimeError("the stream ended without its usage")  # it always has it
    wanted = request.logprobs is not None
    return Completion(
        id=_completion_id(),
        model=request.model,
        choices=[
            CompletionChoice(
                index=i,
                text="".join(texts.get(i, [])),
                finish_reason=reasons[i],
                logprobs=logprobs.get(i, CompletionLogprobs()) if wanted else None,
            )
            for i in sorted(reasons)
        ],
        system_fingerprint=SYSTEM_FINGERPRINT,
        usage=usage,
    )


class _Offsets:
    """Builds the legacy logprobs lists, tracking where each token starts in the text."""

    def __init__(self, start: int) -> None:
        self._offset = start
        self.all = CompletionLogprobs()

    def add_prompt(
        self, first: str, scored: Sequence[TokenLogprob], text: str
    ) -> CompletionLogprobs:
        """The echoed prompt's tokens, from the start of the text: ``first`` has no logprob
        (nothing comes before it), as at OpenAI; ``scored`` are the rest. The generated
        tokens then start after ``text``, whatever the prompt tokens' own texts add up to
        (a tokenizer may add a BOS token that the text does not have)."""
        self._offset = 0
        part = self.add([TokenLogprob(first, 0.0), *scored])
        first_at = len(self.all.tokens) - len(part.tokens)
        for logprobs, at in ((part, 0), (self.all, first_at)):
            logprobs.token_logprobs[at] = None
            assert logprobs.top_logprobs is not None  # add() fills them
            logprobs.top_logprobs[at] = None
        self._offset = len(text)
        return part

    def add(self, tokens: Sequence[TokenLogprob]) -> CompletionLogprobs:
        """Appends ``tokens`` and returns just their part, for one stream chunk."""
        part = CompletionLogprobs(
            tokens=[t.token for t in tokens],
            token_logprobs=[t.logprob for t in tokens],
            top_logprobs=[dict(t.top) for t in tokens],
            text_offset=[],
        )
        for t in tokens:
            part.text_offset.append(self._offset)
            self._offset += len(t.token)
        for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
            getattr(self.all, name).extend(getattr(part, name))
        return part


def _completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


def _total_usage(finished: list[Finished]) -> CompletionUsage:
    return usage_of(
        Finished(
            "stop",
            prompt_tokens=sum(f.prompt_tokens for f in finished),
            completion_tokens=sum(f.completion_tokens for f in finished),
            cached_tokens=sum(f.cached_tokens for f in finished),
        )
    )
