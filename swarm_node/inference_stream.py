"""``rpc_inference``: one session's stream of steps through the span.

A stream opens a session (its KV cache lives in the ``CacheStore`` and outlives the
stream), then sends steps: each carries its input hidden states, or says they come by push
from the previous hop (or by the gateway's relay, whichever first). Every step runs on the
compute thread through the step scheduler, which batches the steps of every open stream;
its output goes back on the stream, or straight to the next hop (``rpc_push``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from hivemind.proto import runtime_pb2

from protocol.codec import make_response
from protocol.errors import (
    CapacityExceeded,
    InvalidRequest,
    ProtocolMismatch,
    RequestError,
    SwarmError,
)
from protocol.logs import request_id
from protocol.rpc import (
    OpenSession,
    Relay,
    RpcError,
    SessionOpened,
    Step,
    StepDone,
    decode,
    decode_stream_message,
)
from swarm_node.admission import OPEN_TIMEOUT_S, Admission
from swarm_node.backend import new_kv_buffers
from swarm_node.batching import StepScheduler
from swarm_node.bounded_streams import Caller
from swarm_node.cache_store import CachedSession, CacheStore
from swarm_node.kv_buffers import KVBuffers
from swarm_node.push import Inbox, PushBoard, Pusher

logger = logging.getLogger(__name__)

STEP_TIMEOUT_S = 90.0  # an idle stream holds its session's reservation at most this long
# A step waits this long for its input by push or relay; longer than a gateway's recovery
# of a failed hop before it (60 s), which ends with a relay.
INPUT_WAIT_S = 90.0
MAX_STREAMS_PER_PEER = 256  # one gateway's concurrent sessions here, replays included
BUSY_WAIT_S = 2.0  # how long an open waits for the session's previous stream to end


def cache_key(session_id: str, secret: str) -> str:
    """The key of a session's cache in the ``CacheStore``: neither the session's id nor its
    secret alone finds it, and the secret itself is never stored."""
    return hashlib.sha256(f"{session_id}\0{secret}".encode()).hexdigest()


def _copy_prefix(donor: KVBuffers, version: int, kv: KVBuffers, tokens: int) -> bool:
    """Copy ``donor``'s prefix unless a step queued before the copy rewrote it (run on the
    compute thread, in order with every forward)."""
    if donor.version != version or donor.length < tokens:
        return False
    kv.copy_prefix(donor, tokens)
    return True


class InferenceStreams:
    """The node's inference streams: how many are open (its load), and each one's life."""

    def __init__(
        self,
        caches: CacheStore,
        admission: Admission,
        scheduler: StepScheduler,
        compute: ThreadPoolExecutor,
        pushes: PushBoard,
        *,
        observe_step: Callable[[int, float], None],
        input_wait_s: float = INPUT_WAIT_S,
    ) -> None:
        self.caches = caches
        self._admission = admission
        self._scheduler = scheduler
        self._compute = compute  # the one thread every forward and cache copy runs on
        self.pushes = pushes
        self.pusher: Pusher | None = None  # set once registered: None sends no pushes
        self._observe_step = observe_step  # (tokens, seconds) of each completed step
        self._input_wait_s = input_wait_s
        self.active = 0
        self._streams_of: Counter[str] = Counter()  # open streams per calling peer
        self._released = asyncio.Condition()

    async def rpc_inference(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: Caller | None
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """One session's stream. Refusals and failures are answered with a typed ``RpcError``
        and end the stream; the session's state after any of them is consistent."""
        caller = str(context.remote_id) if context is not None else ""
        try:
            if self._streams_of[caller] >= MAX_STREAMS_PER_PEER:
                raise CapacityExceeded(f"{MAX_STREAMS_PER_PEER} streams from one peer at most")
            opening = await self._read_opening(requests, caller)
            if context is not None:
                context.admitted()  # a member: its stream no longer counts as a stranger's
            request_id.set(opening.request_id)  # this stream's task: its log lines carry it
            key = cache_key(opening.session_id, opening.secret)
            await self._wait_until_idle(key)
            span = self._admission.span
            session, cached = self.caches.open(
                key,
                opening.start,
                opening.end,
                opening.max_length,
                opening.prefix_hashes,
                lambda: new_kv_buffers(span, opening.start, opening.end),
                keep=opening.keep,
                resume=(opening.resume_length, opening.resume_digest),
                adapter=opening.adapter,
                caller=caller,  # seeded only from what this same peer wrote (see find_prefix)
            )
            session.kv.limit = opening.max_length  # its buffers grow no further
        except (SwarmError, RequestError) as e:
            yield make_response(RpcError.of(e))
            return
        self.active += 1
        self._streams_of[caller] += 1
        began, computed = time.monotonic(), 0
        reader = _Requests(requests)
        token = opening.push_token
        inbox = self.pushes.open(token) if token is not None else None
        try:
            if cached == 0 and session.position == 0:
                cached = await self._seed(session, opening.prefix_hashes)
            yield make_response(SessionOpened(cached_tokens=cached, push=inbox is not None))
            first = True
            while (request := await reader.next(STEP_TIMEOUT_S)) is not None:
                try:
                    message = decode_stream_message(request.metadata)
                    if isinstance(message, Relay):
                        continue  # its step took the push first: exactly one input per step
                    step = message
                    hidden, hashes = await self._input(session, step, request, reader, inbox)
                    if hidden is None:
                        return  # the gateway closed the stream while the step waited
                    out = await self._step(session, step, hidden, hashes, first)
                    pushed = await self._push(step, out)
                except (SwarmError, RequestError) as e:
                    yield make_response(RpcError.of(e))
                    return
                except Exception as e:
                    logger.exception("a step of session %s failed", session.key)
                    yield make_response(RpcError.of(e))
                    return
                first = False
                computed += hidden.shape[1]
                done = StepDone(position=session.position, pushed=pushed)
                yield make_response(done) if pushed else make_response(done, out)
        finally:
            reader.close()
            if inbox is not None and token is not None:
                self.pushes.close(token, inbox)
            # One line per stream, like an access log: with --log-format json and the
            # request id, a request can be followed across every server it touched.
            logger.info(
                "stream of %s closed: blocks %d:%d, %d cached and %d computed tokens, %.2f s",
                caller or "a local caller",
                session.start,
                session.end,
                cached,
                computed,
                time.monotonic() - began,
            )
            self.active -= 1
            self._streams_of[caller] -= 1
            if not self._streams_of[caller]:
                del self._streams_of[caller]
            self.caches.release(session)
            async with self._released:
                self._released.notify_all()

    async def _input(
        self,
        session: CachedSession,
        step: Step,
        request: runtime_pb2.ExpertRequest,
        reader: _Requests,
        inbox: Inbox | None,
    ) -> tuple[torch.Tensor | None, list[str]]:
        """A step's input [1, n, H] (None: the stream ended while it waited) and the block
        hashes it completes; checked before it waits, so a bad step fails at once."""
        if not step.input_tokens:
            hidden = self._admission.one_tensor(request)
            return hidden, self.caches.check_step(
                session, step.position, hidden.shape[1], step.new_hashes
            )
        if inbox is None:
            raise InvalidRequest("this stream takes no pushes (it was opened without a token)")
        if request.tensors:
            raise ProtocolMismatch("a step awaiting its input by push carries a tensor")
        most = self._admission.max_tokens
        if step.input_tokens > most:
            raise InvalidRequest(f"{step.input_tokens} tokens in one step (max {most})")
        hashes = self.caches.check_step(session, step.position, step.input_tokens, step.new_hashes)
        return await self._receive(step, reader, inbox), hashes

    async def _receive(self, step: Step, reader: _Requests, inbox: Inbox) -> torch.Tensor | None:
        """Wait for the step's input: the previous hop's push or the gateway's relay,
        whichever comes first, within ``input_wait_s``."""
        arrived = inbox.expect(step.position, step.input_tokens, step.digest)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._input_wait_s
        try:
            while not arrived.done():
                left = deadline - loop.time()
                if left <= 0:
                    raise InvalidRequest(
                        f"the input of the step at {step.position} came neither by push nor "
                        f"by relay within {self._input_wait_s:g} s"
                    )
                if not await reader.wait(left, arrived):
                    continue
                request = reader.take()
                if request is None:
                    return None
                message = decode_stream_message(request.metadata)
                if not isinstance(message, Relay):
                    raise ProtocolMismatch("a step came while the last one awaits its input")
                inbox.relay(message.position, self._admission.one_tensor(request))
            return arrived.result()
        finally:
            inbox.settle()

    async def _push(self, step: Step, out: torch.Tensor) -> bool:
        """Whether the step's output went to the next hop (else it goes to the gateway)."""
        if step.push_to is None or self.pusher is None:
            return False
        return await self.pusher.push(step.push_to, step.position, step.digest, out)

    async def _read_opening(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], caller: str
    ) -> OpenSession:
        first = await asyncio.wait_for(anext(requests), OPEN_TIMEOUT_S)
        opening = decode(OpenSession, first.metadata)
        admission = self._admission
        admission.admit(opening.version, opening.member_pass, caller)
        admission.admit_work("new sessions", opening.start, opening.end)
        if opening.adapter is not None and opening.adapter not in admission.adapters:
            # Routed here from a stale record: another server may serve it.
            raise ProtocolMismatch(f"this server does not serve the adapter {opening.adapter!r}")
        if opening.max_length > admission.max_length:
            raise InvalidRequest(
                f"max_length {opening.max_length} exceeds the model's {admission.max_length}"
            )
        return opening

    async def _step(
        self,
        session: CachedSession,
        step: Step,
        hidden: torch.Tensor,
        hashes: list[str],
        first: bool,
    ) -> torch.Tensor:
        """All or nothing: the session records the step only once its forward completed."""
        position = step.position
        began = time.perf_counter()
        if position < session.position:
            # An edited or regenerated turn: what follows ``position`` is gone from now on,
            # so no new session is seeded from it while this step waits or runs.
            self.caches.truncate(session, position)
            session.kv.crop(position)
        try:
            blocks = (session.start, session.end)
            out = await self._scheduler.step(
                session.kv, blocks, position, hidden, adapter=session.adapter
            )
        except BaseException:
            # Cancelled (the stream dropped) while the compute thread may still be writing
            # this cache, or the forward failed halfway: nobody may use this cache again.
            self.caches.discard(session)
            raise
        self.caches.commit_step(
            session, position, hidden.shape[1], hashes, first=first, digest=step.digest
        )
        self._observe_step(hidden.shape[1], time.perf_counter() - began)
        return out

    async def _seed(self, session: CachedSession, prefix_hashes: list[str]) -> int:
        """A new session starts from the longest prefix another session of the same caller
        here holds (a conversation sharing a system prompt, say): copied, never shared, so
        neither conversation can crop or overwrite the other. How many tokens it starts
        with. Never another caller's: block hashes are that caller's unchecked word."""
        found = self.caches.find_prefix(session, prefix_hashes)
        if found is None:
            return 0
        donor, tokens = found
        version = donor.kv.version
        try:
            loop = asyncio.get_running_loop()
            copied = await loop.run_in_executor(
                self._compute, _copy_prefix, donor.kv, version, session.kv, tokens
            )
        except BaseException:
            self.caches.discard(session)  # the copy may be half done
            raise
        if not copied:
            return 0
        self.caches.seed(session, donor, tokens)
        return tokens

    async def _wait_until_idle(self, key: str) -> None:
        """A conversation's next turn can arrive before its last stream's end is processed
        here; give that stream a moment to finish rather than forking a cold cache."""
        # Still busy after that: a concurrent request, which gets a fork.
        async with self._released:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._released.wait_for(lambda: not self.caches.in_use(key)),
                    BUSY_WAIT_S,
                )


