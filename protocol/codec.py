"""Tensor framing for RPC messages (hivemind serialization, no compression on loopback)."""

from __future__ import annotations

import torch
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.proto import runtime_pb2

from protocol.rpc import RpcMessage


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
    return [deserialize_torch_tensor(t) for t in message.tensors]
