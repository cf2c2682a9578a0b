"""Server-sent event framing for OpenAI streams: one ``data:`` per chunk, ``[DONE]`` last;
for the Responses API, each event named after its ``type`` and no ``[DONE]``, as OpenAI's.

Lines end in ``\\n`` as OpenAI's own streams do (sse-starlette defaults to ``\\r\\n``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pydantic import BaseModel
from sse_starlette import ServerSentEvent

from gateway.openai.answers import ErrorResponse

SEP = "\n"
PING_PERIOD_S = 15  # keep-alive comments stop proxies from closing a slow stream


def chunk_event(chunk: BaseModel) -> ServerSentEvent:
    return ServerSentEvent(data=chunk.model_dump_json(), sep=SEP)


def error_event(error: ErrorResponse) -> ServerSentEvent:
    # The OpenAI SDK raises APIError on an `error` event whose data holds an "error" object.
    return ServerSentEvent(event="error", data=error.model_dump_json(), sep=SEP)


def done_event() -> ServerSentEvent:
    return ServerSentEvent(data="[DONE]", sep=SEP)


def typed_event(event: BaseModel) -> ServerSentEvent:
    """A Responses API event: ``event: <its type>`` and its JSON (the SDK reads the type)."""
    return ServerSentEvent(
        event=str(getattr(event, "type", "")), data=event.model_dump_json(), sep=SEP
    )


def _never(event: BaseModel) -> bool:
    return False


_TERMINAL = frozenset({"response.completed", "response.incomplete", "response.failed"})


def _terminal(event: BaseModel) -> bool:
    return getattr(event, "type", None) in _TERMINAL


@dataclass(frozen=True)
class Framing:
    """How a stream writes its events, and how it ends: with ``[DONE]``, or with an event
    of its own (``last``). Either way the end goes out after the stream's cleanup, so that a
    client that sends its next request on reading it finds its slot free."""

    encode: Callable[[BaseModel], ServerSentEvent]
    done: bool
    last: Callable[[BaseModel], bool] = _never


CHUNKS = Framing(chunk_event, done=True)  # chat and text completions
TYPED_EVENTS = Framing(typed_event, done=False, last=_terminal)  # the Responses API
