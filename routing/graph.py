"""The chain DAG of a snapshot and the latency model every solver shares.

A chain enters a server either at block 0 or exactly where the previous server's span ends (petals'
rule), and uses the server up to the end of its span. So the cost of going from server i to server
j depends only on (i, j): a chain is a path in the DAG whose nodes are servers and whose edges are
i -> j for start_j <= end_i < end_j. The edges are grouped by *position* p (block 0 or a span end):
at p, the servers ending at p (`enders`) hand over to the servers covering p (`covers`).

Latency of one decode step (seconds, additive along the chain):
    rtt(client, first)/2
  + sum over servers j entered at block p of (end_j - p) / rps_j                (compute)
  + sum over hops i -> j of rtt(i, j)/2 + hop_overhead_s                        (network + serialise)
  + rtt(last, client)/2
Without relay (`chat --no-relay`) every hop goes back through the client: a hop i -> j costs
rtt(i, client)/2 + rtt(client, j)/2 + hop_overhead_s, so a chain costs the sum of its servers' client
RTTs plus compute; server-to-server RTTs play no part. A server reached through a circuit relay
(`reach` "relayed") is charged what its measured RTTs through the relay show, plus
RELAYED_OVERHEAD_S each time a step's hidden states pass through the relay: on every hop into it
(client or previous server dial it through the relay), and on its output back to the client.
Unknown RTTs are estimated, in this order: measured next_rtts (either direction); the snapshot's
region table; rtt_client_i + rtt_client_j (the triangle bound, right for one-machine swarms);
DEFAULT_RTT_S. Throughput of a chain is the minimum throughput of its servers. rps and throughput are
what the client measured when the snapshot carries `observed_rps`, else what the server announced.
"""

from __future__ import annotations

import math

import numpy as np

from .errors import NoRouteError
from .swarm import Hop, Route, Snapshot

DEFAULT_RTT_S = 0.15  # an unmeasured round trip: a transatlantic guess, so unknown peers look far
HOP_OVERHEAD_S = 0.002  # serialise + deserialise one step's hidden states at a hop
# A relay (py-libp2p circuit relay v2) copies each frame between two yamux streams in Python: ~1 ms
# per pass on 2 busy cores, beyond the link delays that RTTs measured through it already include.
RELAYED_OVERHEAD_S = 0.001
# A server whose announced speed exceeds what the client measured by more than this factor is
# "demoted": it is routed on the measurement (as every measured server is) and named in the result.
# Honest servers measure within ~2x of their claim (the client's figure includes its libp2p hop).
OVERCLAIM_FACTOR = 3.0

