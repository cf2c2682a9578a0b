"""HTTP routes: parse, call the service, shape the response; and what only HTTP knows:
whether a request's client is still there."""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel
from sse_starlette import ServerSentEvent
from starlette.requests import ClientDisconnect

from client.swarm_client import SwarmClient
from gateway.engine.generation import Generation
from gateway.openai.answers import ErrorResponse, ModelCard, ModelList, dump
from gateway.openai.chat_service import ChatService
from gateway.openai.completion_service import CompletionService
from gateway.openai.errors import to_http_error
from gateway.openai.models import ChatCompletionRequest, CompletionRequest
from gateway.responses.models import DeletedResponse, ResponsesRequest
from gateway.responses.service import ResponsesService
from gateway.web import sse
from gateway.web.auth import client_key, tenant_of
from gateway.web.cancellation import unless_disconnected
from gateway.web.endpoint import Body, Chunk, Endpoint, Prepared, Result
from gateway.web.limits import Admission, Slot
from gateway.web.streaming import EventStream
from protocol.errors import ModelNotFound, NoRouteError
from routing.planner import Hop, plan_route

api = APIRouter()  # the OpenAI surface, behind gateway.web.auth.ApiKeyGuard
ops = APIRouter()  # health and coverage stay open for probes and operators

_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (400, 401, 404, 429, 503)
}


def _chat(request: Request) -> ChatService:
    return request.app.state.chat  # type: ignore[no-any-return]


def _swarm(request: Request) -> SwarmClient:
    return request.app.state.swarm  # type: ignore[no-any-return]


@api.post("/v1/chat/completions", responses=_ERRORS)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    conversation_key = request.headers.get("x-session-id")
    return await _respond(request, _chat(request), body, conversation_key)


@api.post("/v1/completions", responses=_ERRORS)
async def completions(body: CompletionRequest, request: Request) -> Response:
    conversation_key = request.headers.get("x-session-id") or body.user
    return await _respond(request, _completions(request), body, conversation_key)


def _completions(request: Request) -> CompletionService:
    return request.app.state.completions  # type: ignore[no-any-return]


def _responses(request: Request) -> ResponsesService:
    return request.app.state.responses  # type: ignore[no-any-return]


def _tenant(request: Request) -> str:
    return tenant_of(request.headers.get("authorization", ""), request.app.state.api_keys)


@api.post("/v1/responses", responses=_ERRORS)
async def create_response(body: ResponsesRequest, request: Request) -> Response:
    service = _responses(request)
    conversation_key = request.headers.get("x-session-id")
    # The stored conversation is read before the request waits for a slot.
    turn = await service.resolve(body, tenant=_tenant(request), conversation_key=conversation_key)
    return await _respond(request, service, turn, conversation_key, framing=sse.TYPED_EVENTS)


@api.get("/v1/responses/{response_id}", responses=_ERRORS)
async def retrieve_response(response_id: str, request: Request) -> object:
    return dump(await _responses(request).retrieve(response_id, tenant=_tenant(request)))


@api.get("/v1/responses/{response_id}/input_items", responses=_ERRORS)
async def list_input_items(
    response_id: str,
    request: Request,
    after: str | None = None,
    before: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    order: Literal["asc", "desc"] = "desc",
    # Accepted and ignored: what it can add (images, logprobs, reasoning, tool results) is
    # never part of an input here, which is text and function calls.
    include: Annotated[list[str] | None, Query()] = None,
) -> object:
    page = await _responses(request).input_items(
        response_id, tenant=_tenant(request), after=after, before=before, limit=limit, order=order
    )
    return dump(page)


@api.delete("/v1/responses/{response_id}", responses=_ERRORS)
async def delete_response(response_id: str, request: Request) -> object:
    await _responses(request).delete(response_id, tenant=_tenant(request))
    return dump(DeletedResponse(id=response_id))


ROUTE_HEADER = "X-Swarmgate-Route"


def route_header(route: Sequence[Hop]) -> str:
    """``peer:start-end,peer:start-end``: the servers of a route and their half-open block
    ranges, in chain order (peer ids are base58: no ``:`` or ``,`` in them)."""
    return ",".join(f"{hop.peer_id}:{hop.start}-{hop.end}" for hop in route)


CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that left; nobody reads it


async def _respond(
    request: Request,
    service: Endpoint[Body, Prepared, Result, Chunk],
    body: Body,
    conversation_key: str | None,
    *,
    framing: sse.Framing = sse.CHUNKS,
) -> Response:
    """Checks first; then a slot, the prompt and the generation, all given up (session
    closed, slot freed) if the client leaves before the response is ready."""
    received_at = time.monotonic()
    service.check(body)
    work = _serve(request, service, body, conversation_key, received_at, framing)
    try:
        return await unless_disconnected(request.receive, work)
    except ClientDisconnect:
        return Response(status_code=CLIENT_CLOSED_REQUEST)


