"""What the swarm must match: greedy decoding by `transformers` (or peft's `PeftModel`, with
an adapter) on the whole model."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import peft
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase


def greedy_ids(
    model: Path, prompt: list[int], new_tokens: int, adapter: Path | None = None
) -> list[int]:
    """The ids ``generate`` picks greedily after ``prompt``, end of sequence left out."""
    base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    runner = peft.PeftModel.from_pretrained(base, adapter).eval() if adapter else base
    with torch.no_grad():
        out = runner.generate(
            input_ids=torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=new_tokens,
            do_sample=False,
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