class ChainGraph:
    """Eligible servers as arrays, and per-position hop costs. Index k = position, j = server."""

    def __init__(self, snap: Snapshot, *, banned: frozenset[str] | set[str] = frozenset(),
                 need_cache_tokens: int = 0, default_rtt_s: float = DEFAULT_RTT_S,
                 hop_overhead_s: float = HOP_OVERHEAD_S, exact_weights: bool = False, relay: bool = True,
                 relayed_overhead_s: float = RELAYED_OVERHEAD_S):
        self.num_blocks = L = snap.num_blocks
        self.excluded = _excluded(snap, banned, need_cache_tokens, exact_weights)
        self.demoted = demoted(snap)
        cands = [s for s in snap.servers if s.peer_id not in self.excluded]
        _check_coverage(L, cands, self.excluded)
        keep = _useful(L, [(s.start, s.end) for s in cands])
        self.servers = [s for s, k in zip(cands, keep, strict=True) if k]
        S = len(self.servers)
        self.start = np.array([s.start for s in self.servers], dtype=np.int64)
        self.end = np.array([s.end for s in self.servers], dtype=np.int64)
        self.step_s = np.array([1.0 / s.rps for s in self.servers])  # per block: measured beats announced
        self.thr = np.array([s.routed_throughput for s in self.servers], dtype=float)
        self.risk = np.array([-math.log(s.availability) for s in self.servers])
        rtt = np.array([np.nan if s.rtt_s is None else s.rtt_s for s in self.servers])
        self.client_half = np.where(np.isnan(rtt), default_rtt_s, rtt) / 2
        # a relayed server: hidden states to it, and its output to the client, pass through the relay;
        # 16-byte pings measured the link, not the copy of a whole frame in the relay's Python loop
        self.via_relay = np.array([relayed_overhead_s if s.reach == "relayed" else 0.0 for s in self.servers])
        self.client_half = self.client_half + self.via_relay
        self.finishes = self.end == L

        # positions: block 0 and every span end short of L (all reachable after pruning)
        self.positions = np.unique(np.concatenate([[0], self.end[self.end < L]]))
        P = len(self.positions)
        self.pos_of_block = np.full(L + 1, -1, dtype=np.int64)
        self.pos_of_block[self.positions] = np.arange(P)
        order = np.argsort(-self.thr, kind="stable")  # within a position, fastest servers first
        self.covers, self.enders, self.compute = [], [], []
        for p in self.positions:
            c = order[(self.start[order] <= p) & (p < self.end[order])]
            self.covers.append(c)
            self.enders.append(np.flatnonzero(self.end == p) if p > 0 else np.zeros(0, np.int64))
            self.compute.append((self.end[c] - p) * self.step_s[c])  # cost of entering c at p

        rtt_fn = _RttModel(snap, self.servers, rtt, default_rtt_s)
        self.hop = []  # hop[k][row, col]: rtt/2 + overhead from enders[k][row] to covers[k][col]
        for k in range(P):
            rows, cols = self.enders[k], self.covers[k]
            if relay:
                cost = rtt_fn.pairs(rows, cols) / 2 + self.via_relay[cols][None, :]
            else:  # back to the client, then out to the next server
                cost = self.client_half[rows][:, None] + self.client_half[cols][None, :]
            self.hop.append(cost + hop_overhead_s)

        # flat layout for vectorised lookups (NSGA-II decode): hop[k][r, c] = flat_hop[off[k] + r*nc + c]
        self.row_in_enders = np.zeros(S, dtype=np.int64)
        for e in self.enders:
            self.row_in_enders[e] = np.arange(len(e))
        self.ncov = np.array([len(c) for c in self.covers], dtype=np.int64)
        sizes = np.array([h.size for h in self.hop], dtype=np.int64)
        self.hop_off = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        self.flat_hop = np.concatenate([h.ravel() for h in self.hop] + [np.zeros(1)])  # + a pad slot
        self.cover_pad = np.zeros((P, int(self.ncov.max())), dtype=np.int64)
        for k, c in enumerate(self.covers):
            self.cover_pad[k, : len(c)] = c

    # --- chains ---------------------------------------------------------------------------------
    def route(self, chain: list[int]) -> Route:
        """Objective values of a chain given as server indices (each entered where the last ended)."""
        lat, p, prev, hops = 0.0, 0, -1, []
        for j in chain:
            k = int(self.pos_of_block[p])
            col = int(np.flatnonzero(self.covers[k] == j)[0]) if k >= 0 and j in self.covers[k] else -1
            if col < 0:
                raise ValueError(f"server {j} does not cover block {p}")
            if prev < 0:
                lat += self.client_half[j]
            else:
                lat += self.hop[k][self.row_in_enders[prev], col]
            lat += self.compute[k][col]
            hops.append(Hop(self.servers[j].peer_id, int(p), int(self.end[j])))
            prev, p = j, int(self.end[j])
        if p != self.num_blocks:
            raise ValueError("chain stops before the last block")
        lat += self.client_half[prev]
        return Route(chain=hops, latency_s=float(lat), throughput=float(self.thr[chain].min()),
                     hops=len(chain), risk=float(self.risk[chain].sum()))


