"""The exact Pareto front over the chain DAG: the ground truth the other solvers are judged by.

Latency + throughput (sum + bottleneck): find the min-latency chain, note its bottleneck b, forbid
every server with throughput <= b, repeat until no chain is left. Each round costs one DAG shortest
path and yields one candidate; a point whose latency a later round matches is dropped. Any Pareto
chain (l*, t*) survives every round whose threshold is below t*, so some round returns a chain with
latency <= l* and throughput >= t*: the front is complete. Cost: (front size) x (one DAG pass).

More objectives (hops, risk): Pareto label setting over the DAG in topological (span end) order
(Martins 1984; the bottleneck is carried as a running min). Labels can multiply; meant for
swarms of hundreds of servers, not thousands.
"""

from __future__ import annotations

import numpy as np

from .graph import ChainGraph
from .swarm import Route

INF = np.inf


def min_latency_chain(g: ChainGraph, allowed: np.ndarray | None = None) -> list[int] | None:
    """Server indices of the min-latency chain over allowed servers (DAG dynamic programme), or None."""
    S = len(g.servers)
    done = np.full(S, INF)  # done[j]: least latency from the client to the end of j's span
    pred = np.full(S, -1, dtype=np.int64)
    for k, p in enumerate(g.positions):
        cov = g.covers[k]
        if p == 0:
            cand, from_ = g.client_half[cov].copy(), np.full(len(cov), -1, dtype=np.int64)
        else:
            ends = g.enders[k]
            d = done[ends]
            if not np.isfinite(d).any():
                continue
            total = d[:, None] + g.hop[k]  # [enders, covers]
            r = np.argmin(total, axis=0)
            cand, from_ = total[r, np.arange(len(cov))], ends[r]
        cand += g.compute[k]
        if allowed is not None:
            cand[~allowed[cov]] = INF
        better = cand < done[cov]
        done[cov[better]], pred[cov[better]] = cand[better], from_[better]
    final = np.where(g.finishes, done + g.client_half, INF)
    last = int(np.argmin(final))
    if not np.isfinite(final[last]):
        return None
    chain = [last]
    while pred[chain[-1]] >= 0:
        chain.append(int(pred[chain[-1]]))
    return chain[::-1]


def exact_front(g: ChainGraph) -> list[Route]:
    """The Pareto front of (latency, throughput), min-latency end first."""
    allowed = np.ones(len(g.servers), dtype=bool)
    points: list[Route] = []
    while (chain := min_latency_chain(g, allowed)) is not None:
        route = g.route(chain)
        while points and points[-1].latency_s >= route.latency_s * (1 - 1e-12):  # same latency, worse
            points.pop()
        points.append(route)
        allowed &= g.thr > route.throughput
    return points


def label_front(g: ChainGraph, objectives: tuple[str, ...]) -> list[Route]:
    """Exact front for any of latency, throughput, hops, risk by Pareto label setting."""
    S = len(g.servers)
    labels: list[list[tuple]] = [[] for _ in range(S)]  # per server: (objs..., chain) to the span end
    for k, p in enumerate(g.positions):
        for col, j in enumerate(g.covers[k]):
            j = int(j)
            entry = g.compute[k][col]
            if p == 0:
                new = [_extend(g, (0.0, INF, 0, 0.0), (), j, g.client_half[j] + entry)]
            else:
                new = [_extend(g, lab[:4], lab[4], j, g.hop[k][row, col] + entry)
                       for row, i in enumerate(g.enders[k]) for lab in labels[int(i)]]
            labels[j] = _pareto(labels[j] + new, objectives)
    finals = [(lab[0] + g.client_half[j],) + lab[1:] for j in np.flatnonzero(g.finishes)
              for lab in labels[int(j)]]
    front = [g.route(list(lab[4])) for lab in _pareto(finals, objectives)]
    return sorted(front, key=lambda r: (r.latency_s, -r.throughput))


def _extend(g: ChainGraph, objs: tuple, chain: tuple, j: int, cost: float) -> tuple:
    lat, thr, hops, risk = objs
    return (lat + cost, min(thr, g.thr[j]), hops + 1, risk + g.risk[j], chain + (j,))


def _key(lab: tuple, objectives: tuple[str, ...]) -> tuple:
    table = {"latency": lab[0], "throughput": -lab[1], "hops": lab[2], "risk": lab[3]}
    return tuple(table[o] for o in objectives)


def _pareto(labels: list[tuple], objectives: tuple[str, ...]) -> list[tuple]:
    """Non-dominated labels; of labels with equal objective values, the first is kept."""
    keyed = sorted(((_key(lab, objectives), lab) for lab in labels), key=lambda t: t[0])
    kept: list[tuple] = []
    for key, lab in keyed:  # lexicographic order: nothing later dominates anything earlier
        if not any(all(a <= b for a, b in zip(kk, key, strict=True)) for kk, _ in kept):
            kept.append((key, lab))
    return [lab for _, lab in kept]
