"""What the swarm must match: greedy decoding by `transformers` (or peft's `PeftModel`, with
an adapter) on the whole model."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import peft
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedTokenizerBase,
)


def greedy_ids(
    model: Path,
    prompt: list[int],
    new_tokens: int,
    adapter: Path | None = None,
    logit_bias: dict[str, float] | None = None,
) -> list[int]:
    """The ids ``generate`` picks greedily after ``prompt`` (under OpenAI's ``logit_bias``,
    where given), end of sequence left out."""
    base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    runner = peft.PeftModel.from_pretrained(base, adapter).eval() if adapter else base
    with torch.no_grad():
        out = runner.generate(
            input_ids=torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=new_tokens,
            do_sample=False,
            logits_processor=LogitsProcessorList([LogitBias(logit_bias)]) if logit_bias else None,
        )
    eos = tokenizer(model).eos_token_id
    return [t for t in out[0, len(prompt) :].tolist() if t != eos]


def prompt_logprobs(model: Path, prompt: list[int]) -> torch.Tensor:
    """[len(prompt) - 1, vocab]: the log-probabilities the whole model gives after each
    prefix of ``prompt`` (row i: what comes after token i)."""
    runner = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = runner(input_ids=torch.tensor([prompt])).logits[0, :-1]
    return torch.log_softmax(logits.float(), dim=-1)


def token_texts(model: Path, ids: list[int]) -> list[str]:
    """Each token's own text, as the API's logprobs name tokens."""
    return [tokenizer(model).decode([t]) for t in ids]


@cache
def tokenizer(model: Path) -> PreTrainedTokenizerBase:
    loaded: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(model)
    return loaded


class OpenAIPenalties(LogitsProcessor):
    """OpenAI's presence and frequency penalties for `generate`: subtracted from the logits
    of the tokens generated so far (the prompt's do not count)."""

    def __init__(self, prompt_length: int, presence_penalty: float, frequency_penalty: float):
        self.prompt_length = prompt_length
        self.presence = presence_penalty
        self.frequency = frequency_penalty

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        generated = input_ids[0, self.prompt_length :]
        if len(generated):
            ids, counts = torch.unique(generated, return_counts=True)
            scores[0, ids] -= counts.to(scores.dtype) * self.frequency + self.presence
        return scores


class LogitBias(LogitsProcessor):
    """OpenAI's ``logit_bias`` for `generate`: token id (a string, as the API has it) →
    a value added to that token's logit at every step."""

    def __init__(self, bias: dict[str, float]):
        self.ids = torch.tensor([int(token) for token in bias], dtype=torch.long)
        self.values = torch.tensor(list(bias.values()))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores[:, self.ids] += self.values.to(scores.dtype)
        return scores
