"""Training calls to block servers over P2P: one stream per call, a header then pieces
(``protocol/rpc.py``), and nothing a server sends back is used before it is checked."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence

import torch
from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2

from client.swarm_view import Hop
from models.loading import BlockLinear
from models.lora import lora_shapes
from protocol.codec import make_request, read_pieces, request_pieces
from protocol.errors import BadReply, PeerUnavailable, SwarmError
from protocol.logs import request_id
from protocol.rpc import (
    RPC_TRAIN_BACKWARD,
    RPC_TRAIN_FORWARD,
    LoraSpec,
    TrainCall,
    TrainDone,
    decode_reply,
)
from training.settings import CALL_TIMEOUT_S


class TrainClient:
    """Calls ``rpc_train_forward``/``rpc_train_backward``; counts the bytes it moves."""

    def __init__(
        self,
        p2p: P2P,
        hidden_size: int,
        linears: dict[str, BlockLinear],
        spec: LoraSpec,
        *,
        member_pass: Callable[[], str] = lambda: "",
        timeout_s: float = CALL_TIMEOUT_S,
    ) -> None:
        self._p2p = p2p
        self._hidden_size = hidden_size
        self._linears = linears
        self._spec = spec
        self._member_pass = member_pass
        self._timeout_s = timeout_s
        self.bytes_sent = 0
        self.bytes_received = 0

    async def forward(
        self, hop: Hop, lora: Sequence[torch.Tensor], hidden: torch.Tensor
    ) -> torch.Tensor:
        """hidden [B, n, H] through ``hop``'s blocks with the LoRA → [B, n, H]."""
        call = self._call(hop, hidden, input_grad=True)
        (out,) = await self._exchange(
            hop.peer_id, RPC_TRAIN_FORWARD, call, [hidden, *lora], [tuple(hidden.shape)]
        )
        return out

    async def backward(
        self,
        hop: Hop,
        lora: Sequence[torch.Tensor],
        hidden: torch.Tensor,
        grad_out: torch.Tensor,
        *,
        input_grad: bool,
    ) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """(grad of ``hidden`` or None, grads of ``lora``) for ``grad_out`` [B, n, H]."""
        call = self._call(hop, hidden, input_grad=input_grad)
        shapes = lora_shapes(self._linears, self._spec.rank, self._spec.targets, hop.length)
        wanted = [tuple(hidden.shape)] * input_grad + shapes
        tensors = [hidden, grad_out, *lora]
        found = await self._exchange(hop.peer_id, RPC_TRAIN_BACKWARD, call, tensors, wanted)
        return (found[0], found[1:]) if input_grad else (None, found)

    def _call(self, hop: Hop, hidden: torch.Tensor, *, input_grad: bool) -> TrainCall:
        batch, length, _ = hidden.shape
        return TrainCall(
            member_pass=self._member_pass(),
            request_id=request_id.get(),
            start=hop.start,
            end=hop.end,
            batch=batch,
            length=length,
            lora=self._spec,
            input_grad=input_grad,
        )

    async def _exchange(
        self,
        peer_id: str,
        rpc: str,
        call: TrainCall,
        tensors: Sequence[torch.Tensor],
        shapes: Sequence[tuple[int, ...]],
    ) -> list[torch.Tensor]:
        requests = [make_request(call), *request_pieces(tensors)]
        self.bytes_sent += sum(r.ByteSize() for r in requests)

        async def run() -> list[torch.Tensor]:
            replies: AsyncIterator[
                runtime_pb2.ExpertResponse
            ] = await self._p2p.iterate_protobuf_handler(
                PeerID.from_base58(peer_id), rpc, _aiter(requests), runtime_pb2.ExpertResponse
            )
            first = await anext(replies)
            done = decode_reply(TrainDone, first.metadata, peer_id)
            found = await read_pieces(_counted(replies, self), shapes)
            self.bytes_received += first.ByteSize()
            if done.values != sum(t.numel() for t in found):
                raise BadReply(f"{peer_id} announced {done.values} values", peer_id)
            return found

        try:
            found = await asyncio.wait_for(run(), self._timeout_s)
        except SwarmError as e:
            if getattr(e, "peer_id", None) is None:  # a framing error: this peer's
                raise BadReply(f"{peer_id}: {e}", peer_id) from None
            raise
        except TimeoutError:
            raise PeerUnavailable(
                f"{peer_id} did not answer within {self._timeout_s:g} s", peer_id
            ) from None
        except Exception as e:  # dial errors, a closed stream, the daemon going away
            raise PeerUnavailable(f"{peer_id}: {e}", peer_id) from e
        for tensor in found:
            if not bool(torch.isfinite(tensor).all()):
                raise BadReply(f"{peer_id} returned non-finite values", peer_id)
        return found


async def _aiter(
    requests: Sequence[runtime_pb2.ExpertRequest],
) -> AsyncIterator[runtime_pb2.ExpertRequest]:
    for request in requests:
        yield request


async def _counted(
    replies: AsyncIterator[runtime_pb2.ExpertResponse], client: TrainClient
) -> AsyncIterator[runtime_pb2.ExpertResponse]:
    async for reply in replies:
        client.bytes_received += reply.ByteSize()
        yield reply
