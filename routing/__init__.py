"""Where requests go: pure planning over a snapshot of the swarm (no network here)."""

from routing.block_selection import choose_blocks
from routing.planner import Hop, plan_route, route_is_usable
from routing.snapshot import SwarmSnapshot, coverage

__all__ = ["Hop", "SwarmSnapshot", "choose_blocks", "coverage", "plan_route", "route_is_usable"]
