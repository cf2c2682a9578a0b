"""The head thread: LM head rows batched across streams, each stream sampling in its own row.

Batches are forced without sleeps: a gate in the LM head holds the thread inside a lone
call while the others queue behind it; releasing it runs everything queued as one job.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import torch

from gateway.app import create_app
from gateway.engine import greedy_head
from gateway.engine import head as head_module
from gateway.engine.batching import BatcherClosed
from gateway.engine.grammar import GrammarError
from gateway.engine.greedy_head import GreedyScreen
from gateway.engine.head import Decoded, HeadRunner, batch_logits
from gateway.engine.sampling import SamplingParams, StreamSampler, TokenChoice
from gateway.metrics import GatewayMetrics
from gateway.settings import GatewaySettings
from models.loading import Head, load_head
from tests.fakes import LocalSwarmClient

T = TypeVar("T")
HIDDEN = 64  # tests/tiny_model.py


class GatedLinear(torch.nn.Module):
    """The LM head, recording the rows of each call. While the gate is closed, each call
    waits inside for a pass (``entered`` counts the arrivals); a call of ``fail_rows``
    rows raises."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.rows: list[int] = []
        self.entered = threading.Semaphore(0)
        self.fail_rows: int | None = None
        self._passes: threading.Semaphore | None = None  # None: open

    def close_gate(self) -> None:
        self.entered = threading.Semaphore(0)
        self._passes = threading.Semaphore(0)

    def let_through(self, calls: int = 1) -> None:
        assert self._passes is not None
        self._passes.release(calls)

    def open_gate(self) -> None:
        passes, self._passes = self._passes, None
        if passes is not None:
            passes.release(1000)

    async def arrival(self) -> None:
        assert await asyncio.to_thread(self.entered.acquire, True, 30), "no call arrived"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.rows.append(x.shape[0])
        passes = self._passes
        self.entered.release()
        if passes is not None and not passes.acquire(timeout=30):
            raise TimeoutError("the test never let this call through")
        if x.shape[0] == self.fail_rows:
            raise RuntimeError("LM head failed")
        out: torch.Tensor = self.inner(x)
        return out


@pytest.fixture(scope="module")
def head(tiny_model: Path) -> Head:
    return load_head(tiny_model)


@pytest.fixture
def gated(head: Head) -> GatedLinear:
    return GatedLinear(head.lm_head)


@pytest.fixture
def runner(head: Head, gated: GatedLinear) -> Iterator[HeadRunner]:
    runner = HeadRunner(dataclasses.replace(head, lm_head=gated))
    yield runner
    gated.open_gate()
    runner.close()


def hidden(seed: int, n: int = 1) -> torch.Tensor:
    return torch.randn(1, n, HIDDEN, generator=torch.Generator().manual_seed(seed))


def unbatched_logits(head: Head, h: torch.Tensor) -> torch.Tensor:
    """What the gateway computed before batching: one stream, one LM head call."""
    with torch.inference_mode():
        out: torch.Tensor = head.lm_head(head.norm(h[:, -1].float()))[0]
        return out


def run(scenario: Callable[[], Coroutine[Any, Any, T]]) -> T:
    return asyncio.run(asyncio.wait_for(scenario(), timeout=60))


async def hold(runner: HeadRunner, gated: GatedLinear) -> asyncio.Task[torch.Tensor]:
    """Occupies the thread with a lone call, held inside the LM head until let through."""
    gated.close_gate()
    held = asyncio.create_task(runner.logits(hidden(999)))
    await gated.arrival()
    return held


async def queue(runner: HeadRunner, calls: list[Awaitable[T]]) -> list[asyncio.Task[T]]:
    """Starts ``calls`` and returns once every one of them waits in the queue."""
    tasks = [asyncio.ensure_future(call) for call in calls]
    for _ in range(1000):
        if runner.waiting >= len(calls):
            return tasks
        await asyncio.sleep(0)  # lets the tasks run up to their queueing, no time passes
    raise AssertionError(f"only {runner.waiting} of {len(calls)} calls queued")


# ---- batched rows are the rows of one-stream calls ----


