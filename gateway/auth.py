"""Whose request it is: API keys, refused before a byte of the body is read, and what a
request's key means for the per-key limit and the caches it may share."""

from __future__ import annotations

import hashlib
import hmac

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.errors import to_http_error
from gateway.metrics import GatewayMetrics
from protocol.errors import Unauthorized

GUARDED_PREFIX = "/v1/"  # the OpenAI surface; health, metrics and coverage stay open


class ApiKeyGuard:
    """With API keys configured, every /v1 request needs `Authorization: Bearer KEY`.

    ASGI middleware rather than a route dependency: FastAPI reads and parses a body before
    it runs dependencies, which would let anyone make the gateway parse megabytes of JSON.
    """

    def __init__(self, app: ASGIApp, keys: tuple[str, ...], metrics: GatewayMetrics) -> None:
        self.app = app
        self.keys = keys
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.keys and scope["path"].startswith(GUARDED_PREFIX):
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
