"""Server-sent event framing of OpenAI streams."""

from __future__ import annotations

import json

import pytest

from gateway.openai.answers import (
    ChatCompletionChunk,
    ChoiceDelta,
    ChunkChoice,
    CompletionUsage,
    ErrorDetail,
    ErrorResponse,
)
from gateway.web.sse import chunk_event, done_event, error_event


def chunk(delta: ChoiceDelta, finish_reason: str | None = None) -> ChatCompletionChunk:
    return ChatCompletionChunk(
        id="chatcmpl-123",
        created=1_700_000_000,
        model="tiny",
        choices=[ChunkChoice(delta=delta, finish_reason=finish_reason)],  # type: ignore[arg-type]
    )


def data_of(raw: bytes, prefix: bytes = b"data: ") -> str:
    assert raw.startswith(prefix)
    assert raw.endswith(b"\n\n")
    body = raw[len(prefix) : -2]
    assert b"\n" not in body, "a JSON event must be one data line"
    return body.decode()


def assert_lf_only(raw: bytes) -> None:
    assert b"\r" not in raw


def test_done_is_exactly_the_openai_terminator() -> None:
    assert done_event().encode() == b"data: [DONE]\n\n"


CHUNKS = [
    chunk(ChoiceDelta(role="assistant", content="")),
    chunk(ChoiceDelta(content="Hello")),
    chunk(ChoiceDelta(), finish_reason="stop"),
    chunk(ChoiceDelta(content="line one\nline two\r\nthree\rfour")),
    chunk(ChoiceDelta(content="sep\u2028arators\u2029and\x85nel")),
    chunk(ChoiceDelta(content="ünïcødé 世界 😀")),
    chunk(ChoiceDelta(content="data: [DONE]\n\n")),
]


@pytest.mark.parametrize("event_chunk", CHUNKS)
def test_chunk_event_is_one_data_line_of_the_model_json(event_chunk: ChatCompletionChunk) -> None:
    raw = chunk_event(event_chunk).encode()
    assert isinstance(raw, bytes)
    assert_lf_only(raw)
    payload = json.loads(data_of(raw))
    assert payload == event_chunk.model_dump(mode="json")
    assert payload["choices"][0]["delta"] == event_chunk.choices[0].delta.model_dump()


def test_chunk_with_usage_round_trips() -> None:
    final = ChatCompletionChunk(
        id="chatcmpl-1",
        created=1,
        model="tiny",
        choices=[],
        usage=CompletionUsage(completion_tokens=3, prompt_tokens=5, total_tokens=8),
    )
    payload = json.loads(data_of(chunk_event(final).encode()))
    assert payload["choices"] == []
    assert payload["usage"]["total_tokens"] == 8


def test_error_event_has_the_error_event_name() -> None:
    error = ErrorResponse(
        error=ErrorDetail(message="boom\nsecond line", type="server_error", code="peer_unavailable")
    )
    raw = error_event(error).encode()
    assert raw.startswith(b"event: error\ndata: ")
    assert_lf_only(raw)
    payload = json.loads(data_of(raw, prefix=b"event: error\ndata: "))
    assert payload == error.model_dump(mode="json")
    assert set(payload["error"]) == {"message", "type", "param", "code"}
    assert payload["error"]["message"] == "boom\nsecond line"


def test_content_only_delta_has_no_role_key() -> None:
    delta = ChoiceDelta(content="Hi")
    assert delta.model_dump() == {"content": "Hi"}
    assert json.loads(delta.model_dump_json()) == {"content": "Hi"}
    payload = json.loads(data_of(chunk_event(chunk(delta)).encode()))
    assert payload["choices"][0]["delta"] == {"content": "Hi"}
    assert "role" not in payload["choices"][0]["delta"]


def test_role_delta_keeps_the_role_and_empty_content() -> None:
    delta = ChoiceDelta(role="assistant", content="")
    assert json.loads(delta.model_dump_json()) == {"role": "assistant", "content": ""}


def test_final_delta_is_empty_object() -> None:
    payload = json.loads(data_of(chunk_event(chunk(ChoiceDelta(), "length")).encode()))
    assert payload["choices"][0]["delta"] == {}
    assert payload["choices"][0]["finish_reason"] == "length"
