"""Messages between the gateway and block servers.

Every RPC carries hivemind ``ExpertRequest``/``ExpertResponse`` protobufs: tensors in
``tensors`` (hivemind's tensor serialization) and one of the models below as JSON in
``metadata``. ``rpc_inference`` is a bidirectional stream per (session, hop):

    gateway → OpenSession          server → SessionOpened
    gateway → Step + hidden [1,n,H]  server → StepDone + hidden [1,n,H]   (repeated)
    gateway closes the stream      server frees the session

Any reply may instead be an ``RpcError`` (a typed refusal, after which the server ends the
stream): the gateway tells "this server is full, try a replica" from "this server is broken".

Node-to-node push (``rpc_push``, unary, server to server) spares the gateway a round trip
per hop. A stream opened with a ``push_token`` (``SessionOpened.push`` says the server
accepts it) may take a ``Step`` without a tensor, ``input_tokens=n``: its input comes
either from the previous hop's ``Push`` showing that token, or, when that push failed,
from the gateway as a ``Relay`` on this stream, whichever arrives first. A ``Step`` with
``push_to`` sends its output to that hop and answers ``StepDone(pushed=True)`` without a
tensor once the push was accepted; a failed push answers with the output as usual:

    gateway → hop k: Step(push_to=hop k+1) + hidden   gateway → hop k+1: Step(input_tokens=n)
    hop k → hop k+1: Push([token]) + [hidden [1,n,H]]  hop k+1 → hop k: PushAccepted
    hop k → gateway: StepDone(pushed=True)            hop k+1 → gateway: StepDone + hidden

Training (``rpc_train_forward``, ``rpc_train_backward``) is stateless, one stream per call,
as Petals' forward and backward: the caller's LoRA tensors travel with every call and
nothing stays on the server. The tensors of a call easily exceed one message (SmolLM2's
rank-8 LoRA on all 7 projections over 15 blocks is 4.9 MB), so both directions are
streams: a header, then the call's tensors flattened into one run of float32 values cut
into pieces that each fit a message (``protocol.codec.tensor_pieces``). The header fixes
every shape, so each side knows, and bounds, what it will read before it reads it:

    client → TrainCall, then pieces of [hidden, grad_out (backward), LoRA A/B per block]
    server → TrainDone, then pieces of [output] (forward) or [grad_in, LoRA grads] (backward)
"""

from __future__ import annotations

import enum
import json
from typing import Annotated, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
)

from protocol.credentials import MAX_CREDENTIAL_CHARS
from protocol.errors import (
    CapacityExceeded,
    NotAMember,
    PeerUnavailable,
    ProtocolMismatch,
    RequestError,
    SwarmError,
)
from protocol.membership import MAX_PASS_CHARS
from protocol.prefix import MAX_BLOCKS
from protocol.swarm import PROTOCOL_VERSION, AdapterName, ServerStats

# Handler names registered on every server's P2P instance.
RPC_INFERENCE = "swarmgate.rpc_inference"
RPC_INFO = "swarmgate.rpc_info"
RPC_PUSH = "swarmgate.rpc_push"
RPC_TRAIN_FORWARD = "swarmgate.rpc_train_forward"
RPC_TRAIN_BACKWARD = "swarmgate.rpc_train_backward"

# hivemind refuses messages over 4 MiB; stay below with room for framing and metadata.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
MESSAGE_BUDGET_BYTES = 3 * 1024 * 1024

# Histogram buckets of one step, in seconds, for the gateway's per-hop latency and each
# node's own step time alike: the same edges let a dashboard set one against the other.
STEP_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

# Steps one push call may carry: a forward's worth (swarm_node.batching.MAX_BATCH_SEGMENTS).
MAX_PUSH_ITEMS = 256

# How long a hop tries to push a step's output before it answers the gateway with it
# instead (network time excluded); the gateway's deadline for that answer includes it.
# Short: a push is one small message to a server that expects it, and while the next hop
# hangs, its predecessor's answer (and so the gateway's failover) waits for this timeout.
# A push that fails costs a relay through the gateway, never a failover.
PUSH_TIMEOUT_S = 1.0


