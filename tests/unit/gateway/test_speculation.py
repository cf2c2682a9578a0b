"""Speculative decoding: prompt lookup's drafts, each stream's pace, and generations with
drafts verified in one pass that are, token for token, the generations without them."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from contextlib import aclosing
from pathlib import Path

import pytest

from gateway.app import create_app
from gateway.engine.drafting import (
    DEFAULT_SPECULATE_MAX_STREAMS,
    MIN_ACCEPTED_PER_PASS,
    PACE_WINDOW,
    START_TOKENS,
    LookupDrafter,
    Speculation,
    SpeculationPace,
)
from gateway.engine.generation import (
    Finished,
    GenerationRequest,
    Generator,
    TextDelta,
    TokenLogprob,
)
from gateway.engine.head import HeadRunner, _Prepare, run_calls
from gateway.engine.sampling import SamplingParams
from gateway.settings import GatewaySettings
from tests.fakes import LocalSwarmClient

# ---- prompt lookup ----


def drafter_of(tokens: list[int], **sizes: int) -> LookupDrafter:
    drafter = LookupDrafter(**sizes)
    drafter.extend(tokens)
    return drafter


def test_lookup_proposes_what_followed_the_last_tokens_before() -> None:
    drafter = drafter_of([1, 2, 3, 4, 5, 9, 2, 3])
    assert drafter.propose(3) == [4, 5, 9]
    assert drafter.propose(1) == [4]
    assert drafter.propose(0) == []


def test_lookup_prefers_the_longest_match_then_the_latest() -> None:
    # [7, 3] followed by 5 twice, [2, 7, 3] by 6 once: the longer match wins.
    drafter = drafter_of([2, 7, 3, 6, 8, 7, 3, 5, 7, 3, 5, 1, 2, 7, 3])
    assert drafter.propose(2) == [6, 8]
    # Only the bigram matches: its latest occurrence.
    drafter = drafter_of([7, 3, 5, 1, 7, 3, 4, 0, 7, 3])
    assert drafter.propose(2) == [4, 0]


def test_lookup_has_no_guess_without_a_repeated_ngram() -> None:
    assert drafter_of([1, 2, 3, 4, 5]).propose(4) == []
    assert drafter_of([]).propose(4) == []
    # A single token repeated is below the smallest n-gram by default.
    assert drafter_of([1, 9, 2, 9]).propose(4) == []
    assert drafter_of([1, 9, 2, 9], min_ngram=1).propose(4) == [2, 9]


def test_lookup_learns_as_tokens_arrive_as_if_told_at_once() -> None:
    tokens = [4, 1, 2, 3, 1, 2, 5, 6, 1, 2, 3, 7, 1, 2]
    at_once = drafter_of(tokens)
    one_by_one = LookupDrafter()
    for token in tokens:
        one_by_one.extend([token])
    assert one_by_one.propose(5) == at_once.propose(5) == [3, 7, 1, 2]


def test_lookup_refuses_ngram_sizes_that_match_nothing() -> None:
    with pytest.raises(ValueError):
        LookupDrafter(max_ngram=2, min_ngram=3)


# ---- pace ----


def test_the_pace_grows_with_accepted_drafts_and_shrinks_with_rejected_ones() -> None:
    pace = SpeculationPace(max_tokens=8)
    assert pace.limit == START_TOKENS
    pace.observe(drafted=4, accepted=4)
    assert pace.limit == START_TOKENS + 2
    pace.observe(drafted=6, accepted=6)
    assert pace.limit == 8  # at most max_tokens
    pace.observe(drafted=8, accepted=2)
    assert pace.limit == 7
    pace.observe(drafted=0, accepted=0)  # a pass without drafts says nothing
    assert pace.limit == 7


def test_a_stream_whose_drafts_do_not_pay_stops_drafting() -> None:
    pace = SpeculationPace(max_tokens=8)
    for _ in range(PACE_WINDOW - 1):
        pace.observe(drafted=2, accepted=0)
    assert pace.limit >= 1
    pace.observe(drafted=2, accepted=0)
    assert pace.limit == 0
    paying = SpeculationPace(max_tokens=8)
    for index in range(PACE_WINDOW * 2):
        paying.observe(drafted=2, accepted=1 if index % 2 else 0)
    assert MIN_ACCEPTED_PER_PASS <= 0.5 and paying.limit > 0


def test_speculation_settings_are_checked() -> None:
    assert Speculation().drafter() is None
    assert isinstance(Speculation("lookup").drafter(), LookupDrafter)
    with pytest.raises(ValueError):
        Speculation("draft-of-nothing")
    with pytest.raises(ValueError):
        Speculation("lookup", max_tokens=0)


# ---- generations ----

PROMPT = [5, 6, 7, 8, 9, 10, 5, 6, 7, 8, 9, 10, 5, 6, 7]
# A tiny random model never repeats itself; held to a handful of tokens, it does, so lookup
# keeps drafting, and its drafts are sometimes right and sometimes wrong.
FEW = {token: 30.0 for token in range(100, 105)}


def generate(
    model: Path,
    speculate: str,
    sampling: SamplingParams,
    *,
    max_new_tokens: int = 48,
    stop: list[str] | None = None,
    speculate_request: bool = True,
    screen: str = "auto",
) -> tuple[list[TokenLogprob], str, Finished, bytes, LocalSwarmClient]:
    """One generation through a local swarm, with logprobs: each token, the text, the end,
    the gateway's metrics and the swarm (its steps counted)."""
    swarm = LocalSwarmClient(model, "tiny")
    settings = GatewaySettings(
        model_id="tiny", model_path=model, speculate=speculate, greedy_screen=screen
    )

    async def scenario() -> tuple[list[TokenLogprob], str, Finished, bytes]:
        app = create_app(settings, swarm_client=swarm)
        async with app.router.lifespan_context(app):
            generator = app.state.completions._generator
            wanted = GenerationRequest(
                list(PROMPT),
                max_new_tokens,
                sampling,
                stop=stop or [],
                logprobs=2,
                speculate=speculate_request,
            )
            generation = await generator.open(wanted)
            tokens: list[TokenLogprob] = []
            text, finished = "", None
            async with aclosing(generator.generate(wanted, generation)) as events:
                async for event in events:
                    if isinstance(event, TextDelta):
                        tokens.extend(event.logprobs)
                        text += event.text
                    elif isinstance(event, Finished):
                        finished = event
            assert finished is not None
            return tokens, text, finished, app.state.metrics.render()

    tokens, text, finished, metrics = asyncio.run(asyncio.wait_for(scenario(), 120))
    return tokens, text, finished, metrics, swarm


