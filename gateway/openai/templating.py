"""Messages (and tools) → prompt token ids with the model's own chat template."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from transformers import PreTrainedTokenizerBase

from gateway.openai.models import ChatMessage, ChatTool, ToolCall
from gateway.openai.tool_calls import (
    ToolFormat,
    fallback_system,
    format_for_template,
    hermes_calls_text,
    template_knows_tools,
)
from protocol.errors import InvalidRequest


class PromptBuilder:
    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        if not tokenizer.chat_template:
            raise ValueError("the model's tokenizer has no chat template")
        self.tokenizer = tokenizer
        template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
        # A template that knows tools renders them and the calls in history itself; any
        # other gets them written in the fallback format (gateway/openai/tool_calls.py).
        self.native_tools = template_knows_tools(template)
        self.tool_format: ToolFormat = format_for_template(template)

    def chat_prompt(self, messages: list[ChatMessage], tools: Sequence[ChatTool] = ()) -> list[int]:
        """The prompt of ``messages``; ``tools``, when given, are offered to the model."""
        if self.native_tools:
            conversation = [_native(m) for m in messages]
            offered: list[dict[Any, Any] | Callable[..., Any]] | None = [
                t.model_dump(exclude_none=True) for t in tools
            ] or None
        else:
            conversation = _with_fallback_tools([_fallback(m) for m in messages], tools)
            offered = None
        try:
            text = self.tokenizer.apply_chat_template(
                conversation, tools=offered, add_generation_prompt=True, tokenize=False
            )
        except Exception as e:  # jinja raises on conversations a template refuses
            raise InvalidRequest(
                f"the chat template rejected the conversation: {e}", param="messages"
            ) from e
        # The template already wrote any special tokens (BOS) it wants.
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])


def _role(message: ChatMessage) -> str:
    # Templates written before OpenAI's `developer` role know it as `system`.
    return "system" if message.role == "developer" else message.role


def _native(message: ChatMessage) -> dict[str, Any]:
    """A message as Hugging Face templates take it: calls with their arguments parsed."""
    out: dict[str, Any] = {"role": _role(message), "content": message.text()}
    if message.tool_calls:
        out["tool_calls"] = [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.function.name, "arguments": _arguments(call)},
            }
            for call in message.tool_calls
        ]
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    if message.name is not None:
        out["name"] = message.name
    return out


def _arguments(call: ToolCall) -> Any:
    try:
        return json.loads(call.function.arguments)
    except json.JSONDecodeError:
        return call.function.arguments


def _fallback(message: ChatMessage) -> dict[str, str]:
    """A message for a template that knows only roles and text: calls written out as the
    model is told to write them, and results as a user turn (as Qwen2.5's template does)."""
    text = message.text()
    if message.tool_calls:
        calls = hermes_calls_text(
            (c.function.name, c.function.arguments) for c in message.tool_calls
        )
        return {"role": "assistant", "content": f"{text}\n{calls}" if text else calls}
    if message.role == "tool":
        return {"role": "user", "content": f"<tool_response>\n{text}\n</tool_response>"}
    return {"role": _role(message), "content": text}


def _with_fallback_tools(
    conversation: list[dict[str, str]], tools: Sequence[ChatTool]
) -> list[dict[str, str]]:
    """The tools' description joins the system message (or becomes one)."""
    if not tools:
        return conversation
    described = fallback_system(tools)
    if conversation and conversation[0]["role"] == "system":
        first = conversation[0]
        return [{**first, "content": f"{first['content']}\n\n{described}"}, *conversation[1:]]
    return [{"role": "system", "content": described}, *conversation]
