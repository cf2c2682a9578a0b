"""OpenAI wire models: requests as OpenAI accepts them, responses as the SDK parses them."""

from __future__ import annotations

from typing import Any

import openai.types.chat as sdk
import pytest
from pydantic import ValidationError

from gateway.openai.answers import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionMessage,
    ChatCompletionTokenLogprob,
    ChoiceDelta,
    ChoiceLogprobs,
    ChunkChoice,
    CompletionUsage,
    PromptTokensDetails,
    TopLogprob,
    dump,
)
from gateway.openai.answers import Choice as ChatChoice
from gateway.openai.models import ChatCompletionRequest

BASE: dict[str, Any] = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}]}


def request(**changes: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({**BASE, **changes})


# ---- requests ----


def test_minimal_request_defaults() -> None:
    r = request()
    assert r.model == "tiny"
    assert r.messages[0].text() == "Hi"
    assert r.n == 1 and r.stream is False
    assert r.temperature is None and r.top_p is None
    assert r.token_limit() is None
    assert r.stop_sequences() == []
    assert r.include_usage() is False


def test_string_content() -> None:
    r = request(messages=[{"role": "system", "content": "Be brief."}, BASE["messages"][0]])
    assert [m.role for m in r.messages] == ["system", "user"]
    assert r.messages[0].text() == "Be brief."


def test_list_of_text_parts_content() -> None:
    content = [{"type": "text", "text": "Hello, "}, {"type": "text", "text": "world"}]
    r = request(messages=[{"role": "user", "content": content}])
    assert r.messages[0].text() == "Hello, world"
    assert isinstance(r.messages[0].content, list)


def test_null_content_is_empty_text() -> None:
    r = request(messages=[*BASE["messages"], {"role": "assistant", "content": None}])
    assert r.messages[1].text() == ""


def test_non_text_content_parts_are_rejected() -> None:
    content = [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]
    with pytest.raises(ValidationError):
        request(messages=[{"role": "user", "content": content}])


def test_unknown_roles_are_rejected() -> None:
    with pytest.raises(ValidationError):
        request(messages=[{"role": "wizard", "content": "hi"}])


def test_unknown_fields_are_ignored() -> None:
    r = request(
        metadata={"a": "b"},
        service_tier="auto",
        messages=[{"role": "user", "content": "Hi", "whatever": 1}],
    )
    assert not hasattr(r, "service_tier")
    assert "metadata" not in r.model_dump()
    assert r.messages[0].text() == "Hi"


@pytest.mark.parametrize(
    "changes",
    [
        {"temperature": 2.01},
        {"temperature": 5},
        {"temperature": -0.1},
        {"top_p": 0},
        {"top_p": 1.5},
        {"max_tokens": 0},
        {"max_tokens": -5},
        {"max_completion_tokens": 0},
        {"stop": ["a", "b", "c", "d", "e"]},
        {"messages": []},
        {"n": 0},
        {"n": 9},
        {"presence_penalty": 2.5},
        {"frequency_penalty": -3},
        {"logit_bias": {"abc": 1.0}},
        {"logit_bias": {"5": 101}},
        {"logit_bias": {"-1": 1.0}},
        {"top_logprobs": 3},
        {"top_logprobs": 21, "logprobs": True},
    ],
)
def test_invalid_requests_are_rejected(changes: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        request(**changes)


def test_missing_model_or_messages_is_rejected() -> None:
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate({"messages": BASE["messages"]})
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate({"model": "tiny"})


@pytest.mark.parametrize(
    "changes",
    [
        {"temperature": 2},
        {"temperature": 0},
        {"top_p": 1},
        {"top_p": 0.01},
        {"max_tokens": 1},
        {"stop": ["a", "b", "c", "d"]},
        {"n": 8},
        {"logit_bias": {"50256": -100, "7": 100}},
        {"top_logprobs": 20, "logprobs": True},
    ],
)
def test_boundary_values_are_accepted(changes: dict[str, Any]) -> None:
    request(**changes)


def test_token_limit_prefers_max_completion_tokens() -> None:
    assert request(max_tokens=10).token_limit() == 10
    assert request(max_completion_tokens=20).token_limit() == 20
    assert request(max_tokens=10, max_completion_tokens=20).token_limit() == 20
    assert request(max_tokens=30, max_completion_tokens=5).token_limit() == 5


@pytest.mark.parametrize(
    ("stop", "expected"),
    [
        (None, []),
        ("\n", ["\n"]),
        ("", []),
        ([], []),
        (["a", "", "b"], ["a", "b"]),
        (["</s>"], ["</s>"]),
    ],
)
def test_stop_sequences_are_normalized(stop: Any, expected: list[str]) -> None:
    assert request(stop=stop).stop_sequences() == expected


def test_include_usage() -> None:
    assert request(stream=True, stream_options={"include_usage": True}).include_usage()
    assert not request(stream=True, stream_options={}).include_usage()


# ---- responses, checked with the official SDK ----


def usage() -> CompletionUsage:
    return CompletionUsage(
        completion_tokens=3,
        prompt_tokens=5,
        total_tokens=8,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=2),
    )


def logprobs() -> ChoiceLogprobs:
    return ChoiceLogprobs(
        content=[
            ChatCompletionTokenLogprob(
                token="Hi",
                logprob=-0.1,
                bytes=[72, 105],
                top_logprobs=[TopLogprob(token="Hi", logprob=-0.1, bytes=[72, 105])],
            )
        ]
    )


def test_chat_completion_parses_with_the_sdk() -> None:
    completion = ChatCompletion(
        id="chatcmpl-1",
        created=1_700_000_000,
        model="tiny",
        choices=[
            ChatChoice(
                index=0,
                message=ChatCompletionMessage(content="Hello!"),
                finish_reason="stop",
                logprobs=logprobs(),
            ),
            ChatChoice(index=1, message=ChatCompletionMessage(content=""), finish_reason="length"),
        ],
        usage=usage(),
    )
    data = dump(completion)
    parsed = sdk.ChatCompletion.model_validate(data)
    assert parsed.object == "chat.completion"
    assert parsed.choices[0].message.content == "Hello!"
    assert parsed.choices[0].message.role == "assistant"
    assert parsed.choices[0].finish_reason == "stop"
    assert parsed.choices[1].finish_reason == "length"
    assert parsed.choices[0].logprobs is not None
    assert parsed.choices[0].logprobs.content is not None
    assert parsed.choices[0].logprobs.content[0].token == "Hi"
    assert parsed.usage is not None and parsed.usage.total_tokens == 8
    assert parsed.usage.prompt_tokens_details is not None
    assert parsed.usage.prompt_tokens_details.cached_tokens == 2
    # Exactly OpenAI's fields: nothing the SDK does not know about.
    assert parsed.model_extra in (None, {})


def test_chat_completion_created_defaults_to_now() -> None:
    completion = ChatCompletion(
        id="x",
        model="tiny",
        choices=[ChatChoice(message=ChatCompletionMessage(content="a"), finish_reason="stop")],
        usage=usage(),
    )
    assert completion.created > 1_600_000_000
    sdk.ChatCompletion.model_validate(dump(completion))


@pytest.mark.parametrize(
    ("delta", "finish_reason"),
    [
        (ChoiceDelta(role="assistant", content=""), None),
        (ChoiceDelta(content="Hel"), None),
        (ChoiceDelta(), "stop"),
        (ChoiceDelta(), "length"),
    ],
)
def test_chat_completion_chunks_parse_with_the_sdk(delta: ChoiceDelta, finish_reason: Any) -> None:
    chunk = ChatCompletionChunk(
        id="chatcmpl-1",
        created=1_700_000_000,
        model="tiny",
        choices=[ChunkChoice(delta=delta, finish_reason=finish_reason)],
    )
    data = dump(chunk)
    parsed = sdk.ChatCompletionChunk.model_validate(data)
    assert parsed.object == "chat.completion.chunk"
    assert parsed.choices[0].delta.content == delta.content
    assert parsed.choices[0].delta.role == delta.role
    assert parsed.choices[0].finish_reason == finish_reason
    assert "role" in data["choices"][0]["delta"] or delta.role is None


def test_usage_chunk_parses_with_the_sdk() -> None:
    chunk = ChatCompletionChunk(id="chatcmpl-1", created=1, model="tiny", choices=[], usage=usage())
    parsed = sdk.ChatCompletionChunk.model_validate(dump(chunk))
    assert parsed.choices == []
    assert parsed.usage is not None and parsed.usage.completion_tokens == 3


def test_chunk_with_logprobs_parses_with_the_sdk() -> None:
    chunk = ChatCompletionChunk(
        id="chatcmpl-1",
        created=1,
        model="tiny",
        choices=[ChunkChoice(delta=ChoiceDelta(content="Hi"), logprobs=logprobs())],
    )
    parsed = sdk.ChatCompletionChunk.model_validate(dump(chunk))
    assert parsed.choices[0].logprobs is not None
    assert parsed.choices[0].logprobs.content is not None
    assert parsed.choices[0].logprobs.content[0].logprob == pytest.approx(-0.1)


def test_sdk_rejects_a_malformed_chunk() -> None:
    # Guards the checks above: the SDK model really validates.
    with pytest.raises(ValidationError):
        sdk.ChatCompletionChunk.model_validate({"id": "x"})
