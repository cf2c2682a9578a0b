"""Continuous batching on a node: packed forwards give each session exactly what it would get
alone, and the scheduler packs what waits, chunks prompts and survives cancellation."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, MistralConfig, MistralForCausalLM

from models.loading import Span, load_span
from protocol import gather
from swarm_node import batching as batching_module
from swarm_node.backend import forward_packed, forward_span, new_kv_buffers
from swarm_node.batching import StepScheduler
from swarm_node.kv_buffers import KVBuffers, Segment
from tests.tiny_model import TINY_BLOCKS
from tests.unit.swarm_node.support import HIDDEN, Gate, gated_forwards, inputs, reference, until


@pytest.fixture(scope="module")
def span(tiny_model: Path) -> Span:
    return load_span(tiny_model, 0, TINY_BLOCKS)


def test_a_packed_forward_equals_each_session_alone(span: Span) -> None:
    """Mixed history lengths, prompts and decode steps in one forward."""
    histories = [inputs(n, seed) for seed, n in enumerate([5, 40, 1, 17])]
    steps = [inputs(n, 10 + seed) for seed, n in enumerate([1, 1, 9, 1])]
    kvs = [new_kv_buffers(span, 0, TINY_BLOCKS) for _ in histories]
    for kv, history in zip(kvs, histories, strict=True):
        forward_span(span, history, kv)
    segments = [
        Segment(kv, h.shape[1], s.shape[1]) for kv, h, s in zip(kvs, histories, steps, strict=True)
    ]
    out = forward_packed(span, torch.cat(steps, 1), segments, start=0, end=TINY_BLOCKS)
    offset = 0
    for history, step, kv in zip(histories, steps, kvs, strict=True):
        expected = reference(span, [history, step])[1]
        got = out[:, offset : offset + step.shape[1]]
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
        assert kv.length == history.shape[1] + step.shape[1]
        offset += step.shape[1]


def test_the_swarm_span_equals_the_whole_transformers_model(tiny_model: Path, span: Span) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    ids = torch.arange(100, 130).unsqueeze(0)
    with torch.no_grad():
        embedded = model.model.embed_tokens(ids)
        expected = model.model(input_ids=ids).last_hidden_state
    kv = new_kv_buffers(span, 0, TINY_BLOCKS)
    prompt = forward_span(span, embedded[:, :20], kv)
    rest = [forward_span(span, embedded[:, i : i + 1], kv, position=i) for i in range(20, 30)]
    got = model.model.norm(torch.cat([prompt, *rest], 1))
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_a_sliding_window_model_attends_only_within_its_window(tmp_path: Path) -> None:
    config = MistralConfig(
        vocab_size=300,
        hidden_size=HIDDEN,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=8,
        initializer_range=0.2,
    )
    torch.manual_seed(0)
    MistralForCausalLM(config).eval().save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    span = load_span(tmp_path, 0, 2)
    ids = torch.arange(1, 25).unsqueeze(0)
    with torch.no_grad():
        embedded = model.model.embed_tokens(ids)
        expected = model.model(input_ids=ids).last_hidden_state
    kv = new_kv_buffers(span, 0, 2)
    pieces = [forward_span(span, embedded[:, :12], kv)]  # a prompt longer than the window
    pieces += [forward_span(span, embedded[:, 12:15], kv, position=12)]  # a chunk past it
    pieces += [forward_span(span, embedded[:, i : i + 1], kv, position=i) for i in range(15, 24)]
    got = model.model.norm(torch.cat(pieces, 1))
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_a_cache_grows_in_place_and_truncates_without_copying(span: Span) -> None:
    kv = new_kv_buffers(span, 0, TINY_BLOCKS)
    kv.limit = 1000
    forward_span(span, inputs(10, 1), kv)
    buffer = kv.view(0, kv.length)[0].data_ptr()
    capacity = kv.capacity
    for position in range(10, capacity):  # decode steps within the capacity: no reallocation
        forward_span(span, inputs(1, position), kv, position=position)
    assert kv.view(0, kv.length)[0].data_ptr() == buffer
    assert kv.nbytes == kv.capacity * TINY_BLOCKS * 2 * 2 * 16 * 4  # exact: 2 heads of 16, fp32
    kv.crop(4)
    assert kv.length == 4 and kv.capacity == capacity
    with pytest.raises(RuntimeError, match="holds 4 tokens"):
        forward_span(span, inputs(1, 0), kv, position=5)


def test_growth_stops_at_the_reserved_length(span: Span) -> None:
    kv = new_kv_buffers(span, 0, TINY_BLOCKS)
    kv.limit = 70
    forward_span(span, inputs(65, 1), kv)
    forward_span(span, inputs(1, 2), kv, position=65)
    assert kv.capacity == 70, "never past what the stream reserved"


# --- the scheduler ---------------------------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.batches: list[tuple[int, int]] = []  # (sessions, tokens) of each forward

    def __call__(self, sessions: int, tokens: int) -> None:
        self.batches.append((sessions, tokens))


@pytest.fixture
def gated(monkeypatch: pytest.MonkeyPatch) -> Iterator[Gate]:
    with gated_forwards(monkeypatch) as gate:
        yield gate


def run(scenario: Any) -> None:
    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_steps_that_wait_together_run_as_one_forward(span: Span, gated: Gate) -> None:
    recorder = Recorder()
    prompts = [inputs(n, seed) for seed, n in enumerate([3, 8, 5, 12, 2])]
    turns = [inputs(1, 20 + seed) for seed in range(len(prompts))]

    async def scenario() -> None:
        with ThreadPoolExecutor(1) as compute:
            scheduler = StepScheduler(span, compute, observe_batch=recorder)
            kvs = [new_kv_buffers(span, 0, TINY_BLOCKS) for _ in prompts]
            blocks = (0, TINY_BLOCKS)
            busy = asyncio.ensure_future(
                scheduler.step(new_kv_buffers(span, 0, TINY_BLOCKS), blocks, 0, inputs(1, 99))
            )
            await until(gated.entered.is_set)  # the thread is busy: everything else waits
            firsts = [
                asyncio.ensure_future(scheduler.step(kv, blocks, 0, p))
                for kv, p in zip(kvs, prompts, strict=True)
            ]
            await until(lambda: scheduler.waiting == len(prompts) + 1)
            gated.open.set()
            await busy
            outs = await asyncio.gather(*firsts)
            seconds = await asyncio.gather(
                *(
                    scheduler.step(kv, blocks, p.shape[1], t)
                    for kv, p, t in zip(kvs, prompts, turns, strict=True)
                )
            )
            scheduler.close()
        assert recorder.batches[1] == (len(prompts), sum(p.shape[1] for p in prompts))
        assert recorder.batches[2] == (len(prompts), len(prompts)), "decode steps batch too"
        for prompt, turn, out, second in zip(prompts, turns, outs, seconds, strict=True):
            expected = reference(span, [prompt, turn])
            torch.testing.assert_close(out, expected[0], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(second, expected[1], atol=1e-4, rtol=1e-4)

    run(scenario)


def test_a_long_prompt_runs_in_chunks_between_other_streams_decode_steps(span: Span) -> None:
    recorder = Recorder()
    prompt = inputs(50, 1)
    history, turn = inputs(6, 2), inputs(1, 3)

    async def scenario() -> None:
        with ThreadPoolExecutor(1) as compute:
            scheduler = StepScheduler(span, compute, prefill_chunk=16, observe_batch=recorder)
            blocks = (0, TINY_BLOCKS)
            decoding = new_kv_buffers(span, 0, TINY_BLOCKS)
            await scheduler.step(decoding, blocks, 0, history)
            recorder.batches.clear()
            long = asyncio.ensure_future(
                scheduler.step(new_kv_buffers(span, 0, TINY_BLOCKS), blocks, 0, prompt)
            )
            short = asyncio.ensure_future(scheduler.step(decoding, blocks, 6, turn))
            done, _ = await asyncio.wait([long, short], return_when=asyncio.FIRST_COMPLETED)
            assert short in done and long not in done, "the decode step waits one chunk at most"
            out = await long
            scheduler.close()
        assert recorder.batches == [(2, 17), (1, 16), (1, 16), (1, 2)]
        torch.testing.assert_close(out, reference(span, [prompt])[0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(
            short.result(), reference(span, [history, turn])[1], atol=1e-4, rtol=1e-4
        )

    run(scenario)


def test_a_cancelled_step_leaves_the_others_in_its_batch_untouched(span: Span, gated: Gate) -> None:
    async def scenario() -> None:
        with ThreadPoolExecutor(1) as compute:
            scheduler = StepScheduler(span, compute)
            blocks = (0, TINY_BLOCKS)
            busy = asyncio.ensure_future(
                scheduler.step(new_kv_buffers(span, 0, TINY_BLOCKS), blocks, 0, inputs(2, 9))
            )
            await until(gated.entered.is_set)
            kept_kv, dropped_kv = (new_kv_buffers(span, 0, TINY_BLOCKS) for _ in range(2))
            kept = asyncio.ensure_future(scheduler.step(kept_kv, blocks, 0, inputs(4, 1)))
            dropped = asyncio.ensure_future(scheduler.step(dropped_kv, blocks, 0, inputs(4, 2)))
            await until(lambda: scheduler.waiting == 3)
            dropped.cancel()
            await until(lambda: scheduler.waiting == 2)  # gone before it ever ran
            gated.open.set()
            await busy
            out = await kept
            scheduler.close()
        assert dropped_kv.length == 0
        torch.testing.assert_close(out, reference(span, [inputs(4, 1)])[0], atol=1e-4, rtol=1e-4)

    run(scenario)


def test_a_failed_forward_fails_its_batch_and_the_next_one_runs(
    span: Span, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = batching_module.forward_packed
    failures = iter([True])

    def flaky(*args: Any, **kwargs: Any) -> torch.Tensor:
        if next(failures, False):
            raise RuntimeError("out of memory, say")
        return real(*args, **kwargs)

    monkeypatch.setattr(batching_module, "forward_packed", flaky)

    async def scenario() -> None:
        with ThreadPoolExecutor(1) as compute:
            scheduler = StepScheduler(span, compute)
            blocks = (0, TINY_BLOCKS)
            kv: KVBuffers = new_kv_buffers(span, 0, TINY_BLOCKS)
            with pytest.raises(RuntimeError, match="out of memory"):
                await scheduler.step(kv, blocks, 0, inputs(3, 1))
            fresh = new_kv_buffers(span, 0, TINY_BLOCKS)
            out = await scheduler.step(fresh, blocks, 0, inputs(3, 1))
            scheduler.close()
        torch.testing.assert_close(out, reference(span, [inputs(3, 1)])[0], atol=1e-4, rtol=1e-4)

    run(scenario)


def test_sessions_over_other_blocks_run_in_their_own_forward(span: Span) -> None:
    recorder = Recorder()

    async def scenario() -> None:
        with ThreadPoolExecutor(1) as compute:
            scheduler = StepScheduler(span, compute, observe_batch=recorder)
            whole, tail = new_kv_buffers(span, 0, TINY_BLOCKS), new_kv_buffers(span, 2, TINY_BLOCKS)
            a, b = await asyncio.gather(
                scheduler.step(whole, (0, TINY_BLOCKS), 0, inputs(3, 1)),
                scheduler.step(tail, (2, TINY_BLOCKS), 0, inputs(3, 2)),
            )
            scheduler.close()
        assert sorted(recorder.batches) == [(1, 3), (1, 3)]
        tail_alone = new_kv_buffers(span, 2, TINY_BLOCKS)
        expected = forward_span(span, inputs(3, 2), tail_alone, start=2, end=TINY_BLOCKS)
        torch.testing.assert_close(b, expected, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(a, reference(span, [inputs(3, 1)])[0], atol=1e-4, rtol=1e-4)

    run(scenario)


def test_a_forward_waits_for_steps_that_keep_arriving_not_for_a_stream_elsewhere(
    span: Span, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three open streams, two of which send a step now: the forward waits for the second
    (it came within the gap of the first), then runs without the third, which is elsewhere
    in its cycle: a gap without arrivals ends the wait long before the window."""
    monkeypatch.setattr(gather, "MAX_GATHER_S", 60.0)
    monkeypatch.setattr(gather, "GATHER_SHARE", 1e9)  # the window: a minute
    monkeypatch.setattr(gather, "GATHER_GAP_S", 0.5)
    recorder = Recorder()

    async def scenario() -> None:
        with ThreadPoolExecutor(1) as compute:
            scheduler = StepScheduler(span, compute, observe_batch=recorder, open_streams=lambda: 3)
            blocks = (0, TINY_BLOCKS)
            kvs = [new_kv_buffers(span, 0, TINY_BLOCKS) for _ in range(3)]
            await scheduler.step(kvs[0], blocks, 0, inputs(2, 0))  # times a forward
            first = asyncio.ensure_future(scheduler.step(kvs[1], blocks, 0, inputs(1, 1)))
            await until(lambda: scheduler.waiting == 1)
            second = asyncio.ensure_future(scheduler.step(kvs[2], blocks, 0, inputs(1, 2)))
            await asyncio.wait_for(asyncio.gather(first, second), 30)
            scheduler.close()
        assert recorder.batches[1:] == [(2, 2)]

    run(scenario)


