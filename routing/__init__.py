"""Where requests go: pure planning over a snapshot of the swarm (no network here)."""

from routing.block_selection import choose_blocks
from routing.costs import RouteCosts, hop_cost, step_deadline_s
from routing.health import PeerHealth
from routing.planner import plan_route, route_cost, route_covers
from routing.snapshot import Hop, SwarmSnapshot, coverage

__all__ = [
    "Hop",
    "PeerHealth",
    "RouteCosts",
    "SwarmSnapshot",
    "choose_blocks",
    "coverage",
    "hop_cost",
    "plan_route",
    "route_cost",
    "route_covers",
    "step_deadline_s",
]
