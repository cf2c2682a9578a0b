"""Stream rhythms: when a decoding stream's next step is due, and when it is not expected."""

from __future__ import annotations

from pytest import approx

from swarm_node.cadence import MAX_INTERVAL_S, Cadences


class Stream:
    """Stands for a session's cache: any object held weakly by identity."""


def steady(cadences: Cadences, stream: Stream, start: float, interval: float, steps: int) -> None:
    for i in range(steps):
        cadences.arrived(stream, start + i * interval)


def test_a_steady_stream_is_due_one_interval_after_its_last_step() -> None:
    cadences, a = Cadences(), Stream()
    steady(cadences, a, 0.0, 0.1, 4)  # last step at 0.3
    assert cadences.due_by(0.32, horizon=0.2, present=()) == approx(0.4)
    assert cadences.due_by(0.32, horizon=0.05, present=()) is None  # beyond the horizon
    assert cadences.due_by(0.32, horizon=0.2, present={a}) is None  # already here


def test_the_latest_due_stream_sets_the_wait() -> None:
    cadences, a, b, c = Cadences(), Stream(), Stream(), Stream()
    steady(cadences, a, 0.00, 0.1, 3)  # due at 0.30
    steady(cadences, b, 0.04, 0.1, 3)  # due at 0.34
    steady(cadences, c, 0.00, 1.0, 2)  # due at 2.0: not soon
    assert cadences.due_by(0.25, horizon=0.2, present=()) == approx(0.34)


def test_a_late_step_is_due_now_until_it_is_too_late() -> None:
    cadences, a = Cadences(), Stream()
    steady(cadences, a, 0.0, 0.1, 3)  # due at 0.3
    assert cadences.due_by(0.32, horizon=0.1, present=()) == 0.32
    assert cadences.due_by(0.36, horizon=0.1, present=()) is None  # over half an interval late


def test_without_a_rhythm_nothing_is_due() -> None:
    cadences, a, b = Cadences(), Stream(), Stream()
    cadences.arrived(a, 0.0)  # one step: no interval yet
    steady(cadences, b, 0.0, 0.1, 3)
    cadences.arrived(b, 0.25, decode=False)  # a new prompt starts its rhythm over
    assert cadences.due_by(0.3, horizon=1.0, present=()) is None


def test_a_pause_between_turns_breaks_the_rhythm_and_old_streams_are_forgotten() -> None:
    cadences, a = Cadences(), Stream()
    steady(cadences, a, 0.0, 0.1, 3)
    cadences.arrived(a, 0.2 + MAX_INTERVAL_S + 1)  # the next turn, much later
    assert cadences.due_by(0.2 + MAX_INTERVAL_S + 1.05, horizon=1.0, present=()) is None
    assert len(cadences) == 1
    cadences.due_by(0.2 + 3 * MAX_INTERVAL_S, horizon=1.0, present=())
    assert len(cadences) == 0


def test_a_dropped_session_drops_its_rhythm() -> None:
    cadences, a = Cadences(), Stream()
    steady(cadences, a, 0.0, 0.1, 3)
    del a
    assert len(cadences) == 0
