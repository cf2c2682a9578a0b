"""When each stream's next step should reach this server, from the rhythm of its last ones.

A stream that decodes sends a step every cycle of its chain (this hop, the others, the
gateway's LM head, the network between them): its next step is due about one interval
after its last. The scheduler uses that to run streams in one forward that would otherwise
alternate: two groups of streams half a cycle apart each pay a whole forward, which on a
server whose forward costs nearly as much for one step as for sixteen doubles its work.
Waiting once for the later group aligns them, and aligned streams stay together.

Pure bookkeeping: times are given, never read here.
"""

from __future__ import annotations

import weakref
from collections.abc import Collection
from dataclasses import dataclass

# A stream is expected only while its rhythm holds: one whose step is this late (in its own
# intervals) is busy elsewhere or gone, and an interval this long is not a decode rhythm.
LATE_INTERVALS = 0.5
MAX_INTERVAL_S = 5.0
SMOOTHING = 0.5  # weight of the newest interval


@dataclass
class _Rhythm:
    last: float  # when its latest step arrived
    interval: float | None = None  # smoothed time between its steps


class Cadences:
    """Each stream's rhythm, keyed by its session's cache (held weakly: a dropped cache
    drops its entry)."""

    def __init__(self) -> None:
        self._rhythms: weakref.WeakKeyDictionary[object, _Rhythm] = weakref.WeakKeyDictionary()

    def __len__(self) -> int:
        return len(self._rhythms)

    def arrived(self, stream: object, now: float, *, decode: bool = True) -> None:
        """A step of ``stream`` arrived. Only decode steps keep a rhythm: a prompt's step
        starts it over (its chain's cycle is longer than a decode step's)."""
        rhythm = self._rhythms.get(stream)
        if rhythm is None or not decode:
            self._rhythms[stream] = _Rhythm(now)
            return
        interval = now - rhythm.last
        rhythm.last = now
        if not 0 < interval <= MAX_INTERVAL_S:
            rhythm.interval = None  # a pause between turns, say: the rhythm starts over
        elif rhythm.interval is None:
            rhythm.interval = interval
        else:
            rhythm.interval = SMOOTHING * interval + (1 - SMOOTHING) * rhythm.interval

    def due_by(self, now: float, horizon: float, present: Collection[object]) -> float | None:
        """The latest time, at most ``now + horizon``, by which the streams not ``present``
        whose next step is due by then should all have arrived; None if none is due.
        A step already late by less than ``LATE_INTERVALS`` of its interval is due now."""
        latest: float | None = None
        for stream, rhythm in list(self._rhythms.items()):
            if now - rhythm.last > MAX_INTERVAL_S:
                del self._rhythms[stream]  # between turns, or closed: no rhythm to keep
                continue
            if rhythm.interval is None or stream in present:
                continue
            due = rhythm.last + rhythm.interval
            if due < now - LATE_INTERVALS * rhythm.interval or due > now + horizon:
                continue
            due = max(due, now)
            latest = due if latest is None else max(latest, due)
        return latest
