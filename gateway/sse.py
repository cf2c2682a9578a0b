"""Server-sent event framing for OpenAI streams: one ``data:`` per chunk, ``[DONE]`` last.

Lines end in ``\\n`` as OpenAI's own streams do (sse-starlette defaults to ``\\r\\n``).
"""

from __future__ import annotations

from pydantic import BaseModel
from sse_starlette import ServerSentEvent

from protocol.openai import ErrorResponse

SEP = "\n"
PING_PERIOD_S = 15  # keep-alive comments stop proxies from closing a slow stream


def chunk_event(chunk: BaseModel) -> ServerSentEvent:
    return ServerSentEvent(data=chunk.model_dump_json(), sep=SEP)


def error_event(error: ErrorResponse) -> ServerSentEvent:
    # The OpenAI SDK raises APIError on an `error` event whose data holds an "error" object.
    return ServerSentEvent(event="error", data=error.model_dump_json(), sep=SEP)


def done_event() -> ServerSentEvent:
    return ServerSentEvent(data="[DONE]", sep=SEP)
