"""Soft step deadlines (routing/deadlines.py) and bans of hung peers (routing/health.py)."""

from __future__ import annotations

import math

import pytest

from routing.deadlines import SUSPECT_FACTOR, SUSPECT_FLOOR_S, StepTimes
from routing.health import PeerHealth


def test_an_unmeasured_peer_is_suspected_after_the_floor_or_its_prediction() -> None:
    times = StepTimes()
    assert times.suspect_after_s("A") == SUSPECT_FLOOR_S
    assert times.suspect_after_s("A", predicted_s=3.0) == 3.0  # a long prefill chunk


def test_the_deadline_follows_a_peers_own_steps() -> None:
    times = StepTimes()
    for _ in range(50):
        times.observe("fast", 0.02, tokens=1)
        times.observe("slow", 0.4, tokens=1)
    assert times.suspect_after_s("fast") == SUSPECT_FLOOR_S  # 3 x 20 ms is below the floor
    slow = times.suspect_after_s("slow")
    assert SUSPECT_FACTOR * 0.4 * 0.99 <= slow <= 2.0  # steady: about 3 steps' worth


def test_jitter_widens_the_deadline_and_it_comes_back_once_steps_steady() -> None:
    times = StepTimes()
    for seconds in [0.1, 0.5] * 20:
        times.observe("jittery", seconds, tokens=1)
    wide = times.suspect_after_s("jittery")
    assert wide > SUSPECT_FACTOR * 0.3  # mean 0.3 s, but steps vary by 0.4 s
    for _ in range(80):
        times.observe("jittery", 0.3, tokens=1)
    assert times.suspect_after_s("jittery") < wide


def test_prefill_chunks_and_unusable_samples_are_not_decode_steps() -> None:
    times = StepTimes()
    times.observe("A", 9.0, tokens=512)  # a prompt chunk says nothing about decode steps
    times.observe("A", math.nan, tokens=1)
    times.observe("A", -1.0, tokens=1)
    assert times.suspect_after_s("A") == SUSPECT_FLOOR_S


def test_the_table_of_peers_is_bounded() -> None:
    times = StepTimes(max_peers=3)
    for peer in "ABCD":
        times.observe(peer, 1.0, tokens=1)
    assert times.suspect_after_s("A") == SUSPECT_FLOOR_S  # forgotten: the oldest
    assert times.suspect_after_s("D") > SUSPECT_FLOOR_S


def test_a_hung_peer_stays_banned_until_it_answers() -> None:
    now = [0.0]
    health = PeerHealth(base_ban_s=2.0, max_ban_s=120.0, clock=lambda: now[0])
    health.observe_rtt("H", 0.01)
    health.on_hung("H")
    now[0] = 10_000.0  # far past any timed ban
    assert health.is_banned("H") and health.is_hung("H") and health.hung() == {"H"}
    assert health.on_failure("H") == math.inf  # its streams failing says nothing new
    health.on_success("H")
    assert not health.is_banned("H") and not health.is_hung("H") and not health.hung()


@pytest.mark.parametrize("rtt", [True, False])
def test_an_answer_forgives_a_hung_peer_whether_or_not_its_round_trip_is_known(
    rtt: bool,
) -> None:
    health = PeerHealth()
    if rtt:
        health.observe_rtt("H", 0.01)
    health.on_hung("H")
    health.on_success("H")
    assert not health.is_banned("H")
