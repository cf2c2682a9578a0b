"""Errors shared by every part of swarmgate.

    SwarmError                  anything that went wrong in the swarm
    ├── NoRouteError            no chain of online servers covers every block
    ├── PeerUnavailable         a server of the chain failed or could not be reached
    │   ├── BadReply            a server answered with something unusable (NaN, wrong shape)
    │   └── NotAMember          a server refused us (or we it): not of the same closed swarm
    ├── CapacityExceeded        a server or the gateway is full right now
    └── ProtocolMismatch        a peer sent a message we cannot understand

Errors about one server carry its ``peer_id`` so that the gateway can route around it.

    RequestError                the client's request is wrong, or more than it may ask now
    ├── InvalidRequest          bad JSON or parameter values
    ├── Unauthorized            a missing or wrong API key
    ├── ModelNotFound           the requested model is not served here
    ├── NotFound                a stored object (a response) that the request names is not here
    ├── ContextLengthExceeded   prompt + max tokens exceed the model's context
    └── TooManyRequests         the client (API key) has too many requests in flight

    StoreUnavailable            the gateway's shared store (Redis) did not answer

The gateway maps each class to an HTTP status once, in ``gateway/openai/errors.py``.
"""

from __future__ import annotations


class SwarmError(Exception):
    """Anything that went wrong in the swarm rather than in the request."""


class NoRouteError(SwarmError):
    """No chain of online servers covers every block of the model."""


class PeerUnavailable(SwarmError):
    """A server of the chain failed or could not be reached."""

    def __init__(self, message: str, peer_id: str | None = None) -> None:
        super().__init__(message)
        self.peer_id = peer_id


class BadReply(PeerUnavailable):
    """A server answered with something unusable: NaN, a wrong dtype or shape, a bad count."""


class NotAMember(PeerUnavailable):
    """A peer without a valid pass of this swarm: a node refuses it before any work."""


class CapacityExceeded(SwarmError):
    """A server or the gateway has no room for this request right now."""

    def __init__(self, message: str, peer_id: str | None = None) -> None:
        super().__init__(message)
        self.peer_id = peer_id  # None: the gateway itself is full


class ProtocolMismatch(SwarmError):
    """A peer sent a message that this version cannot understand."""

    def __init__(self, message: str, peer_id: str | None = None) -> None:
        super().__init__(message)
        self.peer_id = peer_id


class RequestError(Exception):
    """The client's request is wrong (retrying it unchanged cannot help), or more than the
    client may ask for right now (``TooManyRequests``)."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class InvalidRequest(RequestError):
    """Malformed JSON or invalid parameter values."""


class Unauthorized(RequestError):
    """The request carries no valid API key for a gateway that requires one."""


class ModelNotFound(RequestError):
    """The requested model is not served by this gateway."""


class NotFound(RequestError):
    """A stored object that the request names does not exist, has expired, or belongs to
    another API key (which is not told apart: ids are no oracle)."""


class ContextLengthExceeded(RequestError):
    """The prompt plus the tokens to generate do not fit the model's context."""


class TooManyRequests(RequestError):
    """The client (its API key) already has as many requests in flight as one may have."""


class StoreUnavailable(Exception):
    """The gateway's shared store (Redis) did not answer a read that a request needs."""