def test_batched_logits_match_one_row_at_a_time(head: Head) -> None:
    rows = [hidden(seed, n) for seed, n in enumerate([1, 1, 7, 1, 3, 1, 1, 12])]
    batched = batch_logits(head, rows)
    assert batched.shape == (len(rows), head.config.vocab_size)
    for h, row in zip(rows, batched, strict=True):
        alone = unbatched_logits(head, h)
        torch.testing.assert_close(row, alone, rtol=0, atol=1e-5)
        assert int(row.argmax()) == int(alone.argmax())


def test_a_lone_call_is_exactly_todays_computation(head: Head) -> None:
    h = hidden(0, 5)
    assert torch.equal(batch_logits(head, [h])[0], unbatched_logits(head, h))


def test_concurrent_callers_end_up_in_one_batch(runner: HeadRunner, gated: GatedLinear) -> None:
    greedy = SamplingParams(temperature=0.0)
    inputs = [hidden(seed) for seed in range(6)]

    async def scenario() -> tuple[list[int], list[int]]:
        alone = [(await runner.decode(h, StreamSampler.of(greedy))).choice.token for h in inputs]
        gated.rows.clear()
        held = await hold(runner, gated)
        tasks = await queue(runner, [runner.decode(h, StreamSampler.of(greedy)) for h in inputs])
        gated.open_gate()
        await held
        return alone, [out.choice.token for out in await asyncio.gather(*tasks)]

    alone, batched = run(scenario)
    assert gated.rows == [1, len(inputs)]  # the held call, then everything that queued
    assert batched == alone


def test_calls_after_an_idle_thread_run_at_once_alone(
    runner: HeadRunner, gated: GatedLinear
) -> None:
    async def scenario() -> None:
        for seed in range(3):
            await runner.embed([seed, seed + 1])
            await runner.logits(hidden(seed))
            assert runner.waiting == 0

    run(scenario)
    assert gated.rows == [1, 1, 1]


def test_batches_are_bounded(head: Head, gated: GatedLinear) -> None:
    runner = HeadRunner(dataclasses.replace(head, lm_head=gated), max_batch=2)

    async def scenario() -> None:
        held = await hold(runner, gated)
        tasks = await queue(runner, [runner.logits(hidden(seed)) for seed in range(5)])
        gated.open_gate()
        await asyncio.gather(held, *tasks)

    try:
        run(scenario)
    finally:
        gated.open_gate()
        runner.close()
    assert gated.rows == [1, 2, 2, 1]


def test_batch_sizes_are_a_metric(head: Head, gated: GatedLinear) -> None:
    metrics = GatewayMetrics()
    runner = HeadRunner(dataclasses.replace(head, lm_head=gated), metrics=metrics)

    async def scenario() -> None:
        held = await hold(runner, gated)
        calls = [runner.logits(hidden(seed)) for seed in range(3)] + [runner.embed([1, 2])]
        tasks = await queue(runner, calls)
        gated.open_gate()
        await asyncio.gather(held, *tasks)

    try:
        run(scenario)
    finally:
        gated.open_gate()
        runner.close()
    sample = metrics.registry.get_sample_value
    assert sample("swarmgate_head_batch_rows_count") == 2
    assert sample("swarmgate_head_batch_rows_sum") == 4  # 1 + 3: embeddings are no rows


def test_prefill_chooses_from_the_last_position(runner: HeadRunner, head: Head) -> None:
    prompt = hidden(7, n=9)
    expected = int(unbatched_logits(head, prompt[:, -1:]).argmax())
    greedy = StreamSampler.of(SamplingParams(temperature=0.0))
    assert run(lambda: runner.decode(prompt, greedy)).choice.token == expected


def test_decode_also_embeds_the_chosen_token(runner: HeadRunner, head: Head) -> None:
    h = hidden(4)
    greedy = StreamSampler.of(SamplingParams(temperature=0.0))

    async def scenario() -> tuple[int, torch.Tensor, torch.Tensor]:
        decoded = await runner.decode(h, greedy)
        return decoded.choice.token, decoded.embedding, await runner.embed([decoded.choice.token])

    token, embedding, expected = run(scenario)
    assert token == int(unbatched_logits(head, h).argmax())
    assert embedding.shape == (1, 1, HIDDEN)
    torch.testing.assert_close(embedding, expected, rtol=0, atol=0)


