"""Request limits and parameters the gateway applies or refuses out loud."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from starlette.testclient import TestClient

from gateway.app import create_app
from gateway.limits import Admission
from gateway.sampling import SamplingParams, adjust_logits
from gateway.settings import GatewaySettings
from protocol.errors import CapacityExceeded, TooManyRequests
from tests.fakes import LocalSwarmClient

MODEL_ID = "tiny"
CHAT = {"model": MODEL_ID, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 5}


@pytest.fixture
def client(tiny_model: Path) -> Iterator[TestClient]:
    settings = GatewaySettings(model_id=MODEL_ID, model_path=tiny_model, max_body_bytes=200_000)
    app = create_app(settings, swarm_client=LocalSwarmClient(tiny_model, MODEL_ID))
    with TestClient(app) as c:
        yield c


def test_penalties_and_bias_adjust_logits() -> None:
    logits = torch.zeros(5)
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25, logit_bias={4: 3.0})
    adjusted = adjust_logits(logits, params, Counter({1: 2, 2: 1}))
    assert adjusted.tolist() == [0.0, -1.0, -0.75, 0.0, 3.0]
    assert logits.tolist() == [0.0] * 5  # the caller's logits are left alone


def test_logit_bias_steers_greedy_decoding(client: TestClient) -> None:
    body = {**CHAT, "temperature": 0, "logit_bias": {"42": 100}}
    r = client.post("/v1/chat/completions", json=body).json()
    tokenizer = client.app.state.chat._prompts.tokenizer  # type: ignore[attr-defined]
    assert r["choices"][0]["message"]["content"] == tokenizer.decode([42] * 5)
    assert r["usage"]["completion_tokens"] == 5


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": []},
                }
            },
            "response_format",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "x"}},
                }
            },
            "response_format",
        ),
        ({"logit_bias": {"99999999": 1}}, "logit_bias"),
        ({"logit_bias": {"5": 101}}, "logit_bias"),
        ({"logit_bias": {str(t): 1 for t in range(301)}}, "logit_bias"),
        ({"messages": [{"role": "user", "content": "x"}] * 2049}, "messages"),
    ],
)
def test_unsupported_or_invalid_parameters_are_400_not_ignored(
    client: TestClient, extra: dict, param: str
) -> None:
    r = client.post("/v1/chat/completions", json={**CHAT, **extra})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"].startswith(param)


def test_text_response_format_and_unknown_fields_are_accepted(client: TestClient) -> None:
    body = {**CHAT, "response_format": {"type": "text"}, "some_future_field": 1}
    assert client.post("/v1/chat/completions", json=body).status_code == 200


def test_oversized_bodies_are_413(client: TestClient) -> None:
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * 300_000}]}
    r = client.post("/v1/chat/completions", json=big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        yield b'{"model": "tiny", "messages": [{"role": "user", "content": "'
        for _ in range(400):
            yield b"y" * 1000
        yield b'"}]}'

    r = client.post(
        "/v1/chat/completions", content=chunks(), headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 413
    assert client.post("/v1/chat/completions", json=CHAT).status_code == 200


def test_admission_queues_then_refuses() -> None:
    async def scenario() -> None:
        admission = Admission(max_active=1, max_waiting=1)
        running = await admission.admit("a")
        waiter = asyncio.create_task(admission.admit("b"))
        await asyncio.sleep(0)  # let it start waiting
        with pytest.raises(CapacityExceeded):
            await admission.admit("c")
        running.release()
        running.release()  # idempotent: frees one slot, once
        second = await asyncio.wait_for(waiter, 1)
        second.release()
        await asyncio.wait_for(admission.admit("c"), 1)

    asyncio.run(scenario())


def test_one_key_may_hold_only_its_share_of_the_slots() -> None:
    async def scenario() -> None:
        admission = Admission(max_active=8, max_waiting=8, max_per_key=2)
        held = [await admission.admit("greedy"), await admission.admit("greedy")]
        with pytest.raises(TooManyRequests):
            await admission.admit("greedy")
        other = await admission.admit("modest")  # other keys still get in
        held.pop().release()
        held.append(await admission.admit("greedy"))
        for slot in [*held, other]:
            slot.release()
        assert admission.in_flight("greedy") == admission.in_flight("modest") == 0

    asyncio.run(scenario())


def test_a_key_waiting_in_the_queue_counts_against_its_share() -> None:
    async def scenario() -> None:
        admission = Admission(max_active=1, max_waiting=4, max_per_key=2)
        running = await admission.admit("k")
        queued = asyncio.create_task(admission.admit("k"))
        await asyncio.sleep(0)
        with pytest.raises(TooManyRequests):
            await admission.admit("k")
        queued.cancel()  # a client that leaves the queue gives its place back
        with pytest.raises(asyncio.CancelledError):
            await queued
        assert admission.in_flight("k") == 1
        running.release()

    asyncio.run(scenario())


def test_a_request_holds_as_many_slots_as_generations_it_runs() -> None:
    async def scenario() -> None:
        admission = Admission(max_active=4, max_waiting=4)
        three = await admission.admit("a", generations=3)
        one = await admission.admit("b")  # the fourth slot
        waiting = asyncio.create_task(admission.admit("c", generations=2))
        later = asyncio.create_task(admission.admit("d"))  # fits one slot, but comes second
        await asyncio.sleep(0)
        assert admission.waiting == 2
        one.release()  # one slot free: c needs two, and d may not overtake it
        await asyncio.sleep(0)
        assert not waiting.done() and not later.done()
        three.release()
        c = await asyncio.wait_for(waiting, 1)
        d = await asyncio.wait_for(later, 1)
        # Past the gateway's limit, a request takes all of it (it runs, alone).
        everything = asyncio.create_task(admission.admit("e", generations=9))
        await asyncio.sleep(0)
        assert not everything.done()
        c.release()
        d.release()
        (await asyncio.wait_for(everything, 1)).release()

    asyncio.run(scenario())


def test_a_key_s_share_counts_generations() -> None:
    async def scenario() -> None:
        admission = Admission(max_active=16, max_waiting=8, max_per_key=4)
        three = await admission.admit("k", generations=3)
        with pytest.raises(TooManyRequests):
            await admission.admit("k", generations=2)
        one = await admission.admit("k")
        three.release()
        one.release()
        wide = await admission.admit("k", generations=8)  # more than its share: all of it
        assert admission.in_flight("k") == 4
        with pytest.raises(TooManyRequests):
            await admission.admit("k")
        wide.release()
        assert admission.in_flight("k") == 0

    asyncio.run(scenario())


def test_a_waiter_cancelled_as_it_got_its_turn_gives_the_slots_back() -> None:
    async def scenario() -> None:
        admission = Admission(max_active=2, max_waiting=4)
        running = await admission.admit("a", generations=2)
        first = asyncio.create_task(admission.admit("b", generations=2))
        second = asyncio.create_task(admission.admit("c", generations=2))
        await asyncio.sleep(0)
        running.release()  # b's turn is granted ...
        first.cancel()  # ... as its request leaves: c gets the slots instead
        with pytest.raises(asyncio.CancelledError):
            await first
        (await asyncio.wait_for(second, 1)).release()
        assert admission.waiting == 0 and admission.in_flight("b") == 0

    asyncio.run(scenario())
