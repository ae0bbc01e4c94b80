"""Pick one chain from a front by a stated rule, and say why in words."""

from __future__ import annotations

import numpy as np

from .errors import RoutingError
from .swarm import Route

PREFERENCES = ("latency", "throughput", "balanced")


def choose(front: list[Route], prefer: str = "balanced") -> tuple[Route, str]:
    """latency: least latency (ties: more throughput); throughput: most throughput (ties: less
    latency); balanced: the knee, the point farthest from the line joining the two extremes after
    scaling both objectives to [0, 1] (the point that gives up least of one for the other)."""
    if prefer not in PREFERENCES:
        raise RoutingError(f"--prefer must be one of {', '.join(PREFERENCES)}, got {prefer!r}")
    if not front:
        raise RoutingError("the front is empty: nothing to choose from")
    fast = min(front, key=lambda r: (r.latency_s, -r.throughput))
    wide = max(front, key=lambda r: (r.throughput, -r.latency_s))
    n = len(front)
    if prefer == "latency":
        return fast, f"least latency of the {n} front points: {_ms(fast)} per step"
    if prefer == "throughput":
        return wide, f"most throughput of the {n} front points: {wide.throughput:.1f} tok/s"
    if n <= 2 or fast.latency_s == wide.latency_s or fast.throughput == wide.throughput:
        return fast, (f"balanced: front has {n} point(s) with no trade-off in between, "
                      f"took the least latency ({_ms(fast)})")
    x = np.array([(r.latency_s - fast.latency_s) / (wide.latency_s - fast.latency_s) for r in front])
    y = np.array([(wide.throughput - r.throughput) / (wide.throughput - fast.throughput) for r in front])
    dist = (1 - x - y) / np.sqrt(2)  # distance below the line from (0, 1) to (1, 0)
    knee = front[int(np.argmax(dist))]
    dl = knee.latency_s / fast.latency_s - 1
    dt = 1 - knee.throughput / wide.throughput
    return knee, (f"balanced (knee of {n} points): {dl:+.0%} latency vs the fastest chain, "
                  f"{dt:.0%} less throughput than the widest")


def _ms(r: Route) -> str:
    return f"{r.latency_s * 1000:.1f} ms"
