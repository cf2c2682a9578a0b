"""The greedy screen on tiny, huge and rounding-edge inputs: every row's screened token is
the fp32 head's argmax (``torch.argmax`` of ``linear(x, W)``) or None (the full head
decides), every bf16 logit lies within its undoubled bound, and ordinary inputs do not
fall back.

Seeded loops of a few hundred cases. Two fp32 matmuls may sum in different orders and
differ by an ulp (even for two equal rows in one call), which decides ties and near
ties; so the cases built to tie or nearly tie have values with few significant bits,
multiples of 2**-149, whose products and sums fp32 computes exactly in any order.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from gateway.engine import greedy_head
from gateway.engine.greedy_head import SAFETY, GreedyScreen


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny matmuls: on a busy machine, threads waiting for each other cost ~20x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def screen_of(weight: torch.Tensor) -> GreedyScreen:
    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    linear.weight.data = weight
    screen = GreedyScreen.of(linear)
    assert screen is not None
    return screen


def fp32_argmax(weight: torch.Tensor, x: torch.Tensor) -> list[int]:
    return [int(t) for t in torch.argmax(torch.nn.functional.linear(x, weight), dim=1)]


def bf16_argmax(weight: torch.Tensor, x: torch.Tensor) -> list[int]:
    coarse = torch.nn.functional.linear(x.bfloat16(), weight.bfloat16()).float()
    return [int(t) for t in torch.argmax(coarse, dim=1)]


def screened(weight: torch.Tensor, x: torch.Tensor) -> list[int | None]:
    """The screen's tokens, each checked to be the fp32 argmax or None, and the bound
    checked to hold for every finite logit."""
    screen = screen_of(weight)
    tokens = screen.argmax(x)
    for row, (token, best) in enumerate(zip(tokens, fp32_argmax(weight, x), strict=True)):
        assert token in (None, best), f"row {row}: screened {token}, fp32 argmax {best}"
    approx, bound = screen._screen(x)
    exact = torch.nn.functional.linear(x, weight)
    finite = torch.isfinite(exact) & torch.isfinite(approx) & torch.isfinite(bound)
    assert bool(((approx - exact).abs() <= bound / SAFETY)[finite].all())
    return tokens


def randint(g: torch.Generator, low: int, high: int, shape: tuple[int, ...] = ()) -> torch.Tensor:
    """Uniform in [low, high]."""
    return torch.randint(low, high + 1, shape, generator=g)


def pow2(exponents: torch.Tensor) -> torch.Tensor:
    return torch.pow(2.0, exponents.double()).float()  # exact down to 2**-149


def signs(g: torch.Generator, shape: tuple[int, ...]) -> torch.Tensor:
    return randint(g, 0, 1, shape).float() * 2 - 1


def midpoints(g: torch.Generator, shape: tuple[int, ...]) -> torch.Tensor:
    """±(1 + k 2**-8 + o 2**-18), k in [0, 255], o in [-1, 1]: an odd k puts the value on
    the midpoint between two bf16 numbers (o = 0: rounded to even) or a hair to either
    side of it. Multiples of 2**-18."""
    k, o = randint(g, 0, 255, shape).float(), randint(g, -1, 1, shape).float()
    return signs(g, shape) * (1 + k * 2**-8 + o * 2**-18)


def quarters(g: torch.Generator, shape: tuple[int, ...]) -> torch.Tensor:
    """±(1 + c/4), c in [0, 3]: exact in bf16. Multiples of 2**-2."""
    return signs(g, shape) * (1 + randint(g, 0, 3, shape).float() / 4)


def exact_case(
    g: torch.Generator, x_exponent: int, w_exponent: int, vocab: int = 48
) -> tuple[torch.Tensor, torch.Tensor]:
    """W: bf16 midpoints times 2**w_exponent, with near copies of fp32's best row that
    bf16 cannot tell from it (one entry moved by 2**-18 of the scale, or none: a tie);
    x: 1 row of quarters times 2**x_exponent, 2 to 4 entries. Products are multiples of
    2**(x_exponent + w_exponent - 20) below 4 times the scales, sums of up to 4 of them
    below 16: 24 bits, exact in fp32 while x_exponent + w_exponent >= -129."""
    assert x_exponent + w_exponent >= -129
    hidden = int(randint(g, 2, 4))
    scale = 2.0**w_exponent
    weight = midpoints(g, (vocab, hidden)) * scale
    x = quarters(g, (1, hidden)) * 2.0**x_exponent
    best = fp32_argmax(weight, x)[0]
    for copy in randint(g, 0, vocab - 1, (3,)).tolist():
        if copy != best:
            weight[copy] = weight[best]
            weight[copy, int(randint(g, 0, hidden - 1))] += int(randint(g, -1, 1)) * 2**-18 * scale
    return weight, x


# The weights of test_greedy_head's test_a_token_behind_in_bf16_but_ahead_in_fp32_wins.
BEHIND_IN_BF16 = torch.tensor(
    [[1 + 2**-8 + 2**-20, -1.0], [0.004, 0.0], [-1.0, -1.0], [-1.0, -1.0]]
)


def test_a_tiny_hidden_state_keeps_its_bound() -> None:
    """|x| squared in fp32 underflows to 0 at 2**-100, and the bound vanished with it:
    the screen took bf16's token 0. The logits are normal and exact in fp32: token 1."""
    x = 2.0**-100 * torch.tensor([[1.0, 1.0]])
    assert bf16_argmax(BEHIND_IN_BF16, x) == [0]
    assert fp32_argmax(BEHIND_IN_BF16, x) == [1]
    assert screen_of(BEHIND_IN_BF16).argmax(x) == [1]


