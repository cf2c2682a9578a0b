"""Messages → prompt token ids with the model's own chat template."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from protocol.errors import InvalidRequest
from protocol.openai import ChatMessage


def load_tokenizer(folder: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(folder)


class PromptBuilder:
    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        if not tokenizer.chat_template:
            raise ValueError("the model's tokenizer has no chat template")
        self.tokenizer = tokenizer

    def chat_prompt(self, messages: list[ChatMessage]) -> list[int]:
        conversation = [
            # Templates written before OpenAI's `developer` role know it as `system`.
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            for m in messages
        ]
        try:
            text = self.tokenizer.apply_chat_template(
                conversation, add_generation_prompt=True, tokenize=False
            )
        except Exception as e:  # jinja raises on conversations a template refuses
            raise InvalidRequest(
                f"the chat template rejected the messages: {e}", param="messages"
            ) from e
        # The template already wrote any special tokens (BOS) it wants.
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
