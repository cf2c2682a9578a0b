"""Training data: JSONL records → token ids and labels, and batches of them. Pure given a
tokenizer.

One JSON object per line, in one of three shapes:

- ``{"messages": [{"role", "content"}, ...]}``: a conversation through the model's chat
  template; the loss covers the assistant turns only (with their end-of-turn tokens).
- ``{"prompt": ..., "completion": ...}``: the loss covers the completion and an EOS token.
- ``{"text": ...}``: the loss covers every token, and an EOS token appended.

Labels are the ids themselves where the loss applies and ``IGNORE`` elsewhere, aligned
with the ids (the shift to next-token targets happens in the loss, as in Hugging Face's).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

IGNORE = -100  # a label without loss (PyTorch's and Hugging Face's convention)
ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """A training file that cannot be used, with the line that says why."""


@dataclass(frozen=True)
class Example:
    ids: list[int]
    labels: list[int]  # ids, or IGNORE where no loss applies

    @property
    def trained_tokens(self) -> int:
        """Tokens with a loss: the first token is never predicted."""
        return sum(label != IGNORE for label in self.labels[1:])


def read_examples(path: Path, tokenizer: Any, max_length: int) -> list[Example]:
    """Every usable record of the JSONL file at ``path``; ``DataError`` names bad lines."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read it: {e}") from None
    return parse_lines(lines, tokenizer, max_length, source=str(path))


def parse_lines(
    lines: Iterable[str], tokenizer: Any, max_length: int, *, source: str = "data"
) -> list[Example]:
    examples = []
    skipped = 0
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{source}:{number}: not valid JSON ({e.msg})") from None
        try:
            example = encode_record(record, tokenizer, max_length)
        except (ValueError, TypeError) as e:
            raise DataError(f"{source}:{number}: {e}") from None
        if example.trained_tokens == 0:
            skipped += 1
            logger.warning(
                "%s:%d: no trained token within %d tokens; skipped", source, number, max_length
            )
            continue
        examples.append(example)
    if not examples:
        raise DataError(
            f"{source}: no usable records" + (f" ({skipped} skipped)" if skipped else "")
        )
    return examples


def encode_record(record: object, tokenizer: Any, max_length: int) -> Example:
    """One record's ids and labels, truncated to ``max_length`` tokens."""
    if not isinstance(record, dict):
        raise ValueError("a record must be a JSON object")
    if "messages" in record:
        pieces = _conversation(record["messages"], tokenizer)
    elif "prompt" in record or "completion" in record:
        prompt, completion = _text(record, "prompt"), _text(record, "completion")
        pieces = [
            (_ids(tokenizer, prompt, special=True), False),
            (_completion(tokenizer, completion), True),
        ]
    elif "text" in record:
        pieces = [(_ids(tokenizer, _text(record, "text"), special=True) + _eos(tokenizer), True)]
    else:
        raise ValueError('a record needs "messages", "prompt" and "completion", or "text"')
    ids: list[int] = []
    labels: list[int] = []
    for piece, trained in pieces:
        ids += piece
        labels += piece if trained else [IGNORE] * len(piece)
    return Example(ids[:max_length], labels[:max_length])


def _text(record: dict[str, Any], key: str) -> str:
    value = record.get(key)
    if not isinstance(value, str) or not value:
        raise ValueError(f'"{key}" must be a non-empty string')
    return value


def _ids(tokenizer: Any, text: str, *, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _eos(tokenizer: Any) -> list[int]:
    return [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]


def _completion(tokenizer: Any, text: str) -> list[int]:
    return _ids(tokenizer, text, special=False) + _eos(tokenizer)


def _conversation(messages: object, tokenizer: Any) -> list[tuple[list[int], bool]]:
    """The conversation's text cut where assistant turns begin and end, so each turn is
    trained on exactly as the template renders it after its prompt."""
    turns = _check_messages(messages)

    def render(upto: int, prompt: bool) -> str:
        text = tokenizer.apply_chat_template(
            turns[:upto], tokenize=False, add_generation_prompt=prompt
        )
        return str(text)

    pieces: list[tuple[list[int], bool]] = []
    done = ""
    for index, turn in enumerate(turns):
        if turn["role"] != "assistant":
            continue
        prompt, full = render(index, True), render(index + 1, False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise ValueError("the chat template does not render this conversation turn by turn")
        pieces.append((_ids(tokenizer, prompt[len(done) :], special=False), False))
        pieces.append((_ids(tokenizer, full[len(prompt) :], special=False), True))
        done = full
    rest = render(len(turns), False)
    if not rest.startswith(done):
        raise ValueError("the chat template does not render this conversation turn by turn")
    if rest[len(done) :]:
        pieces.append((_ids(tokenizer, rest[len(done) :], special=False), False))
    return pieces


def _check_messages(messages: object) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise ValueError('"messages" must be a non-empty list')
    turns = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"messages[{i}] must be an object")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ValueError(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be a string")
        turns.append({"role": role, "content": content})
    if turns[0]["role"] == "assistant":
        raise ValueError("the conversation must not begin with the assistant")
    if not any(t["role"] == "assistant" for t in turns):
        raise ValueError("no assistant message to learn from")
    return turns


def collate(examples: Sequence[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids and labels [B, n], right-padded to the longest (pads carry no loss, and nothing
    attends to them: attention is causal and they come last)."""
    length = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE, dtype=torch.long)
    for row, example in enumerate(examples):
        ids[row, : len(example.ids)] = torch.tensor(example.ids)
        labels[row, : len(example.labels)] = torch.tensor(example.labels)
    return ids, labels


def token_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """logits [B, n, V], labels [B, n] → (summed cross-entropy of each position's next
    token where a label applies, how many such tokens)."""
    targets = labels[:, 1:]
    count = int((targets != IGNORE).sum())
    total = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
        targets.reshape(-1),
        ignore_index=IGNORE,
        reduction="sum",
    )
    return total, count


def batches(count: int, size: int, steps: int, seed: int) -> list[list[int]]:
    """Indices of the examples of each step: epochs of a seeded shuffle, ``size`` at a time
    (an epoch's last short batch is topped up from the next)."""
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    out = []
    for _ in range(steps):
        while len(order) < size:
            order += torch.randperm(count, generator=generator).tolist()
        out.append(order[:size])
        order = order[size:]
    return out
