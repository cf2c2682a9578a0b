"""SSE frames and the one mapping from exceptions to OpenAI-shaped HTTP errors."""

from __future__ import annotations

import json

import pytest
from fastapi.exceptions import RequestValidationError

from gateway.errors import to_http_error
from gateway.sse import chunk_event, done_event, error_event
from protocol.errors import (
    CapacityExceeded,
    ContextLengthExceeded,
    InvalidRequest,
    ModelNotFound,
    NoRouteError,
    PeerUnavailable,
    Unauthorized,
)
from protocol.openai import ChatCompletionChunk, ChoiceDelta, ChunkChoice, ErrorResponse


def chunk(delta: ChoiceDelta) -> ChatCompletionChunk:
    return ChatCompletionChunk(
        id="chatcmpl-1", created=1, model="m", choices=[ChunkChoice(delta=delta)]
    )


def test_chunk_frames_are_single_data_lines() -> None:
    frame = chunk_event(chunk(ChoiceDelta(content="Hi"))).encode()
    assert frame.startswith(b"data: ") and frame.endswith(b"\n\n") and b"\r" not in frame
    data = json.loads(frame[len(b"data: ") :])
    assert data["choices"][0]["delta"] == {"content": "Hi"}  # no "role": null
    assert done_event().encode() == b"data: [DONE]\n\n"


def test_error_frames_carry_an_openai_error_object() -> None:
    body = to_http_error(PeerUnavailable("gone")).body
    frame = error_event(body).encode().decode()
    assert frame.startswith("event: error\ndata: ") and frame.endswith("\n\n")
    assert ErrorResponse.model_validate_json(frame.split("data: ", 1)[1]) == body


@pytest.mark.parametrize(
    ("exc", "status", "code", "retry"),
    [
        (ModelNotFound("no such model"), 404, "model_not_found", False),
        (
            ContextLengthExceeded("too long", param="messages"),
            400,
            "context_length_exceeded",
            False,
        ),
        (InvalidRequest("bad"), 400, None, False),
        (Unauthorized("who?"), 401, "invalid_api_key", False),
        (NoRouteError("gap"), 503, "no_route", True),
        (PeerUnavailable("gone"), 503, "peer_unavailable", True),
        (CapacityExceeded("full"), 429, "capacity_exceeded", True),
    ],
)
def test_each_error_has_one_status_and_shape(
    exc: Exception, status: int, code: str | None, retry: bool
) -> None:
    error = to_http_error(exc)
    assert error.status == status and error.body.error.code == code
    assert ("Retry-After" in (error.headers or {})) == retry
    assert set(error.body.model_dump()["error"]) == {"message", "type", "param", "code"}


def test_unexpected_errors_do_not_leak_internals() -> None:
    error = to_http_error(RuntimeError("secret path /home/x"))
    assert error.status == 500 and "secret" not in error.body.error.message


def test_validation_errors_name_the_parameter() -> None:
    exc = RequestValidationError(
        [{"type": "less_than_equal", "loc": ("body", "temperature"), "msg": "too hot", "input": 5}]
    )
    error = to_http_error(exc)
    assert error.status == 400 and error.body.error.param == "temperature"
    bad_json = RequestValidationError([{"type": "json_invalid", "loc": ("body", 0), "msg": "x"}])
    assert "not valid JSON" in to_http_error(bad_json).body.error.message
