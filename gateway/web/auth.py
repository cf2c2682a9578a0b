"""Whose request it is: API keys, refused before a byte of the body is read, and what a
request's key means for the per-key limit and the caches it may share."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.metrics import GatewayMetrics
from gateway.openai.errors import to_http_error
from protocol.errors import Unauthorized

# What stays open with API keys configured: the probes (Kubernetes sends no key). Everything
# else, the OpenAI surface, /swarm, /metrics and the API docs included, needs a key; an
# unkeyed /metrics is served on `--metrics-port` instead, a port of its own.
OPEN_PATHS = frozenset({"/health", "/health/live"})


class ApiKeyGuard:
    """With API keys configured, every request but the health probes needs
    `Authorization: Bearer KEY`.

    ASGI middleware rather than a route dependency: FastAPI reads and parses a body before
    it runs dependencies, which would let anyone make the gateway parse megabytes of JSON.
    """

    def __init__(self, app: ASGIApp, keys: tuple[str, ...], metrics: GatewayMetrics) -> None:
        self.app = app
        self.keys = keys
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.keys and scope["path"] not in OPEN_PATHS:
            try:
                check_api_key(Headers(scope=scope).get("authorization", ""), self.keys)
            except Unauthorized as e:
                error = to_http_error(e)
                self.metrics.requests.labels(str(error.status)).inc()
                body = error.body.model_dump(mode="json")
                await JSONResponse(body, error.status, headers=error.headers)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def check_api_key(authorization: str, keys: tuple[str, ...]) -> None:
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("missing API key: send `Authorization: Bearer YOUR_KEY`")
    if not any(hmac.compare_digest(token.strip().encode(), key.encode()) for key in keys):
        raise Unauthorized("incorrect API key provided")


def client_key(authorization: str) -> str:
    """Whom a request counts against in ``--max-concurrent-per-key``: its bearer token (an
    accepted API key, when keys are configured), else everyone without one together."""
    scheme, _, token = authorization.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else "anonymous"


def tenant_of(authorization: str, keys: tuple[str, ...]) -> str:
    """Whose caches a request may reuse: with API keys configured, a digest of the key it
    authenticated with (never the key itself); on an open gateway everyone is one tenant."""
    if not keys:
        return ""
    return hashlib.sha256(client_key(authorization).encode()).hexdigest()[:32]


LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain"})


def is_loopback(host: str) -> bool:
    """Whether listening on ``host`` admits this machine's own processes only."""
    name = host.strip().strip("[]").lower()
    if name in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False  # another host name: it may resolve to any interface


KEY_SETTINGS = ("max_concurrent",)


class KeyFileError(ValueError):
    """A line of an API key file that cannot be read; its message never holds a key."""


@dataclass(frozen=True)
class ApiKeys:
    """Accepted API keys, and the caps some have of their own."""

    keys: tuple[str, ...] = field(default=(), repr=False)
    limits: dict[str, int] = field(default_factory=dict, repr=False, hash=False)  # key → cap


def read_key_lines(lines: Iterable[str]) -> ApiKeys:
    """Keys from the lines of a key file: ``KEY`` alone, or ``KEY max_concurrent=N`` (the
    most generations that key may have running or queued); blank lines, lines starting
    with ``#`` and anything after a `` #`` are comments."""
    keys: list[str] = []
    limits: dict[str, int] = {}
    first_seen: dict[str, int] = {}
    for number, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, *fields = line.split()
        for i, item in enumerate(fields):
            if item.startswith("#"):
                fields = fields[:i]
                break
        if key in first_seen:
            raise KeyFileError(f"line {number}: the key of line {first_seen[key]} again")
        first_seen[key] = number
        keys.append(key)
        for item in fields:
            name, sep, value = item.partition("=")
            if not sep:
                raise KeyFileError(
                    f"line {number}: expected KEY [NAME=VALUE ...], got a second word that "
                    f"is no NAME=VALUE (a key cannot hold spaces)"
                )
            if name not in KEY_SETTINGS:
                raise KeyFileError(
                    f"line {number}: unknown setting {name!r} (known: {', '.join(KEY_SETTINGS)})"
                )
            if not value.isdigit() or int(value) < 1:
                raise KeyFileError(f"line {number}: {name} must be a whole number >= 1")
            limits[key] = int(value)
    return ApiKeys(tuple(keys), limits)
