"""Tensor framing for RPC messages (hivemind serialization, no compression on loopback).

A training call's tensors travel as one run of float32 values cut into pieces, one per
message (see ``protocol/rpc.py``): ``tensor_pieces`` cuts, ``read_pieces`` reassembles into
shapes both sides know from the call's header, refusing anything beyond them unread.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Sequence
from typing import TypeAlias

import torch
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.proto import runtime_pb2

from protocol.errors import ProtocolMismatch
from protocol.rpc import MAX_PIECE_VALUES, RpcMessage

Message: TypeAlias = runtime_pb2.ExpertRequest | runtime_pb2.ExpertResponse


def make_request(message: RpcMessage, *tensors: torch.Tensor) -> runtime_pb2.ExpertRequest:
    return runtime_pb2.ExpertRequest(
        tensors=[serialize_torch_tensor(t) for t in tensors], metadata=message.encode()
    )


def make_response(message: RpcMessage, *tensors: torch.Tensor) -> runtime_pb2.ExpertResponse:
    return runtime_pb2.ExpertResponse(
        tensors=[serialize_torch_tensor(t) for t in tensors], metadata=message.encode()
    )


def read_tensors(
    message: runtime_pb2.ExpertRequest | runtime_pb2.ExpertResponse,
) -> list[torch.Tensor]:
    return [read_tensor(t) for t in message.tensors]


def read_tensor(proto: runtime_pb2.Tensor) -> torch.Tensor:
    """One tensor as a peer sent it; one that cannot be read is a ``ProtocolMismatch``."""
    try:
        tensor: torch.Tensor = deserialize_torch_tensor(proto)
    except Exception as e:  # a buffer shorter than its header says, an unknown dtype, ...
        raise ProtocolMismatch(f"a malformed tensor: {e}") from None
    return tensor


def tensor_pieces(
    tensors: Sequence[torch.Tensor], max_values: int = MAX_PIECE_VALUES
) -> list[torch.Tensor]:
    """``tensors`` as float32 values in order, in 1-D pieces of at most ``max_values``."""
    if not tensors:
        return []
    flat = torch.cat([t.detach().reshape(-1).to(torch.float32) for t in tensors])
    return list(torch.split(flat, max_values))


def request_pieces(tensors: Sequence[torch.Tensor]) -> list[runtime_pb2.ExpertRequest]:
    return [
        runtime_pb2.ExpertRequest(tensors=[serialize_torch_tensor(p)])
        for p in tensor_pieces(tensors)
    ]


def response_pieces(tensors: Sequence[torch.Tensor]) -> list[runtime_pb2.ExpertResponse]:
    return [
        runtime_pb2.ExpertResponse(tensors=[serialize_torch_tensor(p)])
        for p in tensor_pieces(tensors)
    ]


async def read_pieces(
    messages: AsyncIterator[Message], shapes: Sequence[Sequence[int]]
) -> list[torch.Tensor]:
    """Tensors of ``shapes`` from the pieces that follow a call's header. A piece that is not
    one 1-D float32 tensor, or would run past what the shapes hold, is a ``ProtocolMismatch``
    before its values are kept; so is a stream that ends early."""
    sizes = [math.prod(shape) for shape in shapes]
    total = sum(sizes)
    pieces: list[torch.Tensor] = []
    received = 0
    while received < total:
        try:
            message = await anext(messages)
        except StopAsyncIteration:
            raise ProtocolMismatch(f"the stream ended after {received} of {total} values") from None
        if len(message.tensors) != 1:
            raise ProtocolMismatch(f"a piece carries {len(message.tensors)} tensors, not 1")
        proto = message.tensors[0]
        # Checked on the header before deserializing: a piece claiming more is never built.
        if (
            proto.dtype != "float32"
            or len(proto.size) != 1
            or proto.compression != runtime_pb2.CompressionType.NONE
        ):
            raise ProtocolMismatch(f"a piece must be 1-D float32, got {proto.dtype} {proto.size}")
        if proto.size[0] > total - received or proto.size[0] == 0:
            raise ProtocolMismatch(f"a piece of {proto.size[0]} values, {total - received} left")
        try:
            piece = deserialize_torch_tensor(proto)
        except (ValueError, RuntimeError) as e:  # a buffer shorter than its header says
            raise ProtocolMismatch(f"a malformed piece: {e}") from None
        if piece.dtype != torch.float32 or piece.shape != (proto.size[0],):
            raise ProtocolMismatch("a piece's values disagree with its header")
        pieces.append(piece)
        received += piece.numel()
    flat = torch.cat(pieces) if pieces else torch.empty(0)
    return [
        part.reshape(tuple(shape))
        for part, shape in zip(torch.split(flat, sizes), shapes, strict=True)
    ]