def test_a_step_waits_for_a_stream_whose_rhythm_says_its_step_is_due(
    span: Span, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stream a steps every 0.3 s (the sleeps make its rhythm: they are the input here).
    Stream b's step arrives between two of a's: instead of running alone, it waits for
    a's, which is due within the horizon, and both run in one forward."""
    monkeypatch.setattr(gather, "MAX_GATHER_S", 0.001)  # no waiting for bursts
    monkeypatch.setattr(gather, "GATHER_GAP_S", 0.5)  # slack after a due step
    monkeypatch.setattr(batching_module, "MAX_ALIGN_S", 60.0)
    monkeypatch.setattr(batching_module, "ALIGN_SHARE", 1e9)
    recorder = Recorder()

    async def scenario() -> None:
        with ThreadPoolExecutor(1) as compute:
            scheduler = StepScheduler(span, compute, observe_batch=recorder, open_streams=lambda: 2)
            blocks = (0, TINY_BLOCKS)
            a, b = (new_kv_buffers(span, 0, TINY_BLOCKS) for _ in range(2))
            await scheduler.step(a, blocks, 0, inputs(1, 0))
            await asyncio.sleep(0.3)
            await scheduler.step(a, blocks, 1, inputs(1, 1))  # a's next is due in 0.3 s
            late = asyncio.ensure_future(scheduler.step(b, blocks, 0, inputs(1, 2)))
            await until(lambda: scheduler.waiting == 1)
            await asyncio.wait_for(
                asyncio.gather(late, scheduler.step(a, blocks, 2, inputs(1, 3))), 30
            )
            scheduler.close()
        assert recorder.batches == [(1, 1), (1, 1), (2, 2)]

    run(scenario)
