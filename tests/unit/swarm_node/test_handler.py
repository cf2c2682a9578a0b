"""rpc_inference driven by fake request streams: steps are all or nothing under cancellation,
refusals are typed, and the metrics thread never touches the session store."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hivemind.proto import runtime_pb2

from models.loading import Span, load_span
from protocol.codec import make_request, read_tensors
from protocol.credentials import Role
from protocol.errors import CapacityExceeded, NotAMember
from protocol.membership import Membership, PassIssuer, SwarmKey
from protocol.prefix import BLOCK_TOKENS, TokenHistory
from protocol.rpc import (
    ErrorCode,
    OpenSession,
    RpcError,
    ServerInfo,
    SessionOpened,
    Step,
    StepDone,
    decode,
    decode_reply,
)
from swarm_node import batching as batching_module
from swarm_node import inference_stream as inference_stream_module
from swarm_node.admission import AdmissionRules
from swarm_node.bounded_streams import Caller as StreamCaller
from swarm_node.cache_store import CacheStore
from swarm_node.handler import BlockHandler
from swarm_node.inference_stream import cache_key
from swarm_node.metrics import InfoBoard, _NodeCollector
from tests.tiny_model import TINY_BLOCKS
from tests.unit.swarm_node.support import Gate, gated_forwards, inputs, reference, until

SECRET = "5e" * 16
CONV = cache_key("conv", SECRET)  # where the node keeps the session "conv"


@pytest.fixture(scope="module")
def span(tiny_model: Path) -> Span:
    return load_span(tiny_model, 0, TINY_BLOCKS)


def make_store(span: Span) -> CacheStore:
    per_token = 2 * span.config.num_key_value_heads * 16 * 4  # head_dim 16, fp32
    return CacheStore(1 << 26, per_token)


def info_of(store: CacheStore) -> ServerInfo:
    stats = store.stats()
    return ServerInfo(
        start=0,
        end=TINY_BLOCKS,
        state="online",
        sessions=stats.sessions,
        load=0.0,
        cache_bytes_free=stats.free_bytes,
        throughput=1.0,
    )


class FakeStream:
    """The gateway's side of one rpc_inference stream, driven by hand."""

    def __init__(self, handler: BlockHandler, caller: str = "") -> None:
        self._requests: asyncio.Queue[runtime_pb2.ExpertRequest | None] = asyncio.Queue()
        # What hivemind hands a handler: the peer id that libp2p authenticated.
        context = StreamCaller(caller) if caller else None  # type: ignore[arg-type]
        self.replies = handler.streams.rpc_inference(self._incoming(), context=context)  # type: ignore[arg-type]

    async def _incoming(self) -> AsyncIterator[runtime_pb2.ExpertRequest]:
        while (request := await self._requests.get()) is not None:
            yield request

    def send(self, request: runtime_pb2.ExpertRequest) -> None:
        self._requests.put_nowait(request)

    async def exchange(self, request: runtime_pb2.ExpertRequest) -> runtime_pb2.ExpertResponse:
        self.send(request)
        return await anext(self.replies)

    async def open(
        self,
        session_id: str,
        hashes: list[str],
        max_length: int = 200,
        secret: str = SECRET,
        member_pass: str = "",
    ) -> int:
        opening = OpenSession(
            member_pass=member_pass,
            session_id=session_id,
            secret=secret,
            start=0,
            end=TINY_BLOCKS,
            max_length=max_length,
            prefix_hashes=hashes,
        )
        reply = await self.exchange(make_request(opening))
        return decode_reply(SessionOpened, reply.metadata, "node").cached_tokens

    async def step(self, position: int, hidden: torch.Tensor, new: list[str]) -> torch.Tensor:
        reply = await self.exchange(make_request(Step(position=position, new_hashes=new), hidden))
        done = decode_reply(StepDone, reply.metadata, "node")
        assert done.position == position + hidden.shape[1]
        return read_tensors(reply)[0]

    async def close(self) -> None:
        self.send(None)  # type: ignore[arg-type]
        with pytest.raises(StopAsyncIteration):
            await anext(self.replies)


def hashes_for(n: int) -> list[str]:
    return TokenHistory(list(range(n))).hashes


@pytest.fixture
def slow_forward(monkeypatch: pytest.MonkeyPatch) -> Iterator[Gate]:
    """One-token steps block inside the compute thread until the gate opens."""
    with gated_forwards(monkeypatch, lambda hidden: hidden.shape[1] == 1) as gate:
        yield gate


