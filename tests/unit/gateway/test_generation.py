"""The decode loop's timing against its reader: the swarm computes the next token while the
text of the last one is being streamed, and a reader that leaves stops that computation."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing, asynccontextmanager
from pathlib import Path
from typing import TypeVar

from gateway.app import create_app
from gateway.engine.generation import GenerationRequest, Generator, TextDelta
from gateway.engine.sampling import SamplingParams
from gateway.settings import GatewaySettings
from tests.fakes import LocalSwarmClient

T = TypeVar("T")
PATIENCE_S = 10.0  # far beyond a tiny model's step; only a broken loop waits this long


@asynccontextmanager
async def generator_of(swarm: LocalSwarmClient, model: Path) -> AsyncIterator[Generator]:
    app = create_app(GatewaySettings(model_id="tiny", model_path=model), swarm_client=swarm)
    async with app.router.lifespan_context(app):
        yield app.state.completions._generator


def run(scenario: Callable[[], Awaitable[T]]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(scenario(), PATIENCE_S * 3)

    return asyncio.run(bounded())


def request(tokens: int) -> GenerationRequest:
    greedy = SamplingParams(temperature=0.0)
    return GenerationRequest(prompt_ids=[5, 6, 7, 8], max_new_tokens=tokens, sampling=greedy)


async def hold_the_first_token(swarm: LocalSwarmClient, model: Path, *, stall: bool) -> int:
    """Generate until the first text, then hold it, asking for nothing more, until the
    next step starts (with ``stall``, the swarm never answers it); then leave, which
    closes the generation. How many steps had started when the text came."""
    async with generator_of(swarm, model) as generator:
        wanted = request(8)
        generation = await generator.open(wanted)
        async with aclosing(generator.generate(wanted, generation)) as events:
            async for event in events:
                if isinstance(event, TextDelta):
                    steps = swarm.steps
                    if stall:
                        swarm.gate = asyncio.Event()
                    swarm.step_started.clear()
                    await asyncio.wait_for(swarm.step_started.wait(), PATIENCE_S)
                    return steps
    raise AssertionError("no text came")


def test_the_next_step_is_under_way_while_a_token_is_being_read(tiny_model: Path) -> None:
    swarm = LocalSwarmClient(tiny_model, "tiny")
    before = run(lambda: hold_the_first_token(swarm, tiny_model, stall=False))
    assert swarm.steps == before + 1


def test_a_reader_that_leaves_cancels_the_step_in_flight(tiny_model: Path) -> None:
    swarm = LocalSwarmClient(tiny_model, "tiny")
    run(lambda: hold_the_first_token(swarm, tiny_model, stall=True))
    # Closed: the step waiting on the stalled swarm was cancelled, not left behind.
    assert swarm.cancelled_steps == 1
    assert swarm.closed == 1
