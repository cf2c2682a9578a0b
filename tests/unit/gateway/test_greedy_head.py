"""The greedy screen: the argmax of the full fp32 head, found through its bf16 copy."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from gateway.engine import greedy_head
from gateway.engine.greedy_head import SAFETY, GreedyScreen, greedy_screen
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
    screen = GreedyScreen.of(head.lm_head)
    assert screen is not None
    x = head.norm(rows(300, head.config.hidden_size, scale, seed=int(scale)))
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


def test_a_screen_is_offered_only_where_it_pays_off(
    head: Head, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(GreedyScreen, "pays_off", lambda self: False)
    assert greedy_screen(head.lm_head) is None
    monkeypatch.setattr(GreedyScreen, "pays_off", lambda self: True)
    assert greedy_screen(head.lm_head) is not None