def test_rows_of_decoding_streams_wait_for_each_other_on_an_idle_thread(
    runner: HeadRunner, gated: GatedLinear
) -> None:
    """Two streams decoding: the first row to reach the idle thread waits for the second,
    which comes within the gap, and they run as one LM head call."""
    greedy = [StreamSampler.of(SamplingParams(temperature=0.0)) for _ in range(2)]

    async def scenario() -> None:
        await runner.logits(hidden(0))  # times a job
        with runner.decoding(), runner.decoding():
            # The second's call queues first; the first's task runs before any timer.
            first = asyncio.ensure_future(runner.decode(hidden(1), greedy[0]))
            await runner.decode(hidden(2), greedy[1])
            await first

    run(scenario)
    assert gated.rows == [1, 2]


def test_logprobs_are_the_models_own(runner: HeadRunner, head: Head) -> None:
    h = hidden(3)
    # Temperature and bias change the choice, never the reported distribution.
    params = SamplingParams(temperature=0.5, seed=1, logit_bias={5: 50.0})
    choice = run(lambda: runner.decode(h, StreamSampler.of(params, logprobs=3))).choice
    logprobs = torch.log_softmax(unbatched_logits(head, h), dim=-1)
    assert choice.token == 5
    assert choice.logprob == pytest.approx(float(logprobs[5]), abs=1e-5)
    values, ids = torch.topk(logprobs, 3)
    assert [token for token, _ in choice.top] == ids.tolist()
    assert [lp for _, lp in choice.top] == pytest.approx(values.tolist(), abs=1e-5)


# ---- greedy rows through the screen ----

MIXED = [
    (SamplingParams(temperature=0.0), None),  # screened
    (SamplingParams(temperature=0.9, seed=5), None),
    (SamplingParams(temperature=0.0), 2),  # greedy, but its logprobs need every logit
    (SamplingParams(temperature=0.0), None),  # screened
]


def screened_runner(
    head: Head, gated: GatedLinear, kind: type[GreedyScreen] = GreedyScreen
) -> HeadRunner:
    screen = GreedyScreen.of(head.lm_head)
    assert screen is not None
    fields = {f.name: getattr(screen, f.name) for f in dataclasses.fields(screen)}
    return HeadRunner(dataclasses.replace(head, lm_head=gated), screen=kind(**fields))


async def mixed_batch(runner: HeadRunner, gated: GatedLinear) -> list[Decoded | BaseException]:
    """The calls of ``MIXED`` decoded in one job (queued behind a held call)."""
    held = await hold(runner, gated)
    calls = [
        runner.decode(hidden(40 + i), StreamSampler.of(params, logprobs))
        for i, (params, logprobs) in enumerate(MIXED)
    ]
    tasks = await queue(runner, calls)
    gated.open_gate()
    await held
    return await asyncio.gather(*tasks, return_exceptions=True)


def decode_mixed_batch(runner: HeadRunner, gated: GatedLinear) -> list[TokenChoice]:
    outcomes = run(lambda: mixed_batch(runner, gated))
    assert all(isinstance(out, Decoded) for out in outcomes), outcomes
    return [out.choice for out in outcomes if isinstance(out, Decoded)]


def assert_same_choices(got: list[TokenChoice], expected: list[TokenChoice]) -> None:
    """The same tokens; logprobs to float rounding (a batch of other rows rounds apart)."""
    assert [c.token for c in got] == [c.token for c in expected]
    for a, b in zip(got, expected, strict=True):
        assert [t for t, _ in a.top] == [t for t, _ in b.top]
        assert (a.logprob is None) == (b.logprob is None)
        if a.logprob is not None:
            assert a.logprob == pytest.approx(b.logprob, abs=1e-5)


def test_greedy_rows_find_their_token_without_the_full_head(
    runner: HeadRunner, head: Head, gated: GatedLinear
) -> None:
    expected = decode_mixed_batch(runner, gated)
    screened = screened_runner(head, gated)
    try:
        gated.rows.clear()
        assert_same_choices(decode_mixed_batch(screened, gated), expected)
    finally:
        gated.open_gate()
        screened.close()
    assert gated.rows == [1, 2]  # the held call, then the two rows that need logits
    assert expected[2].logprob is not None