@pytest.mark.parametrize("exponent", [-60, -80, -100, -120, -126, -130, -140, -149])
def test_the_same_example_at_every_tiny_scale(exponent: int) -> None:
    tokens = screened(BEHIND_IN_BF16, 2.0**exponent * torch.tensor([[1.0, 1.0]]))
    if exponent >= -100:  # logits far above the absolute error: decided
        assert tokens == [1]


def test_rows_at_bf16_midpoints_and_near_ties() -> None:
    """300 heads at ordinary scales, where bf16 often ranks another token first: the
    screen always decides (it stays useful), and always for fp32's token."""
    g = torch.Generator().manual_seed(1)
    bf16_wrong = 0
    for _ in range(300):
        weight, x = exact_case(g, int(randint(g, -8, 8)), int(randint(g, -8, 8)))
        assert screened(weight, x) == fp32_argmax(weight, x)
        bf16_wrong += bf16_argmax(weight, x) != fp32_argmax(weight, x)
    assert bf16_wrong >= 30  # the cases reach what bf16 alone gets wrong


@pytest.mark.parametrize("tiny", ["x", "W", "both"])
def test_tiny_hidden_states_and_tiny_weights(tiny: str) -> None:
    """x, W or both at 2**-60 ... 2**-140, with the other scale just large enough for
    exact fp32 logits: those that are normal are still decided."""
    g = torch.Generator().manual_seed(2)
    for _ in range(100):
        small = int(randint(g, -140, -60))
        if tiny == "both":
            small = max(small, -69)
            other = int(randint(g, -129 - small, -60))
        else:
            other = int(randint(g, max(-8, -129 - small), max(8, -129 - small)))
        x_exponent, w_exponent = (small, other) if tiny in ("x", "both") else (other, small)
        weight, x = exact_case(g, x_exponent, w_exponent)
        tokens = screened(weight, x)
        if x_exponent + w_exponent >= -100:
            assert tokens == fp32_argmax(weight, x)


def test_tiny_products_down_to_the_last_subnormal() -> None:
    """x and W both tiny, products down to 2**-149: quarters times 2**0 ... 2**4 of a
    scale, so products are multiples of 2**-149 spanning under 18 bits, summed exactly."""
    g = torch.Generator().manual_seed(3)
    for _ in range(100):
        x_exponent = int(randint(g, -85, -60))
        w_exponent = int(randint(g, -145 - x_exponent, -60))
        hidden = int(randint(g, 2, 8))
        weight = quarters(g, (64, hidden)) * pow2(randint(g, 0, 4, (64, hidden)) + w_exponent)
        x = quarters(g, (4, hidden)) * pow2(randint(g, 0, 4, (4, hidden)) + x_exponent)
        screened(weight, x)


def test_tiny_gaussian_hidden_states_are_still_decided() -> None:
    """Gaussian x at 2**-60 ... 2**-100 against a gaussian head larger than
    MAX_CANDIDATES (so it could fall back): the bound shrinks with |x|, every row is
    decided."""
    g = torch.Generator().manual_seed(4)
    weight = torch.randn(greedy_head.MAX_CANDIDATES + 4000, 32, generator=g)
    x = torch.randn(64, 32, generator=g) * pow2(randint(g, -100, -60, (64, 1)))
    assert screened(weight, x) == fp32_argmax(weight, x)


def test_heads_with_tiny_rows() -> None:
    """Rows at 2**-60 ... 2**-140, whose fp32 norms underflow, against x at 2**0 ...
    2**100: their norms are summed in float64, and the screen decides where the logits
    are normal."""
    g = torch.Generator().manual_seed(5)
    for _ in range(50):
        weight = torch.randn(64, 16, generator=g) * pow2(randint(g, -140, -60, (64, 1)))
        screen = screen_of(weight)
        exact = torch.linalg.vector_norm(weight, dim=1, dtype=torch.float64).float()
        normal = exact >= 2.0**-126
        assert torch.allclose(screen.row_norms[normal], exact[normal], rtol=1e-6, atol=0)
        x = torch.randn(8, 16, generator=g) * pow2(randint(g, 0, 100, (8, 1)))
        screened(weight, x)
    weight = torch.randn(64, 16, generator=g) * 2.0**-70  # all logits normal below
    x = torch.randn(8, 16, generator=g) * 2.0**30
    assert screen_of(weight).row_norms.min() > 0
    assert screened(weight, x) == fp32_argmax(weight, x)


