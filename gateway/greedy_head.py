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
errors are absolute, not relative (bf16 instructions flush such inputs and products to
zero), so each bound also has ``2**-126`` times ``n + 1 + sqrt(n) (|x| + |W_j|)``: nothing
for real hidden states, but what keeps the bound true for tiny ones.

So every logit lies within its own bound of its bf16 value, and only the tokens whose
upper bound reaches the best lower bound can be the argmax: usually one to a few hundred
of 49152. Those are scored again in fp32, and the
argmax among them (the first, on ties, as ``torch.argmax``) is the token the full fp32
head would choose, up to the float rounding by which any two fp32 matmul paths differ
(~1e-6 here, against the ~1e-5 by which a split model's hidden states already differ
from a whole one's). The bound is doubled for safety; on SmolLM2's hidden states the
largest error seen was 15% of the undoubled bound.

Anything unusual falls back to the full fp32 head: non-finite values, too many candidates.
Where bf16 is not faster than fp32 (CPUs without bf16 arithmetic), it is not used at all.
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
SAFETY = 2.0
# Past this many candidates a row is scored in full: the screen is not separating them.
MAX_CANDIDATES = 4096
# bf16 must beat fp32 by this much on one row to be worth holding a second copy of the head.
MIN_SPEEDUP = 1.2
CHECKED_BATCH = 16  # the bound is checked at startup on one row and on a batch this size


@dataclass(frozen=True)
class GreedyScreen:
    """The fp32 LM head weight, its bf16 copy and what bounds the copy's error."""

    weight: torch.Tensor  # [vocab, hidden] fp32
    coarse: torch.Tensor  # the same in SCREEN_DTYPE
    row_norms: torch.Tensor  # [vocab] fp32: |W_j|
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
        row_norms = weight.norm(dim=1)
        return cls(
            weight=weight,
            coarse=weight.to(SCREEN_DTYPE),
            row_norms=row_norms,
            product_error=SAFETY * (2 * u + u * u + 2 * hidden * FP32_UNIT_ROUNDOFF),
            output_error=SAFETY * u,
            flush_error=tiny * (hidden + 1 + root * row_norms),
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
            if not bool(torch.isfinite(floor)) or not bool(torch.isfinite(row).all()):
                tokens.append(None)
                continue
            candidates = torch.nonzero(row + radius >= floor).flatten()
            if len(candidates) > MAX_CANDIDATES:
                tokens.append(None)
                continue
            exact = torch.nn.functional.linear(xs.unsqueeze(0), self.weight[candidates])[0]
            tokens.append(int(candidates[int(torch.argmax(exact))]))
        return tokens

    def _screen(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [B, hidden] → the bf16 logits [B, vocab] (as fp32) and each one's bound."""
        approx = torch.nn.functional.linear(x.to(SCREEN_DTYPE), self.coarse).float()
        norms = x.norm(dim=1, keepdim=True)
        bound = self.product_error * norms * self.row_norms + self.output_error * approx.abs()
        bound += self.flush_error
        bound += self.flush_per_norm * norms
        return approx, bound

    @torch.inference_mode()
    def pays_off(self, repeats: int = 7) -> bool:
        """Whether the screen holds and is clearly faster than the fp32 head on this
        machine. Both are measured: speed depends on the CPU's instructions, and a matmul
        that summed in bf16 (no CPU kernel seen does) would break the bound, on one row or
        on a batch (kernels may differ by batch size). Timed on one thread, alternating:
        what starts beside a gateway (nodes loading) skews multi-threaded timings most."""
        generator = torch.Generator().manual_seed(0)
        for rows in (1, CHECKED_BATCH):
            x = torch.randn(rows, self.weight.shape[1], generator=generator)
            approx, bound = self._screen(x)
            exact = torch.nn.functional.linear(x, self.weight)
            if not bool(((approx - exact).abs() <= bound / SAFETY).all()):
                return False
        one = x[:1]
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


def _timed(fn: Callable[[], object]) -> float:
    began = time.perf_counter()
    fn()
    return time.perf_counter() - began


def greedy_screen(lm_head: torch.nn.Module) -> GreedyScreen | None:
    """The screen for ``lm_head`` if it is one and pays off on this machine."""
    screen = GreedyScreen.of(lm_head)
    return screen if screen is not None and screen.pays_off() else None
