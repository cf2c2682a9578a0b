"""What every RPC of a block server checks before it does any work for its caller.

One place for the rules, so that no RPC can skip one: the caller speaks this protocol
version and shows a pass of this swarm for its own peer id (``admit``: before anything
else, so a stranger costs nothing beyond its first message); new work is taken only while
the server is not draining, for blocks it holds (``admit_work``); and every tensor from the
network is bounded and checked before it reaches memory kept across calls or compute
(``one_tensor``, ``hidden_of``). Which of these each RPC runs, and in which order, is in
its handler: a push is never refused for draining (it feeds a stream already running), and
an info call has no version.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from hivemind.proto import runtime_pb2

from models.loading import Span
from protocol.codec import read_tensors
from protocol.errors import CapacityExceeded, InvalidRequest, NotAMember, ProtocolMismatch
from protocol.membership import Membership, PassChecker
from protocol.rpc import max_tokens_per_message
from protocol.swarm import PROTOCOL_VERSION

logger = logging.getLogger(__name__)

# An opening stream must say what it is (an opening or a training call, with its pass)
# within this, or it is dropped.
OPEN_TIMEOUT_S = 30.0
MAX_REFUSED_LOGGED = 1024  # strangers remembered so that each is logged once


def _always() -> bool:
    return True


@dataclass(frozen=True)
class AdmissionRules:
    """Whom a server serves, and what: ``members`` None is an open swarm (everyone may
    call); ``accepting`` is False while draining (running streams go on, new work is
    refused); ``adapters`` are the LoRA adapters attached to its span."""

    members: Membership | None = None
    accepting: Callable[[], bool] = _always
    adapters: frozenset[str] = frozenset()


class Admission:
    """The checks of ``AdmissionRules`` and of the span's bounds, for every RPC."""

    def __init__(self, span: Span, rules: AdmissionRules) -> None:
        self.span = span
        self.adapters = rules.adapters
        self._accepting = rules.accepting
        self._members = PassChecker(rules.members) if rules.members is not None else None
        self._refused: set[str] = set()
        self.hidden_size = span.config.hidden_size
        self.max_tokens = max_tokens_per_message(self.hidden_size)
        self.max_length = span.config.max_position_embeddings

    def admit(self, version: int, member_pass: str, caller: str) -> None:
        """A message that opens work here: of this protocol version, from a member."""
        if version != PROTOCOL_VERSION:
            raise ProtocolMismatch(
                f"protocol version {version}, this server speaks {PROTOCOL_VERSION}"
            )
        self.check_member(member_pass, caller)

    def check_member(self, member_pass: str, caller: str) -> None:
        """In a closed swarm, refuse a caller without a pass for its own peer id."""
        if self._members is not None and not self._members(member_pass, caller):
            if caller not in self._refused:  # once per peer: a stranger may keep trying
                if len(self._refused) >= MAX_REFUSED_LOGGED:
                    self._refused.clear()
                self._refused.add(caller)
                logger.warning("refused %s: it showed no valid pass of this swarm", caller)
            raise NotAMember("this server serves members of its swarm only")

    def admit_work(self, what: str, start: int, end: int) -> None:
        """New work (``what``, as in "takes no ``what``") on blocks ``[start, end)``: not
        while draining, and only on blocks this server holds."""
        if not self._accepting():
            raise CapacityExceeded(f"this server is draining and takes no {what}")
        self.check_range(start, end)

    def check_range(self, start: int, end: int) -> None:
        if not self.span.start <= start < end <= self.span.end:
            held = f"{self.span.start}:{self.span.end}"
            raise InvalidRequest(f"blocks {start}:{end} requested, this server holds {held}")

    def one_tensor(self, request: runtime_pb2.ExpertRequest) -> torch.Tensor:
        tensors = read_tensors(request)
        if len(tensors) != 1:
            raise ProtocolMismatch(f"expected 1 tensor, got {len(tensors)}")
        return self.hidden_of(tensors[0])

    def hidden_of(self, hidden: torch.Tensor) -> torch.Tensor:
        """An input as every path takes it (a step's own tensor, a relay, a push): float32
        [1, n, H], all finite. A NaN or inf written into a session's cache would spoil
        every later step of it, and every session seeded from it."""
        hidden_size = self.hidden_size
        if (
            hidden.ndim != 3
            or hidden.shape[0] != 1
            or hidden.shape[-1] != hidden_size
            or hidden.dtype != torch.float32
        ):
            raise InvalidRequest(
                f"hidden states must be float32 [1, n, {hidden_size}], got "
                f"{hidden.dtype} {list(hidden.shape)}"
            )
        if not 0 < hidden.shape[1] <= self.max_tokens:
            raise InvalidRequest(f"{hidden.shape[1]} tokens in one message (max {self.max_tokens})")
        if not bool(torch.isfinite(hidden).all()):
            raise InvalidRequest("non-finite hidden states")
        return hidden
