"""Greedy choices without reading the whole fp32 LM head every step.

A greedy step needs only the argmax of the logits, yet the LM head is the largest matrix
the gateway reads per step, and reading it is the cost: SmolLM2's is 49152 x 576, 113 MB
in fp32, ~9 ms per row on this machine's memory bandwidth, a sixth of a decode step.
A bf16 copy is half the bytes (~6 ms per row here, and ~2x faster at 16 rows).

Its logits are not the fp32 ones, but how far each can be is known: for the row ``W_j``
and the normed hidden state ``x``, rounding ``x`` and ``W_j`` to bf16 moves each product by
at most ``2u + u**2`` of ``|x_i W_ji|`` (``u = 2**-8``), summing in fp32 (here and in the
exact matmul) adds at most ``n * 2**-24`` of ``sum |x_i W_ji|`` each, and bf16 output
rounds once more, by ``u`` of the result. ``sum |x_i W_ji| <= |x| |W_j|`` (Cauchy-Schwarz),
and the row norms are computed once. Below fp32's smallest normal number (``2**-126``)
errors are absolute, not relative: bf16 instructions flush such inputs, products and sums
to zero, so each entry of ``x`` or ``W_j`` moves by up to ``2**-126`` (``sqrt(n) (|x| +
|W_j|)`` of it in all, by Cauchy-Schwarz again), each of the ``n`` products and ``n`` sums
by up to ``2**-126`` (``2n``), the output by ``2**-126`` and the exact matmul's subnormal
products by ``2**-150`` each (under one more ``2**-126``): ``2**-126`` times ``2n + 2 +
sqrt(n) (|x| + |W_j|)``. Nothing for real hidden states, but what keeps the bound true for
tiny ones.

The norms themselves must not underflow: fp32 squares vanish below ``2**-75``, and a norm
of 0 would drop the relative part of the bound, which is most of it for a tiny ``x`` (a
hidden state of ``2**-100 * [1, 1]`` has normal, exact fp32 logits). So ``|x|`` is summed
in float64 (whose squares of fp32 values neither underflow nor overflow) and rounded to
fp32; so are the head's rows whose fp32 norm is under ``2**-40`` or not finite (above it,
squares lost to underflow are at most ``n * 2**-126`` of a square of at least ``2**-80``;
the others keep their fp32 norm, so a head need not be copied to float64). A norm, or
the relative part computed from it, may still land below ``2**-126`` in fp32, losing bits
or becoming 0: only where ``|x|`` or ``|W_j|`` is under ``2**-119``, so that the relative
part is smaller than the other norm's ``2**-126 sqrt(n)`` term above (or, both tiny, than
``2**-126 (2n + 2)``). A norm or bound too large for fp32 is infinite: a hidden state whose bound
overflows falls back (below), a head with such a row norm is not screened. Second-order
terms (``u`` times the others) and the rounding of the bound's own fp32 arithmetic are
far inside the doubling below.

So every logit lies within its own bound of its bf16 value, and only the tokens whose
upper bound reaches the best lower bound can be the argmax: usually one to a few hundred
of 49152. Those are scored again in fp32, and the
argmax among them (the first, on ties, as ``torch.argmax``) is the token the full fp32
head would choose, up to the float rounding by which any two fp32 matmul paths differ
(~1e-6 here, against the ~1e-5 by which a split model's hidden states already differ
from a whole one's). The bound is doubled for safety; on SmolLM2's hidden states the
largest error seen was 15% of the undoubled bound.

Anything unusual falls back to the full fp32 head: non-finite logits or bounds, too many
candidates.
Where bf16 is not faster than fp32 (CPUs without bf16 arithmetic), it is not used at all
(``--greedy-screen auto``, the default; ``on`` uses it wherever the bound holds, ``off``
never).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

SCREEN_DTYPE = torch.bfloat16
UNIT_ROUNDOFF = 2.0**-8  # bf16: 8 significant bits
FP32_UNIT_ROUNDOFF = 2.0**-24
SMALLEST_NORMAL = 2.0**-126  # fp32's and bf16's; below it, values may be flushed to zero
# An fp32 row norm at least this large lost nothing that matters to squares' underflow.
ACCURATE_FP32_NORM = 2.0**-40
SAFETY = 2.0
# Past this many candidates a row is scored in full: the screen is not separating them.
MAX_CANDIDATES = 4096
# bf16 must beat fp32 by this much on one row to be worth holding a second copy of the head.
MIN_SPEEDUP = 1.2
CHECKED_BATCH = 16  # the bound is checked at startup on one row and on a batch this size
MODES = ("on", "off", "auto")  # --greedy-screen (gateway/settings.py)


@dataclass(frozen=True)
class GreedyScreen:
    """The fp32 LM head weight, its bf16 copy and what bounds the copy's error."""

    weight: torch.Tensor  # [vocab, hidden] fp32
    coarse: torch.Tensor  # the same in SCREEN_DTYPE
    row_norms: torch.Tensor  # [vocab] fp32: |W_j|, without underflow (_row_norms)
    product_error: float  # of |x| |W_j|, doubled for safety
    output_error: float  # of |logit|, doubled for safety
    flush_error: torch.Tensor  # [vocab]: the absolute part that does not depend on x
    flush_per_norm: float  # the absolute part per unit of |x|

    @classmethod
    def of(cls, lm_head: torch.nn.Module) -> GreedyScreen | None:
        """A screen for a plain fp32 linear head without bias; None for anything else
        (a bias or a wrapper would make the bound wrong, a bf16 head gains nothing)."""
        if type(lm_head) is not torch.nn.Linear or lm_head.bias is not None:
            return None
        weight = lm_head.weight.detach()
        # On a GPU the head is read at its bandwidth and the screen's per-row candidate
        # checks would synchronize with it every token: the screen is for CPU heads.
        if weight.dtype != torch.float32 or weight.dim() != 2 or weight.device.type != "cpu":
            return None
        hidden = weight.shape[1]
        u, tiny, root = UNIT_ROUNDOFF, SAFETY * SMALLEST_NORMAL, hidden**0.5
        row_norms = _row_norms(weight)
        if not bool(torch.isfinite(row_norms).all()):
            return None  # every row's bound would be infinite or NaN: nothing to gain
        return cls(
            weight=weight,
            coarse=weight.to(SCREEN_DTYPE),
            row_norms=row_norms,
            product_error=SAFETY * (2 * u + u * u + 2 * hidden * FP32_UNIT_ROUNDOFF),
            output_error=SAFETY * u,
            flush_error=tiny * (2 * hidden + 2) + (tiny * root) * row_norms,  # no overflow
            flush_per_norm=tiny * root,
        )

    @torch.inference_mode()
    def argmax(self, x: torch.Tensor) -> list[int | None]:
        """x: [B, hidden] fp32, the final-normed hidden states → each row's greedy token,
        or None where the screen cannot tell and the full head must."""
        approx, bound = self._screen(x)
        tokens: list[int | None] = []
        for row, radius, xs in zip(approx, bound, x, strict=True):
            floor = torch.max(row - radius)
            upper = row + radius  # not finite where a logit or a bound is not
            if not bool(torch.isfinite(floor)) or not bool(torch.isfinite(upper).all()):
                tokens.append(None)
                continue
            candidates = torch.nonzero(upper >= floor).flatten()
            if len(candidates) > MAX_CANDIDATES:
                tokens.append(None)
                continue
            exact = torch.nn.functional.linear(xs.unsqueeze(0), self.weight[candidates])[0]
            tokens.append(int(candidates[int(torch.argmax(exact))]))
        return tokens

    def _screen(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [B, hidden] → the bf16 logits [B, vocab] (as fp32) and each one's bound."""
        approx = torch.nn.functional.linear(x.to(SCREEN_DTYPE), self.coarse).float()
        norms = torch.linalg.vector_norm(x, dim=1, keepdim=True, dtype=torch.float64).float()
        bound = self.product_error * norms * self.row_norms + self.output_error * approx.abs()
        bound += self.flush_error
        bound += self.flush_per_norm * norms
        return approx, bound

    def pays_off(self, repeats: int = 7) -> bool:
        """Whether the screen holds and is clearly faster than the fp32 head on this
        machine (``--greedy-screen auto``)."""
        return self.holds() and self.faster(repeats)

    @torch.inference_mode()
    def holds(self) -> bool:
        """Whether every logit lies within its bound on random hidden states: a matmul that
        summed in bf16 (no CPU kernel seen does) would break the bound, on one row or on a
        batch (kernels may differ by batch size)."""
        generator = torch.Generator().manual_seed(0)
        for rows in (1, CHECKED_BATCH):
            x = torch.randn(rows, self.weight.shape[1], generator=generator)
            approx, bound = self._screen(x)
            exact = torch.nn.functional.linear(x, self.weight)
            if not bool(((approx - exact).abs() <= bound / SAFETY).all()):
                return False
        return True

    @torch.inference_mode()
    def faster(self, repeats: int = 7) -> bool:
        """Whether one screened row takes at most 1/MIN_SPEEDUP of the fp32 head's time:
        speed depends on the CPU's instructions, so it is measured. Timed on one thread,
        alternating: what starts beside a gateway (nodes loading) skews multi-threaded
        timings most."""
        one = torch.randn(1, self.weight.shape[1], generator=torch.Generator().manual_seed(1))
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            fp32, screened = [], []
            for _ in range(repeats):
                fp32.append(_timed(lambda: torch.nn.functional.linear(one, self.weight)))
                screened.append(_timed(lambda: self.argmax(one)))
        finally:
            torch.set_num_threads(threads)
        return min(screened) * MIN_SPEEDUP <= min(fp32)


def _row_norms(weight: torch.Tensor) -> torch.Tensor:
    """Each row's norm in fp32, summed in float64 where fp32's squares could underflow
    (or overflow): only those rows are copied, usually none."""
    norms: torch.Tensor = torch.linalg.vector_norm(weight, dim=1)
    suspect = torch.nonzero(~(torch.isfinite(norms) & (norms >= ACCURATE_FP32_NORM))).flatten()
    if len(suspect):
        exact = torch.linalg.vector_norm(weight[suspect], dim=1, dtype=torch.float64)
        norms[suspect] = exact.float()
    return norms


def _timed(fn: Callable[[], object]) -> float:
    began = time.perf_counter()
    fn()
    return time.perf_counter() - began


def greedy_screen(lm_head: torch.nn.Module, mode: str = "auto") -> GreedyScreen | None:
    """The screen for ``lm_head`` as ``--greedy-screen`` says: ``auto`` where it is one, holds
    and is faster on this machine; ``on`` wherever it is one and holds (where the startup
    timing misjudges a machine, or to measure it); ``off`` never."""
    if mode not in MODES:
        raise ValueError(f"greedy screen mode {mode!r} is not one of {', '.join(MODES)}")
    screen = GreedyScreen.of(lm_head) if mode != "off" else None
    if screen is None or not screen.holds():
        return None
    return screen if mode == "on" or screen.faster() else None
