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
from gateway.engine.sampling import SamplingParams, adjust_logits
from gateway.settings import GatewaySettings
from gateway.web.limits import Admission
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


def test_a_request_over_its_keys_cap_waits_for_one_of_its_own_to_finish() -> None:
    async def scenario() -> None:
        admission = Admission(max_active=8, max_waiting=8, max_per_key=1, key_wait_s=5)
        first = await admission.admit("k")
        second = asyncio.create_task(admission.admit("k"))
        await asyncio.sleep(0)
        assert not second.done() and admission.waiting == 1
        other = await admission.admit("other")  # another key is not held up
        first.release()
        (await asyncio.wait_for(second, 1)).release()  # long before its 5 s wait ends
        other.release()
        assert admission.waiting == 0 and admission.in_flight("k") == 0

    asyncio.run(scenario())


def test_a_request_over_its_keys_cap_is_refused_after_its_wait() -> None:
    async def scenario() -> None:
        admission = Admission(max_active=8, max_waiting=8, max_per_key=1, key_wait_s=0.2)
        held = await admission.admit("k")
        started = asyncio.get_running_loop().time()
        with pytest.raises(TooManyRequests, match=r"waited 0\.2 s for one to finish"):
            await asyncio.wait_for(admission.admit("k"), 5)
        assert 0.15 <= asyncio.get_running_loop().time() - started < 2
        assert admission.waiting == 0 and admission.in_flight("k") == 1
        held.release()
        (await asyncio.wait_for(admission.admit("k"), 1)).release()
        assert admission.in_flight("k") == 0

    asyncio.run(scenario())


def test_each_key_may_have_a_cap_of_its_own() -> None:
    async def scenario() -> None:
        admission = Admission(max_active=16, max_waiting=8, max_per_key=16, caps={"small": 2})
        small = [await admission.admit("small") for _ in range(2)]
        with pytest.raises(TooManyRequests, match="2 is the most"):
            await admission.admit("small")
        big = [await admission.admit("big") for _ in range(10)]  # the default cap: 16
        for slot in small + big:
            slot.release()

    asyncio.run(scenario())


def test_a_keys_waiters_are_bounded_by_its_cap_and_count_as_waiting() -> None:
    async def scenario() -> None:
        admission = Admission(
            max_active=8, max_waiting=3, max_per_key=2, caps={"j": 8}, key_wait_s=5
        )
        held = [await admission.admit("k"), await admission.admit("k")]
        waiters = [asyncio.create_task(admission.admit("k")) for _ in range(2)]
        await asyncio.sleep(0)
        assert admission.waiting == 2
        with pytest.raises(TooManyRequests, match="2 more waiting"):
            await admission.admit("k")  # as many wait as may run: no more
        one = await admission.admit("j", generations=2)
        two = await admission.admit("j", generations=2)
        three = await admission.admit("j", generations=2)  # 8 running: the gateway is full
        queued = asyncio.create_task(admission.admit("i"))
        await asyncio.sleep(0)
        with pytest.raises(CapacityExceeded):  # 2 of k's and i's wait: --max-queue is 3
            await admission.admit("h")
        for slot in [*held, one, two, three]:
            slot.release()
        for slot in await asyncio.wait_for(asyncio.gather(*waiters, queued), 1):
            slot.release()
        assert admission.waiting == 0

    asyncio.run(scenario())


def test_a_cancelled_key_waiter_frees_its_place() -> None:
    async def scenario() -> None:
        admission = Admission(max_active=8, max_waiting=8, max_per_key=2, key_wait_s=5)
        held = [await admission.admit("k", generations=2)]
        leaving = asyncio.create_task(admission.admit("k"))
        staying = asyncio.create_task(admission.admit("k"))
        await asyncio.sleep(0)
        assert admission.waiting == 2
        with pytest.raises(TooManyRequests):
            await admission.admit("k")  # as many wait as the key may run
        leaving.cancel()  # its client disconnected while it waited
        with pytest.raises(asyncio.CancelledError):
            await leaving
        assert admission.waiting == 1
        late = asyncio.create_task(admission.admit("k"))  # the place it left is free
        await asyncio.sleep(0)
        assert not late.done() and admission.waiting == 2
        held[0].release()
        held += await asyncio.wait_for(asyncio.gather(staying, late), 1)
        for slot in held:
            slot.release()
        assert admission.waiting == 0 and admission.in_flight("k") == 0

    asyncio.run(scenario())


def test_a_key_waiter_cancelled_as_its_turn_came_gives_the_slot_back() -> None:
    async def scenario() -> None:
        admission = Admission(max_active=2, max_waiting=8, max_per_key=2, key_wait_s=5)
        held = await admission.admit("k", generations=2)
        first = asyncio.create_task(admission.admit("k", generations=2))
        second = asyncio.create_task(admission.admit("k", generations=2))
        await asyncio.sleep(0)
        held.release()  # first gets the key's room and the free slot at once ...
        first.cancel()  # ... as its request leaves: second gets them instead
        with pytest.raises(asyncio.CancelledError):
            await first
        (await asyncio.wait_for(second, 1)).release()
        assert admission.waiting == 0 and admission.in_flight("k") == 0
        (await asyncio.wait_for(admission.admit("k"), 1)).release()

    asyncio.run(scenario())


def test_a_key_waiter_moves_to_the_queue_and_may_leave_it() -> None:
    async def scenario() -> None:
        admission = Admission(max_active=1, max_waiting=8, max_per_key=1, key_wait_s=5)
        held = await admission.admit("k")
        waiter = asyncio.create_task(admission.admit("k"))
        await asyncio.sleep(0)
        blocker = asyncio.create_task(admission.admit("j"))  # queued for the one slot
        await asyncio.sleep(0)
        held.release()  # j takes the slot; k's waiter has room under its cap: it queues
        j = await asyncio.wait_for(blocker, 1)
        await asyncio.sleep(0.3)
        assert not waiter.done() and admission.in_flight("k") == 1  # no longer timed
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert admission.waiting == 0 and admission.in_flight("k") == 0
        j.release()
        (await asyncio.wait_for(admission.admit("k"), 1)).release()

    asyncio.run(scenario())
