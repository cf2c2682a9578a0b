"""The gateway's share of the model (embedding, final norm, LM head) and the choice of each
next token, run off the event loop on one thread, batched across concurrent streams.

The LM head dominates a decode step here (for SmolLM2 a 49152 x 576 fp32 matrix, ~113 MB
read per call): on one CPU core one call of 16 rows took ~27 ms, 16 calls of one row
~180 ms. So every call that arrives while the thread is busy waits in a queue, and the next
job runs all of them: one norm + LM head over the stacked rows, then each stream's own
sampling in its own row. A lone stream never waits; with several streams decoding, an idle
thread waits a few milliseconds for the rows that arrive together (see gateway/engine/batching.py).
A decoding stream gets its next token's embedding in the same job, ready for its next step.

Failures: an exception in the shared LM head reaches every caller with a row in it; one in
a single call's own work (its embedding, its sampling) reaches that caller alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import torch

from gateway.engine.batching import MicroBatcher
from gateway.engine.drafting import Drafter
from gateway.engine.greedy_head import GreedyScreen
from gateway.engine.sampling import StreamSampler, TokenChoice
from gateway.metrics import GatewayMetrics
from models.devices import to_device, to_host
from models.loading import Head
from protocol.gather import GATHER_GAP_S

# Rows of one job: 64 rows of the default model took ~70 ms on one CPU core, so a call
# queued behind a full batch is not held long.
MAX_BATCH_ROWS = 64


@dataclass(frozen=True)
class _Embed:
    ids: list[int]


@dataclass(frozen=True)
class _Prepare:
    drafter: Drafter
    wanted: Callable[[], bool]  # asked when the thread gets to it, not when it was queued


@dataclass(frozen=True)
class _Logits:
    hidden: torch.Tensor  # [1, n, hidden_size]; its last position is the row


@dataclass(frozen=True)
class _NextToken:
    hidden: torch.Tensor  # [1, n, hidden_size]
    sampler: StreamSampler


@dataclass(frozen=True)
class _Verify:
    """A speculative step's output: row 0 follows the token chosen before, row j + 1 the
    draft j fed after it. Then the stream's next drafts, and the next step's input."""

    hidden: torch.Tensor  # [1, n, hidden_size], n >= len(drafts) + 1
    drafts: list[int]
    sampler: StreamSampler
    drafter: Drafter
    limit: int  # drafts to propose after this one, at most
    room: int  # tokens the stream may still emit, this step's included

    @property
    def rows(self) -> int:
        return len(self.drafts) + 1


@dataclass(frozen=True)
class _Score:
    hidden: torch.Tensor  # [m, hidden_size]: the swarm's output at the positions before ...
    tokens: list[int]  # ... these m tokens, each scored given those before it
    top: int


@dataclass(frozen=True)
class Decoded:
    choice: TokenChoice
    embedding: torch.Tensor  # [1, 1, hidden_size]: the chosen token, as the next step's input


@dataclass(frozen=True)
class Verified:
    """The tokens a speculative step yields: one per draft accepted, then the token drawn
    where a draft was not (or after the last one); and what to feed next."""

    choices: list[TokenChoice]
    drafts: list[int]  # the next drafts, fed after the last choice
    embedding: torch.Tensor  # [1, 1 + len(drafts), hidden_size]: the last choice, the drafts

    @property
    def accepted(self) -> int:
        """Drafts taken."""
        return len(self.choices) - 1


T = TypeVar("T")

_Call = _Embed | _Prepare | _Logits | _NextToken | _Verify | _Score
_Rows = _Logits | _NextToken | _Verify
_Outcome = torch.Tensor | Decoded | Verified | list[TokenChoice] | bool

# Prompt positions scored in one job: other streams' rows wait behind it at most this many
# rows' worth of LM head (64 rows of the default model: ~35 ms on one core, as a step of 16).
SCORE_ROWS = 64


class HeadRunner:
    """Embeddings in, next tokens out: the only place the gateway runs its model weights.

    ``screen``: greedy rows that need only their argmax find it through it instead of the
    full fp32 LM head (gateway/engine/greedy_head.py); None: every row through the full head."""

    def __init__(
        self,
        head: Head,
        *,
        screen: GreedyScreen | None = None,
        max_batch: int = MAX_BATCH_ROWS,
        metrics: GatewayMetrics | None = None,
    ) -> None:
        self._hidden_size = int(head.config.hidden_size)
        self._metrics = metrics or GatewayMetrics()
        self._decoding = 0
        self._batcher: MicroBatcher[_Call, _Outcome] = MicroBatcher(
            lambda calls: run_calls(head, calls, screen),
            max_batch=max_batch,
            thread_name="head",
            on_batch=self._observe,
            expected=lambda: self._decoding,
            gap_s=GATHER_GAP_S,  # the last hop answers one forward's streams one by one
        )

    @property
    def waiting(self) -> int:
        """Calls queued behind the job on the thread."""
        return self._batcher.waiting

    async def embed(self, ids: list[int]) -> torch.Tensor:
        """ids: n token ids → hidden [1, n, hidden_size] (fp32)."""
        out = await self._batcher.submit(_Embed(list(ids)))
        assert isinstance(out, torch.Tensor)
        return out

    async def prepare(self, drafter: Drafter, wanted: Callable[[], bool]) -> bool:
        """``drafter.prepare()`` on the thread (a draft model reading a prompt), if it is
        still ``wanted()`` once the thread gets to it: a burst of streams all ask at once,
        before any of them knows how many came. Whether it ran."""
        out = await self._batcher.submit(_Prepare(drafter, wanted))
        return out is True

    async def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [1, n, hidden_size] → logits of the last position [vocab] (fp32)."""
        out = await self._batcher.submit(_Logits(self._checked(hidden)))
        assert isinstance(out, torch.Tensor)
        return out

    async def decode(self, hidden: torch.Tensor, sampler: StreamSampler) -> Decoded:
        """hidden: [1, n, hidden_size], the swarm's output (n > 1 after a prefill) → the token
        ``sampler`` chooses from the last position's logits (with its logprobs if asked)
        and that token's embedding, the next step's input: one trip to the thread."""
        out = await self._batcher.submit(_NextToken(self._checked(hidden), sampler))
        assert isinstance(out, Decoded)
        return out

    async def verify(
        self,
        hidden: torch.Tensor,
        drafts: Sequence[int],
        sampler: StreamSampler,
        drafter: Drafter,
        limit: int,
        room: int,
    ) -> Verified:
        """hidden: [1, n, hidden_size], the swarm's output for the token chosen before and
        then ``drafts`` (n > len(drafts) after a prefill) → the tokens ``sampler`` draws
        there, one position after another, for as long as each equals the draft fed after
        it: every draw exactly as without drafts. Then ``drafter``, told the tokens drawn,
        proposes up to ``limit`` more, and the last token's and their embeddings come with
        them: one trip to the thread. ``room``: tokens the stream may still emit; the next
        drafts leave room for the token after them."""
        hidden = self._checked(hidden)
        if hidden.shape[1] <= len(drafts):
            raise ValueError(f"{hidden.shape[1]} positions to verify {len(drafts)} drafts")
        call = _Verify(hidden, list(drafts), sampler, drafter, limit, room)
        out = await self._batcher.submit(call)
        assert isinstance(out, Verified)
        return out

    async def score(self, hidden: torch.Tensor, ids: list[int], top: int) -> list[TokenChoice]:
        """hidden: [1, n, hidden_size], the swarm's output for the prompt ``ids`` (n tokens)
        → each token after the first as the model scores it given those before it: its
        logprob and the ``top`` most likely tokens there. In jobs of ``SCORE_ROWS``
        positions, so other streams' steps go on between them."""
        self._checked(hidden)
        if hidden.shape[1] != len(ids):
            raise ValueError(f"{hidden.shape[1]} positions of hidden states for {len(ids)} tokens")
        rows = hidden[0, :-1]  # position i predicts token i + 1
        scored: list[TokenChoice] = []
        for start in range(0, len(ids) - 1, SCORE_ROWS):
            call = _Score(
                rows[start : start + SCORE_ROWS], ids[start + 1 : start + 1 + SCORE_ROWS], top
            )
            out = await self._batcher.submit(call)
            assert isinstance(out, list)
            scored.extend(out)
        return scored

    @contextmanager
    def decoding(self) -> Iterator[None]:
        """Counts a stream as decoding while inside: an idle thread waits briefly for the
        rows of decoding streams, never for others."""
        self._decoding += 1
        try:
            yield
        finally:
            self._decoding -= 1

    def close(self) -> None:
        self._batcher.close()

    def _checked(self, hidden: torch.Tensor) -> torch.Tensor:
        # Checked here, before queueing: a malformed row would fail the stack it joins,
        # and with it every stream batched alongside.
        if hidden.dim() != 3 or hidden.shape[0] != 1 or hidden.shape[2] != self._hidden_size:
            raise ValueError(
                f"hidden states must be [1, n, {self._hidden_size}], not {list(hidden.shape)}"
            )
        if hidden.shape[1] == 0:
            raise ValueError("hidden states of no position have no next token")
        return hidden

    def _observe(self, calls: Sequence[_Call]) -> None:
        rows = sum(
            call.rows if isinstance(call, _Verify) else 1
            for call in calls
            if not isinstance(call, _Embed | _Prepare)
        )
        if rows:
            self._metrics.head_batch_rows.observe(rows)


