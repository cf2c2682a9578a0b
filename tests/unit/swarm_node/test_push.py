"""Node-to-node push, receiving and sending: a step takes exactly one input, by push or by
relay, checked against what the gateway announced, and nothing waits forever or dangles."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from hivemind.proto import runtime_pb2

from models.loading import Span, load_span
from protocol.codec import make_request, make_response, read_tensors
from protocol.credentials import Role
from protocol.errors import CapacityExceeded, InvalidRequest
from protocol.latency import SimulatedLink
from protocol.membership import Membership, PassIssuer, SwarmKey
from protocol.rpc import (
    ErrorCode,
    OpenSession,
    Push,
    PushAccepted,
    PushItem,
    PushTarget,
    Relay,
    RpcError,
    SessionOpened,
    Step,
    StepDone,
    decode,
    decode_reply,
)
from swarm_node import push as push_module
from swarm_node.admission import AdmissionRules
from swarm_node.cache_store import CacheStore
from swarm_node.handler import BlockHandler
from swarm_node.push import MAX_EARLY_PUSHES, Inbox, PushBoard, Pusher
from tests.tiny_model import TINY_BLOCKS
from tests.unit.swarm_node.support import HIDDEN, inputs, reference, until
from tests.unit.swarm_node.test_handler import SECRET, FakeStream, info_of, make_store

TOKEN = "7a" * 16
OTHER_TOKEN = "b3" * 16
DIGEST = "d1" * 16
HALF = TINY_BLOCKS // 2


def run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


# ---- Inbox: the rules, without a model ----


def test_a_push_for_the_awaited_step_is_its_input() -> None:
    async def scenario() -> None:
        inbox = Inbox(HIDDEN)
        arrived = inbox.expect(5, 3, DIGEST)
        hidden = inputs(3, 1)
        await inbox.push(5, DIGEST, hidden)
        assert arrived.result() is hidden

    run(scenario())


def test_an_early_push_waits_for_its_step_and_is_accepted_once_taken() -> None:
    async def scenario() -> None:
        inbox = Inbox(HIDDEN)
        hidden = inputs(2, 1)
        pushing = asyncio.ensure_future(inbox.push(0, DIGEST, hidden))
        await until(lambda: inbox.early == 1)
        assert not pushing.done(), "accepted only once its step took it"
        arrived = inbox.expect(0, 2, DIGEST)
        assert arrived.result() is hidden
        await pushing  # accepted
        assert inbox.early == 0

    run(scenario())


def test_an_early_push_that_does_not_match_its_step_is_refused_and_the_step_waits_on() -> None:
    async def scenario() -> None:
        inbox = Inbox(HIDDEN)
        pushing = asyncio.ensure_future(inbox.push(0, DIGEST, inputs(2, 1)))
        await until(lambda: inbox.early == 1)
        arrived = inbox.expect(0, 3, DIGEST)  # the gateway says 3 tokens
        with pytest.raises(InvalidRequest, match="takes 3 tokens, got 2"):
            await pushing
        assert not arrived.done()
        assert inbox.relay(0, inputs(3, 2))  # the pusher's fallback: the gateway relays
        assert arrived.result().shape[1] == 3

    run(scenario())


def test_a_step_takes_exactly_one_input_whichever_comes_first() -> None:
    async def scenario() -> None:
        inbox = Inbox(HIDDEN)
        arrived = inbox.expect(0, 1, DIGEST)
        await inbox.push(0, DIGEST, inputs(1, 1))
        with pytest.raises(InvalidRequest, match="already has its input"):
            await inbox.push(0, DIGEST, inputs(1, 2))
        assert not inbox.relay(0, inputs(1, 3)), "a relay after the push is stale: dropped"
        torch.testing.assert_close(arrived.result(), inputs(1, 1))
        inbox.settle()

        second = inbox.expect(1, 1, DIGEST)
        assert inbox.relay(1, inputs(1, 4))
        with pytest.raises(InvalidRequest, match="already has its input"):
            await inbox.push(1, DIGEST, inputs(1, 5))
        torch.testing.assert_close(second.result(), inputs(1, 4))
        inbox.settle()
        with pytest.raises(InvalidRequest, match="has passed"):  # a late duplicate
            await inbox.push(1, DIGEST, inputs(1, 5))
        assert not inbox.relay(1, inputs(1, 5))

    run(scenario())


def test_a_second_early_push_for_one_step_is_a_duplicate() -> None:
    async def scenario() -> None:
        inbox = Inbox(HIDDEN)
        first = asyncio.ensure_future(inbox.push(3, DIGEST, inputs(1, 1)))
        await until(lambda: inbox.early == 1)
        with pytest.raises(InvalidRequest, match="already waiting"):
            await inbox.push(3, DIGEST, inputs(1, 2))
        inbox.expect(3, 1, DIGEST)
        await first

    run(scenario())


@pytest.mark.parametrize(
    ("hidden", "match"),
    [
        (torch.zeros(1, 2, HIDDEN, dtype=torch.bfloat16), "float32"),
        (torch.zeros(1, 2, HIDDEN + 1), "float32"),
        (torch.zeros(2, 2, HIDDEN), "float32"),
        (torch.zeros(2, HIDDEN), "float32"),
        (torch.zeros(1, 3, HIDDEN), "takes 2 tokens"),
        (torch.full((1, 2, HIDDEN), float("nan")), "non-finite"),
    ],
)
def test_a_push_of_the_wrong_shape_dtype_length_or_values_is_refused(
    hidden: torch.Tensor, match: str
) -> None:
    async def scenario() -> None:
        inbox = Inbox(HIDDEN)
        arrived = inbox.expect(0, 2, DIGEST)
        with pytest.raises(InvalidRequest, match=match):
            await inbox.push(0, DIGEST, hidden)
        assert not arrived.done()

    run(scenario())


@pytest.mark.parametrize(
    ("hidden", "match"),
    [
        (torch.zeros(1, 2, HIDDEN, dtype=torch.float16), "float32"),
        (torch.full((1, 2, HIDDEN), float("inf")), "non-finite"),
        (torch.full((1, 2, HIDDEN), float("nan")), "non-finite"),
    ],
)
def test_a_relay_of_the_wrong_dtype_or_values_is_refused(hidden: torch.Tensor, match: str) -> None:
    async def scenario() -> None:
        inbox = Inbox(HIDDEN)
        arrived = inbox.expect(0, 2, DIGEST)
        with pytest.raises(InvalidRequest, match=match):
            inbox.relay(0, hidden)
        assert not arrived.done()

    run(scenario())


def test_a_push_for_another_history_is_refused() -> None:
    async def scenario() -> None:
        inbox = Inbox(HIDDEN)
        inbox.expect(0, 1, DIGEST)
        with pytest.raises(InvalidRequest, match="another history"):
            await inbox.push(0, "ee" * 16, inputs(1, 1))

    run(scenario())


def test_early_pushes_are_bounded_in_number_and_in_time() -> None:
    async def scenario() -> None:
        inbox = Inbox(HIDDEN, early_wait_s=0.2)
        waiting = [
            asyncio.ensure_future(inbox.push(p, DIGEST, inputs(1, p)))
            for p in range(MAX_EARLY_PUSHES)
        ]
        await until(lambda: inbox.early == MAX_EARLY_PUSHES)
        with pytest.raises(CapacityExceeded):
            await inbox.push(MAX_EARLY_PUSHES, DIGEST, inputs(1, 9))
        for pending in waiting:  # their steps never come
            with pytest.raises(InvalidRequest, match="no step at"):
                await pending
        assert inbox.early == 0

    run(scenario())


def test_a_cancelled_push_or_step_leaves_nothing_waiting() -> None:
    async def scenario() -> None:
        inbox = Inbox(HIDDEN)
        pushing = asyncio.ensure_future(inbox.push(1, DIGEST, inputs(1, 1)))
        await until(lambda: inbox.early == 1)
        pushing.cancel()  # the pusher gave up
        await asyncio.gather(pushing, return_exceptions=True)
        assert inbox.early == 0

        arrived = inbox.expect(1, 1, DIGEST)  # that push is gone: the step waits
        assert not arrived.done()
        inbox.settle()  # the step was cancelled
        assert arrived.cancelled()
        late = asyncio.ensure_future(inbox.push(2, DIGEST, inputs(1, 2)))
        await until(lambda: inbox.early == 1)
        inbox.close()  # the stream ended: waiting pushes are refused at once
        with pytest.raises(InvalidRequest, match="closed"):
            await late
        with pytest.raises(InvalidRequest, match="closed"):
            await inbox.push(3, DIGEST, inputs(1, 3))

    run(scenario())


def test_the_board_finds_inboxes_by_token_only() -> None:
    async def scenario() -> None:
        board = PushBoard(HIDDEN)
        inbox = board.open(TOKEN)
        assert inbox is not None
        assert board.open(TOKEN) is None, "a token already in use is never shared"
        arrived = inbox.expect(0, 1, DIGEST)
        with pytest.raises(InvalidRequest, match="no stream here"):
            await board.deliver(OTHER_TOKEN, 0, DIGEST, inputs(1, 1))
        await board.deliver(TOKEN, 0, DIGEST, inputs(1, 1))
        assert arrived.done()
        board.close(TOKEN, inbox)
        assert len(board) == 0 and inbox.closed
        with pytest.raises(InvalidRequest, match="no stream here"):
            await board.deliver(TOKEN, 1, DIGEST, inputs(1, 1))

    run(scenario())


# ---- Pusher: any failure means "answer the gateway instead" ----


def accept_all(sent: list[tuple[str, Push]]) -> Any:
    async def call(peer: str, request: runtime_pb2.ExpertRequest) -> runtime_pb2.ExpertResponse:
        push = decode(Push, request.metadata)
        assert len(request.tensors) == len(push.items)
        sent.append((peer, push))
        return make_response(PushAccepted(refused=[None] * len(push.items)))

    return call


def test_a_push_is_sent_with_this_servers_pass_and_counts_once_accepted() -> None:
    sent: list[tuple[str, Push]] = []
    pusher = Pusher(accept_all(sent), member_pass=lambda: "my-pass")
    target = PushTarget(peer_id="QmNext", token=TOKEN)
    assert run(pusher.push(target, 4, DIGEST, inputs(1, 1)))
    item = PushItem(token=TOKEN, position=4, digest=DIGEST)
    assert sent == [("QmNext", Push(member_pass="my-pass", items=[item]))]


def test_the_pushes_of_one_forward_to_one_hop_share_one_call() -> None:
    """Streams that push in the same turn of the loop (a batched forward's steps) send
    one call per next hop, each output with its own step, and each hears its own fate."""
    sent: list[tuple[str, Push]] = []
    tokens = [f"{i:02x}" * 16 for i in range(5)]
    targets = [PushTarget(peer_id="QmB" if i < 3 else "QmC", token=t) for i, t in enumerate(tokens)]

    async def scenario() -> list[bool]:
        pusher = Pusher(accept_all(sent))
        return await asyncio.gather(
            *(pusher.push(t, 7, DIGEST, inputs(1, i)) for i, t in enumerate(targets))
        )

    assert run(scenario()) == [True] * 5
    assert [(peer, [item.token for item in push.items]) for peer, push in sent] == [
        ("QmB", tokens[:3]),
        ("QmC", tokens[3:]),
    ]


def test_each_push_of_a_call_is_accepted_or_refused_on_its_own() -> None:
    async def call(peer: str, request: runtime_pb2.ExpertRequest) -> runtime_pb2.ExpertResponse:
        push = decode(Push, request.metadata)
        no = RpcError(error=ErrorCode.INVALID_REQUEST, message="the step at 3 has passed")
        return make_response(
            PushAccepted(refused=[None if i.position != 3 else no for i in push.items])
        )

    async def scenario() -> list[bool]:
        pusher = Pusher(call)
        target = PushTarget(peer_id="QmNext", token=TOKEN)
        return await asyncio.gather(
            *(pusher.push(target, p, DIGEST, inputs(1, p)) for p in (2, 3, 4))
        )

    assert run(scenario()) == [True, False, True]


def test_pushes_beyond_one_messages_budget_go_in_several_calls(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    one = inputs(1, 1)
    monkeypatch.setattr(push_module, "MESSAGE_BUDGET_BYTES", 2 * one.numel() * 4)
    sent: list[tuple[str, Push]] = []

    async def scenario() -> list[bool]:
        pusher = Pusher(accept_all(sent))
        target = PushTarget(peer_id="QmNext", token=TOKEN)
        return await asyncio.gather(*(pusher.push(target, p, DIGEST, one) for p in range(5)))

    assert run(scenario()) == [True] * 5
    assert [[item.position for item in push.items] for _, push in sent] == [[0, 1], [2, 3], [4]]


def test_a_cancelled_push_is_dropped_before_its_call_and_the_rest_go_on() -> None:
    sent: list[tuple[str, Push]] = []

    async def scenario() -> bool:
        pusher = Pusher(accept_all(sent))
        target = PushTarget(peer_id="QmNext", token=TOKEN)
        dropped = asyncio.ensure_future(pusher.push(target, 1, DIGEST, inputs(1, 1)))
        kept = asyncio.ensure_future(pusher.push(target, 2, DIGEST, inputs(1, 2)))
        await asyncio.sleep(0)  # both queued, their call not yet made
        dropped.cancel()
        return await kept

    assert run(scenario())
    assert [[item.position for item in push.items] for _, push in sent] == [[2]]


@pytest.mark.parametrize("failure", ["refused", "unreachable", "silent", "miscounted"])
def test_a_push_that_fails_in_any_way_is_reported_not_raised(failure: str) -> None:
    async def call(peer: str, request: runtime_pb2.ExpertRequest) -> runtime_pb2.ExpertResponse:
        if failure == "refused":
            return make_response(RpcError(error=ErrorCode.INVALID_REQUEST, message="no"))
        if failure == "unreachable":
            raise ConnectionError("dial failed")
        if failure == "miscounted":  # a peer's answer must match what it was sent
            return make_response(PushAccepted(refused=[None, None]))
        await asyncio.sleep(10)
        raise AssertionError("not reached")

    pusher = Pusher(call, timeout_s=0.1)
    target = PushTarget(peer_id="QmNext", token=TOKEN)
    assert not run(pusher.push(target, 0, DIGEST, inputs(1, 1)))


def test_a_push_crosses_one_simulated_link() -> None:
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    pusher = Pusher(accept_all([]), link=SimulatedLink(0.1, sleep))
    assert run(pusher.push(PushTarget(peer_id="QmNext", token=TOKEN), 0, DIGEST, inputs(1, 1)))
    assert slept == [0.05, 0.05]


# ---- the handler: streams that take their inputs by push or relay ----


@pytest.fixture(scope="module")
def span(tiny_model: Path) -> Span:
    return load_span(tiny_model, 0, TINY_BLOCKS)


def handler_of(span: Span, **kwargs: Any) -> tuple[BlockHandler, CacheStore]:
    store = make_store(span)
    return BlockHandler(span, store, lambda: info_of(store), **kwargs), store


async def open_hop(
    handler: BlockHandler,
    blocks: tuple[int, int],
    token: str | None,
    caller: str = "",
    member_pass: str = "",
    session_id: str = "conv",
) -> FakeStream:
    stream = FakeStream(handler, caller)
    opening = OpenSession(
        member_pass=member_pass,
        session_id=session_id,
        secret=SECRET,
        start=blocks[0],
        end=blocks[1],
        max_length=64,
        push_token=token,
    )
    reply = await stream.exchange(make_request(opening))
    assert decode_reply(SessionOpened, reply.metadata, "node").push == (token is not None)
    return stream


def push_request(position: int, hidden: torch.Tensor, token: str = TOKEN, **kw: Any) -> Any:
    item = PushItem(token=token, position=position, digest=DIGEST)
    return make_request(Push(items=[item], **kw), hidden)


def refusal(reply: runtime_pb2.ExpertResponse) -> RpcError:
    """Why a push of one step was refused: the whole call's refusal, or its item's."""
    if "error" in json.loads(reply.metadata):
        return decode(RpcError, reply.metadata)
    [refused] = decode_reply(PushAccepted, reply.metadata, "node").refused
    assert refused is not None, "the push was accepted"
    return refused


def accepted(reply: runtime_pb2.ExpertResponse) -> bool:
    return decode_reply(PushAccepted, reply.metadata, "node").refused == [None]


def caller(peer: str) -> Any:
    return SimpleNamespace(remote_id=peer)


def expect_step(position: int, tokens: int, **kw: Any) -> runtime_pb2.ExpertRequest:
    return make_request(Step(position=position, input_tokens=tokens, digest=DIGEST, **kw))


def test_a_step_computes_on_the_pushed_input_as_on_its_own(span: Span) -> None:
    prompt, turn = inputs(5, 1), inputs(1, 2)
    expected = reference(span, [prompt, turn])

    async def scenario() -> None:
        handler, _ = handler_of(span)
        stream = await open_hop(handler, (0, TINY_BLOCKS), TOKEN)
        outs = []
        for position, hidden in ((0, prompt), (5, turn)):
            stream.send(expect_step(position, hidden.shape[1]))
            reply = asyncio.ensure_future(anext(stream.replies))
            reply_to_push = await handler.push.rpc_push(
                push_request(position, hidden), caller("QmPrev")
            )
            assert accepted(reply_to_push)
            done = await reply
            finished = decode_reply(StepDone, done.metadata, "node")
            assert finished.position == position + hidden.shape[1] and not finished.pushed
            outs.append(read_tensors(done)[0])
        for got, want in zip(outs, expected, strict=True):
            torch.testing.assert_close(got, want)
        await stream.close()
        assert len(handler.pushes) == 0

    run(scenario())


def test_a_push_before_its_step_and_a_relay_instead_of_a_push_both_work(span: Span) -> None:
    prompt, turn = inputs(4, 3), inputs(1, 4)
    expected = reference(span, [prompt, turn])

    async def scenario() -> None:
        handler, _ = handler_of(span)
        stream = await open_hop(handler, (0, TINY_BLOCKS), TOKEN)
        # Early: the push reaches the node before the gateway's step does.
        pushing = asyncio.ensure_future(
            handler.push.rpc_push(push_request(0, prompt), caller("Qm"))
        )
        await until(lambda: sum(i.early for i in handler.pushes._inboxes.values()) == 1)
        first = await stream.exchange(expect_step(0, 4))
        torch.testing.assert_close(read_tensors(first)[0], expected[0])
        assert accepted(await pushing)
        # Relayed: the previous hop could not push, the gateway sends the input itself.
        stream.send(expect_step(4, 1))
        relayed = await stream.exchange(make_request(Relay(relay=True, position=4), turn))
        torch.testing.assert_close(read_tensors(relayed)[0], expected[1])
        # A stale relay (its step took a push) is dropped without an answer.
        stream.send(make_request(Relay(relay=True, position=4), turn))
        await stream.close()

    run(scenario())


def test_pushes_with_a_wrong_token_or_from_a_stranger_are_refused_before_any_work(
    span: Span,
) -> None:
    key = Membership.of(SwarmKey.generate(), Role.SERVER)

    async def scenario() -> None:
        handler, _ = handler_of(span, rules=AdmissionRules(members=key))
        gateway_pass = PassIssuer(key, "QmGateway").current()
        stream = await open_hop(handler, (0, TINY_BLOCKS), TOKEN, "QmGateway", gateway_pass)
        stream.send(expect_step(0, 1))
        reply = asyncio.ensure_future(anext(stream.replies))
        stranger = await handler.push.rpc_push(push_request(0, inputs(1, 1)), caller("QmStranger"))
        assert refusal(stranger).error is ErrorCode.FORBIDDEN
        member = PassIssuer(key, "QmPrev").current()
        wrong = push_request(0, inputs(1, 1), token=OTHER_TOKEN, member_pass=member)
        refused = await handler.push.rpc_push(wrong, caller("QmPrev"))
        assert refusal(refused).error is ErrorCode.INVALID_REQUEST
        stolen_pass = push_request(0, inputs(1, 1), member_pass=member)  # QmPrev's, not ours
        refused = await handler.push.rpc_push(stolen_pass, caller("QmOther"))
        assert refusal(refused).error is ErrorCode.FORBIDDEN
        ok = await handler.push.rpc_push(push_request(0, inputs(1, 1), member_pass=member),
                                    caller("QmPrev"))  # fmt: skip
        assert accepted(ok)
        decode_reply(StepDone, (await reply).metadata, "node")
        await stream.close()

    run(scenario())


def test_a_step_whose_input_never_comes_fails_with_a_clear_error(span: Span) -> None:
    async def scenario() -> None:
        handler, store = handler_of(span, input_wait_s=0.2)
        stream = await open_hop(handler, (0, TINY_BLOCKS), TOKEN)
        reply = await stream.exchange(expect_step(0, 2))
        error = decode(RpcError, reply.metadata)
        assert error.error is ErrorCode.INVALID_REQUEST
        assert "neither by push nor by relay" in error.message
        with pytest.raises(StopAsyncIteration):
            await anext(stream.replies)
        assert len(handler.pushes) == 0 and handler.active_streams == 0
        assert not any(store.in_use(k) for k in store.cache_keys())

    run(scenario())


def test_a_stream_closed_while_its_step_waits_frees_everything(span: Span) -> None:
    async def scenario() -> None:
        handler, store = handler_of(span)
        stream = await open_hop(handler, (0, TINY_BLOCKS), TOKEN)
        stream.send(expect_step(0, 1))
        waiting = asyncio.ensure_future(anext(stream.replies))
        early = asyncio.ensure_future(
            handler.push.rpc_push(push_request(1, inputs(1, 1)), caller("Q"))
        )
        await until(lambda: sum(i.early for i in handler.pushes._inboxes.values()) == 1)
        stream.send(None)  # type: ignore[arg-type]  # the gateway leaves mid-wait
        with pytest.raises(StopAsyncIteration):
            await waiting
        refused = await early
        assert refusal(refused).error is ErrorCode.INVALID_REQUEST
        assert len(handler.pushes) == 0 and handler.active_streams == 0
        assert not any(store.in_use(k) for k in store.cache_keys())

    run(scenario())


def test_a_step_without_a_push_token_or_with_a_tensor_and_a_count_is_refused(span: Span) -> None:
    async def scenario() -> None:
        handler, _ = handler_of(span)
        relayed_only = await open_hop(handler, (0, TINY_BLOCKS), None)
        reply = await relayed_only.exchange(expect_step(0, 1))
        assert "takes no pushes" in decode(RpcError, reply.metadata).message
        both = await open_hop(handler, (0, TINY_BLOCKS), TOKEN)
        step = Step(position=0, input_tokens=1, digest=DIGEST)
        reply = await both.exchange(make_request(step, inputs(1, 1)))
        assert decode(RpcError, reply.metadata).error is ErrorCode.PROTOCOL_MISMATCH

    run(scenario())


def test_a_hop_pushes_its_output_into_the_next_hops_step(span: Span) -> None:
    """Two servers, blocks [0, HALF) and [HALF, end): the first pushes, the second
    answers; the chain's output is the whole model's."""
    prompt = inputs(6, 5)
    expected = reference(span, [prompt])[0]

    async def scenario(fail: bool) -> None:
        first, _ = handler_of(span)
        second, _ = handler_of(span)

        async def call(peer: str, request: runtime_pb2.ExpertRequest) -> Any:
            if fail:
                raise ConnectionError("the next hop is gone")
            return await second.push.rpc_push(request, caller("QmFirst"))

        first.streams.pusher = Pusher(call)
        head = await open_hop(first, (0, HALF), None)
        tail = await open_hop(second, (HALF, TINY_BLOCKS), TOKEN)
        tail.send(expect_step(0, 6))
        answer = asyncio.ensure_future(anext(tail.replies))
        to = PushTarget(peer_id="QmSecond", token=TOKEN)
        done = await head.exchange(
            make_request(Step(position=0, digest=DIGEST, push_to=to), prompt)
        )
        head_done = decode_reply(StepDone, done.metadata, "node")
        assert head_done.position == 6 and head_done.pushed is not fail
        if fail:  # the output came back instead: the gateway relays it
            (middle,) = read_tensors(done)
            tail.send(make_request(Relay(relay=True, position=0), middle))
        else:
            assert not done.tensors, "an acknowledged push carries no hidden state"
        out = await answer
        torch.testing.assert_close(read_tensors(out)[0], expected, atol=1e-4, rtol=1e-4)
        await head.close()
        await tail.close()

    run(scenario(fail=False))
    run(scenario(fail=True))


def test_one_call_pushing_several_steps_answers_each_on_its_own(span: Span) -> None:
    """Two streams' steps in one push, plus one for a token nobody holds and one whose
    tensor cannot be read: the two are taken, the others refused, and a call whose
    tensors do not match its items is refused whole, before anything is taken."""
    a, b = inputs(1, 1), inputs(1, 2)
    want_a, want_b = reference(span, [a])[0], reference(span, [b])[0]

    async def scenario() -> None:
        handler, _ = handler_of(span)
        first = await open_hop(handler, (0, TINY_BLOCKS), TOKEN, session_id="one")
        second = await open_hop(handler, (0, TINY_BLOCKS), OTHER_TOKEN, session_id="two")
        for stream in (first, second):
            stream.send(expect_step(0, 1))
        replies = [asyncio.ensure_future(anext(s.replies)) for s in (first, second)]
        items = [
            PushItem(token=t, position=0, digest=DIGEST)
            for t in (TOKEN, "ee" * 16, OTHER_TOKEN, TOKEN)
        ]
        mismatched = make_request(Push(items=items), a, a, b)
        assert refusal(await handler.push.rpc_push(mismatched, caller("Qm"))).error is (
            ErrorCode.PROTOCOL_MISMATCH
        )
        request = make_request(Push(items=items), a, a, b, a)
        request.tensors[3].dtype = "float99"
        reply = await handler.push.rpc_push(request, caller("Qm"))
        refused = decode_reply(PushAccepted, reply.metadata, "node").refused
        assert refused[0] is None and refused[2] is None
        assert refused[1] is not None and refused[1].error is ErrorCode.INVALID_REQUEST
        assert refused[3] is not None and refused[3].error is ErrorCode.PROTOCOL_MISMATCH
        outs = [read_tensors(await reply) for reply in replies]
        torch.testing.assert_close(outs[0][0], want_a)
        torch.testing.assert_close(outs[1][0], want_b)
        await first.close()
        await second.close()

    run(scenario())


def test_a_step_that_never_comes_holds_its_calls_reply_only_briefly(
    span: Span, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One item of a call may wait for a step the gateway has not announced yet; its
    call's reply waits for it, so that wait is short, and then it is refused alone."""
    monkeypatch.setattr(Inbox.__init__, "__defaults__", (0.2,))  # EARLY_WAIT_S, shortened

    async def scenario() -> None:
        handler, _ = handler_of(span)
        first = await open_hop(handler, (0, TINY_BLOCKS), TOKEN, session_id="one")
        second = await open_hop(handler, (0, TINY_BLOCKS), OTHER_TOKEN, session_id="two")
        first.send(expect_step(0, 1))
        reply = asyncio.ensure_future(anext(first.replies))
        items = [
            PushItem(token=TOKEN, position=0, digest=DIGEST),
            PushItem(token=OTHER_TOKEN, position=0, digest=DIGEST),  # never announced
        ]
        answer = await asyncio.wait_for(
            handler.push.rpc_push(
                make_request(Push(items=items), inputs(1, 1), inputs(1, 2)), caller("Q")
            ),
            5,
        )
        taken, refused = decode_reply(PushAccepted, answer.metadata, "node").refused
        assert taken is None and refused is not None and "came within 0.2 s" in refused.message
        decode_reply(StepDone, (await reply).metadata, "node")
        await first.close()
        await second.close()

    run(scenario())


def bad_input(kind: str) -> torch.Tensor:
    hidden = inputs(2, 5)
    if kind in ("nan", "inf"):
        hidden[0, 1, 7] = float(kind)
        return hidden
    return hidden.to(getattr(torch, kind))


@pytest.mark.parametrize("kind", ["nan", "inf", "bfloat16", "float64"])
@pytest.mark.parametrize("path", ["step", "relay", "push"])
def test_an_input_that_is_not_finite_float32_is_refused_on_every_path(
    span: Span, path: str, kind: str
) -> None:
    """Whichever way an input comes (with its step, relayed by the gateway, pushed by the
    previous hop), NaN, inf or another dtype never reaches compute or the session's cache."""
    hidden = bad_input(kind)

    async def scenario() -> None:
        handler, store = handler_of(span, input_wait_s=0.5)
        stream = await open_hop(handler, (0, TINY_BLOCKS), None if path == "step" else TOKEN)
        if path == "step":
            reply = await stream.exchange(make_request(Step(position=0, digest=DIGEST), hidden))
            error = decode(RpcError, reply.metadata)
        elif path == "relay":
            stream.send(expect_step(0, 2))
            reply = await stream.exchange(make_request(Relay(relay=True, position=0), hidden))
            error = decode(RpcError, reply.metadata)
        else:
            stream.send(expect_step(0, 2))
            waiting = asyncio.ensure_future(anext(stream.replies))
            inbox = handler.pushes._inboxes[TOKEN]
            await until(lambda: inbox._awaited is not None)  # the step awaits its input
            error = refusal(await handler.push.rpc_push(push_request(0, hidden), caller("QmPrev")))
            await waiting  # the step then waits out its input and fails
        assert error.error is ErrorCode.INVALID_REQUEST
        assert ("non-finite" if kind in ("nan", "inf") else "float32") in error.message
        assert store.tokens_computed == 0
        assert all(store._cached[k].position == 0 for k in store.cache_keys())

    run(scenario())