def test_rows_the_screen_cannot_decide_go_through_the_full_head(
    runner: HeadRunner, head: Head, gated: GatedLinear, monkeypatch: pytest.MonkeyPatch
) -> None:
    expected = decode_mixed_batch(runner, gated)
    monkeypatch.setattr(greedy_head, "MAX_CANDIDATES", 0)
    screened = screened_runner(head, gated)
    try:
        gated.rows.clear()
        assert_same_choices(decode_mixed_batch(screened, gated), expected)
    finally:
        gated.open_gate()
        screened.close()
    assert gated.rows == [1, 4]


class BrokenScreen(GreedyScreen):
    def argmax(self, x: torch.Tensor) -> list[int | None]:
        raise RuntimeError("screen failed")


def test_a_screen_failure_reaches_every_caller_of_its_batch(head: Head, gated: GatedLinear) -> None:
    broken = screened_runner(head, gated, BrokenScreen)

    async def scenario() -> tuple[list[Decoded | BaseException], torch.Tensor]:
        outcomes = await mixed_batch(broken, gated)
        return outcomes, await broken.embed([1, 2, 3])  # a job of embeddings alone still runs

    try:
        outcomes, embedded = run(scenario)
    finally:
        gated.open_gate()
        broken.close()
    assert all(isinstance(o, RuntimeError) and "screen failed" in str(o) for o in outcomes)
    assert embedded.shape == (1, 3, HIDDEN)


# ---- seeded sampling does not depend on who else is in the batch ----

STREAMS = [
    SamplingParams(temperature=1.0, seed=1),
    SamplingParams(temperature=0.7, top_p=0.9, seed=2),
    SamplingParams(temperature=1.3, seed=3, presence_penalty=1.0, frequency_penalty=0.5),
    SamplingParams(temperature=0.0, logit_bias={11: 2.0}),
    SamplingParams(temperature=1.0, seed=1),  # the first again, in a row of its own
]
STEPS = 6


def test_seeded_sampling_is_the_same_batched_and_alone(
    runner: HeadRunner, gated: GatedLinear
) -> None:
    inputs = [[hidden(100 * s + t) for t in range(STEPS)] for s in range(len(STREAMS) - 1)]
    inputs.append(inputs[0])

    async def alone() -> list[list[int]]:
        tokens = []
        for params, steps in zip(STREAMS, inputs, strict=True):
            sampler = StreamSampler.of(params)
            tokens.append([(await runner.decode(h, sampler)).choice.token for h in steps])
        return tokens

    async def batched() -> list[list[int]]:
        samplers = [StreamSampler.of(params) for params in STREAMS]
        tokens: list[list[int]] = [[] for _ in STREAMS]
        for t in range(STEPS):
            held = await hold(runner, gated)
            calls = [runner.decode(inputs[s][t], samplers[s]) for s in range(len(STREAMS))]
            tasks = await queue(runner, calls)
            gated.open_gate()
            await held
            for stream, out in zip(tokens, await asyncio.gather(*tasks), strict=True):
                stream.append(out.choice.token)
        return tokens

    expected = run(alone)
    gated.rows.clear()
    assert run(batched) == expected
    assert gated.rows == [1, len(STREAMS)] * STEPS
    # Two streams with one seed draw alike even side by side: each has its own generator.
    assert expected[0] == expected[4]
    assert len(set(expected[0])) > 1  # a real draw, not a constant


# ---- failures and cancellation ----


def test_a_cancelled_caller_does_not_break_its_batch(
    runner: HeadRunner, gated: GatedLinear, head: Head
) -> None:
    inputs = [hidden(seed) for seed in range(3)]

    async def scenario() -> list[torch.Tensor]:
        held = await hold(runner, gated)
        tasks = await queue(runner, [runner.logits(h) for h in inputs])
        tasks[1].cancel()  # its client went away while it waited
        gated.open_gate()
        await held
        out = [await tasks[0], await tasks[2]]
        with pytest.raises(asyncio.CancelledError):
            await tasks[1]
        return out

    first, third = run(scenario)
    assert gated.rows == [1, 2]  # the cancelled request never ran
    torch.testing.assert_close(first, unbatched_logits(head, inputs[0]), rtol=0, atol=1e-5)
    torch.testing.assert_close(third, unbatched_logits(head, inputs[2]), rtol=0, atol=1e-5)


