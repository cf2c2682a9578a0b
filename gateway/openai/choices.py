"""One lifecycle for the choices of a request, chat's and completions' alike.

The first choice's generation is opened before the response starts (so that a missing
route is an HTTP status, not a broken stream). The others open near its route, once its
prompt is on the servers (``fan_in``'s lead), and their chunks interleave as they come.
Every generation is closed however the request ends: finished, failed, or cancelled when
its client leaves, before or while its generation runs.

A service's ``stream`` renders each choice's events as its chunks; its ``complete`` collects
those same chunks into one response, so each service has one generation path.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable, Sequence
from contextlib import aclosing
from typing import TypeVar

from gateway.engine.generation import Finished, Generation, GenerationRequest, Generator
from gateway.openai.answers import CompletionUsage, PromptTokensDetails
from gateway.openai.fanout import fan_in

T = TypeVar("T")

SYSTEM_FINGERPRINT = "swarmgate-v1"

# The chunks of choice ``index`` from its open generation; calls ``prompt_done`` (the
# third argument) once its prompt's forward has returned.
ChoiceChunks = Callable[[int, Generation, Callable[[], None]], AsyncGenerator[T, None]]


async def choices(
    generator: Generator,
    requests: Sequence[GenerationRequest],
    first: Generation,
    chunks: ChoiceChunks[T],
    *,
    lead: bool,
) -> AsyncGenerator[T, None]:
    """Every choice's chunks as they come, each choice's in order (``first``, the first
    choice's generation, is already open). With ``lead``, the others start once the first's
    prompt is on the servers, from a copy of its cache."""

    async def run(index: int, prompt_done: Callable[[], None]) -> AsyncGenerator[T, None]:
        generation = first if index == 0 else None
        try:
            generation = generation or await generator.open(requests[index], near=first.route)
            # Closed with the stream, even when its reader stops at a `yield`.
            async with aclosing(chunks(index, generation, prompt_done)) as made:
                async for chunk in made:
                    yield chunk
        finally:  # also when the client leaves before its generation began
            if generation is not None:
                await generator.close(generation)

    try:
        async with aclosing(fan_in(run, len(requests), lead=lead)) as merged:
            async for chunk in merged:
                yield chunk
    finally:  # the first choice's, when the stream ended before it began
        await generator.close(first)


async def collected(
    generator: Generator, first: Generation, stream: AsyncGenerator[T, None]
) -> list[T]:
    """All of a stream's chunks, for a response sent whole. ``first`` is closed however
    this ends, even when it is cancelled before the stream began (a stream that never
    started runs none of its own cleanup)."""
    try:
        async with aclosing(stream) as chunks:
            return [chunk async for chunk in chunks]
    finally:
        await generator.close(first)


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
