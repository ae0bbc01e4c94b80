"""Benchmark the solvers on simulated swarms: solve times and NSGA-II's share of the exact hypervolume.

All solvers run on the same snapshot in the same process; both fronts are measured against one
reference point (worst value of each objective over both fronts, pushed out 10% of the range:
`hv_ratio`); also against (1.1 x worst latency, 0 tok/s) (`hv_ratio_loose_ref`), and the worst
relative latency excess of NSGA-II at each exact point's throughput (`nsga2_max_latency_gap`).
NSGA-II is seeded only with cheap chains (see nsga.SEED_KINDS), never with exact-front points; its
memetic step (nsga.reroute_segment) re-routes a few hops of one genome's own chain and can be
switched off (local_search=False) to measure the plain genetic operators. Several simulator seeds
per size by default, summarised by the median and the worst ratio (`summary`), so one unlucky
snapshot does not decide.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

from .hypervolume import hypervolume, latency_gap, loose_reference_point, reference_point
from .nsga import SEED_KINDS
from .simulate import simulate_swarm
from .solve import solve

SIZES = (100, 500, 2000)
SEEDS = (0, 1, 2)
BLOCKS = 80
O2 = ("latency", "throughput")


def bench_one(servers: int, blocks: int = BLOCKS, seed: int = 0, time_budget_s: float = 1.0,
              pop_size: int = 50, nsga_seeds: tuple[str, ...] = SEED_KINDS, local_search: bool = True) -> dict:
    snap = simulate_swarm(servers, blocks, seed)
    exact = solve(snap, "exact")
    dijk = solve(snap, "dijkstra")
    t0 = time.perf_counter()
    nsga = solve(snap, "nsga2", seed=seed, time_budget_s=time_budget_s, pop_size=pop_size,
                 generations=100_000, nsga_seeds=nsga_seeds,
                 nsga_options=None if local_search else {"local": 0.0})
    nsga_wall = time.perf_counter() - t0
    ref = reference_point([exact.front, nsga.front], O2)
    hv_exact, hv_nsga = hypervolume(exact.front, O2, ref), hypervolume(nsga.front, O2, ref)
    loose = loose_reference_point([exact.front, nsga.front])
    hv_exact_l, hv_nsga_l = hypervolume(exact.front, O2, loose), hypervolume(nsga.front, O2, loose)
    return {
        "servers": len(snap.servers), "requested_servers": servers, "blocks": blocks, "seed": seed,
        "servers_in_graph": exact.details["servers_in_graph"],
        "graph_time_s": exact.details["graph_time_s"],
        "exact_time_s": exact.solve_time_s, "exact_points": len(exact.front),
        "dijkstra_time_s": dijk.solve_time_s,
        "dijkstra_matches_exact": abs(dijk.chosen.latency_s - exact.front[0].latency_s) <= 1e-9,
        "nsga2_time_s": nsga_wall, "nsga2_points": len(nsga.front),
        "nsga2_generations": nsga.details["generations"], "nsga2_pop_size": pop_size,
        "nsga2_seeds": nsga.details["seeds"], "nsga2_local_search": nsga.details["local_search"],
        "hv_ratio": hv_nsga / hv_exact if hv_exact > 0 else 1.0,  # tight reference point
        "reference_point": [float(x) for x in ref],
        "hv_ratio_loose_ref": hv_nsga_l / hv_exact_l if hv_exact_l > 0 else 1.0,
        "loose_reference_point": [float(x) for x in loose],
        "nsga2_max_latency_gap": latency_gap(nsga.front, exact.front),
    }


def bench(sizes: tuple[int, ...] = SIZES, blocks: int = BLOCKS, seeds: tuple[int, ...] = SEEDS,
          time_budget_s: float = 1.0, pop_size: int = 50, nsga_seeds: tuple[str, ...] = SEED_KINDS,
          local_search: bool = True,
          progress: Callable[[str, float, float | None], None] | None = None) -> list[dict]:
    rows, total = [], len(sizes) * len(seeds)
    for n in sizes:
        for s in seeds:
            if progress:
                progress("bench route", len(rows), total)
            rows.append(bench_one(n, blocks, s, time_budget_s, pop_size, nsga_seeds, local_search))
    if progress:
        progress("bench route", total, total)
    return rows


def summary(rows: list[dict]) -> list[dict]:
    """Per requested size (rows grouped in order): median and worst over the seeds."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["blocks"], r["requested_servers"]), []).append(r)
    out = []
    for (blocks, n), rs in groups.items():
        med = {k: statistics.median(r[k] for r in rs) for k in
               ("exact_time_s", "nsga2_time_s", "hv_ratio", "hv_ratio_loose_ref", "nsga2_max_latency_gap")}
        out.append({"servers": n, "blocks": blocks, "seeds": [r["seed"] for r in rs],
                    **{f"median_{k}": v for k, v in med.items()},
                    "worst_hv_ratio": min(r["hv_ratio"] for r in rs),
                    "worst_exact_time_s": max(r["exact_time_s"] for r in rs),
                    "worst_nsga2_time_s": max(r["nsga2_time_s"] for r in rs)})
    return out