def test_a_caller_cancelled_mid_job_leaves_the_rest_of_it(
    runner: HeadRunner, gated: GatedLinear
) -> None:
    greedy = SamplingParams(temperature=0.0)

    async def scenario() -> int:
        held = await hold(runner, gated)
        tasks = await queue(runner, [runner.logits(hidden(1)), runner.logits(hidden(2))])
        gated.let_through()
        await held
        await gated.arrival()  # the batch of two is in the LM head, waiting for its pass
        tasks[0].cancel()
        gated.open_gate()
        await tasks[1]
        with pytest.raises(asyncio.CancelledError):
            await tasks[0]
        return (await runner.decode(hidden(3), StreamSampler.of(greedy))).choice.token

    assert isinstance(run(scenario), int)  # and the thread goes on serving
    assert gated.rows == [1, 2, 1]


def test_an_lm_head_failure_reaches_every_caller_of_its_batch(
    runner: HeadRunner, gated: GatedLinear
) -> None:
    gated.fail_rows = 3
    sampler = StreamSampler.of(SamplingParams(temperature=0.0))

    async def scenario() -> list[BaseException | object]:
        held = await hold(runner, gated)
        calls: list[Awaitable[object]] = [
            runner.logits(hidden(1)),
            runner.decode(hidden(2), sampler),
            runner.embed([1, 2, 3]),  # no row of the LM head: not part of its failure
            runner.logits(hidden(3)),
        ]
        tasks = await queue(runner, calls)
        gated.open_gate()
        await held
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        await runner.logits(hidden(4))  # the next batch runs as usual
        return outcomes

    first, second, embedded, fourth = run(scenario)
    for outcome in (first, second, fourth):
        assert isinstance(outcome, RuntimeError) and str(outcome) == "LM head failed"
    assert isinstance(embedded, torch.Tensor) and embedded.shape == (1, 3, HIDDEN)
    assert gated.rows == [1, 3, 1]


def test_a_streams_own_sampling_error_is_its_alone(runner: HeadRunner, gated: GatedLinear) -> None:
    broken = StreamSampler.of(SamplingParams(temperature=0.0, logit_bias={10**9: 1.0}))
    fine = StreamSampler.of(SamplingParams(temperature=0.0))

    async def scenario() -> list[object]:
        held = await hold(runner, gated)
        calls = [runner.decode(hidden(1), broken), runner.decode(hidden(2), fine)]
        tasks = await queue(runner, calls)
        gated.open_gate()
        await held
        return await asyncio.gather(*tasks, return_exceptions=True)

    bad, good = run(scenario)
    assert isinstance(bad, IndexError)
    assert not isinstance(good, BaseException)
    assert gated.rows == [1, 2]


class FailingGrammar:
    """A constraint whose matcher has failed (as llguidance's can, past a limit)."""

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        raise GrammarError("the grammar failed")

    def consume(self, token: int) -> None:
        raise AssertionError("nothing was chosen")


def test_a_streams_grammar_failure_is_its_alone(runner: HeadRunner, gated: GatedLinear) -> None:
    broken = StreamSampler.of(SamplingParams(), constraint=FailingGrammar())
    fine = StreamSampler.of(SamplingParams(temperature=0.0))

    async def scenario() -> list[object]:
        held = await hold(runner, gated)
        calls = [runner.decode(hidden(1), broken), runner.decode(hidden(2), fine)]
        tasks = await queue(runner, calls)
        gated.open_gate()
        await held
        return await asyncio.gather(*tasks, return_exceptions=True)

    bad, good = run(scenario)
    assert isinstance(bad, GrammarError)
    assert not isinstance(good, BaseException)
    assert gated.rows == [1, 2]