class _RttModel:
    """Round-trip estimates between servers, vectorised over index arrays (see module docstring)."""

    def __init__(self, snap: Snapshot, servers, client_rtt: np.ndarray, default_rtt_s: float):
        self.client_rtt, self.default = client_rtt, default_rtt_s
        regions = sorted(set(snap.region_rtts) | {b for row in snap.region_rtts.values() for b in row})
        rid = {r: i for i, r in enumerate(regions)}
        self.table = np.full((len(regions) + 1, len(regions) + 1), np.nan)  # last row/col: unknown
        for a, row in snap.region_rtts.items():
            for b, v in row.items():
                self.table[rid[a], rid[b]] = v
                if np.isnan(self.table[rid[b], rid[a]]):
                    self.table[rid[b], rid[a]] = v
        self.region = np.array([rid.get(s.region, len(regions)) if s.region else len(regions)
                                for s in servers], dtype=np.int64)
        index = {s.peer_id: j for j, s in enumerate(servers)}
        self.measured: dict[int, dict[int, float]] = {}
        for i, s in enumerate(servers):  # i's own measurement wins over j's measurement of i
            for peer, v in s.next_rtts.items():
                if (j := index.get(peer)) is not None:
                    self.measured.setdefault(i, {})[j] = v
                    self.measured.setdefault(j, {}).setdefault(i, v)

    def pairs(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """[len(rows), len(cols)] estimated RTT in seconds."""
        if len(rows) == 0:
            return np.zeros((0, len(cols)))
        ci, cj = self.client_rtt[rows][:, None], self.client_rtt[cols][None, :]
        est = np.where(np.isnan(ci) | np.isnan(cj), self.default, ci + cj)
        reg = self.table[self.region[rows][:, None], self.region[cols][None, :]]
        est = np.where(np.isnan(reg), est, reg)
        col_of = {int(j): c for c, j in enumerate(cols)}
        for r, i in enumerate(rows):
            for j, v in self.measured.get(int(i), {}).items():
                if (c := col_of.get(j)) is not None:
                    est[r, c] = v
        return est


def _excluded(snap: Snapshot, banned, need_cache_tokens: int, exact_weights: bool = False) -> dict[str, str]:
    """peer_id -> why it cannot serve this session. A full cache (0 tokens left) always excludes;
    with exact_weights, so do servers whose weights are quantised."""
    need = max(int(need_cache_tokens), 1)
    out = {}
    for s in snap.servers:
        if s.peer_id in banned:
            out[s.peer_id] = "banned"
        elif s.distrusted:
            out[s.peer_id] = f"distrusted: {s.distrusted}"
        elif exact_weights and not s.exact_weights:
            out[s.peer_id] = f"quantised weights ({s.quant})"
        elif s.cache_tokens_left is not None and s.cache_tokens_left < need:
            out[s.peer_id] = f"cache room {s.cache_tokens_left} < {need} tokens"
    return out


def demoted(snap: Snapshot, factor: float = OVERCLAIM_FACTOR) -> dict[str, str]:
    """peer_id -> why it is routed on far less than it announces (measured by the client)."""
    out = {}
    for s in snap.servers:
        if s.observed_rps is not None and s.inference_rps > factor * s.observed_rps:
            out[s.peer_id] = (f"announces {s.inference_rps:.4g} steps/s per block, measured {s.observed_rps:.4g} "
                              f"({s.inference_rps / s.observed_rps:.0f}x less): routed on what it delivers")
    return out


def _check_coverage(L: int, servers, excluded: dict[str, str]) -> None:
    covered = np.zeros(L + 1, dtype=np.int64)
    for s in servers:
        covered[s.start] += 1
        covered[s.end] -= 1
    holes = np.flatnonzero(np.cumsum(covered)[:L] == 0)
    if len(holes):
        ranges = _ranges(holes)
        why = f" ({len(excluded)} servers excluded: banned, distrusted, no cache room or quantised)" if excluded else ""
        raise NoRouteError(f"no eligible server holds block(s) {ranges} of {L}{why}; "
                           "wait for servers to join, or ban fewer")


def _ranges(blocks: np.ndarray) -> str:
    parts, lo = [], int(blocks[0])
    for a, b in zip(blocks[:-1], blocks[1:], strict=True):
        if b != a + 1:
            parts.append(f"{lo}-{int(a)}" if a != lo else f"{lo}")
            lo = int(b)
    last = int(blocks[-1])
    parts.append(f"{lo}-{last}" if last != lo else f"{lo}")
    return ", ".join(parts)


def _useful(L: int, spans: list[tuple[int, int]]) -> list[bool]:
    """Keep a server only if some complete chain passes through it (so every genome is valid)."""
    n = len(spans)
    by_end = sorted(range(n), key=lambda i: -spans[i][1])
    good_at = np.zeros(L + 1, dtype=bool)  # good_at[p]: a chain can go from block p to the end
    good_at[L] = True
    good = [False] * n
    for i in by_end:  # later ends first: a server's successors end strictly later, so are settled
        s, e = spans[i]
        good[i] = bool(good_at[e])
        if good[i]:
            good_at[s:e] = True
    reach_at = np.zeros(L + 1, dtype=bool)  # reach_at[p]: a chain from block 0 can enter at p
    reach_at[0] = True
    keep = [False] * n
    for i in sorted(range(n), key=lambda i: spans[i][1]):
        s, e = spans[i]
        if good[i] and reach_at[s:e].any():
            keep[i] = True
            reach_at[e] = True
    return keep
