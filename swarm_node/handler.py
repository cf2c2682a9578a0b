"""The RPC handlers of a block server, registered on its P2P daemon.

Each RPC lives in a module of its own; this one builds them over what they share and
registers them: ``rpc_inference`` (``inference_stream.py``), ``rpc_push``
(``push_rpc.py``), the training RPCs (``training_rpc.py``) and ``rpc_info`` (here). Every
one of them admits its caller through the same ``Admission`` (``admission.py``) before it
does any work. Compute runs on one worker thread, fed by the step scheduler, which batches
the steps of every open stream; the event loop (P2P, announcements) stays responsive while
torch works.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from hivemind.p2p import P2P, P2PContext
from hivemind.proto import runtime_pb2

from models.loading import Span
from protocol.codec import make_response
from protocol.errors import RequestError, SwarmError
from protocol.latency import SimulatedLink
from protocol.rpc import (
    RPC_INFERENCE,
    RPC_INFO,
    RPC_PUSH,
    RPC_TRAIN_BACKWARD,
    RPC_TRAIN_FORWARD,
    InfoRequest,
    RpcError,
    ServerInfo,
    decode,
)
from swarm_node.admission import Admission, AdmissionRules
from swarm_node.batching import BatchObserver, StepScheduler
from swarm_node.bounded_streams import BoundedStreams
from swarm_node.cache_store import CacheStore
from swarm_node.inference_stream import INPUT_WAIT_S, InferenceStreams
from swarm_node.push import PushBoard, Pusher
from swarm_node.push_rpc import PushReceiver
from swarm_node.training_rpc import TrainingCalls


def _ignore_step(tokens: int, seconds: float) -> None:
    pass


def _ignore_batch(segments: int, tokens: int) -> None:
    pass


def _no_pass() -> str:
    return ""


@dataclass(frozen=True)
class NodeHooks:
    """What the handler reports to the node around it, and takes from it."""

    observe_step: Callable[[int, float], None] = _ignore_step  # (tokens, seconds) per step
    observe_batch: BatchObserver = _ignore_batch  # (segments, tokens) per forward
    member_pass: Callable[[], str] = _no_pass  # this server's own, shown when pushing
    link: SimulatedLink = field(default_factory=SimulatedLink)  # simulated network (benches)


class BlockHandler:
    def __init__(
        self,
        span: Span,
        caches: CacheStore,
        info: Callable[[], ServerInfo],
        rules: AdmissionRules = AdmissionRules(),  # noqa: B008 (frozen: shared safely)
        hooks: NodeHooks = NodeHooks(),
        *,
        prefill_chunk: int | None = None,
        input_wait_s: float = INPUT_WAIT_S,
    ) -> None:
        self.span = span
        self.caches = caches
        self._info = info
        self._hooks = hooks
        self.admission = Admission(span, rules)
        self._compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="span-compute")
        chunk = {} if prefill_chunk is None else {"prefill_chunk": prefill_chunk}
        self._scheduler = StepScheduler(
            span,
            self._compute,
            observe_batch=hooks.observe_batch,
            open_streams=lambda: self.active_streams,
            **chunk,
        )
        self.pushes = PushBoard(span.config.hidden_size)
        self.streams = InferenceStreams(
            caches,
            self.admission,
            self._scheduler,
            self._compute,
            self.pushes,
            observe_step=hooks.observe_step,
            input_wait_s=input_wait_s,
        )
        self.push = PushReceiver(self.admission, self.pushes)
        self.training = TrainingCalls(self.admission, self._compute)
        self._bounded = BoundedStreams()

    @property
    def active_streams(self) -> int:
        """Inference streams open here: the server's load."""
        return self.streams.active

    async def register(self, p2p: P2P) -> None:
        """Streams are read through ``swarm_node.bounded_streams`` (bounded frames, a
        deadline for the first, a cap on callers without a pass); the unary calls come
        through the daemon, which caps them at its message size."""
        Request = runtime_pb2.ExpertRequest
        await self._bounded.add(p2p, RPC_INFERENCE, self.streams.rpc_inference)
        await p2p.add_protobuf_handler(RPC_INFO, self.rpc_info, Request)
        await p2p.add_protobuf_handler(RPC_PUSH, self.push.rpc_push, Request)
        await self._bounded.add(p2p, RPC_TRAIN_FORWARD, self.training.rpc_train_forward)
        await self._bounded.add(p2p, RPC_TRAIN_BACKWARD, self.training.rpc_train_backward)
        hooks = self._hooks
        self.streams.pusher = Pusher(self.push.call_over(p2p), hooks.member_pass, hooks.link)

    async def unregister(self, p2p: P2P) -> None:
        self.streams.pusher = None
        await p2p.remove_binary_stream_handler(RPC_INFERENCE)
        await p2p.remove_protobuf_handler(RPC_INFO)
        await p2p.remove_protobuf_handler(RPC_PUSH)
        for name in (RPC_TRAIN_FORWARD, RPC_TRAIN_BACKWARD):
            await p2p.remove_binary_stream_handler(name)

    def shutdown(self) -> None:
        self._scheduler.close()
        self._compute.shutdown(wait=False, cancel_futures=True)

    async def rpc_info(
        self, request: runtime_pb2.ExpertRequest, context: P2PContext
    ) -> runtime_pb2.ExpertResponse:
        """Cache counters and liveness, for members (an info request has no version)."""
        try:
            asked = decode(InfoRequest, request.metadata or b"{}")
            self.admission.check_member(asked.member_pass, str(context.remote_id))
        except (SwarmError, RequestError) as e:
            return make_response(RpcError.of(e))
        return make_response(self._info())
