"""The training RPCs, ``rpc_train_forward`` and ``rpc_train_backward``: read, bound and check
a call, then run its compute (``swarm_node/training.py``) on the node's compute thread.

Stateless: a call brings its input, its LoRA tensors (and for the backward the gradient of
its output) and takes its answer; nothing stays here after it. A call is admitted from its
header alone (version, pass), takes one of ``MAX_TRAIN_CALLS`` slots, and is bounded in
everything it may cost before any tensor of it is read.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import torch
from hivemind.proto import runtime_pb2

from models.loading import block_linears
from protocol.codec import make_response, read_pieces, response_pieces
from protocol.errors import (
    CapacityExceeded,
    InvalidRequest,
    ProtocolMismatch,
    RequestError,
    SwarmError,
)
from protocol.logs import request_id
from protocol.rpc import RpcError, TrainCall, TrainDone, decode
from swarm_node.admission import OPEN_TIMEOUT_S, Admission
from swarm_node.bounded_streams import Caller
from swarm_node.training import (
    MAX_TRAIN_TOKENS,
    MAX_TRAIN_VALUES,
    LoraCall,
    train_backward,
    train_forward,
)

logger = logging.getLogger(__name__)

# Training calls in progress here (reading, waiting for or using the compute thread): each
# holds its tensors in memory until it is done, so their number is bounded.
MAX_TRAIN_CALLS = 4
TRAIN_READ_TIMEOUT_S = 60.0  # a call's header and tensors must arrive within this


class TrainingCalls:
    """The training calls in progress here, at most ``MAX_TRAIN_CALLS``."""

    def __init__(self, admission: Admission, compute: ThreadPoolExecutor) -> None:
        self._admission = admission
        self.span = admission.span
        self._compute = compute  # the one thread every forward runs on
        self._linears = block_linears(self.span.config)  # what LoRA may target
        self._training = 0  # training calls in progress

    async def rpc_train_forward(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: Caller | None
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """A ``TrainCall`` and pieces of [hidden [B, n, H], LoRA tensors] → ``TrainDone``
        and pieces of the output [B, n, H]. Stateless: nothing stays here after it."""
        async for reply in self._train(requests, context, backward=False):
            yield reply

    async def rpc_train_backward(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: Caller | None
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """A ``TrainCall`` and pieces of [hidden, grad of the output (both [B, n, H]), LoRA
        tensors] → ``TrainDone`` and pieces of [grad of hidden (if ``input_grad``), grads of
        the LoRA tensors]. The forward is recomputed: nothing was kept from it."""
        async for reply in self._train(requests, context, backward=True):
            yield reply

    async def _train(
        self,
        requests: AsyncIterator[runtime_pb2.ExpertRequest],
        context: Caller | None,
        *,
        backward: bool,
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        caller = str(context.remote_id) if context is not None else ""
        try:
            # The call's header, with the pass, first: a slot is taken by members only.
            call = await asyncio.wait_for(self._train_header(requests, caller), OPEN_TIMEOUT_S)
        except (SwarmError, RequestError) as e:
            yield make_response(RpcError.of(e))
            return
        except TimeoutError:
            error = InvalidRequest(f"no training call within {OPEN_TIMEOUT_S:g} s")
            yield make_response(RpcError.of(error))
            return
        if context is not None:
            context.admitted()
        if self._training >= MAX_TRAIN_CALLS:
            full = CapacityExceeded(f"{MAX_TRAIN_CALLS} training calls in progress here")
            yield make_response(RpcError.of(full))
            return
        self._training += 1
        try:
            try:
                pending = await asyncio.wait_for(
                    self._train_call(requests, call, backward), TRAIN_READ_TIMEOUT_S
                )
                # The timeout covers reading; compute waits its turn on the compute thread.
                outputs = await pending
            except (SwarmError, RequestError) as e:
                yield make_response(RpcError.of(e))
                return
            except TimeoutError:
                error = InvalidRequest(f"the call did not arrive within {TRAIN_READ_TIMEOUT_S:g} s")
                yield make_response(RpcError.of(error))
                return
            except Exception as e:
                logger.exception("a training call from %s failed", caller or "a local caller")
                yield make_response(RpcError.of(e))
                return
            yield make_response(TrainDone(values=sum(t.numel() for t in outputs)))
            for piece in response_pieces(outputs):
                yield piece
        finally:
            self._training -= 1

    async def _train_header(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], caller: str
    ) -> TrainCall:
        """A training stream's first message: the call, from a member."""
        first = await anext(requests, None)
        if first is None:
            raise ProtocolMismatch("a training stream without a call")
        call = decode(TrainCall, first.metadata)
        self._admission.admit(call.version, call.member_pass, caller)
        request_id.set(call.request_id)
        if first.tensors:
            raise ProtocolMismatch("a training call's header carries no tensors")
        return call

    async def _train_call(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], call: TrainCall, backward: bool
    ) -> asyncio.Future[list[torch.Tensor]]:
        """Check a call and read its tensors, then hand it to the compute thread: its
        result, to await."""
        lora = self._check_train_call(call)
        hidden_shape = (call.batch, call.length, self.span.config.hidden_size)
        shapes = [hidden_shape, *([hidden_shape] if backward else []), *lora.shapes(self._linears)]
        tensors = await read_pieces(requests, shapes)
        if not all(bool(torch.isfinite(t).all()) for t in tensors):
            raise InvalidRequest("a training call's tensors must be finite")
        loop = asyncio.get_running_loop()
        span, linears = self.span, self._linears
        if backward:
            hidden, grad, weights = tensors[0], tensors[1], tensors[2:]

            def run() -> list[torch.Tensor]:
                dx, grads = train_backward(
                    span, lora, linears, weights, hidden, grad, input_grad=call.input_grad
                )
                return grads if dx is None else [dx, *grads]

        else:
            hidden, weights = tensors[0], tensors[1:]

            def run() -> list[torch.Tensor]:
                return [train_forward(span, lora, linears, weights, hidden)]

        return loop.run_in_executor(self._compute, run)

    def _check_train_call(self, call: TrainCall) -> LoraCall:
        """Everything a call may cost, bounded before any tensor of it is read."""
        self._admission.admit_work("training calls", call.start, call.end)
        tokens = call.batch * call.length
        if tokens > MAX_TRAIN_TOKENS:
            raise InvalidRequest(f"{tokens} tokens in one training call (max {MAX_TRAIN_TOKENS})")
        if tokens * self.span.config.hidden_size > MAX_TRAIN_VALUES:
            raise InvalidRequest(
                f"{tokens} tokens of hidden states exceed {MAX_TRAIN_VALUES} values"
            )
        max_length = self._admission.max_length
        if call.length > max_length:
            raise InvalidRequest(f"length {call.length} exceeds the model's {max_length}")
        unknown = [t for t in call.lora.targets if t not in self._linears]
        if unknown:
            known = ", ".join(self._linears)
            raise InvalidRequest(f"no projection named {', '.join(unknown)} (known: {known})")
        spec = call.lora
        return LoraCall(call.start, call.end, spec.rank, spec.alpha, tuple(spec.targets))
