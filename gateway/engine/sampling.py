"""Choosing the next token from logits: penalties and biases, a grammar's mask, then greedy,
temperature and nucleus (top-p) sampling; and the model's own log-probabilities of the choice.

Pure tensor code, run by the head thread (gateway/engine/head.py), never on the event loop."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

import torch

# Below this, logits / temperature can overflow float32 (inf, then NaN probabilities); the
# distribution is one-hot long before, so such temperatures sample greedily, like 0.
MIN_TEMPERATURE = 1e-4


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 (or below MIN_TEMPERATURE) means greedy
    top_p: float = 1.0
    seed: int | None = None
    presence_penalty: float = 0.0  # subtracted once from every token already generated
    frequency_penalty: float = 0.0  # subtracted per occurrence of a generated token
    logit_bias: Mapping[int, float] = field(default_factory=dict)  # token id → added logit

    @property
    def adjusts_logits(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias)

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE


class Constraint(Protocol):
    """What a stream's tokens must match (gateway/engine/grammar.py's Matcher): it masks each
    step's logits and follows the tokens chosen."""

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """logits: [vocab] → a copy with the forbidden tokens at -inf."""
        ...

    def consume(self, token: int) -> None: ...


def make_generator(seed: int | None) -> torch.Generator:
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def logits_to_probs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """logits: [vocab] → probabilities [vocab] after temperature and top-p truncation."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        sorted_probs[before >= top_p] = 0.0
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        probs /= probs.sum()
    return probs


def adjust_logits(
    logits: torch.Tensor, params: SamplingParams, generated: Counter[int]
) -> torch.Tensor:
    """logits: [vocab] → a copy with logit_bias added and OpenAI's presence and frequency
    penalties subtracted for the tokens generated so far."""
    logits = logits.clone()
    if params.logit_bias:
        ids = torch.tensor(list(params.logit_bias), dtype=torch.long)
        logits[ids] += torch.tensor(list(params.logit_bias.values()), dtype=logits.dtype)
    if generated and (params.presence_penalty or params.frequency_penalty):
        ids = torch.tensor(list(generated), dtype=torch.long)
        counts = torch.tensor(list(generated.values()), dtype=logits.dtype)
        logits[ids] -= counts * params.frequency_penalty + params.presence_penalty
    return logits


def sample(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator,
    generated: Counter[int] | None = None,
    constraint: Constraint | None = None,
) -> int:
    """logits: [vocab] → the next token id; ``generated`` counts the tokens so far. A
    ``constraint`` masks the logits before any choice, so that every temperature and top-p
    draws among the allowed tokens only."""
    if params.adjusts_logits:
        logits = adjust_logits(logits, params, generated or Counter())
    if constraint is not None:
        logits = constraint.mask(logits)
    if params.greedy:
        return int(torch.argmax(logits))
    probs = logits_to_probs(logits, params.temperature, params.top_p)
    return int(torch.multinomial(probs, 1, generator=generator))


def token_logprobs(
    logits: torch.Tensor, token: int, top: int
) -> tuple[float, tuple[tuple[int, float], ...]]:
    """logits: [vocab] → the log-probability of ``token`` and the ``top`` most likely
    (token id, log-probability) pairs, from the model's own distribution (before
    temperature, penalties and bias)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    best: tuple[tuple[int, float], ...] = ()
    if top:
        values, ids = torch.topk(logprobs, top)
        best = tuple(zip(ids.tolist(), values.tolist(), strict=True))
    return float(logprobs[token]), best


@dataclass(frozen=True)
class TokenChoice:
    token: int
    logprob: float | None = None  # the model's own log-probability of it, when asked for
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob) of the most likely tokens


@dataclass
class StreamSampler:
    """One stream's way of choosing its tokens: its parameters, its own random generator
    (so a seeded stream draws the same tokens whoever it is batched with), the tokens it
    has chosen so far (for the penalties) and what they must match, if anything. Only one
    choice at a time per stream."""

    params: SamplingParams
    generator: torch.Generator
    logprobs: int | None = None  # None: off; k: each token's logprob and the top k
    generated: Counter[int] = field(default_factory=Counter)
    constraint: Constraint | None = None

    @classmethod
    def of(
        cls,
        params: SamplingParams,
        logprobs: int | None = None,
        constraint: Constraint | None = None,
    ) -> StreamSampler:
        return cls(params, make_generator(params.seed), logprobs, constraint=constraint)

    @property
    def needs_logits(self) -> bool:
        """False when the argmax of the model's own logits alone decides the token: greedy,
        no logprobs, nothing adjusting or masking the logits. Then ``take`` may be given
        that argmax, found without computing every logit (gateway/engine/greedy_head.py)."""
        return bool(
            not self.params.greedy
            or self.logprobs is not None
            or self.constraint is not None
            or self.params.adjusts_logits
        )

    def take(self, token: int) -> TokenChoice:
        """The argmax ``token``, for a sampler that does not need logits."""
        if self.needs_logits:
            raise ValueError("this stream chooses from the logits, not from their argmax")
        self.generated[token] += 1
        return TokenChoice(token)

    def choose(self, logits: torch.Tensor) -> TokenChoice:
        """logits: [vocab] → the next token (counted for the penalties of later ones, and
        consumed by the constraint). Logprobs stay the model's own, from before the mask."""
        token = sample(logits, self.params, self.generator, self.generated, self.constraint)
        if self.constraint is not None:
            self.constraint.consume(token)
        self.generated[token] += 1
        if self.logprobs is None:
            return TokenChoice(token)
        logprob, top = token_logprobs(logits, token, self.logprobs)
        return TokenChoice(token, logprob, top)
