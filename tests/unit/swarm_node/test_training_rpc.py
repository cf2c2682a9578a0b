"""rpc_train_forward / rpc_train_backward driven by fake request streams: the answers are
the node-side training functions' own, and every bad call is refused, typed, before its
tensors cost anything."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from hivemind.compression import serialize_torch_tensor
from hivemind.proto import runtime_pb2

from models.loading import Span, block_linears, load_span
from models.lora import lora_shapes
from protocol.codec import make_request, read_pieces, request_pieces
from protocol.credentials import Role
from protocol.membership import Membership, PassIssuer, SwarmKey
from protocol.rpc import ErrorCode, LoraSpec, RpcError, TrainCall, TrainDone, decode
from swarm_node.admission import AdmissionRules
from swarm_node.backend import forward_span
from swarm_node.bounded_streams import Caller as StreamCaller
from swarm_node.cache_store import CacheStore
from swarm_node.handler import BlockHandler
from swarm_node.training import LoraCall, train_backward, train_forward
from tests.tiny_model import TINY_BLOCKS
from tests.unit.swarm_node.test_handler import info_of, make_store

SPEC = LoraSpec(rank=2, alpha=4, targets=["q_proj", "down_proj"])


@pytest.fixture(scope="module")
def span(tiny_model: Path) -> Span:
    return load_span(tiny_model, 0, TINY_BLOCKS)


def handler_of(span: Span, **kw: Any) -> BlockHandler:
    store: CacheStore = make_store(span)
    return BlockHandler(span, store, lambda: info_of(store), **kw)


def lora_for(span: Span, blocks: int, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shapes = lora_shapes(block_linears(span.config), SPEC.rank, SPEC.targets, blocks)
    return [torch.randn(shape, generator=generator) * 0.1 for shape in shapes]


def hidden(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, length, 64, generator=torch.Generator().manual_seed(seed))


async def _aiter(items: Sequence[runtime_pb2.ExpertRequest]) -> AsyncIterator[Any]:
    for item in items:
        yield item


async def call(
    handler: BlockHandler,
    header: TrainCall,
    tensors: Sequence[torch.Tensor],
    *,
    backward: bool = False,
    caller: str = "",
    requests: Sequence[runtime_pb2.ExpertRequest] | None = None,
) -> list[runtime_pb2.ExpertResponse]:
    sent = requests if requests is not None else [make_request(header), *request_pieces(tensors)]
    context = StreamCaller(caller) if caller else None  # type: ignore[arg-type]
    rpc = handler.training.rpc_train_backward if backward else handler.training.rpc_train_forward
    return [reply async for reply in rpc(_aiter(sent), context)]  # type: ignore[arg-type]


def header(start: int = 0, end: int = TINY_BLOCKS, **kw: Any) -> TrainCall:
    fields: dict[str, Any] = {"start": start, "end": end, "batch": 2, "length": 5, "lora": SPEC}
    return TrainCall(**{**fields, **kw})


def refusal(replies: list[runtime_pb2.ExpertResponse]) -> RpcError:
    assert len(replies) == 1
    return decode(RpcError, replies[0].metadata)


def test_forward_and_backward_answer_what_the_span_computes(span: Span) -> None:
    lora, x, grad = lora_for(span, 2), hidden(2, 5, 1), hidden(2, 5, 2)
    linears = block_linears(span.config)
    job = LoraCall(1, 3, SPEC.rank, SPEC.alpha, tuple(SPEC.targets))

    async def scenario() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        handler = handler_of(span)
        replies = await call(handler, header(1, 3), [x, *lora])
        forward = await read_pieces(_aiter(replies[1:]), [(2, 5, 64)])
        assert decode(TrainDone, replies[0].metadata).values == x.numel()
        replies = await call(handler, header(1, 3), [x, grad, *lora], backward=True)
        shapes = [(2, 5, 64), *(tuple(t.shape) for t in lora)]
        backward = await read_pieces(_aiter(replies[1:]), shapes)
        handler.shutdown()
        return forward, backward

    forward, backward = asyncio.run(scenario())
    assert torch.equal(forward[0], train_forward(span, job, linears, lora, x))
    dx, dlora = train_backward(span, job, linears, lora, x, grad)
    assert dx is not None
    assert torch.equal(backward[0], dx)
    for got, want in zip(backward[1:], dlora, strict=True):
        assert torch.equal(got, want)


def test_backward_without_input_grad_sends_lora_grads_only(span: Span) -> None:
    lora = lora_for(span, TINY_BLOCKS)

    async def scenario() -> list[runtime_pb2.ExpertResponse]:
        handler = handler_of(span)
        tensors = [hidden(2, 5, 1), hidden(2, 5, 2), *lora]
        return await call(handler, header(input_grad=False), tensors, backward=True)

    replies = asyncio.run(scenario())
    assert decode(TrainDone, replies[0].metadata).values == sum(t.numel() for t in lora)


def test_inference_after_training_is_bit_identical(span: Span) -> None:
    prompt = hidden(1, 7, 3)
    before = forward_span(span, prompt, None)
    lora = lora_for(span, TINY_BLOCKS)

    async def scenario() -> None:
        handler = handler_of(span)
        tensors = [hidden(2, 5, 1), hidden(2, 5, 2), *lora]
        await call(handler, header(), tensors, backward=True)
        handler.shutdown()

    asyncio.run(scenario())
    assert torch.equal(forward_span(span, prompt, None), before)


def bad_pieces(kind: str, lora: list[torch.Tensor]) -> list[runtime_pb2.ExpertRequest]:
    x = hidden(2, 5, 1)
    if kind == "too many values":  # a piece longer than what is left to read
        left = sum(t.numel() for t in lora)
        return [*request_pieces([x]), *request_pieces([torch.zeros(left + 3)])]
    if kind == "too few values":
        return request_pieces([x])
    if kind == "float64":
        proto = serialize_torch_tensor(torch.zeros(10, dtype=torch.float64))
        return [runtime_pb2.ExpertRequest(tensors=[proto])]
    if kind == "two-dimensional":
        proto = serialize_torch_tensor(torch.zeros(2, 5))
        return [runtime_pb2.ExpertRequest(tensors=[proto])]
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind", ["too many values", "too few values", "float64", "two-dimensional"]
)
def test_malformed_pieces_are_refused(span: Span, kind: str) -> None:
    lora = lora_for(span, TINY_BLOCKS)

    async def scenario() -> RpcError:
        handler = handler_of(span)
        requests = [make_request(header()), *bad_pieces(kind, lora)]
        return refusal(await call(handler, header(), [], requests=requests))

    assert asyncio.run(scenario()).error is ErrorCode.PROTOCOL_MISMATCH


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"end": TINY_BLOCKS + 1}, ErrorCode.INVALID_REQUEST),  # beyond the span
        ({"batch": 64, "length": 100}, ErrorCode.INVALID_REQUEST),  # 6400 tokens
        ({"length": 5000}, ErrorCode.INVALID_REQUEST),  # beyond the model's context
        (
            {"lora": LoraSpec(rank=2, alpha=4, targets=["q_proj", "lm_head"])},
            ErrorCode.INVALID_REQUEST,
        ),
        ({"version": 0}, ErrorCode.PROTOCOL_MISMATCH),
    ],
)
def test_bad_calls_are_refused_before_their_tensors(
    span: Span, change: dict[str, Any], code: ErrorCode
) -> None:
    async def scenario() -> RpcError:
        # No tensors follow: a refusal must not wait for them.
        return refusal(await call(handler_of(span), header(**change), []))

    assert asyncio.run(scenario()).error is code


def test_a_rank_above_the_bound_is_refused(span: Span) -> None:
    raw = header().model_dump()
    raw["lora"]["rank"] = 65

    async def scenario() -> RpcError:
        request = runtime_pb2.ExpertRequest(metadata=json.dumps(raw).encode())
        return refusal(await call(handler_of(span), header(), [], requests=[request]))

    assert asyncio.run(scenario()).error is ErrorCode.PROTOCOL_MISMATCH


@pytest.mark.parametrize(
    ("where", "value"),
    [("lora", "nan"), ("hidden", "nan"), ("hidden", "inf"), ("grad", "nan"), ("grad", "-inf")],
)
def test_non_finite_values_are_refused(span: Span, where: str, value: str) -> None:
    """In the LoRA weights, the hidden states or (backward) the output's grad alike."""
    lora, x, grad = lora_for(span, TINY_BLOCKS), hidden(2, 5, 1), hidden(2, 5, 2)
    {"lora": lora[3], "hidden": x, "grad": grad}[where].view(-1)[3] = float(value)
    backward = where == "grad"
    tensors = [x, grad, *lora] if backward else [x, *lora]

    async def scenario() -> RpcError:
        return refusal(await call(handler_of(span), header(), tensors, backward=backward))

    error = asyncio.run(scenario())
    assert error.error is ErrorCode.INVALID_REQUEST and "finite" in error.message


def test_draining_and_strangers_are_refused(span: Span) -> None:
    key = Membership.of(SwarmKey.generate(), Role.SERVER)
    lora = lora_for(span, TINY_BLOCKS)
    tensors = [hidden(2, 5, 1), *lora]

    async def scenario() -> tuple[RpcError, RpcError, list[runtime_pb2.ExpertResponse]]:
        draining = handler_of(span, rules=AdmissionRules(accepting=lambda: False))
        closed = handler_of(span, rules=AdmissionRules(members=key))
        good = header(member_pass=PassIssuer(key, "peer-a").current())
        return (
            refusal(await call(draining, header(), tensors)),
            refusal(await call(closed, good, tensors, caller="peer-b")),  # another's pass
            await call(closed, good, tensors, caller="peer-a"),
        )

    draining, stranger, member = asyncio.run(scenario())
    assert draining.error is ErrorCode.CAPACITY
    assert stranger.error is ErrorCode.FORBIDDEN
    assert decode(TrainDone, member[0].metadata).values == 2 * 5 * 64
