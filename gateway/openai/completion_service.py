"""OpenAI text completions (`/v1/completions`) on top of the decode loop; no HTTP here."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass, replace

from transformers import PreTrainedTokenizerBase

from gateway.engine.generation import (
    Finished,
    Generation,
    GenerationRequest,
    Generator,
    PromptLogprobs,
    TextDelta,
    TokenLogprob,
)
from gateway.openai.chat_service import SYSTEM_FINGERPRINT, usage_of
from gateway.openai.fanout import fan_in, fan_out
from gateway.openai.models import (
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionUsage,
)
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
        session_key: str | None = None,
        *,
        received_at: float | None = None,
        tenant: str = "",
    ) -> list[PreparedPrompt]:
        """A checked request as one generation per prompt, tokenized on a thread."""
        return await asyncio.to_thread(self._prepare, request, session_key, received_at, tenant)

    def _prepare(
        self,
        request: CompletionRequest,
        session_key: str | None,
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
                session_key=session_key,
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

    async def open(self, prepared: PreparedPrompt) -> Generation:
        return await self._generator.open(prepared.generation)

    async def close(self, generation: Generation) -> None:
        await self._generator.close(generation)

    async def complete(
        self, request: CompletionRequest, prepared: list[PreparedPrompt]
    ) -> tuple[Completion, tuple[Hop, ...]]:
        """The whole completion, and the route its first prompt was generated on.

        Its prompts generate at once (gateway/openai/fanout.py): a list of prompts is how
        evaluation harnesses batch. The first leads, the others start once its prompt is
        on the servers, so a few-shot prefix they share is computed once; prompts scored
        whole (echo with logprobs) reuse nothing and all start at once."""
        lead: list[tuple[Hop, ...]] = []  # the first prompt's route, once open

        async def run(index: int, prompt_done: Callable[[], None]) -> _Outcome:
            prompt = prepared[index]
            generation = await self._generator.open(prompt.generation, near=lead[0] if lead else ())
            if index == 0:
                lead.append(generation.route)
            return await self._choice(request, index, prompt, generation, prompt_done)

        scoring = any(p.generation.prompt_logprobs is not None for p in prepared)
        outcomes = await fan_out(run, len(prepared), lead=not scoring)
        completion = Completion(
            id=_completion_id(),
            model=request.model,
            choices=[choice for choice, _ in outcomes],
            system_fingerprint=SYSTEM_FINGERPRINT,
            usage=_total_usage([finished for _, finished in outcomes]),
        )
        return completion, lead[0] if lead else ()

    async def _choice(
        self,
        request: CompletionRequest,
        index: int,
        prompt: PreparedPrompt,
        generation: Generation,
        prompt_done: Callable[[], None],
    ) -> _Outcome:
        outcome: _Outcome | None = None
        try:
            parts = [prompt.text] if request.echo else []
            offsets = _Offsets(len(prompt.text) if request.echo else 0)
            events = self._generator.generate(
                prompt.generation, generation, prompt_done=prompt_done
            )
            async with aclosing(events):
                async for event in events:
                    if isinstance(event, PromptLogprobs):
                        first = self._first_token(prompt)
                        offsets.add_prompt(first, event.logprobs, prompt.text)
                    elif isinstance(event, TextDelta):
                        parts.append(event.text)
                        offsets.add(event.logprobs)
                    else:
                        choice = CompletionChoice(
                            index=index,
                            text="".join(parts),
                            finish_reason=event.finish_reason,
                            logprobs=offsets.all if request.logprobs is not None else None,
                        )
                        outcome = choice, event  # read on to the end: leaving early cancels it
        finally:  # also when cancelled before its generation began
            await self._generator.close(generation)
        if outcome is None:
            raise RuntimeError("the generation ended without finishing")  # it always does
        return outcome

    async def stream(
        self,
        request: CompletionRequest,
        prepared: list[PreparedPrompt],
        first: Generation,
    ) -> AsyncGenerator[Completion, None]:
        """Chunks of each prompt's choice (``first`` is already open), then usage. The
        prompts generate at once, as in ``complete``; their chunks interleave as they come,
        each with its choice's index."""
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
            index: int, prompt_done: Callable[[], None]
        ) -> AsyncGenerator[Completion, None]:
            prompt = prepared[index]
            generation = first if index == 0 else None
            try:
                generation = generation or await self._generator.open(
                    prompt.generation, near=first.route
                )
                offsets = _Offsets(len(prompt.text) if request.echo else 0)
                if request.echo and prompt.generation.prompt_logprobs is None:
                    yield chunk(index, prompt.text)
                # Closed with the stream, even when its reader stops at a `yield`.
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
            finally:  # also when the client leaves before its generation began
                if generation is not None:
                    await self._generator.close(generation)

        scoring = any(p.generation.prompt_logprobs is not None for p in prepared)
        try:
            async with aclosing(fan_in(chunks, len(prepared), lead=not scoring)) as merged:
                async for made in merged:
                    yield made
            if request.include_usage():
                yield Completion(
                    id=completion_id,
                    created=created,
                    model=request.model,
                    choices=[],
                    system_fingerprint=SYSTEM_FINGERPRINT,
                    usage=_total_usage(finished),
                )
        finally:  # the first prompt's, when the stream ended before it began
            await self._generator.close(first)


_Outcome = tuple[CompletionChoice, Finished]


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
