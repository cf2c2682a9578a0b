"""Training data: the three record shapes, where the loss applies, and bad lines named."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoTokenizer

from training.data import (
    IGNORE,
    DataError,
    batches,
    collate,
    encode_record,
    parse_lines,
    token_loss,
)


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path) -> Any:
    return AutoTokenizer.from_pretrained(tiny_model)


def trained_text(tokenizer: Any, record: dict[str, Any], max_length: int = 512) -> str:
    example = encode_record(record, tokenizer, max_length)
    return str(tokenizer.decode([label for label in example.labels if label != IGNORE]))


def test_prompt_completion_trains_on_the_completion_and_eos(tokenizer: Any) -> None:
    record = {"prompt": "Q: sky?\nA:", "completion": " blue"}
    example = encode_record(record, tokenizer, 512)
    prompt_ids = tokenizer("Q: sky?\nA:")["input_ids"]
    assert example.ids[: len(prompt_ids)] == prompt_ids
    assert example.labels[: len(prompt_ids)] == [IGNORE] * len(prompt_ids)
    assert example.ids[-1] == tokenizer.eos_token_id
    assert trained_text(tokenizer, record) == " blue" + tokenizer.eos_token


def test_text_trains_on_everything(tokenizer: Any) -> None:
    example = encode_record({"text": "hello world"}, tokenizer, 512)
    assert example.labels == example.ids
    assert example.ids[-1] == tokenizer.eos_token_id


def test_messages_train_on_assistant_turns_only(tokenizer: Any) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye."},
    ]
    example = encode_record({"messages": messages}, tokenizer, 512)
    # The ids are the template's rendering of the whole conversation...
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert tokenizer.decode(example.ids) == rendered
    # ...and only the assistant's words and end-of-turn carry a loss.
    trained = trained_text(tokenizer, {"messages": messages})
    assert trained == "Hello!<|im_end|>\nGoodbye.<|im_end|>\n"


def test_truncation_and_skipping(tokenizer: Any) -> None:
    long_prompt = {"prompt": "word " * 100, "completion": " yes"}
    lines = [json.dumps(long_prompt), json.dumps({"text": "short"})]
    examples = parse_lines(lines, tokenizer, 16)
    assert len(examples) == 1  # the first has no completion token within 16 tokens
    assert all(len(e.ids) <= 16 for e in examples)
    with pytest.raises(DataError, match="no usable records"):
        parse_lines(lines[:1], tokenizer, 16)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "data:2: not valid JSON"),
        ("[1, 2]", "data:2: a record must be a JSON object"),
        ('{"foo": 1}', 'data:2: a record needs "messages"'),
        ('{"prompt": "x"}', 'data:2: "completion" must be a non-empty string'),
        ('{"messages": [{"role": "user", "content": "x"}]}', "data:2: no assistant message"),
        ('{"messages": [{"role": "robot", "content": "x"}]}', r"data:2: messages\[0\].role"),
        ('{"messages": [{"role": "user", "content": 3}]}', r"data:2: messages\[0\].content"),
    ],
)
def test_bad_lines_are_named(tokenizer: Any, line: str, message: str) -> None:
    with pytest.raises(DataError, match=message):
        parse_lines(['{"text": "fine"}', line], tokenizer, 64)


def test_collate_pads_without_loss() -> None:
    from training.data import Example

    ids, labels = collate([Example([1, 2, 3], [IGNORE, 2, 3]), Example([4], [4])], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [4, 0, 0]]
    assert labels.tolist() == [[IGNORE, 2, 3], [4, IGNORE, IGNORE]]


def test_token_loss_predicts_the_next_labelled_token() -> None:
    logits = torch.randn(2, 4, 10, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([[IGNORE, IGNORE, 3, 4], [IGNORE, 5, IGNORE, IGNORE]])
    total, count = token_loss(logits, labels)
    assert count == 3
    want = sum(
        -torch.log_softmax(logits[row, position - 1], -1)[label]
        for row, position, label in [(0, 2, 3), (0, 3, 4), (1, 1, 5)]
    )
    torch.testing.assert_close(total, want)


def test_batches_are_seeded_epochs() -> None:
    plan = batches(5, 2, 5, seed=3)
    assert plan == batches(5, 2, 5, seed=3) != batches(5, 2, 5, seed=4)
    assert sorted([i for b in plan[:2] for i in b] + [plan[2][0]]) == list(range(5))  # an epoch
    assert all(len(b) == 2 for b in plan)
