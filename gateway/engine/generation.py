"""The decode loop: prompt tokens in, text deltas out, driven through a swarm session.

No HTTP here. The gateway holds the model's embedding, final norm and LM head; the swarm
runs every transformer block in between. Tensor work (embedding, logits, sampling) runs on
the head thread (gateway/engine/head.py); this loop only awaits it and turns tokens into text.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from client.swarm_client import InferenceSession, SwarmClient, detach
from gateway.engine.affinity import Claim, SessionAffinity
from gateway.engine.drafting import Drafter, Speculation, SpeculationPace
from gateway.engine.finish import FinishReason
from gateway.engine.grammar import Grammar
from gateway.engine.head import HeadRunner, Verified
from gateway.engine.sampling import SamplingParams, StreamSampler, TokenChoice
from gateway.engine.text import Decoder, IncrementalDetokenizer, StopMatcher
from gateway.metrics import GatewayMetrics
from protocol.prefix import TokenHistory
from routing.planner import Hop


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: list[int]
    max_new_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: list[str] = field(default_factory=list)
    conversation_key: str | None = None  # the client's name for the conversation, if any
    # Whose caches these are: a digest of the caller's API key ("" on a gateway without
    # keys). Prefix hashes and session keys are salted with it, so one tenant can neither
    # hit nor probe (through cached_tokens) another's cached prompts.
    tenant: str = ""
    logprobs: int | None = None  # None: off; k: each token's logprob and the top k
    # None: off; k: the logprob of each prompt token after the first, given those before
    # it, and the top k at its position (`echo` with `logprobs`). The prompt is then
    # computed whole: no cached token has the hidden states that score it.
    prompt_logprobs: int | None = None
    received_at: float = field(default_factory=time.monotonic)  # for time-to-first-token
    deadline: float = math.inf  # time.monotonic() past which the generation ends ("length")
    # What the text must match (structured outputs); the generation stops ("stop") once
    # the grammar is complete. Stop sequences still apply, as at OpenAI.
    grammar: Grammar | None = None
    # The LoRA adapter to run (model "BASE:ADAPTER"); None: the base model. Its sessions,
    # prefix hashes and routes are its own: caches never mix with the base model's.
    adapter: str | None = None
    # False: no drafts for this request, whatever the gateway's --speculate says.
    speculate: bool = True


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()  # the most likely tokens at this position


@dataclass(frozen=True)
class TextDelta:
    text: str
    logprobs: tuple[TokenLogprob, ...] = ()  # of the tokens whose text this delta completes


@dataclass(frozen=True)
class PromptLogprobs:
    """The prompt's tokens as the model scores them (``prompt_logprobs``), before any text:
    one per prompt token after the first."""

    logprobs: tuple[TokenLogprob, ...]


@dataclass(frozen=True)
class Finished:
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0


@dataclass
class Generation:
    """An opened generation: its swarm session and the claim on its conversation."""

    session: InferenceSession
    claim: Claim
    history: TokenHistory  # every token fed to the session
    closed: bool = False
    route: tuple[Hop, ...] = ()  # the servers the session was opened on


class Generator:
    def __init__(
        self,
        head: HeadRunner,
        tokenizer: Decoder,
        swarm: SwarmClient,
        eos_ids: set[int],
        affinity: SessionAffinity,
        *,
        salt: str,
        metrics: GatewayMetrics | None = None,
        reuse: bool = True,
        speculation: Speculation | None = None,
    ) -> None:
        self._head = head
        self._tokenizer = tokenizer
        self._swarm = swarm
        self._eos_ids = eos_ids
        self._affinity = affinity
        self._salt = salt  # keeps prefix hashes of different models apart
        # False (--no-affinity): servers are told of no prefix, so nothing is reused, not
        # even what they could seed from another conversation's cache (cold baselines).
        self._reuse = reuse
        self._metrics = metrics or GatewayMetrics()
        self._speculation = speculation or Speculation()
        self.streams = 0  # generations running (prefilling or decoding), for speculation

    async def open(self, request: GenerationRequest, *, near: Sequence[Hop] = ()) -> Generation:
        """The conversation's session (or a fresh one), with room for the whole generation.
        A fresh one goes preferably on ``near`` (the servers of a request's first choice,
        which hold the prompt it shares with this one), unless a pin says where.

        Opened before a response starts so that a missing route is an HTTP status, not an
        error in the middle of a stream. The caller holds the request's admission slot.
        """
        model = self._salt if request.adapter is None else f"{self._salt}:{request.adapter}"
        history = TokenHistory(request.prompt_ids, salt=f"{model}\0{request.tenant}")
        key = request.conversation_key
        if key and request.adapter is not None:
            key = f"{key}\0{request.adapter}"  # the same conversation on another adapter
        claim = await self._affinity.claim(
            key and f"{request.tenant}\0{key}", history, tenant=request.tenant
        )
        try:
            session = await self._swarm.open_session(
                len(request.prompt_ids) + request.max_new_tokens,
                session_id=claim.session_id,
                secret=claim.secret,
                prefix_hashes=history.hashes if self._reuse else [],
                prefer=claim.prefer or tuple(near) or None,
                resume=claim.resume if self._reuse else (0, ""),
                adapter=request.adapter,
            )
        except BaseException as e:
            detach(self._affinity.release(claim))
            if isinstance(e, asyncio.CancelledError):  # its client left while it opened
                self._metrics.requests.labels("cancelled").inc()
            raise
        return Generation(session, claim, history, route=tuple(session.route))

    async def generate(
        self,
        request: GenerationRequest,
        generation: Generation,
        *,
        prompt_done: Callable[[], None] = lambda: None,
    ) -> AsyncGenerator[TextDelta | PromptLogprobs | Finished, None]:
        """Text as it is decoded, then one ``Finished``; always closes the session. Past
        ``request.deadline`` it finishes with "length", as if out of tokens. With
        ``request.prompt_logprobs``, a ``PromptLogprobs`` comes first. ``prompt_done`` is
        called once the prompt's forward has returned: its cache is on the servers."""
        session, history = generation.session, generation.history
        prompt = request.prompt_ids
        metrics = self._metrics
        metrics.active_streams.inc()
        self.streams += 1
        metrics.prompt_tokens.inc(len(prompt))
        outcome = "error"
        # One prompt token is always sent again: its logits start the answer.
        reused = min(session.cached_tokens, len(prompt) - 1)
        if request.prompt_logprobs is not None:
            reused = 0
        try:
            async with self._affinity.held(generation.claim):
                session.reuse(reused)
                metrics.cached_tokens.inc(reused)
                matcher = request.grammar.matcher() if request.grammar else None
                sampler = StreamSampler.of(request.sampling, request.logprobs, matcher)
                pending: list[TokenLogprob] = []  # logprobs of tokens whose text is held back
                detokenizer = IncrementalDetokenizer(self._tokenizer)
                stops = StopMatcher(request.stop)
                drafter = self._drafter(request)
                embedded = await self._head.embed(prompt[reused:])
                # A draft model reads the prompt on the head thread while the swarm computes
                # it: not in the first token's way. Not while too many streams run to draft
                # (asked when the thread gets to it): 16 draft models reading 16 prompts there
                # held up every stream's rows (the bench saw 0.87x).
                preparing = (
                    asyncio.ensure_future(
                        self._head.prepare(
                            drafter, lambda: self._speculation.drafting(self.streams)
                        )
                    )
                    if drafter is not None and drafter.costly
                    else None
                )
                prepared = False
                try:
                    hidden = await session.step(embedded, history)
                    if preparing is not None:
                        prepared = await preparing
                finally:
                    if preparing is not None:
                        await _end(preparing)
                if preparing is not None and not prepared:
                    # Read later, when a crowd thins out, its whole conversation would hold
                    # up the head thread at once: a stream that came in a crowd never drafts.
                    drafter = None
                prompt_done()
                if request.prompt_logprobs is not None:
                    scored = await self._head.score(hidden, prompt, request.prompt_logprobs)
                    yield PromptLogprobs(tuple(self._logprob(choice) for choice in scored))
                generated = 0
                finish: FinishReason = "length"
                last = request.received_at
                pace = SpeculationPace(self._speculation.max_tokens)
                drafts: list[int] = []  # fed after the last token chosen, in the last step
                with self._head.decoding():  # from here, a row every step
                    while generated < request.max_new_tokens:
                        room = request.max_new_tokens - generated
                        verified = await self._pass(hidden, drafts, sampler, drafter, pace, room)
                        choices, next_drafts = verified.choices, verified.drafts
                        texts: list[TextDelta] = []
                        ended, unfed = False, 0  # unfed: drafts fed after the last token
                        for index, choice in enumerate(choices):
                            token = choice.token
                            now = time.monotonic()
                            (metrics.token_latency if generated else metrics.ttft).observe(
                                now - last
                            )
                            last = now
                            if token in self._eos_ids:
                                finish, ended, unfed = "stop", True, len(drafts) - index
                                break
                            generated += 1
                            metrics.generated_tokens.inc()
                            if request.logprobs is not None:
                                pending.append(self._logprob(choice))
                            text = stops.push(detokenizer.push(token))
                            if text:
                                texts.append(TextDelta(text, tuple(pending)))
                                pending.clear()
                            stopped = stops.stopped or (matcher is not None and matcher.stopped)
                            if (
                                stopped
                                or generated == request.max_new_tokens
                                or time.monotonic() >= request.deadline
                            ):
                                if stopped:
                                    finish = "stop"
                                # Else "length"; the last token needs no pass.
                                ended, unfed = True, len(drafts) - index
                                break
                        if ended:
                            # What the servers hold past the last token fed for this answer
                            # (drafts after it) is not the conversation's.
                            self._rewind(session, history, unfed)
                            for delta in texts:
                                yield delta
                            break
                        # Drafts after the first one not taken followed a token never
                        # emitted: every server drops them with the next step.
                        self._rewind(session, history, len(drafts) - (len(choices) - 1))
                        history.extend([choices[-1].token, *next_drafts])
                        drafts = next_drafts
                        # The next step leaves before the client hears of these tokens, so
                        # the swarm computes while the text is streamed.
                        stepping = asyncio.ensure_future(session.step(verified.embedding, history))
                        try:
                            for delta in texts:
                                yield delta
                            hidden = await stepping
                        finally:
                            await _end(stepping)
                if not stops.stopped:
                    tail = stops.push(detokenizer.flush()) + stops.flush()
                    if tail or pending:
                        yield TextDelta(tail, tuple(pending))
                    if stops.stopped:
                        finish = "stop"
            outcome = "ok"
            # Settled before the client hears the end, so that its next turn finds the
            # session remembered and released.
            await self.close(generation, settle=True)
            yield Finished(finish, len(prompt), generated, reused)
        except (GeneratorExit, asyncio.CancelledError):
            outcome = "cancelled"
            raise
        finally:
            metrics.active_streams.dec()
            self.streams -= 1
            metrics.requests.labels(outcome).inc()
            await self.close(generation)

    async def _pass(
        self,
        hidden: torch.Tensor,
        drafts: list[int],
        sampler: StreamSampler,
        drafter: Drafter | None,
        pace: SpeculationPace,
        room: int,
    ) -> Verified:
        """The tokens a chain pass's output ``hidden`` yields (one, or with ``drafts`` fed
        after the token before, up to one more than were drafted), and the next input: the
        last of them and, with a ``drafter``, up to the pace's drafts (within ``room``, the
        tokens the stream may still emit)."""
        if drafter is None:
            decoded = await self._head.decode(hidden, sampler)
            return Verified([decoded.choice], [], decoded.embedding)
        limit = self._speculation.limit(pace, self.streams)
        verified = await self._head.verify(hidden, drafts, sampler, drafter, limit, room)
        if drafts:
            pace.observe(len(drafts), verified.accepted)
            self._metrics.observe_speculation(
                self._speculation.mode, len(drafts), verified.accepted
            )
        return verified

    def _drafter(self, request: GenerationRequest) -> Drafter | None:
        """This stream's drafter, told its prompt; None: it decodes a token per step.
        A grammar's stream never drafts: its matcher follows one token at a time."""
        if not request.speculate or request.grammar is not None:
            return None
        drafter = self._speculation.drafter()
        if drafter is not None:
            drafter.extend(request.prompt_ids)
        return drafter

    @staticmethod
    def _rewind(session: InferenceSession, history: TokenHistory, tokens: int) -> None:
        """Forget the last ``tokens`` fed (drafts not taken): the next step starts before
        them, and each server drops them first."""
        if tokens > 0:
            history.truncate(len(history) - tokens)
            session.reuse(len(history))

    def _logprob(self, choice: TokenChoice) -> TokenLogprob:
        """The model's own log-probabilities (before temperature, penalties and bias)."""
        alternatives = tuple((self._token_text(token), logprob) for token, logprob in choice.top)
        assert choice.logprob is not None  # the sampler was asked for logprobs
        return TokenLogprob(self._token_text(choice.token), choice.logprob, alternatives)

    def _token_text(self, token: int) -> str:
        return str(self._tokenizer.decode([token], skip_special_tokens=False))

    async def close(self, generation: Generation, *, settle: bool = False) -> None:
        """Close the session, remember where it lives and release it (idempotent).

        Without ``settle`` it never suspends (the bookkeeping runs detached): it also runs
        while a disconnected request is being cancelled. With it, the bookkeeping is done
        before returning."""
        if generation.closed:
            return
        generation.closed = True
        await generation.session.close()
        if settle:
            await self._finish(generation)
        else:
            detach(self._finish(generation))

    async def _finish(self, generation: Generation) -> None:
        history = generation.history
        await self._affinity.remember(generation.claim, generation.session.route, history)
        await self._affinity.release(generation.claim)


async def _end(task: asyncio.Future[Any]) -> None:
    """``task`` over: cancelled unless it is done (its stream was closed at a yield), and
    waited for, so nothing it does outlives the generation's own cleanup."""
    if not task.done():
        task.cancel()
        await asyncio.wait({task})
    if not task.cancelled():
        task.exception()  # raised to the generation already, or nobody's any more
