"""Speculative decoding's drafts: tokens the gateway guesses will come next, so that one
pass of the chain scores several positions at once (gateway/engine/generation.py).

A drafter proposes deterministic tokens, never a distribution. Verification then draws
each position's token exactly as decoding without speculation would (the same sampler, the
same random generator, one draw per emitted token) and keeps a draft only while it equals
that draw. For a deterministic draft d this is the standard rejection rule: accepting d
with probability min(1, p(d)/q(d)) = p(d) and otherwise drawing from p without d is the
same as drawing from p and comparing. So the output is identical to decoding without
speculation, greedy or sampled, seeded or not, whatever the drafter guesses.

``LookupDrafter`` is prompt lookup: the continuation of the latest earlier occurrence of
the conversation's last few tokens. It needs no model and pays on edits, code, quoting
and summaries, where the answer repeats its context. ``SpeculationPace`` sizes each
stream's drafts from what it has accepted, and stops a stream's drafting where it does not
pay. A draft model's drafter (``--speculate draft``) is in gateway/engine/draft_model.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from gateway.settings import SPECULATE_MODES

if TYPE_CHECKING:  # torch and transformers: only a gateway that drafts with a model loads one
    from gateway.engine.draft_model import DraftModel

# The n-grams prompt lookup matches, longest first. One token alone matches too often to
# be worth a pass's extra rows.
LOOKUP_MAX_NGRAM = 4
LOOKUP_MIN_NGRAM = 2


class Drafter(Protocol):
    """One stream's drafter: told every token the stream holds, asked for guesses."""

    # Whether proposing costs real compute on the head thread (a draft model): such a
    # drafter drafts only for a stream whose prompt it read ahead.
    costly: bool

    def extend(self, tokens: Sequence[int]) -> None:
        """These tokens follow those told before (the prompt first, then each emitted one)."""
        ...

    def propose(self, limit: int) -> list[int]:
        """Up to ``limit`` tokens that may follow all those told so far (none: no guess)."""
        ...

    def prepare(self) -> None:
        """Do now what needs no token to come (a draft model reads the prompt): the head
        thread runs it while the swarm computes the prompt, not in the first token's way."""
        ...


class LookupDrafter:
    """Prompt lookup over the stream's own tokens.

    An index from every n-gram seen (n from ``LOOKUP_MIN_NGRAM`` to ``LOOKUP_MAX_NGRAM``) to
    where its latest occurrence was followed, kept as tokens arrive: a proposal costs a few
    dictionary reads, not a scan of the conversation."""

    def __init__(
        self, max_ngram: int = LOOKUP_MAX_NGRAM, min_ngram: int = LOOKUP_MIN_NGRAM
    ) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"n-gram sizes {min_ngram}..{max_ngram}")
        self._sizes = range(max_ngram, min_ngram - 1, -1)
        self._tokens: list[int] = []
        # n → n-gram → the position of the token that followed its latest occurrence.
        self._follows: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in self._sizes}

    def extend(self, tokens: Sequence[int]) -> None:
        for token in tokens:
            at = len(self._tokens)  # the n-grams ending just before it are followed by it
            for n in self._sizes:
                if at >= n:
                    self._follows[n][tuple(self._tokens[at - n : at])] = at
            self._tokens.append(token)

    costly = False  # a few dictionary reads a proposal

    def prepare(self) -> None:
        pass  # the index is kept as tokens arrive

    def propose(self, limit: int) -> list[int]:
        if limit <= 0:
            return []
        tokens = self._tokens
        for n in self._sizes:  # the longest match predicts best
            if len(tokens) < n:
                continue
            follower = self._follows[n].get(tuple(tokens[-n:]))
            if follower is not None:
                return tokens[follower : follower + limit]
        return []


# Adaptive draft length, per stream, as transformers' assisted generation sizes its own:
# up by two after a pass that took every draft, down by one after one that did not.
GROW_TOKENS = 2
SHRINK_TOKENS = 1
START_TOKENS = 4
# A stream stops drafting once its passes with drafts have, on average over the last
# ``PACE_WINDOW``, accepted fewer than this many tokens each: a draft that is rarely right
# only costs the chain and the head extra rows.
MIN_ACCEPTED_PER_PASS = 0.5
PACE_WINDOW = 8


@dataclass
class SpeculationPace:
    """How many tokens one stream drafts next, from how many of its drafts were accepted."""

    max_tokens: int
    tokens: int = START_TOKENS
    stopped: bool = False
    _recent: list[int] = field(default_factory=list)  # accepted drafts of the last passes

    def __post_init__(self) -> None:
        self.tokens = max(1, min(self.tokens, self.max_tokens))

    @property
    def limit(self) -> int:
        """Drafts to ask for now (0: this stream no longer drafts)."""
        return 0 if self.stopped or self.max_tokens <= 0 else self.tokens

    def observe(self, drafted: int, accepted: int) -> None:
        """A pass verified ``drafted`` drafts and kept the first ``accepted``."""
        if drafted <= 0:
            return
        if accepted >= drafted:
            self.tokens = min(self.max_tokens, self.tokens + GROW_TOKENS)
        else:
            self.tokens = max(1, self.tokens - SHRINK_TOKENS)
        self._recent = [*self._recent, accepted][-PACE_WINDOW:]
        if (
            len(self._recent) == PACE_WINDOW
            and sum(self._recent) / PACE_WINDOW < MIN_ACCEPTED_PER_PASS
        ):
            self.stopped = True


DEFAULT_SPECULATE_TOKENS = 8
DEFAULT_SPECULATE_MAX_STREAMS = 8


@dataclass(frozen=True)
class Speculation:
    """A gateway's way of drafting (``--speculate``) and its longest drafts."""

    mode: str = "off"
    max_tokens: int = DEFAULT_SPECULATE_TOKENS
    # Mode "draft": the gateway's draft model, shared by its streams (each its own cache).
    draft: DraftModel | None = field(default=None, repr=False, compare=False)
    # Above this many generations at once, passes carry no drafts: the servers and the
    # head then have rows enough to compute, and a draft's rows cost more than the trip it
    # may save (vLLM's speculative_disable_by_batch_size).
    max_streams: int = DEFAULT_SPECULATE_MAX_STREAMS

    def __post_init__(self) -> None:
        if self.mode not in SPECULATE_MODES:
            raise ValueError(f"speculate {self.mode!r}: expected one of {SPECULATE_MODES}")
        if self.max_tokens < 1:
            raise ValueError(f"speculate tokens {self.max_tokens}: at least 1")
        if self.max_streams < 1:
            raise ValueError(f"speculate max streams {self.max_streams}: at least 1")
        if self.mode == "draft" and self.draft is None:
            raise ValueError("speculate draft needs a draft model (--draft-model)")

    def drafting(self, streams: int) -> bool:
        """Whether streams draft while ``streams`` generations run."""
        return streams <= self.max_streams

    def limit(self, pace: SpeculationPace, streams: int) -> int:
        """Drafts a stream asks for now, at its ``pace``, while ``streams`` generations run."""
        return pace.limit if self.drafting(streams) else 0

    def drafter(self) -> Drafter | None:
        """A new stream's drafter; None when speculation is off."""
        if self.mode == "lookup":
            return LookupDrafter()
        if self.mode == "draft":
            assert self.draft is not None  # checked above
            return self.draft.drafter()
        return None
