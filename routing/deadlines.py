"""When a hop's silence becomes suspicious: a deadline per step that follows the hop's own
measured step times, as TCP's retransmission timeout follows its round trips.

A hung server (a frozen process, a partition) keeps its connections open: nothing fails,
the answer just never comes. A fixed deadline long enough for the slowest honest step
(a loaded CPU server, a long prompt) stalls every stream for that long. So each hop gets a
*soft* deadline from what its steps took lately: ``mean + 4 x mean deviation`` of its recent
steps, at least ``SUSPECT_FACTOR`` times the mean and never below ``SUSPECT_FLOOR_S``. Missing
it does not fail the hop: it makes the gateway ask the server whether it is alive (a
liveness probe), and only a probe left unanswered fails it. A slow server that answers its
probe keeps its step, up to the hard deadline (``routing.costs.step_deadline_s``), so a
load spike costs a probe, never a failover.

Steps of many tokens (prefill chunks) take longer than decode steps; their soft deadline
also covers what the hop's announced throughput predicts for their size. Pure: the caller
feeds observations and asks for deadlines; no clock, no I/O.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

SUSPECT_FLOOR_S = 0.5  # no soft deadline is shorter: event loops and GC pause for less
SUSPECT_FACTOR = 3.0  # nor shorter than this many typical steps
DEVIATIONS = 4.0  # TCP's RTO = SRTT + 4 RTTVAR
GAIN = 0.125  # TCP's alpha for the mean
DEVIATION_GAIN = 0.25  # and beta for the deviation
SMALL_STEP_TOKENS = 8  # steps up to this many tokens are the decode steps measured here


@dataclass
class _Times:
    mean_s: float
    deviation_s: float


class StepTimes:
    """Each peer's recent decode-step times; the soft deadline of its next step."""

    def __init__(self, max_peers: int = 10_000) -> None:
        self._max_peers = max_peers
        self._peers: OrderedDict[str, _Times] = OrderedDict()

    def observe(self, peer_id: str, seconds: float, tokens: int) -> None:
        """A step of ``tokens`` tokens that ``peer_id`` answered in ``seconds``."""
        if tokens > SMALL_STEP_TOKENS or not (math.isfinite(seconds) and seconds >= 0):
            return
        times = self._peers.pop(peer_id, None)
        if times is None:
            times = _Times(seconds, seconds / 2)
        else:
            times.deviation_s += DEVIATION_GAIN * (abs(seconds - times.mean_s) - times.deviation_s)
            times.mean_s += GAIN * (seconds - times.mean_s)
        self._peers[peer_id] = times
        while len(self._peers) > self._max_peers:
            self._peers.popitem(last=False)

    def suspect_after_s(self, peer_id: str, predicted_s: float = 0.0) -> float:
        """How long a step of ``peer_id`` may stay unanswered before the peer is probed.
        ``predicted_s``: what its announced throughput predicts for this step's size (0 for a
        decode step)."""
        times = self._peers.get(peer_id)
        measured = 0.0
        if times is not None:
            measured = max(
                times.mean_s + DEVIATIONS * times.deviation_s, SUSPECT_FACTOR * times.mean_s
            )
        return max(SUSPECT_FLOOR_S, measured, predicted_s)

    def forget(self, peer_id: str) -> None:
        self._peers.pop(peer_id, None)
