"""Continuous batching: the steps of every open stream, run as few forwards as possible.

Streams hand their steps to one ``StepScheduler``. Whenever the compute thread frees up,
the scheduler packs what is waiting into one forward: every pending decode step, plus at
most ``prefill_chunk`` tokens of prompts. A long prompt is therefore split into chunks that
interleave with other streams' decode steps, which wait behind at most one chunk, and a
lone stream waits for nothing: there is no batching window.

Batches group sessions over the same blocks (a forward runs one range of layers) and the
same LoRA adapter (a forward runs one set of weights). A step's
result is delivered once all its tokens have run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

import torch

from models.adapters import select_adapter
from models.loading import Span
from protocol import gather
from swarm_node.backend import forward_packed
from swarm_node.cadence import Cadences
from swarm_node.kv_buffers import KVBuffers, Segment

logger = logging.getLogger(__name__)

PREFILL_CHUNK_TOKENS = 128  # how long a prompt may hold up other streams' decode steps
# How long a forward may wait for the steps that open streams' rhythms say are due, as a
# share of a forward and at most: waiting less than a forward saves one (see _gather).
ALIGN_SHARE = 1.0
MAX_ALIGN_S = 0.1
MAX_BATCH_SEGMENTS = 256  # sessions in one forward


@dataclass(eq=False)
class _Job:
    kv: KVBuffers
    blocks: tuple[int, int]
    position: int  # of the step's first token
    hidden: torch.Tensor  # [1, n, hidden_size]
    result: asyncio.Future[torch.Tensor]
    adapter: str | None = None  # the LoRA adapter it runs; None: the base model
    done: int = 0  # tokens already run (a prompt in chunks)
    outputs: list[torch.Tensor] = field(default_factory=list)

    @property
    def left(self) -> int:
        return self.hidden.shape[1] - self.done


@dataclass(frozen=True)
class _Piece:
    job: _Job
    tokens: int


BatchObserver = Callable[[int, int], None]  # (segments, tokens) of each forward


def _forward_with(
    span: Span,
    adapter: str | None,
    hidden: torch.Tensor,
    segments: list[Segment],
    start: int,
    end: int,
) -> torch.Tensor:
    select_adapter(span, adapter)  # on the compute thread, so no other forward is running
    return forward_packed(span, hidden, segments, start=start, end=end)


class StepScheduler:
    def __init__(
        self,
        span: Span,
        compute: Executor,
        *,
        prefill_chunk: int = PREFILL_CHUNK_TOKENS,
        observe_batch: BatchObserver = lambda segments, tokens: None,
        open_streams: Callable[[], int] = lambda: 1,
    ) -> None:
        if prefill_chunk < 1:
            raise ValueError("prefill_chunk must be at least 1")
        self._span = span
        self._compute = compute
        self._prefill_chunk = prefill_chunk
        self._observe_batch = observe_batch
        self._open_streams = open_streams  # streams that may send a step soon
        self._forward_s = 0.0  # how long forwards take, smoothed
        self._waiting: list[_Job] = []  # in arrival order
        self._wake = asyncio.Event()
        self._last_arrival = 0.0  # loop time of the latest step
        self._cadences = Cadences()
        self._loop: asyncio.Task[None] | None = None

    async def step(
        self,
        kv: KVBuffers,
        blocks: tuple[int, int],
        position: int,
        hidden: torch.Tensor,
        *,
        adapter: str | None = None,
    ) -> torch.Tensor:
        """Run ``hidden`` [1, n, hidden_size] at ``position ...`` through ``blocks`` on the
        session ``kv``. If this is cancelled, the cache may be half-written (a forward may
        still be running on it): the caller must never use ``kv`` again."""
        self._start()
        result: asyncio.Future[torch.Tensor] = asyncio.get_running_loop().create_future()
        job = _Job(kv, blocks, position, hidden, result, adapter)
        self._waiting.append(job)
        self._last_arrival = asyncio.get_running_loop().time()
        self._cadences.arrived(kv, self._last_arrival, decode=hidden.shape[1] == 1)
        self._wake.set()
        try:
            return await result
        finally:
            if job in self._waiting:  # cancelled before its last chunk ran
                self._waiting.remove(job)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def close(self) -> None:
        if self._loop is not None:
            self._loop.cancel()
        for job in self._waiting:
            if not job.result.done():
                job.result.cancel()
        self._waiting.clear()

    def _start(self) -> None:
        if self._loop is None or self._loop.done():
            self._loop = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._waiting:
                await self._gather()
                if not self._waiting:  # every step it waited with was cancelled meanwhile
                    break
                pieces = self._pick()
                try:
                    await self._forward(pieces)
                except Exception as e:  # a bug here must not strand every other stream
                    logger.exception("a batch of %d steps failed", len(pieces))
                    for piece in pieces:
                        self._finish(piece.job, error=e)

    async def _gather(self) -> None:
        """Wait a moment for the steps of other open streams, never for long.

        A forward costs nearly as much for one step as for sixteen, so every step that runs
        in a forward of its own is a forward's time lost to all streams. Two waits:

        - *Bursts.* Streams that decode together reach this server a few milliseconds apart
          (the previous hop answers them one by one). While steps keep arriving, each within
          ``GATHER_GAP_S`` of the last, the forward waits, at most ``GATHER_SHARE`` of a
          forward (``protocol/gather.py``: the gateway's head gathers its rows the same
          way). Without it, the first arrival would run alone and the rest next.
        - *Rhythms.* Open streams whose next step is due (``Cadences``) within ``ALIGN_SHARE``
          of a forward are waited for too. Groups of streams that drifted apart (a prompt
          joined, a stream ran alone once) would otherwise alternate forever, each forward
          half full; waiting once aligns them, and aligned streams stay together.

        A lone stream never waits, nor does a forward for streams busy elsewhere: a stream
        with no rhythm (between turns, still in its prompt) is waited for only as part of a
        burst. On `swarmgate up` (2 cores) with 16 streams, this took aggregate tokens/s
        from ~57 to ~70 (median of warm rounds); with 4, from ~25 to ~33.
        """
        forward_s = self._forward_s
        if forward_s <= 0 or len(self._waiting) >= self._open_streams():
            return
        loop = asyncio.get_running_loop()
        began = loop.time()
        window = began + gather.gather_window(forward_s)
        horizon = began + min(MAX_ALIGN_S, ALIGN_SHARE * forward_s)
        while len(self._waiting) < self._open_streams():
            now = loop.time()
            until = min(window, self._last_arrival + gather.GATHER_GAP_S)
            present = {job.kv for job in self._waiting}
            due = self._cadences.due_by(now, horizon - now, present)
            if due is not None:
                until = max(until, min(due + gather.GATHER_GAP_S, horizon))
            left = until - now
            if left <= 0:
                return
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), left)

    def _pick(self) -> list[_Piece]:
        """The next forward: the oldest waiting step's blocks and adapter; every decode step
        over them, then prompt tokens up to the chunk size, oldest first."""
        kind = (self._waiting[0].blocks, self._waiting[0].adapter)
        pieces: list[_Piece] = []
        prompt_tokens = 0
        for job in self._waiting:
            if (job.blocks, job.adapter) != kind or len(pieces) >= MAX_BATCH_SEGMENTS:
                continue
            if job.left == 1:
                pieces.append(_Piece(job, 1))
            elif prompt_tokens < self._prefill_chunk:
                tokens = min(job.left, self._prefill_chunk - prompt_tokens)
                pieces.append(_Piece(job, tokens))
                prompt_tokens += tokens
        return pieces

    async def _forward(self, pieces: list[_Piece]) -> None:
        start, end = pieces[0].job.blocks
        adapter = pieces[0].job.adapter
        dtype = self._span.dtype
        hidden = torch.cat(
            [p.job.hidden[:, p.job.done : p.job.done + p.tokens].to(dtype) for p in pieces], 1
        )
        segments = [Segment(p.job.kv, p.job.position + p.job.done, p.tokens) for p in pieces]
        loop = asyncio.get_running_loop()
        began = loop.time()
        try:
            out = await loop.run_in_executor(
                self._compute,
                lambda: _forward_with(self._span, adapter, hidden, segments, start, end),
            )
        except Exception as e:
            # One forward ran them all: none of their caches can be trusted now.
            for piece in pieces:
                self._finish(piece.job, error=e)
            return
        self._observe_batch(len(pieces), hidden.shape[1])
        took = loop.time() - began
        self._forward_s = took if not self._forward_s else 0.8 * self._forward_s + 0.2 * took
        offset = 0
        for piece in pieces:
            job = piece.job
            job.outputs.append(out[:, offset : offset + piece.tokens])
            offset += piece.tokens
            job.done += piece.tokens
            if job.left == 0:
                self._finish(job)

    def _finish(self, job: _Job, error: Exception | None = None) -> None:
        if job in self._waiting:
            self._waiting.remove(job)
        if job.result.done():  # its stream was cancelled meanwhile
            return
        if error is not None:
            job.result.set_exception(error)
        else:
            job.result.set_result(torch.cat(job.outputs, dim=1))