def test_mixed_scales_within_a_row() -> None:
    """Each entry of x and W at its own scale, 2**-149 ... 2**20: some flushed by bf16,
    some normal, some products far below the others. Two entries a row, products of
    powers of two and 3-bit values: exact, and one rounding for the sum in any order."""
    g = torch.Generator().manual_seed(6)
    for _ in range(150):
        weight = quarters(g, (64, 2)) * pow2(randint(g, -129, 20, (64, 2)))
        x = signs(g, (4, 2)) * pow2(randint(g, -20, 0, (4, 2)))
        screened(weight, x)
        screened(x.clone(), weight[:8].clone())  # and the same values as hidden states


def test_values_near_the_smallest_normal_and_subnormals() -> None:
    """Entries a few fp32 steps either side of 2**-126, and subnormals down to 2**-149,
    which bf16 may flush to zero, against powers of two: the bound's absolute part
    covers them. Two entries a row: exact products, one rounding for the sum."""
    g = torch.Generator().manual_seed(7)
    for _ in range(150):
        steps = randint(g, -8, 8, (8, 2)).float()
        near = signs(g, (8, 2)) * 2.0**-126 * (1 + steps * 2.0**-23)
        sub = signs(g, (8, 2)) * randint(g, 1, 2**23 - 1, (8, 2)).float() * 2.0**-149
        x = torch.cat([near, sub])
        weight = signs(g, (64, 2)) * pow2(randint(g, 0, 40, (64, 2)))
        screened(weight, x)
        screened(x.clone(), weight[:8].clone())  # the tiny values in the head instead


def test_huge_values_fall_back_where_the_bound_overflows() -> None:
    """x up to ~fp32's largest: a row falls back where a logit or its bound overflows to
    inf, and is decided where neither does."""
    g = torch.Generator().manual_seed(8)
    weight = torch.randn(64, 16, generator=g)
    x = torch.randn(64, 16, generator=g) * pow2(randint(g, 60, 126, (64, 1)))
    tokens = screened(weight, x)
    norms = torch.linalg.vector_norm(x, dim=1, dtype=torch.float64)
    assert all(t is None for t, n in zip(tokens, norms, strict=True) if n >= 2.0**128)
    assert all(t is not None for t, n in zip(tokens, norms, strict=True) if n < 2.0**110)


def test_a_head_with_rows_near_fp32s_largest() -> None:
    """Row norms finite but near fp32's largest keep a finite bound (no overflow on the
    way); a row norm past it would make every bound infinite: no screen then."""
    near = torch.full((4, 16), 2.0**124)  # row norms 2**126
    near[0] = -near[0]
    screen = screen_of(near)
    assert bool(torch.isfinite(screen.flush_error).all())
    assert screened(near, torch.ones(1, 16) * 2.0**-20) == [1]
    over = torch.nn.Linear(16, 4, bias=False)
    over.weight.data = torch.full((4, 16), 2.0**126)  # entries finite, row norms 2**128
    assert GreedyScreen.of(over) is None


def test_a_batch_of_64_rows_in_every_regime() -> None:
    """One call of 64 rows (bf16 kernels differ by batch size): ordinary, tiny, huge and
    subnormal rows side by side, each checked against fp32's argmax. The head holds
    3-bit values, so the subnormal rows' logits are exact."""
    g = torch.Generator().manual_seed(9)
    for _ in range(5):
        weight = quarters(g, (2000, 24)) * pow2(randint(g, -3, 3, (2000, 24)))
        gaussian = torch.randn(48, 24, generator=g)
        exponents = torch.cat([randint(g, -8, 8, (16, 1)), randint(g, -100, -60, (16, 1))])
        exponents = torch.cat([exponents, randint(g, 60, 122, (16, 1))])
        subnormal = quarters(g, (16, 24)) * pow2(randint(g, -147, -127, (16, 24)))
        x = torch.cat([gaussian * pow2(exponents), subnormal])
        tokens = screened(weight, x)
        assert all(t is not None for t in tokens[:32])  # ordinary and tiny: decided


def test_ties_go_to_the_first_maximal_index() -> None:
    """fp32 ties, exact in fp32: the screen answers the first tied index, as torch.argmax
    does, even where bf16 ranks a later one of them higher."""
    x = torch.tensor([[1.0, 1.0]])
    # Both 1 + 3 * 2**-8 in fp32; bf16 rounds row 2 up (1 + 2**-6), row 1 is 1 + 2**-7.
    weight = torch.tensor([[-1.0, -1.0], [1 + 2**-8, 2**-7], [1 + 3 * 2**-8, 0.0], [0.0, 0.0]])
    assert bf16_argmax(weight, x) == [2]
    assert fp32_argmax(weight, x) == [1]
    assert screen_of(weight).argmax(x) == [1]
    g = torch.Generator().manual_seed(10)
    for _ in range(200):
        weight, x = exact_case(g, int(randint(g, -8, 8)), int(randint(g, -8, 8)), vocab=32)
        best = fp32_argmax(weight, x)[0]
        copies = randint(g, 0, 31, (2,)).tolist()
        weight[copies] = weight[best].clone()
        first = min([best, *copies])
        assert fp32_argmax(weight, x) == [first]
        assert screen_of(weight).argmax(x) == [first]