class _Requests:
    """A stream's requests, read by a task that outlives a wait for something else (a
    push): cancelling a read of hivemind's request iterator would end the stream."""

    def __init__(self, requests: AsyncIterator[runtime_pb2.ExpertRequest]) -> None:
        self._requests = requests
        self._reading: asyncio.Task[runtime_pb2.ExpertRequest | None] | None = None

    async def next(self, timeout_s: float) -> runtime_pb2.ExpertRequest | None:
        """The next request; None once the stream has ended; ``TimeoutError`` if none."""
        if not await self.wait(timeout_s):
            raise TimeoutError(f"no message for {timeout_s:g} s")
        return self.take()

    async def wait(self, timeout_s: float, *also: asyncio.Future[Any]) -> bool:
        """Wait until a request (or the end) can be taken, one of ``also`` is done, or
        ``timeout_s`` passed; whether a request can be taken."""
        if self._reading is None:
            self._reading = asyncio.ensure_future(self._read())
        reading = self._reading
        await asyncio.wait({reading, *also}, timeout=timeout_s, return_when="FIRST_COMPLETED")
        return reading.done()

    def take(self) -> runtime_pb2.ExpertRequest | None:
        reading, self._reading = self._reading, None
        assert reading is not None and reading.done(), "take() only after wait() said so"
        return reading.result()

    def close(self) -> None:
        if self._reading is not None:
            self._reading.cancel()

    async def _read(self) -> runtime_pb2.ExpertRequest | None:
        try:
            return await anext(self._requests)
        except StopAsyncIteration:
            return None