def metric(rendered: bytes, name: str) -> float:
    for line in rendered.decode().splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def assert_same(a: list[TokenLogprob], b: list[TokenLogprob]) -> None:
    """Token for token; the model's logprobs as close as rows computed apart can be."""
    assert [t.token for t in a] == [t.token for t in b]
    for x, y in zip(a, b, strict=True):
        assert x.logprob == pytest.approx(y.logprob, abs=1e-4)
        assert [t for t, _ in x.top] == [t for t, _ in y.top]


@pytest.mark.parametrize(
    "sampling",
    [
        SamplingParams(temperature=0.0, logit_bias=FEW),
        SamplingParams(temperature=0.8, top_p=0.95, seed=11, logit_bias=FEW),
        SamplingParams(temperature=1.0, seed=3, presence_penalty=0.5, logit_bias=FEW),
    ],
    ids=["greedy", "seeded", "penalised"],
)
def test_a_generation_with_drafts_is_the_generation_without(
    tiny_model: Path, sampling: SamplingParams
) -> None:
    plain, plain_text, plain_end, _, plain_swarm = generate(tiny_model, "off", sampling)
    drafted, text, end, metrics, swarm = generate(tiny_model, "lookup", sampling)
    assert_same(drafted, plain)
    assert text == plain_text
    assert (end.finish_reason, end.completion_tokens) == (
        plain_end.finish_reason,
        plain_end.completion_tokens,
    )
    proposed = metric(metrics, "swarmgate_draft_tokens_total")
    accepted = metric(metrics, "swarmgate_draft_tokens_accepted_total")
    # Drafts were taken (fewer chain passes than tokens) and refused (the servers' caches
    # were cropped back), and still every token is the same.
    assert 0 < accepted < proposed
    assert swarm.steps < plain_swarm.steps