# A chained block hash (protocol.prefix): 16 bytes of blake2b, hex.
BlockHash = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{32}$")]
# One hash of a session's whole token history, partial last block included
# (protocol.prefix.TokenHistory.digest); "" when unknown.
HistoryDigest = Annotated[str, StringConstraints(pattern=r"^([0-9a-f]{32})?$")]
# A session's secret: random hex from the gateway that opened it (gateway.engine.affinity).
SessionSecret = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{32,128}$")]
# A caller's proof of membership (protocol.membership); empty in an open swarm.
MemberPass = Annotated[str, StringConstraints(max_length=MAX_PASS_CHARS)]
# What lets one hop push into the next: random hex the gateway makes per hop stream and
# gives to that stream's server and to the hop before it. Never the session's secret.
PushToken = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{32}$")]
# A libp2p peer id as the DHT records name servers (base58).
PeerIdText = Annotated[str, StringConstraints(pattern=r"^[1-9A-HJ-NP-Za-km-z]{1,128}$")]


class RpcMessage(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    def encode(self) -> bytes:
        return self.model_dump_json().encode()


class OpenSession(RpcMessage):
    version: int = PROTOCOL_VERSION
    member_pass: MemberPass = ""
    # The gateway's id of the request, stamped on the server's log lines about it.
    request_id: str = Field(default="", max_length=64, pattern=r"^[A-Za-z0-9._:-]*$")
    session_id: str = Field(min_length=1, max_length=128)
    # Resuming the session's cache takes the same secret: the server keys its caches by a
    # digest of both, so an id alone (from a log, say) opens nothing but a fresh session.
    secret: SessionSecret
    start: int = Field(ge=0)
    end: int = Field(gt=0)
    max_length: int = Field(gt=0)  # tokens the session may reach, to size the cache
    # Chained hashes of the prompt's full token blocks (protocol.prefix): what to reuse.
    prefix_hashes: list[BlockHash] = Field(default_factory=list, max_length=MAX_BLOCKS)
    # False: a throwaway session (replaying a failed hop's inputs), dropped when it closes.
    keep: bool = True
    # A continued conversation: its length and history digest when its last turn ended. A
    # server holding exactly that resumes all of it, not just its full prefix blocks.
    resume_length: int = Field(default=0, ge=0)
    resume_digest: HistoryDigest = ""
    # Pushes of this hop's inputs must show this token; None: inputs come with the steps.
    push_token: PushToken | None = None
    # The LoRA adapter the session runs (a name the server's record lists); None: the base
    # model. A session's cache is its adapter's: it is never resumed or seeded across them.
    adapter: AdapterName | None = None


class SessionOpened(RpcMessage):
    cached_tokens: int = 0  # leading prompt tokens this server already holds
    # It takes inputs by push (it got a push_token and speaks rpc_push). Servers that do
    # not know push leave it out, so their hops are relayed.
    push: bool = False


class PushTarget(RpcMessage):
    """Where a step's output goes instead of back to the gateway: the next hop."""

    peer_id: PeerIdText
    token: PushToken


class Step(RpcMessage):
    # Where these tokens start. Below what the server holds, it drops the rest first (an
    # edited or regenerated turn); above, the step is refused.
    position: int = Field(ge=0)
    # Hashes of the blocks that these tokens complete, so the next turn can find them.
    new_hashes: list[BlockHash] = Field(default_factory=list, max_length=MAX_BLOCKS)
    # The history's digest once these tokens are in: what a later resume_digest names.
    digest: HistoryDigest = ""
    # 0: the input is this message's tensor. n > 0: no tensor; the input, n tokens, comes
    # by push from the previous hop or as a Relay on this stream (the first one to arrive).
    input_tokens: int = Field(default=0, ge=0)
    # Push the output there and answer without it; None: answer with the output.
    push_to: PushTarget | None = None


class StepDone(RpcMessage):
    position: int = Field(ge=0)  # tokens held after this step
    pushed: bool = False  # the output went to the step's push_to: no tensor here


class Relay(RpcMessage):
    """The input of the step at ``position`` (tensor attached), relayed by the gateway
    because the previous hop could not push it. Never answered: the step's StepDone is."""

    relay: Literal[True]
    position: int = Field(ge=0)


class PushItem(RpcMessage):
    """One step's input: the step at ``position`` of the stream opened with ``token``."""

    token: PushToken
    position: int = Field(ge=0)
    digest: HistoryDigest = ""  # of the history once these tokens are in, as in its Step


class Push(RpcMessage):
    """A hop's outputs for steps of the next hop's streams, one tensor per item, in order.
    A forward's steps that go to the same next hop travel in one call: sixteen unary calls
    through the daemons cost several times one call of sixteen."""

    version: int = PROTOCOL_VERSION
    member_pass: MemberPass = ""  # the pushing server's own pass
    items: list[PushItem] = Field(min_length=1, max_length=MAX_PUSH_ITEMS)


class InfoRequest(RpcMessage):
    member_pass: MemberPass = ""


class ServerInfo(ServerStats, RpcMessage):
    """A server's answer to ``rpc_info``: its stats (as its DHT record has them), its
    counters, and who signs its records."""

    # Serialized by alias: the wire has always said ``sessions`` here (``cached_sessions``
    # in the DHT record), and today's peers read and send that name.
    model_config = ConfigDict(serialize_by_alias=True)

    cached_sessions: int = Field(default=0, ge=0, alias="sessions")  # in use or idle
    tokens_computed: int = 0  # positions run through the span since startup
    tokens_reused: int = 0  # prompt positions served from a cache instead
    # The owner tag this server signs its DHT records with. Said over a connection libp2p
    # authenticated as this peer, it binds the records to the peer they name.
    owner: str = Field(default="", max_length=4096)
    # In a closed swarm, the server credential naming the key behind ``owner``: gateways
    # use the records of servers only, never of a gateway or a fine-tuner that announces.
    credential: str = Field(default="", max_length=MAX_CREDENTIAL_CHARS)


MAX_LORA_RANK = 64
MAX_LORA_TARGETS = 16
MAX_TRAIN_BATCH = 1024  # sequences per call; tokens and values are bounded by the server

# A projection inside a block, as LoRA names it: q_proj, down_proj, ...
TargetName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")]


class LoraSpec(RpcMessage):
    """A LoRA adapter's shape, as peft's ``LoraConfig`` has it (no dropout)."""

    rank: int = Field(ge=1, le=MAX_LORA_RANK)
    alpha: int = Field(ge=1, le=4096)
    targets: list[TargetName] = Field(min_length=1, max_length=MAX_LORA_TARGETS)

    @field_validator("targets")
    @classmethod
    def _distinct(cls, targets: list[str]) -> list[str]:
        if len(set(targets)) != len(targets):
            raise ValueError("targets repeat a name")
        return targets


class TrainCall(RpcMessage):
    """The header of a training call over blocks ``[start, end)``: ``batch`` sequences of
    ``length`` tokens, each from position 0, and the caller's LoRA tensors for those blocks."""

    version: int = PROTOCOL_VERSION
    member_pass: MemberPass = ""
    request_id: str = Field(default="", max_length=64, pattern=r"^[A-Za-z0-9._:-]*$")
    start: int = Field(ge=0)
    end: int = Field(gt=0)
    batch: int = Field(ge=1, le=MAX_TRAIN_BATCH)
    length: int = Field(ge=1)
    lora: LoraSpec
    # Backward only: whether the caller needs the gradient of the inputs (the first hop's
    # caller does not: its inputs are frozen embeddings).
    input_grad: bool = True


class TrainDone(RpcMessage):
    values: int = Field(ge=0)  # float32 values that follow in pieces


class ErrorCode(enum.StrEnum):
    FORBIDDEN = "forbidden"  # the caller showed no valid pass of this server's swarm
    CAPACITY = "capacity"  # no room for this session now, or draining: try a replica
    INVALID_REQUEST = "invalid_request"  # the server refuses what was asked (a stale record?)
    PROTOCOL_MISMATCH = "protocol_mismatch"
    INTERNAL = "internal"  # the server failed while computing


class RpcError(RpcMessage):
    error: ErrorCode
    message: str = Field(default="", max_length=1000)

    @classmethod
    def of(cls, exc: BaseException) -> RpcError:
        """The reply that tells a peer what went wrong here."""
        if isinstance(exc, NotAMember):
            code = ErrorCode.FORBIDDEN
        elif isinstance(exc, CapacityExceeded):
            code = ErrorCode.CAPACITY
        elif isinstance(exc, ProtocolMismatch):
            code = ErrorCode.PROTOCOL_MISMATCH
        elif isinstance(exc, RequestError):
            code = ErrorCode.INVALID_REQUEST
        else:  # details of a server's own failure stay in its log
            return cls(error=ErrorCode.INTERNAL, message="the server failed to run this step")
        return cls(error=code, message=str(exc)[:1000])

    def exception(self, peer_id: str) -> SwarmError:
        """What the gateway raises for this reply from ``peer_id``."""
        message = f"{peer_id}: {self.message or self.error.value}"
        if self.error is ErrorCode.CAPACITY:
            return CapacityExceeded(message, peer_id)
        if self.error is ErrorCode.PROTOCOL_MISMATCH:
            return ProtocolMismatch(message, peer_id)
        if self.error is ErrorCode.FORBIDDEN:
            return NotAMember(message, peer_id)
        return PeerUnavailable(message, peer_id)


class PushAccepted(RpcMessage):
    """Each item's fate, in order: None once its step took it, else why it was refused
    (its pusher answers the gateway with that output instead)."""

    refused: list[RpcError | None] = Field(max_length=MAX_PUSH_ITEMS)


M = TypeVar("M", bound=RpcMessage)


# A message's JSON metadata: the largest (an opening with MAX_BLOCKS prefix hashes) is
# about 300 KB. Checked before parsing: JSON decoding costs far more than its bytes.
MAX_METADATA_BYTES = 1024 * 1024


def decode(kind: type[M], metadata: bytes) -> M:
    """Parse a message's metadata as ``kind``; a malformed one is a ``ProtocolMismatch``."""
    if len(metadata) > MAX_METADATA_BYTES:
        raise ProtocolMismatch(
            f"a {kind.__name__} message of {len(metadata)} bytes (at most {MAX_METADATA_BYTES})"
        )
    try:
        return kind.model_validate_json(metadata)
    except ValidationError as e:
        raise ProtocolMismatch(f"bad {kind.__name__} message: {e}") from None


def decode_stream_message(metadata: bytes) -> Step | Relay:
    """What the gateway sent on an inference stream after its opening: a step or a relay."""
    if len(metadata) > MAX_METADATA_BYTES:
        raise ProtocolMismatch(f"a stream message of {len(metadata)} bytes")
    if b'"relay"' in metadata:  # cheap first: steps never carry that key
        try:
            relay = "relay" in json.loads(metadata)
        except ValueError:
            raise ProtocolMismatch("bad stream message: not JSON") from None
        if relay:
            return decode(Relay, metadata)
    return decode(Step, metadata)


def decode_reply(kind: type[M], metadata: bytes, peer_id: str) -> M:
    """A server's reply as ``kind``; its typed refusal, or anything malformed, raised as the
    matching ``SwarmError`` naming ``peer_id``."""
    try:
        if b'"error"' in metadata and "error" in json.loads(metadata):
            raise RpcError.model_validate_json(metadata).exception(peer_id)
        return kind.model_validate_json(metadata)
    except (ValidationError, ValueError) as e:
        raise ProtocolMismatch(f"{peer_id} sent a bad {kind.__name__}: {e}", peer_id) from None


MAX_PIECE_VALUES = MESSAGE_BUDGET_BYTES // 4  # float32 values in one piece of a training call


def max_tokens_per_message(hidden_size: int, bytes_per_value: int = 4) -> int:
    """How many tokens of hidden states fit one message under hivemind's cap."""
    return max(1, MESSAGE_BUDGET_BYTES // (hidden_size * bytes_per_value))