def test_malformed_hidden_states_are_refused_before_queueing(runner: HeadRunner) -> None:
    async def scenario(shape: tuple[int, ...]) -> None:
        with pytest.raises(ValueError, match="hidden states"):
            await runner.logits(torch.zeros(shape))
        assert runner.waiting == 0

    for shape in [(1, 1, HIDDEN + 1), (2, 1, HIDDEN), (1, HIDDEN), (1, 0, HIDDEN)]:
        asyncio.run(scenario(shape))


def test_close_fails_queued_calls_and_refuses_new_ones(
    runner: HeadRunner, gated: GatedLinear, head: Head
) -> None:
    async def scenario() -> tuple[torch.Tensor, list[BaseException | torch.Tensor]]:
        held = await hold(runner, gated)
        tasks = await queue(runner, [runner.logits(hidden(1)), runner.embed([1])])
        runner.close()
        queued = await asyncio.gather(*tasks, return_exceptions=True)
        gated.open_gate()
        with pytest.raises(BatcherClosed):
            await runner.embed([2])
        return await held, queued

    held, queued = run(scenario)
    assert held.shape == (head.config.vocab_size,)  # the job in flight still delivered
    assert all(isinstance(outcome, BatcherClosed) for outcome in queued)


# ---- through the gateway ----


def test_concurrent_requests_answer_as_they_would_alone(tiny_model: Path) -> None:
    settings = GatewaySettings(model_id="tiny", model_path=tiny_model, max_concurrent_per_key=6)
    app = create_app(settings, swarm_client=LocalSwarmClient(tiny_model, "tiny"))
    bodies = [
        {
            "model": "tiny",
            "messages": [{"role": "user", "content": f"Tell me about the number {i}"}],
            "max_tokens": 8,
            "logprobs": True,
            "top_logprobs": 2,
            **({"temperature": 0} if i % 2 else {"temperature": 0.9, "top_p": 0.95, "seed": i}),
        }
        for i in range(6)
    ]

    def answer(response: httpx.Response) -> tuple[str, list[str]]:
        assert response.status_code == 200, response.text
        choice = response.json()["choices"][0]
        tokens = [t["token"] for t in choice["logprobs"]["content"]]
        return choice["message"]["content"], tokens

    async def scenario() -> tuple[list[tuple[str, list[str]]], list[tuple[str, list[str]]]]:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
                url = "/v1/chat/completions"
                alone = [answer(await client.post(url, json=body)) for body in bodies]
                together = await asyncio.gather(*(client.post(url, json=b) for b in bodies))
                return alone, [answer(r) for r in together]

    alone, together = run(scenario)
    assert together == alone
    assert all(tokens for _, tokens in alone)


# ---- scoring a prompt ----


def test_a_prompt_is_scored_in_jobs_that_let_other_rows_through(
    head: Head, gated: GatedLinear, runner: HeadRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Position i scores token i + 1 from the logits of its row; a long prompt goes in
    jobs of SCORE_ROWS positions, and a decode row queued meanwhile runs between them."""
    monkeypatch.setattr(head_module, "SCORE_ROWS", 3)
    h, ids = hidden(5, 8), [int(t) for t in torch.randint(0, 100, (8,)).tolist()]
    with torch.inference_mode():
        want = torch.log_softmax(head.lm_head(head.norm(h[0, :-1])), dim=-1)

    async def scenario() -> list[Any]:
        held = await hold(runner, gated)
        scoring = asyncio.ensure_future(runner.score(h, ids, 2))
        [row] = await queue(runner, [runner.logits(hidden(6))])
        await queue(runner, [])  # nothing else queued yet: the score's first job waits
        gated.open_gate()
        await held
        await row
        return await scoring

    scored = run(scenario)
    assert [choice.token for choice in scored] == ids[1:]
    for i, choice in enumerate(scored):
        assert choice.logprob == pytest.approx(float(want[i, ids[i + 1]]), abs=1e-5)
        assert [t for t, _ in choice.top] == want[i].topk(2).indices.tolist()
    # LM head calls after the held one: 3 scored positions, the decode row, then the
    # score's other 3 + 1 positions: the row did not wait for the whole prompt
    assert gated.rows[1:] == [3, 1, 3, 1]
    with pytest.raises(ValueError, match="positions"):
        run(lambda: runner.score(h, ids[:-1], 2))