async def _serve(
    request: Request,
    service: Endpoint[Body, Prepared, Result, Chunk],
    body: Body,
    conversation_key: str | None,
    received_at: float,
    framing: sse.Framing,
) -> Response:
    """One JSON body, or a stream whose first generation is open before the status line
    goes out (so that a missing route is a 503, not a broken stream). Either way the
    response names the route its (first) generation opened on, in ``ROUTE_HEADER``.

    The prompt is templated and tokenized only once the request holds a slot, so that a
    flood of large bodies queues (or is refused) instead of keeping the CPU busy."""
    admission: Admission = request.app.state.admission
    authorization = request.headers.get("authorization", "")
    slot = await admission.admit(client_key(authorization), service.generations(body))
    stream: EventStream | None = None
    try:
        prepared = await service.prepare(
            body,
            conversation_key,
            received_at=received_at,
            tenant=tenant_of(authorization, request.app.state.api_keys),
        )
        if not body.stream:
            completion, route = await service.complete(body, prepared)
            return JSONResponse(dump(completion), headers={ROUTE_HEADER: route_header(route)})
        first = await service.open(prepared)
        chunks = service.stream(body, prepared, first)
        timeout_s = request.app.state.send_timeout_s
        stream = _stream(service, chunks, first, slot, timeout_s, framing)
        return stream
    finally:
        if stream is None:  # else the stream frees the slot when it ends
            slot.release()


def _stream(
    service: Endpoint[Body, Prepared, Result, Chunk],
    chunks: AsyncGenerator[Chunk, None],
    first: Generation,
    slot: Slot,
    send_timeout_s: float,
    framing: sse.Framing,
) -> EventStream:
    async def cleanup() -> None:  # idempotent, and never suspends (see Generator.close)
        await chunks.aclose()
        await service.close(first)  # in case the stream never began
        slot.release()

    return EventStream(
        _events(chunks, cleanup, framing),
        cleanup=cleanup,
        send_timeout_s=send_timeout_s,
        headers={ROUTE_HEADER: route_header(first.route)},
    )


async def _events(
    chunks: AsyncIterator[BaseModel],
    cleanup: Callable[[], Awaitable[None]],
    framing: sse.Framing,
) -> AsyncIterator[ServerSentEvent]:
    error = last = None
    try:
        async for chunk in chunks:
            if framing.last(chunk):
                last = framing.encode(chunk)
            else:
                yield framing.encode(chunk)
    except Exception as e:  # the status line is long gone: report in-band, then end cleanly
        error = sse.error_event(to_http_error(e).body)
    finally:
        # Before the stream's end (`[DONE]` or its last event): a client that sends its
        # next request on reading it finds its slot free.
        await cleanup()
    for event in (last, error):
        if event is not None:
            yield event
    if framing.done:
        yield sse.done_event()


def _served_models(request: Request) -> list[ModelCard]:
    """The base model and each of its LoRA adapters that online servers cover, every block
    of it: what a request can be routed for now."""
    model = _chat(request).model
    snapshot = _swarm(request).snapshot()
    cards = []
    for adapter in [None, *sorted(snapshot.adapters())]:
        serving = snapshot.serving(adapter)
        try:
            plan_route(serving, serving.num_blocks)
        except NoRouteError:
            continue
        model_id = model.id if adapter is None else f"{model.id}:{adapter}"
        cards.append(ModelCard(id=model_id, created=model.created))
    return cards


@api.get("/v1/models")
async def list_models(request: Request) -> object:
    return dump(ModelList(data=_served_models(request)))


@api.get("/v1/models/{model_id:path}", responses=_ERRORS)
async def get_model(model_id: str, request: Request) -> object:
    for card in _served_models(request):
        if card.id == model_id:
            return dump(card)
    raise ModelNotFound(f"the model {model_id!r} does not exist")


@ops.get("/health/live")
async def live() -> JSONResponse:
    """The process serves HTTP: a liveness probe that a swarm outage does not fail (restarting
    a gateway cannot bring servers back)."""
    return JSONResponse({"status": "ok"})


@ops.get("/health")
async def health(request: Request) -> JSONResponse:
    """Ready: the swarm covers every block, so a request can be served now."""
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
        {"peer_id": peer_id, **record.to_wire(), "precision": record.precision}
        for peer_id, record in sorted(snapshot.servers.items(), key=lambda kv: (kv[1].start, kv[0]))
    ]
    return JSONResponse(
        {
            "model": _chat(request).model.id,
            # The commit of a Hub model ("" for a local one): every server listed serves it.
            "revision": snapshot.model.revision if snapshot.model else "",
            "num_blocks": snapshot.num_blocks,
            "servers": servers,
        }
    )
