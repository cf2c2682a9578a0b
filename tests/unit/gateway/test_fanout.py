"""Several choices of one request at once: the first leads, the others follow once its
prompt is on the servers, and a failure is the request's, with nothing left running."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from gateway.app import create_app
from gateway.openai.fanout import fan_in
from gateway.settings import GatewaySettings
from protocol.errors import NoRouteError
from tests.fakes import LocalSwarmClient


def test_chat_choices_follow_the_first_one_s_prompt_and_decode_alongside(
    tiny_model: Path,
) -> None:
    swarm = LocalSwarmClient(tiny_model, "tiny")
    seen: list[tuple[int, int]] = []  # (steps so far, sessions open) at each open
    opener = swarm.open_session

    async def open_session(*args: Any, **kwargs: Any) -> Any:
        seen.append((swarm.steps, swarm.opened - swarm.closed))
        return await opener(*args, **kwargs)

    swarm.open_session = open_session  # type: ignore[method-assign]
    settings = GatewaySettings(model_id="tiny", model_path=tiny_model)
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Tell me about the sea."}],
        "max_tokens": 6,
        "temperature": 1.0,
        "seed": 7,
        "n": 3,
    }
    with TestClient(create_app(settings, swarm)) as client:
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        assert [c["index"] for c in r.json()["choices"]] == [0, 1, 2]
        assert seen[0] == (0, 0)
        # The others opened after the first's prompt ran, while it was still open.
        assert all(steps >= 1 and open_now >= 1 for steps, open_now in seen[1:])
        assert swarm.opened == swarm.closed == 3
        registry = client.app.state.metrics.registry  # type: ignore[attr-defined]
        assert registry.get_sample_value("swarmgate_requests_total", {"outcome": "ok"}) == 3


# ---- streamed: fan_in ----


def collect(merged: AsyncGenerator[Any, None]) -> list[Any]:
    async def main() -> list[Any]:
        async with aclosing(merged) as items:
            return [item async for item in items]

    return asyncio.run(asyncio.wait_for(main(), 5))


def test_streamed_choices_interleave_each_in_its_order_after_the_leader_s_prompt() -> None:
    events: list[str] = []

    async def stream(index: int, prompt_done: Callable[[], None]) -> AsyncGenerator[str, None]:
        events.append(f"start {index}")
        for k in range(3):
            if index == 0 and k == 1:
                events.append("prompt 0 done")
                prompt_done()
            await asyncio.sleep(0)  # a step: the others run meanwhile
            yield f"{index}.{k}"

    items = collect(fan_in(stream, 3, lead=True))
    assert sorted(items) == [f"{i}.{k}" for i in range(3) for k in range(3)]
    for i in range(3):  # each choice's items in its own order
        assert [x for x in items if x.startswith(f"{i}.")] == [f"{i}.{k}" for k in range(3)]
    assert items.index("1.0") < items.index("0.2")  # they ran alongside the leader
    assert events.index("prompt 0 done") < events.index("start 1")
    assert collect(fan_in(stream, 0, lead=True)) == []


def test_a_streamed_leader_that_never_reports_its_prompt_does_not_strand_the_others() -> None:
    async def stream(index: int, prompt_done: Callable[[], None]) -> AsyncGenerator[int, None]:
        yield index

    assert sorted(collect(fan_in(stream, 3, lead=True))) == [0, 1, 2]


def test_a_streamed_failure_cancels_the_others_and_is_raised_as_itself() -> None:
    closed: list[int] = []

    async def stream(index: int, prompt_done: Callable[[], None]) -> AsyncGenerator[int, None]:
        prompt_done()
        try:
            yield index
            if index == 1:
                raise NoRouteError("gone")
            await asyncio.sleep(10)
            yield index
        finally:
            closed.append(index)

    with pytest.raises(NoRouteError):
        collect(fan_in(stream, 3, lead=False))
    assert sorted(closed) == [0, 1, 2]


def test_a_reader_that_leaves_stops_every_streamed_choice() -> None:
    closed: list[int] = []

    async def stream(index: int, prompt_done: Callable[[], None]) -> AsyncGenerator[int, None]:
        try:
            for k in range(1000):
                await asyncio.sleep(0)
                yield k
        finally:
            closed.append(index)

    async def main() -> list[Any]:
        async with aclosing(fan_in(stream, 3, lead=False)) as items:
            async for item in items:
                if item == 5:
                    break
        return sorted(closed)

    assert asyncio.run(asyncio.wait_for(main(), 5)) == [0, 1, 2]
