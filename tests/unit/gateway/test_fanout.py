"""Several choices of one request at once: the first leads, the others follow once its
prompt is on the servers, and a failure is the request's, with nothing left running."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from gateway.app import create_app
from gateway.fanout import fan_out
from gateway.settings import GatewaySettings
from protocol.errors import NoRouteError
from tests.fakes import LocalSwarmClient


def test_followers_start_once_the_leader_s_prompt_is_done() -> None:
    events: list[str] = []

    async def run(index: int, prompt_done: Callable[[], None]) -> int:
        events.append(f"start {index}")
        await asyncio.sleep(0)
        if index == 0:
            events.append("prompt 0 done")
            prompt_done()
            await asyncio.sleep(0.01)  # still decoding while the others start
        events.append(f"end {index}")
        return index * 10

    assert asyncio.run(fan_out(run, 3, lead=True)) == [0, 10, 20]
    assert events.index("prompt 0 done") < events.index("start 1")
    assert events.index("start 2") < events.index("end 0")  # they run alongside it

    events.clear()
    assert asyncio.run(fan_out(run, 3, lead=False)) == [0, 10, 20]
    assert events[:3] == ["start 0", "start 1", "start 2"]  # nothing shared to wait for


def test_a_leader_that_ends_without_its_prompt_done_does_not_strand_the_others() -> None:
    async def run(index: int, prompt_done: Callable[[], None]) -> int:
        return index

    assert asyncio.run(asyncio.wait_for(fan_out(run, 3, lead=True), 5)) == [0, 1, 2]
    assert asyncio.run(fan_out(run, 0, lead=True)) == []


def test_the_first_failure_cancels_the_others_and_is_raised_as_itself() -> None:
    cancelled: list[int] = []

    async def run(index: int, prompt_done: Callable[[], None]) -> int:
        prompt_done()
        if index == 1:
            raise NoRouteError("gone")
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.append(index)
            raise
        return index

    with pytest.raises(NoRouteError):
        asyncio.run(asyncio.wait_for(fan_out(run, 3, lead=True), 5))
    assert sorted(cancelled) == [0, 2]


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
