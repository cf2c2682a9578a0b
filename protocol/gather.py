"""How long an idle worker waits for more work before it runs a batch: one policy, shared.

Two places batch work that arrives in bursts: a block server's step scheduler
(``swarm_node/batching.py``) packs the steps of its open streams into one forward, and a
gateway's head (``gateway/engine/head.py`` over ``gateway/engine/batching.py``) runs the
rows of its decoding streams as one job. Both see the same traffic: the streams of one
batched forward answered one by one by the hop before, so they arrive a few milliseconds
apart. Both answer it the same way: while work keeps arriving, each within
``GATHER_GAP_S`` of the last, wait, at most ``GATHER_SHARE`` of a job's duration and never
more than ``MAX_GATHER_S``, since a job costs nearly as much for one row as for sixteen and
one run alone costs every other stream a job's time.

The two ends of a hop share these numbers because they shape each other's bursts: what one
end gathers into a job, it answers as one burst that the next end must gather in turn.
The gateway and the block servers never import each other (docs/ARCHITECTURE.md), so the
policy lives here, below both.
"""

from __future__ import annotations

GATHER_SHARE = 0.5  # of a job's (smoothed) duration
MAX_GATHER_S = 0.05
# The streams of one batched forward are answered ~1 ms apart: a wait ends once none came
# for this long.
GATHER_GAP_S = 0.01


def gather_window(job_s: float) -> float:
    """How long after the first arrival a worker may wait for more, given how long its jobs
    take: ``GATHER_SHARE`` of that, ``MAX_GATHER_S`` at most."""
    return min(MAX_GATHER_S, GATHER_SHARE * job_s)
