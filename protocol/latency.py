"""Simulated network round trips between swarm processes, for benchmarks and tests only.

Real swarms have 10 to 100 ms between hops; a swarm on one machine talks over loopback, and
this machine has no ``netem`` to slow a link down. Setting ``SWARMGATE_SIMULATED_RTT_MS``
makes every message on a link wait as long as half that round trip would take: the sender's
message reaches its peer ``rtt / 2`` later, and the peer's reply reaches the sender ``rtt / 2``
after it was sent. It must never be set in production: it slows every request down on
purpose.

The delay suspends only the task that sends or receives (an ``asyncio`` sleep, never a
blocking one), so every other stream of the process goes on meanwhile. A link that sends
one message and waits for its answer (the gateway's hop streams) is delayed exactly as a
real network would delay it. The side that starts an exchange delays both ways, so each
link is delayed once: the gateway for its hop streams (a message it sends without waiting
for an answer, such as a step announcement or a relay, waits ``outbound()`` in its own
task, so messages overlap in flight as on a wire), a node for its pushes to the next node
(the push reaches it ``rtt / 2`` later, the acceptance comes back ``rtt / 2`` after that).
Connection set-up (dialing a peer) and DHT lookups are not delayed.
"""

from __future__ import annotations

import asyncio
import math
import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

__all__ = ["MAX_SIMULATED_RTT_MS", "SIMULATED_RTT_ENV", "SimulatedLink", "parse_rtt_ms"]

SIMULATED_RTT_ENV = "SWARMGATE_SIMULATED_RTT_MS"
MAX_SIMULATED_RTT_MS = 10_000.0  # beyond any real link; a larger value is a typo

Sleep = Callable[[float], Awaitable[None]]


def parse_rtt_ms(text: str) -> float:
    """A round trip in milliseconds from ``SWARMGATE_SIMULATED_RTT_MS``; ``ValueError`` with
    the variable's name unless it is a number in ``[0, MAX_SIMULATED_RTT_MS]``."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 <= value <= MAX_SIMULATED_RTT_MS:  # NaN fails this too
        raise ValueError(
            f"{SIMULATED_RTT_ENV}={text!r}: expected a round trip in milliseconds from 0 to "
            f"{MAX_SIMULATED_RTT_MS:g} (benchmarks and tests only; unset it in production)"
        )
    return value


@dataclass(frozen=True)
class SimulatedLink:
    """The delay of one link, both ways: ``rtt_s`` seconds per round trip, 0 for none.

    ``sleep`` is injectable so tests can record the delays asked for instead of waiting.
    """

    rtt_s: float = 0.0
    sleep: Sleep = asyncio.sleep

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] = os.environ, sleep: Sleep = asyncio.sleep
    ) -> SimulatedLink:
        """The link ``SWARMGATE_SIMULATED_RTT_MS`` asks for; unset or empty: no delay."""
        text = environ.get(SIMULATED_RTT_ENV, "").strip()
        return cls(parse_rtt_ms(text) / 1000.0 if text else 0.0, sleep)

    @property
    def enabled(self) -> bool:
        return self.rtt_s > 0.0

    async def outbound(self) -> None:
        """Wait as long as a message takes to reach the peer."""
        if self.enabled:
            await self.sleep(self.rtt_s / 2)

    async def inbound(self, elapsed_s: float = 0.0) -> None:
        """Wait as long as the peer's message took to arrive, once it has been read;
        ``elapsed_s`` of that already passed since it was read off the wire."""
        if self.enabled and self.rtt_s / 2 > elapsed_s:
            await self.sleep(self.rtt_s / 2 - elapsed_s)
