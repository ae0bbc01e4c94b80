"""Hypervolume of fronts (objectives to minimise) against one shared reference point."""

from __future__ import annotations

import numpy as np

from .swarm import Route

REF_MARGIN = 0.1  # the reference point sits this share of the range beyond the worst point


def reference_point(fronts: list[list[Route]], objectives: tuple[str, ...]) -> np.ndarray:
    """Worst value of each objective over all the fronts given, pushed out by REF_MARGIN of its range."""
    F = np.array([r.objectives(objectives) for f in fronts for r in f], dtype=float)
    lo, hi = F.min(axis=0), F.max(axis=0)
    span = np.where(hi > lo, hi - lo, np.maximum(np.abs(hi), 1.0))
    return hi + REF_MARGIN * span


def loose_reference_point(fronts: list[list[Route]]) -> np.ndarray:
    """(1.1 x worst latency, 0 tok/s) for latency + throughput: fixed meaning, not range-relative, so
    a front spanning 1% of latency does not turn a 0.4% miss into a 60% hypervolume loss."""
    worst = max(r.latency_s for f in fronts for r in f)
    return np.array([worst * (1 + REF_MARGIN), 0.0])


def latency_gap(front: list[Route], exact: list[Route]) -> float:
    """Worst relative latency excess: for each exact point, the least latency front achieves at
    >= its throughput, over the exact latency, minus 1 (inf if no front point reaches it)."""
    gaps = []
    for e in exact:
        ok = [r.latency_s for r in front if r.throughput >= e.throughput]
        gaps.append(min(ok) / e.latency_s - 1 if ok else float("inf"))
    return max(gaps)


def hypervolume(front: list[Route], objectives: tuple[str, ...], ref: np.ndarray) -> float:
    F = np.array([r.objectives(objectives) for r in front], dtype=float).reshape(-1, len(objectives))
    F = F[(F < ref).all(axis=1)]
    if len(F) == 0:
        return 0.0
    if F.shape[1] == 2:  # sweep: sort by the first objective, add the new slab of each point
        F = F[np.argsort(F[:, 0], kind="stable")]
        hv, best_y = 0.0, ref[1]
        for x, y in F:
            if y < best_y:
                hv += (ref[0] - x) * (best_y - y)
                best_y = y
        return float(hv)
    from pymoo.indicators.hv import HV

    return float(HV(ref_point=ref)(F))
