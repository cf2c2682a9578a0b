"""The greedy screen: the argmax of the full fp32 head, found through its bf16 copy."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from gateway.engine import greedy_head
from gateway.engine.greedy_head import MIN_SPEEDUP, MODES, SAFETY, GreedyScreen, greedy_screen
from gateway.settings import GatewaySettings
from models.loading import Head, load_head


@pytest.fixture(scope="module")
def head(tiny_model: Path) -> Head:
    return load_head(tiny_model)


def rows(count: int, hidden: int, scale: float, seed: int) -> torch.Tensor:
    return scale * torch.randn(count, hidden, generator=torch.Generator().manual_seed(seed))


def full_argmax(weight: torch.Tensor, x: torch.Tensor) -> list[int]:
    return [int(t) for t in torch.nn.functional.linear(x, weight).argmax(dim=1)]


def screen_of(weight: torch.Tensor) -> GreedyScreen:
    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    linear.weight.data = weight
    screen = GreedyScreen.of(linear)
    assert screen is not None
    return screen


@pytest.mark.parametrize("scale", [0.01, 1.0, 30.0, 1e4])
def test_the_screened_argmax_is_the_full_heads(head: Head, scale: float) -> None:
    """Normed hidden states at several magnitudes: the final norm divides out its input's
    scale, so it is applied after (as a norm weight of that size would)."""
    screen = GreedyScreen.of(head.lm_head)
    assert screen is not None
    x = scale * head.norm(rows(300, head.config.hidden_size, 1.0, seed=int(scale)))
    assert screen.argmax(x) == full_argmax(screen.weight, x)


def test_every_logit_lies_within_its_bound(head: Head) -> None:
    screen = GreedyScreen.of(head.lm_head)
    assert screen is not None
    for scale in (0.1, 1.0, 100.0):
        x = rows(50, head.config.hidden_size, scale, seed=7)
        approx, bound = screen._screen(x)
        exact = torch.nn.functional.linear(x, screen.weight)
        assert bool(((approx - exact).abs() <= bound / SAFETY).all())


def test_ties_go_to_the_first_token_as_with_argmax() -> None:
    weight = torch.randn(1000, 32, generator=torch.Generator().manual_seed(0))
    x = rows(1, 32, 1.0, seed=1)
    best = full_argmax(weight, x)[0]
    weight[[10, 500, 900]] = weight[best].clone()  # the same best logit, three more times
    assert full_argmax(weight, x) == [min(10, best)]
    assert screen_of(weight).argmax(x) == [min(10, best)]


def test_near_ties_that_bf16_cannot_see_are_decided_in_fp32() -> None:
    """A later row a hair better than the best, equal to it in bf16: the screen keeps
    both, and fp32 decides for the later one (bf16 alone would take the first)."""
    weight = torch.randn(1000, 32, generator=torch.Generator().manual_seed(2))
    x = rows(1, 32, 1.0, seed=3)
    best = full_argmax(weight, x)[0]
    assert best != 999
    weight[999] = weight[best] + 1e-5 * torch.sign(x[0])
    assert torch.equal(weight[999].bfloat16(), weight[best].bfloat16())
    assert full_argmax(weight, x) == [999]
    assert screen_of(weight).argmax(x) == [999]


def test_a_token_behind_in_bf16_but_ahead_in_fp32_wins() -> None:
    """bf16 rounds row 0's first weight up by ~2**-8, which the cancelling second one
    leaves as the whole logit (0.0078 instead of 0.0039); row 1 is nearly exact (0.0040).
    bf16 ranks row 0 first, fp32 row 1: the bound must keep row 1 a candidate."""
    weight = torch.tensor([[1 + 2**-8 + 2**-20, -1.0], [0.004, 0.0], [-1.0, -1.0], [-1.0, -1.0]])
    x = torch.tensor([[1.0, 1.0]])
    coarse = torch.nn.functional.linear(x.bfloat16(), weight.bfloat16()).float()[0]
    assert float(coarse[0]) > float(coarse[1]) and full_argmax(weight, x) == [1]
    assert screen_of(weight).argmax(x) == [1]


def test_logits_too_small_for_relative_error_are_still_bounded() -> None:
    """Below 2**-126, bf16 rounding (or flushing to zero) errs by absolute amounts: here
    bf16 ranks row 2 first, fp32 row 1."""
    s = 2.0**-133
    weight = torch.tensor([[-1.0, -1.0], [1.49 * s, 1.49 * s], [2.51 * s, 0.0], [-1.0, -1.0]])
    x = torch.tensor([[1.0, 1.0]])
    assert full_argmax(weight, x) == [1]
    assert screen_of(weight).argmax(x) in ([1], [None])


def test_rows_it_cannot_decide_are_left_to_the_full_head(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    screen = screen_of(torch.randn(100, 16, generator=torch.Generator().manual_seed(0)))
    x = rows(3, 16, 1.0, seed=4)
    x[1, 0] = float("nan")
    x[2, 0] = float("inf")
    assert screen.argmax(x)[1:] == [None, None]
    assert screen.argmax(x)[0] == full_argmax(screen.weight, x[:1])[0]
    monkeypatch.setattr(greedy_head, "MAX_CANDIDATES", 0)  # too many candidates, always
    assert screen.argmax(x[:1]) == [None]


def test_only_a_plain_fp32_linear_head_is_screened() -> None:
    assert GreedyScreen.of(torch.nn.Linear(8, 20, bias=True)) is None
    assert GreedyScreen.of(torch.nn.Linear(8, 20, bias=False).bfloat16()) is None
    assert GreedyScreen.of(torch.nn.Sequential(torch.nn.Linear(8, 20, bias=False))) is None
    assert GreedyScreen.of(torch.nn.Linear(8, 20, bias=False)) is not None


def test_a_copy_that_breaks_the_bound_is_never_used(head: Head) -> None:
    screen = GreedyScreen.of(head.lm_head)
    assert screen is not None
    wrong = dataclasses.replace(screen, coarse=(screen.weight * 1.05).bfloat16())
    assert not wrong.pays_off()


def fake_timer(monkeypatch: pytest.MonkeyPatch, fp32_s: float, screened_s: float) -> None:
    """Times the fp32 head at ``fp32_s`` and the screen at ``screened_s`` a row, told apart
    by what they return (logits, or a list of tokens)."""

    def timed(fn: Callable[[], object]) -> float:
        return screened_s if isinstance(fn(), list) else fp32_s

    monkeypatch.setattr(greedy_head, "_timed", timed)


@pytest.mark.parametrize(
    ("screened_s", "faster"),
    [(0.5, True), (0.8, True), (0.85, False), (1.0, False), (2.0, False)],
)
def test_the_screen_is_faster_only_by_min_speedup(
    head: Head, monkeypatch: pytest.MonkeyPatch, screened_s: float, faster: bool
) -> None:
    """MIN_SPEEDUP (1.2) or more: 0.8 s against 1 s is, 0.85 s is not."""
    assert MIN_SPEEDUP == 1.2
    screen = GreedyScreen.of(head.lm_head)
    assert screen is not None
    fake_timer(monkeypatch, fp32_s=1.0, screened_s=screened_s)
    assert screen.faster() is faster
    assert screen.pays_off() is faster
    assert (greedy_screen(head.lm_head) is not None) is faster


def test_a_tiny_head_is_timed_slower_through_the_screen() -> None:
    """Really timed: for 20 tokens the screen's per-row steps cost far more than the head's
    one small matmul, so `auto` leaves it off and `on` still uses it."""
    head = torch.nn.Linear(8, 20, bias=False)
    screen = GreedyScreen.of(head)
    assert screen is not None and screen.holds()
    assert not screen.faster()
    assert greedy_screen(head) is None
    assert greedy_screen(head, "on") is not None


def test_greedy_screen_on_off_and_auto(head: Head, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_timer(monkeypatch, fp32_s=1.0, screened_s=2.0)  # slower: auto leaves it off
    assert greedy_screen(head.lm_head, "auto") is None
    assert greedy_screen(head.lm_head, "on") is not None
    assert greedy_screen(head.lm_head, "off") is None
    fake_timer(monkeypatch, fp32_s=1.0, screened_s=0.1)  # faster: still off when told
    assert greedy_screen(head.lm_head, "auto") is not None
    assert greedy_screen(head.lm_head, "off") is None
    with pytest.raises(ValueError, match="not one of on, off, auto"):
        greedy_screen(head.lm_head, "yes")


def test_on_never_uses_a_screen_whose_bound_breaks(
    head: Head, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(GreedyScreen, "holds", lambda self: False)
    assert greedy_screen(head.lm_head, "on") is None
    assert greedy_screen(torch.nn.Linear(8, 20, bias=True), "on") is None  # not screenable


def test_the_flags_choices_are_the_modes() -> None:
    spec = {f.name: f for f in dataclasses.fields(GatewaySettings)}["greedy_screen"]
    assert spec.metadata["choices"] == MODES and spec.default == "auto"
