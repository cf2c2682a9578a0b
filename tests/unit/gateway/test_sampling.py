"""Next-token choice: greedy, seeded sampling, temperature and top-p."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from gateway.engine.sampling import (
    MIN_TEMPERATURE,
    SamplingParams,
    StreamSampler,
    TokenChoice,
    adjust_logits,
    logits_to_probs,
    make_generator,
    sample,
    token_logprobs,
)

VOCAB = 1000


def draws(logits: torch.Tensor, params: SamplingParams, seed: int, n: int = 50) -> list[int]:
    generator = make_generator(seed)
    return [sample(logits, params, generator) for _ in range(n)]


# ---- greedy ----


def test_greedy_picks_the_argmax() -> None:
    logits = torch.tensor([0.1, 3.0, -2.0, 2.9, 0.0])
    params = SamplingParams(temperature=0.0)
    assert params.greedy
    assert sample(logits, params, make_generator(0)) == 1


def test_greedy_ignores_the_generator() -> None:
    logits = torch.randn(VOCAB, generator=torch.Generator().manual_seed(1))
    expected = int(torch.argmax(logits))
    params = SamplingParams(temperature=0.0, top_p=0.1)
    for seed in range(5):
        assert sample(logits, params, make_generator(seed)) == expected


def test_greedy_handles_bfloat16_logits() -> None:
    logits = torch.zeros(10, dtype=torch.bfloat16)
    logits[7] = 1.0
    assert sample(logits, SamplingParams(temperature=0.0), make_generator(0)) == 7


# ---- seeded sampling ----


def test_same_seed_same_tokens() -> None:
    logits = torch.zeros(VOCAB)
    params = SamplingParams(temperature=1.0, seed=123)
    assert draws(logits, params, 123) == draws(logits, params, 123)


def test_different_seeds_give_different_tokens() -> None:
    logits = torch.zeros(VOCAB)  # flat: any two seeds agreeing on 50 draws is ~impossible
    params = SamplingParams(temperature=1.0)
    a, b, c = (draws(logits, params, seed) for seed in (1, 2, 3))
    assert a != b and b != c and a != c


def test_sampling_varies_within_one_stream() -> None:
    tokens = draws(torch.zeros(VOCAB), SamplingParams(temperature=1.0), seed=9, n=100)
    assert len(set(tokens)) > 50
    assert all(0 <= t < VOCAB for t in tokens)


def test_unseeded_generators_are_independent() -> None:
    a = make_generator(None)
    b = make_generator(None)
    assert a.initial_seed() != b.initial_seed()


def test_sampled_ids_are_plain_ints() -> None:
    token = sample(torch.zeros(4), SamplingParams(), make_generator(0))
    assert type(token) is int


def test_sampling_follows_the_distribution() -> None:
    # Token 2 holds ~88% of the mass at temperature 1.
    logits = torch.tensor([0.0, 0.0, 3.0, 0.0])
    counts = Counter(draws(logits, SamplingParams(temperature=1.0), seed=0, n=400))
    assert counts.most_common(1)[0][0] == 2
    assert counts[2] > 300


# ---- temperature ----


def test_probs_sum_to_one() -> None:
    logits = torch.randn(VOCAB, generator=torch.Generator().manual_seed(0))
    for temperature in (0.1, 0.7, 1.0, 2.0):
        probs = logits_to_probs(logits, temperature, 1.0)
        assert probs.shape == (VOCAB,)
        assert torch.all(probs >= 0)
        assert probs.sum().item() == pytest.approx(1.0, abs=1e-5)


def test_temperature_one_is_softmax() -> None:
    logits = torch.tensor([1.0, 2.0, 3.0])
    assert torch.allclose(logits_to_probs(logits, 1.0, 1.0), torch.softmax(logits, dim=-1))


def test_lower_temperature_sharpens() -> None:
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0])
    cold = logits_to_probs(logits, 0.5, 1.0)
    warm = logits_to_probs(logits, 1.0, 1.0)
    hot = logits_to_probs(logits, 2.0, 1.0)
    assert cold[0] > warm[0] > hot[0]
    assert cold[-1] < warm[-1] < hot[-1]
    # The ranking is unchanged.
    assert torch.equal(torch.argsort(cold), torch.argsort(hot))


def test_very_low_temperature_is_almost_greedy() -> None:
    logits = torch.tensor([1.0, 1.5, 0.2])
    assert logits_to_probs(logits, 0.01, 1.0)[1].item() > 0.999
    tokens = draws(logits, SamplingParams(temperature=0.01), seed=4, n=30)
    assert set(tokens) == {1}


def test_logits_are_not_modified() -> None:
    logits = torch.tensor([3.0, 1.0, 0.0, -1.0])
    before = logits.clone()
    logits_to_probs(logits, 0.5, 0.5)
    assert torch.equal(logits, before)


# ---- top-p ----


def probs_of(values: list[float]) -> torch.Tensor:
    """Logits whose softmax is exactly ``values`` (up to float error)."""
    return torch.log(torch.tensor(values))


def test_top_p_keeps_the_smallest_prefix_reaching_it() -> None:
    logits = probs_of([0.1, 0.5, 0.05, 0.3, 0.05])
    # Sorted: 0.5, 0.3, 0.1, 0.05, 0.05. 0.5 < 0.6, 0.5 + 0.3 >= 0.6: keep two tokens.
    probs = logits_to_probs(logits, 1.0, 0.6)
    kept = set(torch.nonzero(probs).flatten().tolist())
    assert kept == {1, 3}
    assert probs[1].item() == pytest.approx(0.5 / 0.8, abs=1e-5)
    assert probs[3].item() == pytest.approx(0.3 / 0.8, abs=1e-5)
    assert probs.sum().item() == pytest.approx(1.0, abs=1e-6)


def test_top_p_just_above_a_boundary_keeps_one_more() -> None:
    logits = probs_of([0.1, 0.5, 0.05, 0.3, 0.05])
    probs = logits_to_probs(logits, 1.0, 0.85)  # 0.5 + 0.3 < 0.85 <= 0.9
    assert set(torch.nonzero(probs).flatten().tolist()) == {0, 1, 3}


def test_tiny_top_p_keeps_exactly_one_token() -> None:
    logits = torch.randn(VOCAB, generator=torch.Generator().manual_seed(3))
    probs = logits_to_probs(logits, 1.0, 1e-6)
    assert int(torch.count_nonzero(probs)) == 1
    assert int(torch.argmax(probs)) == int(torch.argmax(logits))
    assert probs.max().item() == pytest.approx(1.0)


def test_top_p_on_a_flat_distribution_keeps_about_that_fraction() -> None:
    probs = logits_to_probs(torch.zeros(100), 1.0, 0.305)
    kept = int(torch.count_nonzero(probs))
    assert 30 <= kept <= 32
    assert probs.sum().item() == pytest.approx(1.0, abs=1e-5)


def test_top_p_one_keeps_everything() -> None:
    logits = torch.randn(50, generator=torch.Generator().manual_seed(5))
    assert int(torch.count_nonzero(logits_to_probs(logits, 1.0, 1.0))) == 50


def test_sampling_never_picks_a_token_outside_the_nucleus() -> None:
    logits = probs_of([0.1, 0.5, 0.05, 0.3, 0.05])
    tokens = draws(logits, SamplingParams(temperature=1.0, top_p=0.6), seed=11, n=200)
    assert set(tokens) == {1, 3}


def test_temperature_applies_before_top_p() -> None:
    # At temperature 1 the top token holds 0.5 < 0.6; sharpened, it alone passes 0.6.
    logits = probs_of([0.1, 0.5, 0.05, 0.3, 0.05])
    probs = logits_to_probs(logits, 0.25, 0.6)
    assert set(torch.nonzero(probs).flatten().tolist()) == {1}


# ---- penalties and biases ----


def test_logit_bias_can_change_the_greedy_choice() -> None:
    logits = torch.tensor([5.0, 1.0, 0.0])
    params = SamplingParams(temperature=0.0, logit_bias={2: 100.0})
    assert sample(logits, params, make_generator(0)) == 2
    banned = SamplingParams(temperature=0.0, logit_bias={0: -100.0})
    assert sample(logits, banned, make_generator(0)) == 1


def test_penalties_subtract_per_occurrence_and_once() -> None:
    logits = torch.zeros(4)
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    adjusted = adjust_logits(logits, params, Counter({1: 3, 2: 1}))
    assert adjusted.tolist() == pytest.approx([0.0, -(3 * 0.25 + 0.5), -(0.25 + 0.5), 0.0])
    assert torch.equal(logits, torch.zeros(4))  # the input is untouched


# ---- one stream's sampler ----


def test_a_stream_sampler_counts_its_choices_for_the_penalties() -> None:
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0])
    sampler = StreamSampler.of(SamplingParams(temperature=0.0, presence_penalty=10.0))
    assert [sampler.choose(logits).token for _ in range(4)] == [0, 1, 2, 3]
    assert sampler.generated == Counter({0: 1, 1: 1, 2: 1, 3: 1})


def test_a_stream_sampler_reports_logprobs_only_when_asked() -> None:
    logits = torch.randn(VOCAB, generator=torch.Generator().manual_seed(7))
    quiet = StreamSampler.of(SamplingParams(temperature=0.0)).choose(logits)
    assert quiet.logprob is None and quiet.top == ()
    loud = StreamSampler.of(SamplingParams(temperature=0.0), logprobs=0).choose(logits)
    assert loud.logprob == pytest.approx(float(torch.log_softmax(logits, -1).max()))
    assert loud.top == ()


@pytest.mark.parametrize(
    ("params", "logprobs", "constrained", "needs"),
    [
        (SamplingParams(temperature=0.0), None, False, False),
        (SamplingParams(temperature=MIN_TEMPERATURE / 2), None, False, False),
        (SamplingParams(temperature=0.7), None, False, True),
        (SamplingParams(temperature=0.0), 0, False, True),
        (SamplingParams(temperature=0.0), None, True, True),
        (SamplingParams(temperature=0.0, logit_bias={3: 1.0}), None, False, True),
        (SamplingParams(temperature=0.0, presence_penalty=0.5), None, False, True),
        (SamplingParams(temperature=0.0, frequency_penalty=0.5), None, False, True),
    ],
)
def test_only_plain_greedy_streams_go_without_logits(
    params: SamplingParams, logprobs: int | None, constrained: bool, needs: bool
) -> None:
    constraint = AllowOnly({1}) if constrained else None
    sampler = StreamSampler.of(params, logprobs, constraint)
    assert sampler.needs_logits is needs
    if needs:
        with pytest.raises(ValueError, match="chooses from the logits"):
            sampler.take(1)
        assert not sampler.generated


def test_a_taken_argmax_counts_as_a_choice() -> None:
    sampler = StreamSampler.of(SamplingParams(temperature=0.0))
    assert sampler.take(7) == TokenChoice(7)
    assert sampler.take(7) == TokenChoice(7)
    assert sampler.generated == Counter({7: 2})


def test_token_logprobs_are_the_models_own_distribution() -> None:
    logits = torch.randn(VOCAB, generator=torch.Generator().manual_seed(8))
    logprob, top = token_logprobs(logits, 17, 3)
    reference = torch.log_softmax(logits, -1)
    assert logprob == pytest.approx(float(reference[17]))
    values, ids = torch.topk(reference, 3)
    assert [t for t, _ in top] == ids.tolist()
    assert [lp for _, lp in top] == pytest.approx(values.tolist())


# ---- a constraint's mask ----


class AllowOnly:
    """A constraint allowing a fixed set of tokens; it records what it was given."""

    def __init__(self, allowed: set[int]) -> None:
        self.allowed = allowed
        self.consumed: list[int] = []

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        keep = torch.zeros(logits.shape[-1], dtype=torch.bool)
        keep[list(self.allowed)] = True
        return logits.masked_fill(~keep, float("-inf"))

    def consume(self, token: int) -> None:
        self.consumed.append(token)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.0, seed=1),
        SamplingParams(temperature=2.0, seed=2),
        SamplingParams(temperature=2.0, top_p=0.9, seed=3),
        SamplingParams(temperature=1.0, top_p=0.1, seed=4),
        SamplingParams(temperature=2.0, seed=5, logit_bias={0: 100.0}, presence_penalty=2.0),
    ],
)
def test_masked_tokens_are_never_chosen(params: SamplingParams) -> None:
    # The allowed tokens are the model's least likely: every choice goes against it.
    logits = torch.arange(VOCAB, dtype=torch.float32) / 10
    allowed = {3, 5, 8, 13}
    constraint = AllowOnly(allowed)
    sampler = StreamSampler.of(params, logprobs=0, constraint=constraint)
    choices = [sampler.choose(logits) for _ in range(300)]
    assert {c.token for c in choices} <= allowed
    assert constraint.consumed == [c.token for c in choices]
    if not params.greedy and params.top_p > 0.5:
        assert {c.token for c in choices} == allowed  # and they are sampled, not argmaxed
    # The logprobs are the model's own, from before the mask.
    reference = torch.log_softmax(logits, -1)
    assert all(c.logprob == pytest.approx(float(reference[c.token])) for c in choices)


def test_a_constraint_leaves_the_callers_logits_alone() -> None:
    logits = torch.randn(VOCAB, generator=torch.Generator().manual_seed(9))
    before = logits.clone()
    StreamSampler.of(SamplingParams(temperature=1.0), constraint=AllowOnly({1})).choose(logits)
    assert torch.equal(logits, before)
