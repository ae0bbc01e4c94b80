"""Petals' answer: the single min-latency chain, by Dijkstra from the client back to the client.

Petals runs Dijkstra over a graph of (server, block) nodes with edge weights = RTT/2 + compute; here
the nodes are servers (the cost of i -> j depends on (i, j) only, see graph.py) plus a sink for
"back at the client". The relaxation of one settled server is one numpy operation. It is written
independently of exact.py on purpose: its latency must equal the exact front's minimum latency.
"""

from __future__ import annotations

import heapq

import numpy as np

from .graph import ChainGraph
from .swarm import Route


def dijkstra_route(g: ChainGraph) -> Route:
    S = len(g.servers)
    dist = np.full(S + 1, np.inf)  # dist[j]: client -> end of j's span; dist[S]: back at the client
    pred = np.full(S + 1, -1, dtype=np.int64)
    settled = np.zeros(S + 1, dtype=bool)
    first = g.covers[0]
    dist[first] = g.client_half[first] + g.compute[0]
    heap = [(float(dist[j]), int(j)) for j in first]
    heapq.heapify(heap)
    while heap:
        d, i = heapq.heappop(heap)
        if settled[i] or d > dist[i]:
            continue
        settled[i] = True
        if i == S:
            break
        if g.finishes[i]:
            _relax(heap, dist, pred, np.array([S]), d + g.client_half[i : i + 1], i)
            continue
        k = int(g.pos_of_block[g.end[i]])
        cov = g.covers[k]
        cand = d + g.hop[k][g.row_in_enders[i]] + g.compute[k]
        _relax(heap, dist, pred, cov, cand, i)
    chain = [int(pred[S])]
    while pred[chain[-1]] >= 0:
        chain.append(int(pred[chain[-1]]))
    return g.route(chain[::-1])


def _relax(heap, dist, pred, nodes, cand, i) -> None:
    better = cand < dist[nodes]
    for j, c in zip(nodes[better].tolist(), cand[better].tolist(), strict=True):
        dist[j], pred[j] = c, i
        heapq.heappush(heap, (c, j))
