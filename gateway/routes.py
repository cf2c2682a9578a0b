"""HTTP routes: parse, call the service, shape the response. No logic of their own."""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel
from sse_starlette import EventSourceResponse, ServerSentEvent

from gateway import sse
from gateway.chat_service import ChatService
from gateway.completion_service import CompletionService
from gateway.errors import to_http_error
from gateway.swarm_client import SwarmClient
from protocol.errors import ModelNotFound, NoRouteError, Unauthorized
from protocol.openai import (
    ChatCompletionRequest,
    CompletionRequest,
    ErrorResponse,
    ModelCard,
    ModelList,
    dump,
)
from routing.planner import Hop, plan_route


async def require_api_key(request: Request) -> None:
    """With API keys configured, every /v1 request needs `Authorization: Bearer KEY`."""
    keys: tuple[str, ...] = request.app.state.api_keys
    if not keys:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("missing API key: send `Authorization: Bearer YOUR_KEY`")
    if not any(hmac.compare_digest(token.strip().encode(), key.encode()) for key in keys):
        raise Unauthorized("incorrect API key provided")


api = APIRouter(dependencies=[Depends(require_api_key)])  # the OpenAI surface
ops = APIRouter()  # health and coverage stay open for probes and operators

_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (400, 401, 404, 429, 503)
}


def _chat(request: Request) -> ChatService:
    return request.app.state.chat  # type: ignore[no-any-return]


def _swarm(request: Request) -> SwarmClient:
    return request.app.state.swarm  # type: ignore[no-any-return]


@api.post("/v1/chat/completions", responses=_ERRORS)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> object:
    session_key = request.headers.get("x-session-id")
    return await _respond(_chat(request), body, session_key)


@api.post("/v1/completions", responses=_ERRORS)
async def completions(body: CompletionRequest, request: Request) -> object:
    session_key = request.headers.get("x-session-id") or body.user
    return await _respond(request.app.state.completions, body, session_key)


ROUTE_HEADER = "X-Swarmgate-Route"


def route_header(route: Sequence[Hop]) -> str:
    """``peer:start-end,peer:start-end``: the servers of a route and their half-open block
    ranges, in chain order (peer ids are base58: no ``:`` or ``,`` in them)."""
    return ",".join(f"{hop.peer_id}:{hop.start}-{hop.end}" for hop in route)


async def _respond(
    service: ChatService | CompletionService, body: Any, session_key: str | None
) -> object:
    """One JSON body, or a stream whose first generation is open before the status line
    goes out (so that a missing route is a 503, not a broken stream). Either way the
    response names the route its (first) generation opened on, in ``ROUTE_HEADER``."""
    if not body.stream:
        completion, route = await service.complete(body, session_key)
        return JSONResponse(dump(completion), headers={ROUTE_HEADER: route_header(route)})
    prepared: Any = service.prepare(body, session_key)
    first = await service.open(prepared[0])
    chunks = service.stream(body, prepared, first)
    return EventSourceResponse(
        _events(chunks),
        sep=sse.SEP,
        ping=sse.PING_PERIOD_S,
        headers={ROUTE_HEADER: route_header(first.route)},
    )


async def _events(chunks: AsyncIterator[BaseModel]) -> AsyncIterator[ServerSentEvent]:
    try:
        async for chunk in chunks:
            yield sse.chunk_event(chunk)
    except Exception as e:  # the status line is long gone: report in-band, then end cleanly
        yield sse.error_event(to_http_error(e).body)
    yield sse.done_event()


def _served_models(request: Request) -> list[ModelCard]:
    model = _chat(request).model
    snapshot = _swarm(request).snapshot()
    try:
        plan_route(snapshot, snapshot.num_blocks)
    except NoRouteError:
        return []
    return [ModelCard(id=model.id, created=model.created)]


@api.get("/v1/models")
async def list_models(request: Request) -> object:
    return dump(ModelList(data=_served_models(request)))


@api.get("/v1/models/{model_id:path}", responses=_ERRORS)
async def get_model(model_id: str, request: Request) -> object:
    for card in _served_models(request):
        if card.id == model_id:
            return dump(card)
    raise ModelNotFound(f"the model {model_id!r} does not exist")


@ops.get("/health")
async def health(request: Request) -> JSONResponse:
    snapshot = _swarm(request).snapshot()
    model = _chat(request).model.id
    try:
        route = plan_route(snapshot, snapshot.num_blocks)
    except NoRouteError as e:
        return JSONResponse({"status": "unavailable", "model": model, "reason": str(e)}, 503)
    hops = [{"peer_id": h.peer_id, "start": h.start, "end": h.end} for h in route]
    return JSONResponse({"status": "ok", "model": model, "route": hops})


@ops.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@ops.get("/swarm")
async def swarm(request: Request) -> JSONResponse:
    snapshot = _swarm(request).snapshot()
    servers = [
        {"peer_id": peer_id, **record.to_wire()}
        for peer_id, record in sorted(snapshot.servers.items(), key=lambda kv: (kv[1].start, kv[0]))
    ]
    return JSONResponse(
        {
            "model": _chat(request).model.id,
            "num_blocks": snapshot.num_blocks,
            "servers": servers,
        }
    )
