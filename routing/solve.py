"""One entry point: snapshot -> chain graph -> front (by the chosen solver) -> one chosen route."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from .choose import PREFERENCES, choose
from .dijkstra import dijkstra_route
from .errors import RoutingError
from .exact import exact_front, label_front
from .graph import DEFAULT_RTT_S, HOP_OVERHEAD_S, ChainGraph
from .swarm import Route, Snapshot

SOLVERS = ("exact", "nsga2", "dijkstra")
OBJECTIVES = ("latency", "throughput", "hops", "risk")


@dataclass
class SolveResult:
    front: list[Route]  # non-dominated chains, least latency first
    chosen: Route
    reason: str  # why chosen was picked, in words
    solve_time_s: float  # graph build + solver + pick
    solver: str
    objectives: tuple[str, ...]
    excluded: dict[str, str] = field(default_factory=dict)  # peer_id -> why it was left out
    details: dict = field(default_factory=dict)  # solver-specific: generations, seeds, ...
    demoted: dict[str, str] = field(default_factory=dict)  # peer_id -> why it is routed below its claim


def solve(snap: Snapshot, solver: str = "exact", prefer: str = "balanced", *, seed: int = 0,
          banned: frozenset[str] | set[str] = frozenset(), need_cache_tokens: int = 0,
          time_budget_s: float | None = 1.0, pop_size: int = 50, generations: int = 300,
          objectives: tuple[str, ...] = ("latency", "throughput"), nsga_seeds: tuple[str, ...] | None = None,
          nsga_options: dict | None = None,
          default_rtt_s: float = DEFAULT_RTT_S, hop_overhead_s: float = HOP_OVERHEAD_S,
          exact_weights: bool = False, relay: bool = True) -> SolveResult:
    """Route one session through snap. Raises NoRouteError if the eligible servers leave a block
    uncovered, RoutingError on bad arguments. time_budget_s bounds NSGA-II only (None: run all
    generations; a budget that cuts generations makes runs depend on machine speed). exact_weights:
    leave out servers that announce quantised weights (they are listed in `excluded`). relay: the
    session hands hidden states server to server (False: `chat --no-relay`, every hop via the client)."""
    if solver not in SOLVERS:
        raise RoutingError(f"--solver must be one of {', '.join(SOLVERS)}, got {solver!r}")
    if prefer not in PREFERENCES:
        raise RoutingError(f"--prefer must be one of {', '.join(PREFERENCES)}, got {prefer!r}")
    bad = [o for o in objectives if o not in OBJECTIVES]
    core = "latency" in objectives and "throughput" in objectives
    if bad or not core or len(set(objectives)) != len(objectives):
        raise RoutingError(f"objectives must be latency, throughput and any of hops, risk; got {objectives}")
    t0 = time.perf_counter()
    g = ChainGraph(snap.validate(), banned=frozenset(banned), need_cache_tokens=need_cache_tokens,
                   default_rtt_s=default_rtt_s, hop_overhead_s=hop_overhead_s, exact_weights=exact_weights,
                   relay=relay)
    details: dict = {"servers_in_graph": len(g.servers), "graph_time_s": time.perf_counter() - t0}
    if solver == "dijkstra":
        front = [dijkstra_route(g)]
    elif solver == "exact":
        front = exact_front(g) if len(objectives) == 2 else label_front(g, objectives)
    else:
        from .nsga import SEED_KINDS, nsga2_front  # pymoo: 0.25 s of every start that never runs it (join, probe)

        front, run = nsga2_front(g, objectives=objectives, pop_size=pop_size, n_gen=generations,
                                 time_budget_s=time_budget_s, seed=seed,
                                 seeds=SEED_KINDS if nsga_seeds is None else nsga_seeds, **(nsga_options or {}))
        details.update(run)
    chosen, reason = choose(front, prefer)
    if solver == "dijkstra":
        reason = f"the single least-latency chain (petals' Dijkstra): {chosen.latency_s * 1000:.1f} ms/step"
    return SolveResult(front=front, chosen=chosen, reason=reason, solve_time_s=time.perf_counter() - t0,
                       solver=solver, objectives=tuple(objectives), excluded=g.excluded, details=details,
                       demoted=g.demoted)
