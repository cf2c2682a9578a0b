"""Messages between the gateway and block servers.

Every RPC carries hivemind ``ExpertRequest``/``ExpertResponse`` protobufs: tensors in
``tensors`` (hivemind's tensor serialization) and one of the models below as JSON in
``metadata``. ``rpc_inference`` is a bidirectional stream per (session, hop):

    gateway → OpenSession          server → SessionOpened
    gateway → Step + hidden [1,n,H]  server → StepDone + hidden [1,n,H]   (repeated)
    gateway closes the stream      server frees the session
"""

from __future__ import annotations

from typing import TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from protocol.errors import ProtocolMismatch
from protocol.prefix import MAX_BLOCKS
from protocol.swarm import PROTOCOL_VERSION

# Handler names registered on every server's P2P instance.
RPC_INFERENCE = "swarmgate.rpc_inference"
RPC_FORWARD = "swarmgate.rpc_forward"
RPC_INFO = "swarmgate.rpc_info"

# hivemind refuses messages over 4 MiB; stay below with room for framing and metadata.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
MESSAGE_BUDGET_BYTES = 3 * 1024 * 1024


class RpcMessage(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    def encode(self) -> bytes:
        return self.model_dump_json().encode()


class OpenSession(RpcMessage):
    version: int = PROTOCOL_VERSION
    session_id: str = Field(min_length=1, max_length=128)
    start: int = Field(ge=0)
    end: int = Field(gt=0)
    max_length: int = Field(gt=0)  # tokens the session may reach, to size the cache
    # Chained hashes of the prompt's full token blocks (protocol.prefix): what to reuse.
    prefix_hashes: list[str] = Field(default_factory=list, max_length=MAX_BLOCKS)


class SessionOpened(RpcMessage):
    cached_tokens: int = 0  # leading prompt tokens this server already holds


class Step(RpcMessage):
    # Where these tokens start. Below what the server holds, it drops the rest first (an
    # edited or regenerated turn); above, the step is refused.
    position: int = Field(ge=0)
    # Hashes of the blocks that these tokens complete, so the next turn can find them.
    new_hashes: list[str] = Field(default_factory=list, max_length=MAX_BLOCKS)


class StepDone(RpcMessage):
    position: int = Field(ge=0)  # tokens held after this step


class Forward(RpcMessage):
    start: int = Field(ge=0)
    end: int = Field(gt=0)


class ServerInfo(RpcMessage):
    version: int = PROTOCOL_VERSION
    start: int
    end: int
    state: str
    sessions: int  # cached sessions, in use or idle
    load: float  # open inference streams
    cache_bytes_free: int
    throughput: float
    evictions: int = 0
    tokens_computed: int = 0  # positions run through the span since startup
    tokens_reused: int = 0  # prompt positions served from a cache instead


M = TypeVar("M", bound=RpcMessage)


def decode(kind: type[M], metadata: bytes) -> M:
    """Parse a message's metadata as ``kind``; a malformed one is a ``ProtocolMismatch``."""
    try:
        return kind.model_validate_json(metadata)
    except ValidationError as e:
        raise ProtocolMismatch(f"bad {kind.__name__} message: {e}") from None


def max_tokens_per_message(hidden_size: int, bytes_per_value: int = 4) -> int:
    """How many tokens of hidden states fit one message under hivemind's cap."""
    return max(1, MESSAGE_BUDGET_BYTES // (hidden_size * bytes_per_value))