def test_a_step_cancelled_mid_forward_leaves_no_half_written_session(
    span: Span, slow_forward: Gate
) -> None:
    # Block-aligned, so that a server that kept the session would resume exactly at its end.
    n = 2 * BLOCK_TOKENS
    prompt, turn = inputs(n, 1), inputs(1, 2)
    expected = reference(span, [prompt, turn])

    async def scenario() -> None:
        store = make_store(span)
        handler = BlockHandler(span, store, lambda: info_of(store))
        first = FakeStream(handler)
        assert await first.open("conv", []) == 0
        out = await first.step(0, prompt, hashes_for(n))
        torch.testing.assert_close(out, expected[0])
        await first.close()

        # The next turn: its one-token step is cancelled while the forward runs, as when
        # hivemind drops a stream whose connection broke.
        second = FakeStream(handler)
        assert await second.open("conv", hashes_for(n)) == n
        second.send(make_request(Step(position=n), turn))
        pending = asyncio.ensure_future(anext(second.replies))
        await until(slow_forward.entered.is_set)
        pending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pending
        await second.replies.aclose()
        assert CONV not in store.cache_keys(), "a half-written session must be dropped"
        slow_forward.open.set()  # the orphaned forward now finishes writing to its own cache

        # A retry sees a consistent session: whatever it reports cached, resending from
        # there gives exactly the outputs of an undisturbed run.
        retry = FakeStream(handler)
        cached = await retry.open("conv", hashes_for(n))
        history = torch.cat([prompt, turn], dim=1)
        out = await retry.step(cached, history[:, cached:], hashes_for(n)[cached // 32 :])
        torch.testing.assert_close(out[:, -1:], expected[1], atol=1e-4, rtol=1e-4)
        await retry.close()

    asyncio.run(scenario())


def test_a_failed_forward_is_a_typed_error_and_drops_the_session(
    span: Span, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any, **kwargs: Any) -> torch.Tensor:
        raise RuntimeError("out of memory, say")

    async def scenario() -> None:
        store = make_store(span)
        handler = BlockHandler(span, store, lambda: info_of(store))
        stream = FakeStream(handler)
        await stream.open("conv", [])
        await stream.step(0, inputs(40, 1), hashes_for(40))
        monkeypatch.setattr(batching_module, "forward_packed", broken)
        reply = await stream.exchange(make_request(Step(position=40), inputs(1, 2)))
        error = decode(RpcError, reply.metadata)
        assert error.error is ErrorCode.INTERNAL
        with pytest.raises(StopAsyncIteration):
            await anext(stream.replies)
        assert CONV not in store.cache_keys()

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("opening", "code"),
    [
        (
            OpenSession(
                secret="5e" * 16, session_id="s", start=0, end=TINY_BLOCKS + 1, max_length=8
            ),
            "invalid",
        ),
        (
            OpenSession(
                secret="5e" * 16, session_id="s", start=0, end=TINY_BLOCKS, max_length=10**6
            ),
            "invalid",
        ),
        (
            OpenSession(secret="5e" * 16, version=99, session_id="s", start=0, end=1, max_length=8),
            "protocol",
        ),
        (
            OpenSession(secret="5e" * 16, session_id="s", start=0, end=TINY_BLOCKS, max_length=8),
            "draining",
        ),
    ],
)
def test_refusals_are_typed_so_the_gateway_knows_whether_to_try_a_replica(
    span: Span, opening: OpenSession, code: str
) -> None:
    async def scenario() -> Exception:
        store = make_store(span)
        handler = BlockHandler(
            span,
            store,
            lambda: info_of(store),
            AdmissionRules(accepting=lambda: code != "draining"),
        )
        stream = FakeStream(handler)
        reply = await stream.exchange(make_request(opening))
        with pytest.raises(Exception) as caught:
            decode_reply(SessionOpened, reply.metadata, "peer-x")
        assert handler.active_streams == 0
        return caught.value

    error = asyncio.run(scenario())
    assert getattr(error, "peer_id", None) == "peer-x"
    if code == "draining":
        assert isinstance(error, CapacityExceeded)  # full or leaving: try a replica
    else:
        assert not isinstance(error, CapacityExceeded)


def test_a_step_past_the_cache_is_refused_and_the_session_stays_usable(span: Span) -> None:
    prompt = inputs(40, 1)

    async def scenario() -> None:
        store = make_store(span)
        handler = BlockHandler(span, store, lambda: info_of(store))
        stream = FakeStream(handler)
        await stream.open("conv", [])
        await stream.step(0, prompt, hashes_for(40))
        reply = await stream.exchange(make_request(Step(position=45), inputs(1, 2)))
        assert decode(RpcError, reply.metadata).error is ErrorCode.INVALID_REQUEST
        assert "45" in decode(RpcError, reply.metadata).message
        await stream.replies.aclose()
        again = FakeStream(handler)
        assert await again.open("conv", hashes_for(40)) == BLOCK_TOKENS

    asyncio.run(scenario())


def test_the_metrics_thread_reads_a_snapshot_never_the_store(span: Span) -> None:
    loop_thread: list[int] = []

    class WatchedStore(CacheStore):
        touched_from: set[int] = set()

        def stats(self):  # type: ignore[no-untyped-def]
            self.touched_from.add(threading.get_ident())
            return super().stats()

        def expire(self) -> None:
            self.touched_from.add(threading.get_ident())
            super().expire()

    async def scenario() -> None:
        loop_thread.append(threading.get_ident())
        store = WatchedStore(1 << 26, 512, idle_ttl_s=0.0)
        handler = BlockHandler(span, store, lambda: info_of(store))
        board = InfoBoard(lambda: (store.expire(), info_of(store))[1])
        collector = _NodeCollector(lambda: board.latest, store.budget_bytes)
        stop = threading.Event()
        errors: list[BaseException] = []
        scrapes = 0

        def scrape() -> None:
            nonlocal scrapes
            while not stop.is_set():
                try:
                    list(collector.collect())
                    scrapes += 1
                except BaseException as e:
                    errors.append(e)
                    return

        thread = threading.Thread(target=scrape)
        thread.start()
        try:
            for i in range(6):
                stream = FakeStream(handler)
                await stream.open(f"conv-{i}", [])
                await stream.step(0, inputs(8, i), [])
                board.refresh()
                await stream.close()
        finally:
            stop.set()
            thread.join(10)
        assert not errors and scrapes > 0
        assert store.touched_from == {loop_thread[0]}
        assert board.latest.cached_sessions == len(store)

    asyncio.run(scenario())


def Caller(peer: str) -> StreamCaller:
    """What a handler is told about who calls: the remote peer id."""
    return StreamCaller(peer)  # type: ignore[arg-type]


def test_each_bad_input_is_refused_before_any_compute(span: Span) -> None:
    async def reply_to(handler: BlockHandler, *requests: runtime_pb2.ExpertRequest) -> RpcError:
        stream = FakeStream(handler)
        for request in requests[:-1]:
            await stream.exchange(request)
        reply = await stream.exchange(requests[-1])
        return decode(RpcError, reply.metadata)

    async def scenario() -> None:
        store = make_store(span)
        handler = BlockHandler(span, store, lambda: info_of(store))
        opening = make_request(
            OpenSession(secret="5e" * 16, session_id="s", start=0, end=TINY_BLOCKS, max_length=64)
        )
        batch_of_two = make_request(Step(position=0), torch.zeros(2, 1, 64))
        error = await reply_to(handler, opening, batch_of_two)
        assert error.error is ErrorCode.INVALID_REQUEST and "[1, n, 64]" in error.message
        bad_hash = runtime_pb2.ExpertRequest(
            metadata=b'{"session_id": "t", "start": 0, "end": 4, "max_length": 8,'
            b' "prefix_hashes": ["not-a-hash"]}'
        )
        assert (await reply_to(handler, bad_hash)).error is ErrorCode.PROTOCOL_MISMATCH
        assert store.tokens_computed == 0

    asyncio.run(scenario())


def test_one_peer_cannot_hold_every_stream(span: Span, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inference_stream_module, "MAX_STREAMS_PER_PEER", 2)

    async def scenario() -> None:
        store = make_store(span)
        handler = BlockHandler(span, store, lambda: info_of(store))

        def stream_from(peer: str) -> FakeStream:
            stream = FakeStream(handler)
            stream.replies = handler.streams.rpc_inference(stream._incoming(), Caller(peer))  # type: ignore[arg-type]
            return stream

        greedy = [stream_from("greedy") for _ in range(3)]
        for stream in greedy[:2]:
            await stream.open(f"s{id(stream)}", [])
        with pytest.raises(CapacityExceeded):
            await greedy[2].open("s-third", [])
        await stream_from("polite").open("s-polite", [])  # others are still served
        await greedy[0].close()
        await stream_from("greedy").open("s-again", [])  # a slot came back

    asyncio.run(scenario())


def test_a_closed_swarm_node_refuses_callers_without_their_own_pass_before_any_work(
    span: Span,
) -> None:
    key = Membership.of(SwarmKey.generate(), Role.SERVER)

    async def scenario() -> None:
        store = make_store(span)
        handler = BlockHandler(span, store, lambda: info_of(store), AdmissionRules(members=key))
        refused = {
            "no pass": "",
            "another swarm": PassIssuer(
                Membership.of(SwarmKey.generate(), Role.GATEWAY), "QmCaller"
            ).current(),
            "someone else's": PassIssuer(key, "QmSomeoneElse").current(),
        }
        for why, member_pass in refused.items():
            with pytest.raises(NotAMember):
                await FakeStream(handler, "QmCaller").open("conv", [], member_pass=member_pass)
            assert len(store) == 0 and store.used_bytes == 0, why
            assert handler.active_streams == 0, why
        ours = PassIssuer(key, "QmCaller").current()
        stream = FakeStream(handler, "QmCaller")
        assert await stream.open("conv", [], member_pass=ours) == 0
        await stream.close()

    asyncio.run(scenario())


def test_a_session_resumes_only_with_the_secret_it_was_opened_with(span: Span) -> None:
    n = 2 * BLOCK_TOKENS

    async def scenario() -> None:
        store = make_store(span)
        handler = BlockHandler(span, store, lambda: info_of(store))
        owner = FakeStream(handler)
        await owner.open("conv", [])
        await owner.step(0, inputs(n, 1), hashes_for(n))
        await owner.close()

        # The id without its secret: no session to resume (a prefix it knows is copied, as
        # for any conversation; knowing the hashes takes knowing the tokens).
        guesser = FakeStream(handler)
        assert await guesser.open("conv", [], secret="77" * 16) == 0
        await guesser.step(0, inputs(n, 2), TokenHistory(list(range(9, 9 + n))).hashes)
        await guesser.close()

        # Had the guesser written to the owner's session, its blocks would be other hashes.
        again = FakeStream(handler)
        assert await again.open("conv", hashes_for(n)) == n
        await again.close()
        assert CONV in store.cache_keys() and "conv" not in store.cache_keys()

    asyncio.run(scenario())


def test_a_new_conversation_starts_from_a_shared_prefix_and_leaves_the_other_intact(
    span: Span,
) -> None:
    shared, n = 2 * BLOCK_TOKENS, 2 * BLOCK_TOKENS + 5
    prompt, theirs = inputs(n, 1), inputs(1, 3)
    expected = reference(span, [prompt[:, :shared], theirs])

    async def scenario() -> None:
        store = make_store(span)
        handler = BlockHandler(span, store, lambda: info_of(store))
        owner = FakeStream(handler)
        await owner.open("conv", [])
        await owner.step(0, prompt, hashes_for(n))
        await owner.close()

        # Another conversation (its own id and secret) with the same first two blocks.
        other = FakeStream(handler)
        assert await other.open("other", hashes_for(shared), secret="77" * 16) == shared
        out = await other.step(shared, theirs, [])
        torch.testing.assert_close(out, expected[1], atol=1e-4, rtol=1e-4)
        await other.close()

        kept = store._cached[CONV]
        assert kept.position == n and kept.hashes == hashes_for(n), "the owner lost nothing"
        again = FakeStream(handler)
        assert await again.open("conv", hashes_for(n)) == shared  # full blocks it still holds
        await again.close()

    asyncio.run(scenario())


def test_another_peers_session_under_a_prompts_hashes_seeds_nothing(span: Span) -> None:
    """A member writes garbage hidden states under the hashes of a prompt's prefix: the
    gateway's session with that prompt computes it afresh and gets the true output; the
    gateway's own sessions still seed each other."""
    shared, n = 2 * BLOCK_TOKENS, 2 * BLOCK_TOKENS + 5
    prompt = inputs(n, 1)
    expected = reference(span, [prompt])

    async def scenario() -> None:
        store = make_store(span)
        handler = BlockHandler(span, store, lambda: info_of(store))
        poisoner = FakeStream(handler, "QmPoisoner")
        assert await poisoner.open("poison", [], secret="77" * 16) == 0
        await poisoner.step(0, 1e4 * inputs(shared, 9), hashes_for(n)[:2])
        await poisoner.close()

        victim = FakeStream(handler, "QmGateway")
        assert await victim.open("conv", hashes_for(n)) == 0, "nothing of the poisoner's"
        torch.testing.assert_close(await victim.step(0, prompt, hashes_for(n)), expected[0])
        await victim.close()

        sibling = FakeStream(handler, "QmGateway")  # another conversation, same gateway
        assert await sibling.open("other", hashes_for(n), secret="66" * 16) == shared
        out = await sibling.step(shared, prompt[:, shared:], [])
        torch.testing.assert_close(out, expected[0][:, shared:], atol=1e-4, rtol=1e-4)
        await sibling.close()

    asyncio.run(scenario())
