"""``rpc_push``: the node's end of node-to-node push (see ``swarm_node/push.py``).

Receiving: another server's outputs, each the input of a step of one of this node's
streams, delivered to that stream's ``Inbox`` on the ``PushBoard``. Sending: the call a
``Pusher`` makes to the next hop's ``rpc_push``, straight to this node's own handler when
the next hop is this server too.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from hivemind.p2p import P2P, P2PContext, PeerID
from hivemind.proto import runtime_pb2

from protocol.codec import make_response, read_tensor
from protocol.errors import ProtocolMismatch, RequestError, SwarmError
from protocol.rpc import RPC_PUSH, Push, PushAccepted, PushItem, RpcError, decode
from swarm_node.admission import Admission
from swarm_node.push import PushBoard, PushCall


class PushReceiver:
    """Takes the pushes for this node's streams."""

    def __init__(self, admission: Admission, pushes: PushBoard) -> None:
        self._admission = admission
        self.pushes = pushes

    async def rpc_push(
        self, request: runtime_pb2.ExpertRequest, context: P2PContext
    ) -> runtime_pb2.ExpertResponse:
        """Another server's outputs, each the input of a step of one of our streams: each
        accepted once its step took it, or refused on its own. Members only; every input
        is checked against its step before compute."""
        try:
            push = decode(Push, request.metadata)
            self._admission.admit(push.version, push.member_pass, str(context.remote_id))
            if len(request.tensors) != len(push.items):
                raise ProtocolMismatch(
                    f"{len(push.items)} pushed steps came with {len(request.tensors)} tensors"
                )
        except (SwarmError, RequestError) as e:
            return make_response(RpcError.of(e))
        refused = await asyncio.gather(
            *(
                self._take_push(item, tensor)
                for item, tensor in zip(push.items, request.tensors, strict=True)
            )
        )
        return make_response(PushAccepted(refused=refused))

    async def _take_push(self, item: PushItem, tensor: runtime_pb2.Tensor) -> RpcError | None:
        """Why the step of ``item`` refused its input, None once it took it."""
        try:
            hidden = self._admission.hidden_of(read_tensor(tensor))
            await self.pushes.deliver(item.token, item.position, item.digest, hidden)
        except (SwarmError, RequestError) as e:
            return RpcError.of(e)
        return None

    def call_over(self, p2p: P2P) -> PushCall:
        """How this node's ``Pusher`` reaches a next hop's ``rpc_push``."""

        async def call(
            peer_id: str, request: runtime_pb2.ExpertRequest
        ) -> runtime_pb2.ExpertResponse:
            if peer_id == p2p.peer_id.to_base58():  # the next hop is this server too
                return await self.rpc_push(request, SimpleNamespace(remote_id=peer_id))
            peer = PeerID.from_base58(peer_id)
            response_type = runtime_pb2.ExpertResponse
            return await p2p.call_protobuf_handler(peer, RPC_PUSH, request, response_type)

        return call
