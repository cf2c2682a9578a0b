"""Records that servers publish in the DHT, validated wherever they are read.

A server holding blocks ``[start, end)`` stores one ``ServerRecord`` under the key
``"{prefix}.{block}"`` of every block it holds, with its peer id as the subkey. The model
itself is described once under ``"{prefix}._model"``.
"""

from __future__ import annotations

import enum
import hashlib
import json
import re
from typing import Annotated, Any, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    model_validator,
)

# 2: members' passes, session secrets, owner-bound records; 3: a push carries many steps
PROTOCOL_VERSION = 3
LOOPBACK_MADDRS = ["/ip4/127.0.0.1/tcp/0"]  # default listen address: this machine only
MAX_THROUGHPUT = 1e6  # decode steps/s; anything above is a lie meant to win every route
MAX_NAME_CHARS = 128  # dtype, quant and adapter names
MAX_MODEL_BLOCKS = 10_000  # no model comes near; a record beyond is malformed
MAX_ADAPTERS = 64  # adapters one server may list
# A LoRA adapter's id: its folder's name, requested as model "BASE:ADAPTER".
ADAPTER_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
AdapterName = Annotated[str, StringConstraints(pattern=ADAPTER_PATTERN)]


class NodeState(enum.StrEnum):
    JOINING = "joining"
    ONLINE = "online"
    DRAINING = "draining"


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    def to_wire(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @classmethod
    def from_wire(cls, value: object) -> Self:
        """Parse a DHT value; raises ``ValueError`` on anything malformed."""
        if not isinstance(value, dict):
            raise ValueError(f"{cls.__name__} must be a dict, got {type(value).__name__}")
        try:
            return cls.model_validate(value)
        except ValidationError as e:
            raise ValueError(f"malformed {cls.__name__}: {e}") from None


class ServerStats(BaseModel):
    """A server's span and load as it states them: what its DHT record (``ServerRecord``)
    and its answer to ``rpc_info`` (``protocol.rpc.ServerInfo``) share, checked alike and
    under the same names on the wire in both."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    version: int = PROTOCOL_VERSION
    state: NodeState
    start: int = Field(ge=0, lt=MAX_MODEL_BLOCKS)
    end: int = Field(gt=0, le=MAX_MODEL_BLOCKS)
    throughput: float = Field(ge=0.0, le=MAX_THROUGHPUT)  # decode steps/s through the span
    load: float = Field(default=0.0, ge=0.0, le=1e6)  # active inference streams
    cache_bytes_free: int = Field(default=0, ge=0)
    # How many sessions it caches. Never which: a session id is its owner's business.
    # (``rpc_info`` has always called it ``sessions`` on the wire: ``ServerInfo`` says so.)
    cached_sessions: int = Field(default=0, ge=0)
    evictions: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _span_is_not_empty(self) -> Self:
        if self.end <= self.start:
            raise ValueError(f"empty span [{self.start}, {self.end})")
        return self

    @property
    def length(self) -> int:
        return self.end - self.start


class ServerRecord(ServerStats, _Record):
    """What a block server announces about itself in the DHT: its stats, and what it
    serves."""

    # ``ModelRecord.digest`` of the model it serves: a server of another model that happens
    # to share the name (another depth or width) is never chained with this one.
    model: str = Field(default="", max_length=64)
    dtype: str = Field(default="float32", max_length=MAX_NAME_CHARS)
    quant: str = Field(default="none", max_length=MAX_NAME_CHARS)
    adapters: tuple[AdapterName, ...] = Field(default=(), max_length=MAX_ADAPTERS)

    @property
    def precision(self) -> str:
        """``dtype`` alone, or ``dtype/quant`` for quantized weights (``bfloat16/nf4``).

        Derived, so not on the wire: readers show it, the record carries its two parts."""
        return self.dtype if self.quant == "none" else f"{self.dtype}/{self.quant}"


class ModelRecord(_Record):
    """What every server of a model agrees on; stored under ``{prefix}._model``."""

    name: str = Field(min_length=1, max_length=256)
    architecture: str = Field(max_length=MAX_NAME_CHARS)
    num_blocks: int = Field(gt=0, le=MAX_MODEL_BLOCKS)
    hidden_size: int = Field(gt=0, le=1 << 20)
    max_length: int = Field(gt=0, le=1 << 24)
    dtype: str = Field(default="float32", max_length=MAX_NAME_CHARS)
    # The commit sha of a Hugging Face Hub model's revision; "" for a local model.
    revision: str = Field(default="", max_length=64)

    @classmethod
    def of(cls, name: str, config: Any, dtype: str = "float32", revision: str = "") -> ModelRecord:
        """The record of a model with this Hugging Face ``config``."""
        return cls(
            name=name,
            architecture=config.model_type,
            num_blocks=config.num_hidden_layers,
            hidden_size=config.hidden_size,
            max_length=config.max_position_embeddings,
            dtype=dtype,
            revision=revision,
        )

    @property
    def digest(self) -> str:
        """What servers and gateways must agree on to chain: the shape and the revision of
        Hub weights, not the precision. Without a revision, the shape alone (as before
        revisions were recorded)."""
        shape: list[str | int] = [
            self.name,
            self.architecture,
            self.num_blocks,
            self.hidden_size,
            self.max_length,
        ]
        if self.revision:
            shape.append(self.revision)
        return hashlib.sha256(json.dumps(shape).encode()).hexdigest()[:16]

    def disagreement(self, other: ModelRecord) -> str | None:
        """How ``other`` differs from this model in shape or revision, or None."""
        fields: tuple[str, ...] = (
            "name",
            "architecture",
            "num_blocks",
            "hidden_size",
            "max_length",
        )
        if self.revision or other.revision:
            fields += ("revision",)
        diffs = [
            f"{f} {getattr(other, f)!r} (here {getattr(self, f)!r})"
            for f in fields
            if getattr(other, f) != getattr(self, f)
        ]
        return ", ".join(diffs) or None


def dht_prefix(model_name: str, namespace: str = "") -> str:
    """The DHT key prefix of a model: its name, made safe, optionally namespaced."""
    safe = re.sub(r"[^A-Za-z0-9_-]+", "-", model_name).strip("-") or "model"
    return f"{namespace}:{safe}" if namespace else safe


def block_key(prefix: str, block: int) -> str:
    return f"{prefix}.{block}"


def model_key(prefix: str) -> str:
    return f"{prefix}._model"


def models_key(namespace: str = "") -> str:
    """Where every model of a swarm is listed (subkey: the model's prefix), for `status`."""
    return f"{namespace}:_swarmgate.models" if namespace else "_swarmgate.models"