@torch.inference_mode()
def run_calls(
    head: Head, calls: Sequence[_Call], screen: GreedyScreen | None = None
) -> list[_Outcome | Exception]:
    """One job of the head thread, an outcome per call in order. Embeddings run one by
    one: a lookup takes microseconds, there is nothing to gain by stacking them."""
    outcomes: dict[int, _Outcome | Exception] = {}
    for i, call in enumerate(calls):
        if isinstance(call, _Embed):
            outcomes[i] = _attempt(embed_ids, head, call.ids)
        elif isinstance(call, _Prepare):
            outcomes[i] = _attempt(_prepare, call) if call.wanted() else False
        elif isinstance(call, _Score):
            outcomes[i] = _attempt(score_rows, head, call)
    rows = [i for i, call in enumerate(calls) if isinstance(call, _Rows)]
    heads = [call for call in calls if isinstance(call, _Rows)]
    outcomes.update(zip(rows, _run_rows(head, heads, screen), strict=True))
    return [outcomes[i] for i in range(len(calls))]


def embed_ids(head: Head, ids: list[int]) -> torch.Tensor:
    """ids: n token ids → hidden [1, n, hidden_size] (fp32, on the host: for the wire)."""
    hidden: torch.Tensor = head.embed(torch.tensor([ids], dtype=torch.long, device=head.device))
    return to_host(hidden.float())


