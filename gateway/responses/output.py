"""A response from a chat completion: its output items, usage and status, and the response
skeleton that echoes the request's parameters.

Pure: no I/O, no HTTP.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterable, Sequence
from typing import Any, Literal

from gateway.engine.finish import FinishReason
from gateway.openai.answers import (
    ChatCompletion,
    ChatCompletionMessage,
    ChatCompletionTokenLogprob,
    ChoiceLogprobs,
    CompletionUsage,
)
from gateway.responses.models import (
    FunctionCall,
    IncompleteDetails,
    InputTokensDetails,
    Logprob,
    LogprobTop,
    Loose,
    OutputItem,
    OutputMessage,
    OutputText,
    Response,
    ResponsesRequest,
    ResponseUsage,
    TextConfig,
)
from gateway.responses.stream_events import DeltaLogprob, DeltaLogprobTop


def new_id(prefix: str) -> str:
    """``resp_…``, ``msg_…``, ``fc_…``: 192 random bits, unguessable."""
    return f"{prefix}_{secrets.token_hex(24)}"


def response_skeleton(request: ResponsesRequest, response_id: str, model: str) -> Response:
    """The response before any output: its id and the parameters it echoes, as OpenAI's."""
    choice = request.tool_choice
    return Response(
        id=response_id,
        model=model,
        instructions=request.instructions,
        max_output_tokens=request.max_output_tokens,
        parallel_tool_calls=request.parallel_tool_calls is not False,
        previous_response_id=request.previous_response_id,
        prompt_cache_key=request.prompt_cache_key,
        safety_identifier=request.safety_identifier,
        store=request.stores(),
        temperature=1.0 if request.temperature is None else request.temperature,
        text=request.text or TextConfig(),
        tool_choice="auto" if choice is None or isinstance(choice, Loose) else choice,
        tools=[tool for tool in request.tools or [] if not isinstance(tool, Loose)],
        top_logprobs=request.top_logprobs or 0,
        top_p=1.0 if request.top_p is None else request.top_p,
        user=request.user,
        metadata=request.metadata or {},
    )


def usage_of(usage: CompletionUsage) -> ResponseUsage:
    cached = usage.prompt_tokens_details.cached_tokens
    return ResponseUsage(
        input_tokens=usage.prompt_tokens,
        input_tokens_details=InputTokensDetails(
            cached_tokens=cached, cache_write_tokens=usage.prompt_tokens - cached
        ),
        output_tokens=usage.completion_tokens,
        total_tokens=usage.total_tokens,
    )


def finished(
    response: Response,
    output: Sequence[OutputItem],
    finish_reason: FinishReason | None,
    usage: ResponseUsage | None,
) -> Response:
    """``response`` with its output: completed, or incomplete when out of tokens."""
    complete = finish_reason != "length"
    return response.model_copy(
        update={
            "status": "completed" if complete else "incomplete",
            "completed_at": int(time.time()) if complete else None,
            "incomplete_details": None
            if complete
            else IncompleteDetails(reason="max_output_tokens"),
            "output": list(output),
            "usage": usage,
        }
    )


def response_from_completion(response: Response, completion: ChatCompletion) -> Response:
    choice = completion.choices[0]
    items = output_items(choice.message, choice.finish_reason, choice.logprobs)
    return finished(response, items, choice.finish_reason, usage_of(completion.usage))


def output_items(
    message: ChatCompletionMessage,
    finish_reason: FinishReason,
    logprobs: ChoiceLogprobs | None = None,
) -> list[OutputItem]:
    """A chat message as output items: its text as a message (also when empty, unless the
    model only called functions), then one item per call."""
    items: list[OutputItem] = []
    if message.content is not None or not message.tool_calls:
        text = OutputText(text=message.content or "", logprobs=output_logprobs(logprobs))
        status: Literal["completed", "incomplete"] = (
            "incomplete" if finish_reason == "length" else "completed"
        )
        items.append(OutputMessage(id=new_id("msg"), status=status, content=[text]))
    for call in message.tool_calls or []:
        items.append(
            FunctionCall(
                id=new_id("fc"),
                status="completed",
                call_id=call.id,
                name=call.function.name,
                arguments=call.function.arguments,
            )
        )
    return items


def output_logprobs(logprobs: ChoiceLogprobs | None) -> list[Logprob]:
    return [_logprob(t) for t in logprobs.content or []] if logprobs else []


def _logprob(token: ChatCompletionTokenLogprob) -> Logprob:
    def top(t: Any) -> LogprobTop:
        return LogprobTop(token=t.token, bytes=t.bytes or list(t.token.encode()), logprob=t.logprob)

    return Logprob(**top(token).model_dump(), top_logprobs=[top(t) for t in token.top_logprobs])


def delta_logprobs(tokens: Iterable[Logprob]) -> list[DeltaLogprob]:
    return [
        DeltaLogprob(
            token=t.token,
            logprob=t.logprob,
            top_logprobs=[
                DeltaLogprobTop(token=x.token, logprob=x.logprob) for x in t.top_logprobs
            ],
        )
        for t in tokens
    ]