def test_a_request_can_turn_drafts_off(tiny_model: Path) -> None:
    greedy = SamplingParams(temperature=0.0, logit_bias=FEW)
    _, _, _, metrics, swarm = generate(tiny_model, "lookup", greedy, speculate_request=False)
    assert metric(metrics, "swarmgate_draft_tokens_total") == 0
    _, _, end, _, _ = generate(tiny_model, "off", greedy)
    assert swarm.steps == end.completion_tokens  # the prompt's step, then one per token


@pytest.mark.parametrize("max_new_tokens", [1, 2, 5, 17])
def test_drafts_never_run_past_max_tokens(tiny_model: Path, max_new_tokens: int) -> None:
    greedy = SamplingParams(temperature=0.0, logit_bias=FEW)
    plain, _, plain_end, _, _ = generate(tiny_model, "off", greedy, max_new_tokens=max_new_tokens)
    drafted, _, end, _, _ = generate(tiny_model, "lookup", greedy, max_new_tokens=max_new_tokens)
    assert_same(drafted, plain)
    assert end.completion_tokens == plain_end.completion_tokens <= max_new_tokens


def test_a_stop_sequence_inside_accepted_drafts_ends_the_text_there(tiny_model: Path) -> None:
    greedy = SamplingParams(temperature=0.0, logit_bias=FEW)
    _, plain_text, _, _, _ = generate(tiny_model, "off", greedy)
    stop = plain_text[len(plain_text) // 2 : len(plain_text) // 2 + 3]
    _, expected, expected_end, _, _ = generate(tiny_model, "off", greedy, stop=[stop])
    _, text, end, _, _ = generate(tiny_model, "lookup", greedy, stop=[stop])
    assert text == expected and stop not in text
    assert end.finish_reason == expected_end.finish_reason == "stop"
    assert end.completion_tokens == expected_end.completion_tokens


class Recorder:
    """A drafter that never guesses: it records the tokens a stream holds."""

    costly = False

    def __init__(self) -> None:
        self.tokens: list[int] = []

    def extend(self, tokens: Sequence[int]) -> None:
        self.tokens.extend(tokens)

    def propose(self, limit: int) -> list[int]:
        return []

    def prepare(self) -> None:
        pass


class Oracle(Recorder):
    """Knows the answer, and proposes it with every third guess wrong at its second token."""

    def __init__(self, answer: list[int]) -> None:
        super().__init__()
        self.answer = answer
        self.guesses = 0

    def propose(self, limit: int) -> list[int]:
        self.guesses += 1
        at = len(self.tokens)
        guess = list(self.answer[at : at + limit])
        if self.guesses % 3 == 0 and len(guess) > 1:
            guess[1] = guess[1] + 1
        return guess


@pytest.mark.parametrize("screen", ["on", "off"])
def test_greedy_rows_of_a_pass_are_verified_through_the_screen_or_the_full_head(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch, screen: str
) -> None:
    """Greedy, nothing adjusting the logits: every row of a pass may take the bf16 screen's
    argmax (gateway/engine/greedy_head.py). A drafter that knows the answer, and errs now
    and then, changes nothing of it."""
    greedy = SamplingParams(temperature=0.0)
    recorder = Recorder()
    monkeypatch.setattr(Speculation, "drafter", lambda self: recorder)
    plain, _, _, _, plain_swarm = generate(tiny_model, "lookup", greedy, screen=screen)
    oracle = Oracle(recorder.tokens)
    monkeypatch.setattr(Speculation, "drafter", lambda self: oracle)
    drafted, _, _, metrics, swarm = generate(tiny_model, "lookup", greedy, screen=screen)
    assert_same(drafted, plain)
    accepted = metric(metrics, "swarmgate_draft_tokens_accepted_total")
    assert 0 < accepted < metric(metrics, "swarmgate_draft_tokens_total")
    assert swarm.steps < plain_swarm.steps / 2


def test_no_stream_drafts_while_more_than_max_streams_decode() -> None:
    speculation = Speculation("lookup", max_streams=2)
    pace = SpeculationPace(max_tokens=8)
    assert speculation.limit(pace, streams=2) == pace.limit > 0
    assert speculation.limit(pace, streams=3) == 0
    assert speculation.drafting(2) and not speculation.drafting(3)
    with pytest.raises(ValueError):
        Speculation("lookup", max_streams=0)


def test_a_stream_drafts_only_while_few_enough_streams_decode(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The gateway's count of running generations decides each pass: held above the cap,
    a stream that would draft at every pass drafts at none (nor reads its prompt ahead)."""
    greedy = SamplingParams(temperature=0.0, logit_bias=FEW)
    _, _, _, alone, _ = generate(tiny_model, "lookup", greedy)
    assert metric(alone, "swarmgate_draft_tokens_total") > 0
    busy = DEFAULT_SPECULATE_MAX_STREAMS + 1
    # Every generator counts ``busy`` generations running, whatever it counts itself.
    crowd = property(lambda self: busy, lambda self, value: None)
    monkeypatch.setattr(Generator, "streams", crowd, raising=False)
    prepared: list[object] = []
    monkeypatch.setattr(HeadRunner, "prepare", lambda self, d, wanted: prepared.append(d))
    drafted, _, _, crowded, swarm = generate(tiny_model, "lookup", greedy)
    assert metric(crowded, "swarmgate_draft_tokens_total") == 0
    assert swarm.steps == len(drafted)  # the prompt's step, then one per token but the last
    assert prepared == []


def test_a_prompt_read_ahead_no_longer_wanted_when_its_turn_comes_is_skipped() -> None:
    """A burst of streams queues its read-aheads before any knows how many came: each
    asks again when the head thread gets to it."""
    read: list[str] = []

    class Reader(Recorder):
        def prepare(self) -> None:
            read.append("read")

    calls = [_Prepare(Reader(), lambda: True), _Prepare(Reader(), lambda: False)]
    assert run_calls(None, calls) == [True, False]  # type: ignore[arg-type]  # no head needed
    assert read == ["read"]


@pytest.mark.parametrize("costly", [False, True])
def test_a_costly_drafter_that_read_no_prompt_ahead_never_drafts(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch, costly: bool
) -> None:
    """A stream that came in a crowd (its read-ahead not wanted) drafts later with a cheap
    drafter, never with a costly one: reading its whole conversation then would hold up
    every stream's rows."""
    greedy = SamplingParams(temperature=0.0)
    recorder = Recorder()
    monkeypatch.setattr(Speculation, "drafter", lambda self: recorder)
    generate(tiny_model, "lookup", greedy)
    oracle = Oracle(recorder.tokens)
    oracle.costly = costly

    async def not_wanted(self: HeadRunner, drafter: object, wanted: object) -> bool:
        return False

    monkeypatch.setattr(Speculation, "drafter", lambda self: oracle)
    monkeypatch.setattr(HeadRunner, "prepare", not_wanted)
    _, _, _, metrics, _ = generate(tiny_model, "lookup", greedy)
    drafted = metric(metrics, "swarmgate_draft_tokens_total")
    assert (drafted == 0) is costly