def _on_head(head: Head, hidden: torch.Tensor) -> torch.Tensor:
    """Host hidden states as the head's modules take them: on its device, in its dtype
    (what a whole model in that dtype hands its final norm)."""
    return to_device(hidden, head.device).to(head.dtype)


def final_rows(
    head: Head, hidden: Sequence[torch.Tensor], counts: Sequence[int] | None = None
) -> torch.Tensor:
    """hidden: B tensors [1, n_i, hidden_size] → each one's last position (or last
    ``counts[i]`` positions) through the final norm [sum, hidden_size], on the head's device
    in its dtype: what the LM head multiplies."""
    counts = counts or [1] * len(hidden)
    last = torch.cat([h[0, -c:].float() for h, c in zip(hidden, counts, strict=True)])
    rows: torch.Tensor = head.norm(_on_head(head, last))
    return rows


def head_logits(head: Head, rows: torch.Tensor) -> torch.Tensor:
    """rows: [B, hidden_size] from ``final_rows`` → logits [B, vocab], fp32 on the host,
    where sampling, grammars and penalties work on them (one copy per batch)."""
    return to_host(head.lm_head(rows).float())


def batch_logits(head: Head, hidden: Sequence[torch.Tensor]) -> torch.Tensor:
    """hidden: B tensors [1, n_i, hidden_size] → logits of each one's last position
    [B, vocab] (fp32). Rows may differ from one-row calls by float rounding (~1e-6)."""
    return head_logits(head, final_rows(head, hidden))


