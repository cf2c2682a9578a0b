"""PeerHealth: bans that double and expire, round trips smoothed, memory bounded."""

from __future__ import annotations

import math

import pytest

from routing.health import PeerHealth


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def health(clock: Clock, **kwargs: float) -> PeerHealth:
    return PeerHealth(clock=clock, **kwargs)  # type: ignore[arg-type]


def test_bans_double_with_failures_in_a_row_up_to_the_cap() -> None:
    clock = Clock()
    h = health(clock, base_ban_s=2.0, max_ban_s=20.0)
    lengths = []
    for _ in range(6):
        lengths.append(h.on_failure("p"))
        clock.now += lengths[-1] + 0.1  # the ban ran out, and the peer failed again
    assert lengths == [2.0, 4.0, 8.0, 16.0, 20.0, 20.0]


def test_a_ban_expires_by_itself() -> None:
    clock = Clock()
    h = health(clock, base_ban_s=2.0)
    assert h.on_failure("p") == 2.0
    assert h.is_banned("p") and h.banned() == {"p"}
    clock.now += 1.9
    assert h.is_banned("p")
    clock.now += 0.2
    assert not h.is_banned("p") and h.banned() == frozenset()


def test_failures_during_a_ban_are_the_same_outage() -> None:
    # Every session through a dying server fails at once: that is one failure, not ten.
    clock = Clock()
    h = health(clock, base_ban_s=2.0)
    assert [h.on_failure("p") for _ in range(10)] == [2.0] * 10
    clock.now += 2.5
    assert h.on_failure("p") == 4.0


def test_a_success_forgets_the_failures_and_lifts_the_ban() -> None:
    clock = Clock()
    h = health(clock, base_ban_s=2.0)
    h.on_failure("p")
    clock.now += 3
    h.on_failure("p")
    assert h.is_banned("p")
    h.on_success("p")  # used as a last resort, and it answered
    assert not h.is_banned("p")
    assert h.on_failure("p") == 2.0


def test_a_success_of_an_unknown_peer_is_a_no_op() -> None:
    h = health(Clock())
    h.on_success("nobody")
    assert h.banned() == frozenset() and h.rtts() == {}


def test_only_banned_peers_are_listed() -> None:
    clock = Clock()
    h = health(clock, base_ban_s=5.0)
    h.on_failure("a")
    clock.now += 3
    h.on_failure("b")
    h.observe_rtt("c", 0.01)
    assert h.banned() == {"a", "b"}
    clock.now += 2.5
    assert h.banned() == {"b"}


def test_round_trips_are_smoothed() -> None:
    h = health(Clock(), smoothing=0.5)
    h.observe_rtt("p", 0.1)
    assert h.rtts() == {"p": pytest.approx(0.1)}
    h.observe_rtt("p", 0.3)
    assert h.rtts() == {"p": pytest.approx(0.2)}
    h.observe_rtt("p", 0.2)
    assert h.rtts() == {"p": pytest.approx(0.2)}


@pytest.mark.parametrize("sample", [-0.1, math.nan, math.inf])
def test_unusable_round_trips_are_ignored(sample: float) -> None:
    h = health(Clock())
    h.observe_rtt("p", sample)
    assert h.rtts() == {}
    h.observe_rtt("p", 0.05)
    h.observe_rtt("p", sample)
    assert h.rtts() == {"p": pytest.approx(0.05)}


def test_a_success_keeps_the_round_trip() -> None:
    clock = Clock()
    h = health(clock)
    h.observe_rtt("p", 0.05)
    h.on_failure("p")
    h.on_success("p")
    assert h.rtts() == {"p": pytest.approx(0.05)} and not h.is_banned("p")


def test_memory_is_bounded_by_forgetting_the_stalest_peers() -> None:
    clock = Clock()
    h = health(clock, max_peers=3)
    for peer in ("a", "b", "c"):
        h.observe_rtt(peer, 0.01)
    h.observe_rtt("a", 0.02)  # a is fresh again: b is now the stalest
    h.on_failure("d")
    assert set(h.rtts()) == {"a", "c"}
    assert h.banned() == {"d"}
    for k in range(1000):
        h.on_failure(f"x{k}")
    assert len(h.banned()) == 3


def test_a_huge_streak_does_not_overflow() -> None:
    clock = Clock()
    h = health(clock, base_ban_s=1.0, max_ban_s=60.0)
    for _ in range(5000):
        length = h.on_failure("p")
        clock.now += length + 1
    assert length == 60.0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"base_ban_s": 0.0},
        {"base_ban_s": 10.0, "max_ban_s": 5.0},
        {"smoothing": 0.0},
        {"smoothing": 1.5},
        {"max_peers": 0},
    ],
)
def test_nonsense_settings_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        PeerHealth(**kwargs)  # type: ignore[arg-type]


def test_the_default_clock_is_monotonic() -> None:
    h = PeerHealth(base_ban_s=60.0)
    h.on_failure("p")
    assert h.is_banned("p")
