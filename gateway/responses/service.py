"""The OpenAI Responses API on top of the chat completions service; knows nothing about HTTP.

A request is first resolved against the conversation it continues (``previous_response_id``)
into a ``Turn``: the chat request to run and what to store once it has run. From then on it
goes the way of a chat completion (admission, template, swarm session), and its result is
translated back (the other modules of gateway/responses/).

Every turn of a stored conversation runs under one session key, so that it finds the KV
caches of the turn before: the request's ``prompt_cache_key`` (or ``X-Session-ID``) when it
gives one, else the key of the conversation it continues, else, for its first response, a
key named after that response's id. Two follow-ups of one response share that key: the
second continues the cache of the first's branch as far as the two agree (exact either way).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncGenerator, Iterator
from dataclasses import dataclass
from typing import Literal

from gateway.engine.generation import Generation
from gateway.openai.chat_service import ChatService, PreparedChat
from gateway.openai.errors import to_http_error
from gateway.openai.models import ChatCompletionRequest, ChatMessage
from gateway.openai.prepare import ServedModel, requested_adapter
from gateway.responses.events import ResponseEvents
from gateway.responses.items import input_items, items_page, listed_items
from gateway.responses.models import InputItem, Response, ResponseItemList, ResponsesRequest
from gateway.responses.output import new_id, response_from_completion, response_skeleton
from gateway.responses.refusals import refuse_unsupported
from gateway.responses.store import MAX_RECORD_BYTES, ResponseStore, StoredResponse
from gateway.responses.stream_events import ResponseEvent
from gateway.responses.to_chat import chat_request, output_messages
from protocol.errors import InvalidRequest, NotFound, RequestError
from routing.planner import Hop

logger = logging.getLogger(__name__)

# The chat service names the chat request's parameters; a Responses client knows these.
_PARAMS = {
    "messages": "input",
    "response_format": "text.format",
    "max_completion_tokens": "max_output_tokens",
}


@dataclass(frozen=True)
class Turn:
    """A Responses request resolved against the conversation it continues."""

    request: ResponsesRequest
    chat: ChatCompletionRequest  # what the chat service runs
    conversation: tuple[ChatMessage, ...]  # stored turns and this input; no instructions
    input: tuple[InputItem, ...]  # this request's own input, as items
    response: Response  # before any output: its id and the parameters it echoes
    conversation_key: str | None  # the client's name for the conversation (docstring above)
    tenant: str

    @property
    def stream(self) -> bool:
        return self.request.stream


class ResponsesService:
    def __init__(self, chat: ChatService, store: ResponseStore) -> None:
        self._chat = chat
        self._store = store

    @property
    def model(self) -> ServedModel:
        return self._chat.model

    async def resolve(
        self, request: ResponsesRequest, *, tenant: str, conversation_key: str | None = None
    ) -> Turn:
        """Refusals first; then the stored conversation that the request continues (one
        read of the store, before the request waits for a slot)."""
        requested_adapter(self.model, request.model)
        refuse_unsupported(request)
        previous = await self._previous(request, tenant)
        response_id = new_id("resp")
        with _responses_params():
            chat, conversation = chat_request(request, previous.messages if previous else ())
        if request.prompt_cache_key or conversation_key:
            key: str | None = request.prompt_cache_key or conversation_key
        elif previous is not None:
            key = previous.conversation_key
        else:
            key = f"response:{response_id}" if request.stores() else None
        return Turn(
            request,
            chat,
            tuple(conversation),
            tuple(input_items(request.input)),
            response_skeleton(request, response_id, request.model),
            key,
            tenant,
        )

    async def _previous(self, request: ResponsesRequest, tenant: str) -> StoredResponse | None:
        if request.previous_response_id is None:
            return None
        found = await self._store.get(tenant, request.previous_response_id)
        if found is None:  # as OpenAI answers: a 400 with its own code
            raise InvalidRequest(
                f"Previous response with id {request.previous_response_id!r} not found.",
                param="previous_response_id",
                code="previous_response_not_found",
            )
        return found

    def generations(self, turn: Turn) -> int:
        """How many generations the request runs at once: one."""
        return 1

    def check(self, turn: Turn) -> None:
        with _responses_params():
            self._chat.check(turn.chat)

    async def prepare(
        self,
        turn: Turn,
        conversation_key: str | None = None,  # already part of the turn's
        *,
        received_at: float | None = None,
        tenant: str = "",
    ) -> PreparedChat:
        with _responses_params():
            # A context overflow names the prompt in its text too; _PARAMS renames its param.
            return await self._chat.prepare(
                turn.chat,
                turn.conversation_key,
                received_at=received_at,
                tenant=turn.tenant,
                prompt_param="input",
            )

    async def open(self, prepared: PreparedChat) -> Generation:
        return await self._chat.open(prepared)

    async def close(self, generation: Generation) -> None:
        await self._chat.close(generation)

    async def complete(
        self, turn: Turn, prepared: PreparedChat
    ) -> tuple[Response, tuple[Hop, ...]]:
        completion, route = await self._chat.complete(turn.chat, prepared)
        response = response_from_completion(turn.response, completion)
        await self._save(turn, response)
        return response, route

    async def stream(
        self, turn: Turn, prepared: PreparedChat, first: Generation
    ) -> AsyncGenerator[ResponseEvent, None]:
        """The response's events. A failure after the first event ends the stream with an
        `error` event and `response.failed`, and stores nothing."""
        events = ResponseEvents(turn.response)
        for event in events.started():
            yield event
        chunks = self._chat.stream(turn.chat, prepared, first)
        try:
            async with contextlib.aclosing(chunks):
                async for chunk in chunks:
                    for event in events.push(chunk):
                        yield event
            response = events.result()
            await self._save(turn, response)  # before the client hears it is done
        except Exception as e:
            http = to_http_error(e)
            error = http.body.error
            for event in events.failed(error.message, error.code, error.param, http.status):
                yield event
            return
        for event in events.ended(response):
            yield event

    async def _save(self, turn: Turn, response: Response) -> None:
        """Store a finished response, when asked to. The store failing costs the
        conversation its continuation (a warning), not this answer."""
        if not response.store:
            return
        messages = (*turn.conversation, *output_messages(response.output))
        record = StoredResponse(response, messages, turn.conversation_key or "", turn.input)
        if len(record.to_json()) > MAX_RECORD_BYTES:
            logger.warning(
                "response %s is over %d bytes: not stored", response.id, MAX_RECORD_BYTES
            )
            return
        try:
            await self._store.put(turn.tenant, record)
        except Exception as e:
            logger.warning("response %s could not be stored: %s", response.id, e)

    async def retrieve(self, response_id: str, *, tenant: str) -> Response:
        found = await self._store.get(tenant, response_id)
        if found is None:
            raise _not_found(response_id)
        return found.response

    async def input_items(
        self,
        response_id: str,
        *,
        tenant: str,
        after: str | None = None,
        before: str | None = None,
        limit: int = 20,
        order: Literal["asc", "desc"] = "desc",
    ) -> ResponseItemList:
        """A page of the input items of a stored response: its request's own ``input``,
        not the conversation it continued (as OpenAI lists them)."""
        found = await self._store.get(tenant, response_id)
        if found is None:
            raise _not_found(response_id)
        if found.input is None:
            raise NotFound(
                f"The input items of response {response_id!r} were not kept: an older "
                "gateway stored it.",
                param="response_id",
            )
        items = listed_items(response_id, found.input)
        return items_page(items, after=after, before=before, limit=limit, order=order)

    async def delete(self, response_id: str, *, tenant: str) -> None:
        if not await self._store.delete(tenant, response_id):
            raise _not_found(response_id)


def _not_found(response_id: str) -> NotFound:
    return NotFound(f"Response with id {response_id!r} not found.", param="response_id")


@contextlib.contextmanager
def _responses_params() -> Iterator[None]:
    """Errors of the chat service, naming the parameters as a Responses client sent them."""
    try:
        yield
    except RequestError as e:
        root = (e.param or "").split(".", 1)[0]
        if root not in _PARAMS:
            raise
        raise type(e)(e.message, param=_PARAMS[root], code=e.code) from e