def score_rows(head: Head, call: _Score) -> list[TokenChoice]:
    """Each of ``call.tokens`` with its logprob and the top alternatives at its position."""
    logits = head.lm_head(head.norm(_on_head(head, call.hidden.float()))).float()
    logprobs = to_host(torch.log_softmax(logits, dim=-1))
    chosen = logprobs[torch.arange(len(call.tokens)), torch.tensor(call.tokens)].tolist()
    if not call.top:
        return [
            TokenChoice(token, logprob) for token, logprob in zip(call.tokens, chosen, strict=True)
        ]
    values, ids = torch.topk(logprobs, call.top, dim=-1)
    return [
        TokenChoice(token, logprob, tuple(zip(top_ids, top_values, strict=True)))
        for token, logprob, top_ids, top_values in zip(
            call.tokens, chosen, ids.tolist(), values.tolist(), strict=True
        )
    ]


def _run_rows(
    head: Head, calls: Sequence[_Rows], screen: GreedyScreen | None
) -> list[_Outcome | Exception]:
    if not calls:
        return []
    counts = [call.rows if isinstance(call, _Verify) else 1 for call in calls]
    starts = [sum(counts[:i]) for i in range(len(calls))]
    # Each row's greedy token where the screen found it; None: from its full logits.
    screened: list[int | None] = [None] * sum(counts)
    try:  # the rows are computed together: they fail together
        rows = final_rows(head, [call.hidden for call in calls], counts)  # [R, hidden_size]
        greedy = [
            r
            for call, start, count in zip(calls, starts, counts, strict=True)
            if isinstance(call, _NextToken | _Verify) and not call.sampler.needs_logits
            for r in range(start, start + count)
        ]
        if screen is not None and greedy:
            for r, token in zip(greedy, screen.argmax(rows[greedy]), strict=True):
                screened[r] = token
        full = [r for r, token in enumerate(screened) if token is None]
        logits = head_logits(head, rows[full]) if full else None  # [len(full), vocab]
    except Exception as error:
        return [error] * len(calls)
    by_row: dict[int, torch.Tensor] = {}
    if logits is not None:
        # A row alone: a view would keep the whole batch's logits alive.
        by_row = {r: row for r, row in zip(full, logits, strict=True)}
    outcomes: list[_Outcome | Exception] = []
    for call, start, count in zip(calls, starts, counts, strict=True):
        at = range(start, start + count)
        found = [(screened[r], by_row.get(r)) for r in at]
        if isinstance(call, _Logits):
            row = found[0][1]
            assert row is not None
            outcomes.append(row.clone())
        elif isinstance(call, _NextToken):
            outcomes.append(_attempt(_decide, head, call, *found[0]))
        else:
            outcomes.append(_attempt(_verify, head, call, found))
    return outcomes


def _decide(head: Head, call: _NextToken, token: int | None, row: torch.Tensor | None) -> Decoded:
    choice = _draw(call.sampler, token, row)
    return Decoded(choice, embed_ids(head, [choice.token]))


def _draw(sampler: StreamSampler, token: int | None, row: torch.Tensor | None) -> TokenChoice:
    """The sampler's choice at one row: its screened argmax, or from its full logits."""
    if token is not None:
        return sampler.take(token)
    assert row is not None  # every row the screen did not decide has its logits
    return sampler.choose(row)


def _verify(
    head: Head, call: _Verify, rows: Sequence[tuple[int | None, torch.Tensor | None]]
) -> Verified:
    choices: list[TokenChoice] = []
    for j, (token, row) in enumerate(rows):
        choice = _draw(call.sampler, token, row)
        choices.append(choice)
        if j >= len(call.drafts) or choice.token != call.drafts[j]:
            break  # the rows after a wrong draft followed a token never emitted
    call.drafter.extend([choice.token for choice in choices])
    # The next pass yields a token per draft taken and one more: all within the room left.
    drafts = call.drafter.propose(min(call.limit, call.room - len(choices) - 1))
    return Verified(choices, drafts, embed_ids(head, [choices[-1].token, *drafts]))


def _prepare(call: _Prepare) -> bool:
    call.drafter.prepare()
    return True


def _attempt(fn: Callable[..., T], *args: object) -> T | Exception:
    try:
        return fn(*args)
    except Exception as error:
        return error
