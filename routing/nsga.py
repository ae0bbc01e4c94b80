"""NSGA-II over chains (pymoo), with an encoding in which every genome is a valid chain.

Genome: one integer per position k of the chain graph (block 0 and every span end), x[k] in
[0, |covers[k]| - 1]. Decode: at block 0 take covers[0][x[0]], jump to the end of its span, read
the gene of that position, and so on until block L. The graph keeps only servers that lie on some
complete chain, so every genome decodes to a full, valid chain: no repair, no penalty. Genes of
positions the chain never visits are neutral (they carry material for later crossovers).

The whole population is decoded and evaluated at once with numpy (one loop step per hop).

Operators (measured on simulated 80-block swarms, seeds 0-4, 1 s budget, tight-reference
hypervolume ratio vs the exact front; median / worst):
- covers are sorted by throughput, so "servers with throughput >= b at position k" is a prefix
  [0, nok[k, level(b)]) of gene values (one table lookup, see Tables);
- sampling: random genomes clamped to a random throughput threshold (random valid chains at every
  throughput level, not just the low-bottleneck chains uniform genes give);
- two-point crossover: genes are positional, so a child takes A's chain up to a shared position and
  B's after it;
- mutation: re-draw the gene of one hop on the chain; "hold" (50%) also clamps every gene to servers
  at or above the chain's bottleneck (same throughput, look for less latency); "lift" (30%) clamps
  to the next throughput level up (drops the bottleneck server: walks up the front); else free;
- memetic step (30% of offspring, reroute_segment): replace a random run of 1-5 consecutive hops
  (never the whole chain) by the least-latency sub-chain over the same blocks, using only servers at
  or above the chain's bottleneck; a local shortest path on one genome's own chain;
- archive: every non-dominated chain ever evaluated is kept; half the offspring start from a random
  archive chain before mutation, and the run returns the archive's front.
  Before (the first three operators only, final population; seeds 0-2): 500 servers 0.94 / 0.44,
  2000 servers 0.80 / 0.80. After: 500 servers 1.000 / 0.996, 2000 servers 0.97 / 0.94.
  Tried and dropped: duplicate elimination by decoded chain (more mating retries, fewer
  generations, worse fronts than pymoo's genome distance).
Optional seeds are cheap chains any client can build without the exact solver: the min-latency
(Dijkstra) chain, the widest (max-bottleneck) chain, and the fewest-hops greedy chain. Seeds are
NEVER taken from the exact front: that would prove nothing about NSGA-II.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
from pymoo.algorithms.moo.nsga2 import NSGA2
from pymoo.core.mutation import Mutation
from pymoo.core.problem import Problem
from pymoo.operators.crossover.pntx import TwoPointCrossover

from .dijkstra import dijkstra_route
from .graph import ChainGraph
from .swarm import Route

SEED_KINDS = ("dijkstra", "widest", "fewest-hops")
LOCAL_RATE = 0.3  # share of offspring given the memetic segment re-route
LOCAL_HOPS = 5  # longest run of consecutive hops it may replace (never the whole chain)
LIFT_RATE = 0.3  # share of mutations that lift the chain's bottleneck to the next throughput level
FROM_ARCHIVE = 0.5  # share of offspring replaced by an archive chain before mutation
MATING_TRIES = 5  # rounds of mating to fill a generation with new chains (pymoo's default: 100)


class ChainProblem(Problem):
    def __init__(self, g: ChainGraph, objectives: tuple[str, ...]):
        self.g, self.names = g, objectives
        super().__init__(n_var=len(g.positions), n_obj=len(objectives), xl=0, xu=g.ncov - 1, vtype=int)

    def _evaluate(self, X, out, *args, **kwargs):
        objs = decode(self.g, X.astype(np.int64))[0]
        out["F"] = np.column_stack([objs[n] for n in self.names])


def decode(g: ChainGraph, X: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """[N, n_var] genomes -> objective arrays to minimise, and [N, max hops] server indices (-1 pad)."""
    N, L = len(X), g.num_blocks
    rows = np.arange(N)
    lat, thr = np.zeros(N), np.full(N, np.inf)
    hops, risk = np.zeros(N), np.zeros(N)
    k = np.zeros(N, dtype=np.int64)  # current position index
    prev = np.full(N, -1, dtype=np.int64)
    chains = []
    live = rows
    while len(live):
        kk = k[live]
        gene = X[live, kk]
        j = g.cover_pad[kk, gene]
        p = g.positions[kk]
        pv = prev[live]
        at = g.hop_off[kk] + g.row_in_enders[np.maximum(pv, 0)] * g.ncov[kk] + gene
        hop = g.flat_hop[np.where(pv < 0, len(g.flat_hop) - 1, at)]  # first server: no hop
        lat[live] += np.where(pv < 0, g.client_half[j], hop) + (g.end[j] - p) * g.step_s[j]
        thr[live] = np.minimum(thr[live], g.thr[j])
        hops[live] += 1
        risk[live] += g.risk[j]
        step = np.full(N, -1, dtype=np.int64)
        step[live] = j
        chains.append(step)
        prev[live] = j
        fin = g.end[j] == L
        lat[live[fin]] += g.client_half[j[fin]]
        live = live[~fin]
        k[live] = g.pos_of_block[g.end[prev[live]]]
    objs = {"latency": lat, "throughput": -thr, "hops": hops, "risk": risk}
    return objs, np.column_stack(chains)


class Tables:
    """Per-graph lookups shared by the operators (built once per graph, cached on it).

    nok[k, t]: how many servers at position k have throughput >= the t-th largest distinct
    throughput of the swarm (t = 0: none), so "servers at or above b at position k" is the gene
    prefix [0, nok[k, level(b)]) (covers are sorted fastest first)."""

    def __init__(self, g: ChainGraph):
        self.levels = np.unique(g.thr)[::-1]  # distinct throughputs, largest first
        self.nok = np.zeros((len(g.positions), len(self.levels) + 1), dtype=np.int64)
        for k, c in enumerate(g.covers):
            self.nok[k, 1:] = np.searchsorted(-g.thr[c], -self.levels, side="right")
        self.entry_col = {}  # (k, server) -> column of the server in covers[k]
        for k, c in enumerate(g.covers):
            for col, j in enumerate(c.tolist()):
                self.entry_col[(k, j)] = col

    def level(self, b: np.ndarray) -> np.ndarray:
        return np.searchsorted(-self.levels, -np.asarray(b, dtype=float), side="right")

    @staticmethod
    def of(g: ChainGraph) -> Tables:
        t = getattr(g, "_nsga_tables", None)
        if t is None:
            t = g._nsga_tables = Tables(g)
        return t


def n_ok(g: ChainGraph, b: np.ndarray) -> np.ndarray:
    """[N, P] how many servers at each position have throughput >= b[n] (covers sorted by thr desc)."""
    t = Tables.of(g)
    return t.nok[:, t.level(b)].T


def clamp(g: ChainGraph, X: np.ndarray, b: np.ndarray, rng) -> np.ndarray:
    """Re-draw every gene that points below throughput b[n] among the servers at or above it."""
    ok = n_ok(g, b)
    bad = (X >= ok) & (ok > 0)
    X[bad] = (rng.random(int(bad.sum())) * ok[bad]).astype(np.int64)
    return X


def reroute_segment(g: ChainGraph, x: np.ndarray, chain: list[int], rng, max_hops: int = 3) -> bool:
    """Memetic move on ONE genome: pick a random run of 1..max_hops consecutive hops of its chain and
    replace it by the least-latency sub-chain over the same blocks [entry of the first, end of the
    last) that uses only servers at or above the chain's bottleneck and re-joins the rest of the chain
    unchanged. A local shortest path inside a window of the genome's own chain (the chain's other
    hops, and so its throughput, are kept); it never sees the exact front. Edits x in place; True if
    the chain changed."""
    t = Tables.of(g)
    m = len(chain)
    n = int(rng.integers(min(max_hops, max(m - 1, 1)))) + 1  # never the whole chain (unless 1 hop)
    a = int(rng.integers(m - n + 1))
    c = a + n - 1
    thr = g.thr[chain].min()
    lev = int(t.level(thr))
    p_a = 0 if a == 0 else int(g.end[chain[a - 1]])
    E = int(g.end[chain[c]])
    pred = chain[a - 1] if a > 0 else -1
    succ = chain[c + 1] if c + 1 < m else -1
    dist = np.full(len(g.servers), np.inf)  # least latency from the window's entry to the end of j
    back = np.full(len(g.servers), -2, dtype=np.int64)
    k = int(g.pos_of_block[p_a])
    while k < len(g.positions) and g.positions[k] < E:
        cov = g.covers[k][: t.nok[k, lev]]
        use = np.flatnonzero(g.end[cov] <= E)
        if len(use) == 0:
            k += 1
            continue
        if g.positions[k] == p_a:
            cand = (g.client_half[cov[use]] if pred < 0 else g.hop[k][g.row_in_enders[pred], use]).copy()
            src = np.full(len(use), pred, dtype=np.int64)
        else:
            ends = g.enders[k]
            ends = ends[np.isfinite(dist[ends])]
            if len(ends) == 0:
                k += 1
                continue
            total = dist[ends][:, None] + g.hop[k][np.ix_(g.row_in_enders[ends], use)]
            r = np.argmin(total, axis=0)
            cand, src = total[r, np.arange(len(use))], ends[r]
        cand += g.compute[k][use]
        j = cov[use]
        better = cand < dist[j]
        dist[j[better]], back[j[better]] = cand[better], src[better]
        k += 1
    last = np.flatnonzero((g.end == E) & np.isfinite(dist))
    if len(last) == 0:
        return False
    if succ < 0:
        tail = g.client_half[last]
    else:
        kE = int(g.pos_of_block[E])
        tail = g.hop[kE][g.row_in_enders[last], t.entry_col[(kE, succ)]]
    best = int(last[np.argmin(dist[last] + tail)])
    seg = [best]
    while back[seg[-1]] != pred:
        seg.append(int(back[seg[-1]]))
    seg.reverse()
    if seg == chain[a : c + 1]:
        return False
    p = p_a
    for j in seg:
        kk = int(g.pos_of_block[p])
        x[kk] = t.entry_col[(kk, j)]
        p = int(g.end[j])
    return True


class ChainMutation(Mutation):
    """Re-draw one on-chain gene; with probability hold keep the chain's bottleneck (see above);
    then, with probability local, the memetic segment re-route (reroute_segment)."""

    def __init__(self, hold: float = 0.5, local: float = 0.0, local_hops: int = LOCAL_HOPS,
                 lift: float = 0.0, from_archive: float = 0.0, archive: Archive | None = None, **kwargs):
        super().__init__(**kwargs)
        self.hold, self.local, self.local_hops, self.lift = hold, local, local_hops, lift
        self.from_archive, self.archive = from_archive, archive

    def _do(self, problem, X, random_state=None, **kwargs):
        g, rs = problem.g, random_state
        t = Tables.of(g)
        X = X.astype(np.int64)
        arch = self.archive
        if self.from_archive > 0 and arch is not None and len(arch.X):
            swap = np.flatnonzero(rs.random(len(X)) < self.from_archive)
            X[swap] = arch.X[rs.integers(0, len(arch.X), size=len(swap))]
        objs, chains = decode(g, X)
        rows = np.arange(len(X))
        b = -objs["throughput"]
        h = (rs.random(len(X)) * (chains >= 0).sum(1)).astype(np.int64)  # which hop to change
        before = chains[rows, np.maximum(h - 1, 0)]
        k = g.pos_of_block[np.where(h > 0, g.end[before], 0)]
        u = rs.random(len(X))
        hold, lift = u < self.hold, (u >= self.hold) & (u < self.hold + self.lift)
        lev = t.level(b)
        b = np.where(lift, t.levels[np.maximum(lev - 2, 0)], b)  # lift: the next level up
        hold |= lift
        lim = np.where(hold, np.maximum(t.nok[k, t.level(b)], 1), g.ncov[k])
        X[rows, k] = (rs.random(len(X)) * lim).astype(np.int64)
        X[hold] = clamp(g, X[hold], b[hold], rs)
        if self.local > 0:
            pick = np.flatnonzero(rs.random(len(X)) < self.local)
            if len(pick):
                _, ch = decode(g, X[pick])
                for r, row in zip(pick.tolist(), ch, strict=True):
                    reroute_segment(g, X[r], [int(j) for j in row if j >= 0], rs, self.local_hops)
        return X


class Archive:
    """Every non-dominated (objective vector, genome) seen during the run: one genome per objective
    vector, nothing dominated. The run returns the archive's front, not only the last population."""

    def __init__(self, n_obj: int):
        self.F = np.zeros((0, n_obj))
        self.X = np.zeros((0, 0), dtype=np.int64)

    def add(self, X: np.ndarray, F: np.ndarray) -> None:
        X = np.asarray(X, dtype=np.int64)
        F = np.asarray(F, dtype=float)
        if self.X.shape[1] != X.shape[1]:
            self.X = np.zeros((0, X.shape[1]), dtype=np.int64)
        allF, allX = np.vstack([self.F, F]), np.vstack([self.X, X])
        keep = nondominated(allF)
        self.F, self.X = allF[keep], allX[keep]


def nondominated(F: np.ndarray) -> np.ndarray:
    """Indices of the non-dominated rows of F (minimise), one per distinct objective vector, the
    earliest row of equals kept."""
    order = np.lexsort(F.T[::-1])  # by F[:, 0], then F[:, 1], ...; stable
    F = F[order]
    if F.shape[1] == 2:
        # sorted by f0 then f1: a row survives iff its f1 is below every earlier row's f1
        best = np.minimum.accumulate(np.concatenate([[np.inf], F[:-1, 1]]))
        keep = F[:, 1] < best
        return np.sort(order[keep])
    kept: list[int] = []
    for i in range(len(F)):  # lexicographic order: a row can only be dominated by earlier ones
        if kept:
            K = F[kept]
            if ((K <= F[i]).all(axis=1)).any():
                continue
        kept.append(i)
    return np.sort(order[kept])


def sample(g: ChainGraph, pop_size: int, rng, seeded: dict[str, list[int]]) -> np.ndarray:
    """Random chains at random throughput thresholds, the seeded chains in the first rows."""
    X = rng.integers(0, g.ncov, size=(pop_size, len(g.positions)))
    X = clamp(g, X, rng.choice(g.thr, size=pop_size), rng)
    for r, chain in enumerate(list(seeded.values())[:pop_size]):
        X[r] = encode(g, chain, rng)
    return X


def encode(g: ChainGraph, chain: list[int], rng: np.random.Generator) -> np.ndarray:
    """A genome that decodes to chain; genes off the chain are random."""
    x = rng.integers(0, g.ncov)
    p = 0
    for j in chain:
        k = g.pos_of_block[p]
        x[k] = int(np.flatnonzero(g.covers[k] == j)[0])
        p = int(g.end[j])
    return x


def seed_chains(g: ChainGraph) -> dict[str, list[int]]:
    """Cheap chains a client can build alone (no exact front): see SEED_KINDS."""
    index = {s.peer_id: j for j, s in enumerate(g.servers)}
    return {
        "dijkstra": [index[h.peer_id] for h in dijkstra_route(g).chain],
        "widest": _greedy(g, lambda cov, k: int(np.argmax(g.thr[cov]))),
        "fewest-hops": _greedy(g, lambda cov, k: int(np.argmax(g.end[cov]))),
    }


def _greedy(g: ChainGraph, pick: Callable[[np.ndarray, int], int]) -> list[int]:
    """Walk the positions choosing one server per step by a local rule (widest: the fastest server
    holding this block; the chain's bottleneck is then at least as good as any greedy choice)."""
    chain, p = [], 0
    while p < g.num_blocks:
        k = int(g.pos_of_block[p])
        j = int(g.covers[k][pick(g.covers[k], k)])
        chain.append(j)
        p = int(g.end[j])
    return chain


def nsga2_front(g: ChainGraph, *, objectives: tuple[str, ...] = ("latency", "throughput"),
                pop_size: int = 50, n_gen: int = 300, hold: float = 0.5, local: float = LOCAL_RATE,
                local_hops: int = LOCAL_HOPS, lift: float = LIFT_RATE, archive: bool = True,
                from_archive: float = FROM_ARCHIVE,
                time_budget_s: float | None = None,
                seed: int = 0, seeds: tuple[str, ...] = SEED_KINDS) -> tuple[list[Route], dict]:
    """Run NSGA-II; return its non-dominated chains and a record of what it did.

    archive=True returns the front of every chain evaluated during the run (else only the final
    population's); local is the share of offspring given the memetic segment re-route."""
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    problem = ChainProblem(g, objectives)
    seeded = {name: c for name, c in seed_chains(g).items() if name in seeds} if seeds else {}
    arch = Archive(len(objectives))
    mutation = ChainMutation(hold, local, local_hops, lift, from_archive, arch)
    algo = NSGA2(pop_size=pop_size, sampling=sample(g, pop_size, rng, seeded), eliminate_duplicates=True,
                 crossover=TwoPointCrossover(), mutation=mutation)
    # pymoo re-mates up to 100 times to fill a generation with chains not seen before. A small swarm
    # has few chains, and those retries took 1-2 s of a 3-server chat's start for 2 generations;
    # where chains are plenty the first tries fill it anyway.
    algo.mating.n_max_iterations = MATING_TRIES
    algo.setup(problem, termination=("n_gen", n_gen), seed=seed, verbose=False)
    last = time.perf_counter()
    while algo.has_next():
        pop = algo.ask()
        if pop is None or len(pop) == 0:  # no new chain left to try (tiny swarms): the archive is complete
            break
        algo.evaluator.eval(problem, pop, algorithm=algo)
        algo.tell(infills=pop)
        arch.add(pop.get("X"), pop.get("F"))
        now = time.perf_counter()
        if time_budget_s is not None and now + (now - last) - t0 > time_budget_s:
            break  # the next generation would overrun the budget
        last = now
    X = arch.X if archive else np.atleast_2d(algo.opt.get("X")).astype(np.int64)
    routes = _unique_routes(g, X, objectives)
    return routes, {"generations": int(algo.n_gen or 0), "evaluations": int(algo.evaluator.n_eval),
                    "pop_size": pop_size, "seeds": sorted(seeded), "archive": archive,
                    "local_search": f"segment re-route of <= {local_hops} hops on {local:.0%} of offspring"
                    if local > 0 else "none",
                    "operators": f"two-point crossover; re-draw one hop (hold {hold:.0%}, lift {lift:.0%}); "
                                 f"{from_archive:.0%} of offspring start from an archive chain"}


def _unique_routes(g: ChainGraph, X: np.ndarray, objectives: tuple[str, ...]) -> list[Route]:
    _, chains = decode(g, X)
    seen, routes = set(), []
    for row in chains:
        chain = tuple(int(j) for j in row if j >= 0)
        if chain not in seen:
            seen.add(chain)
            routes.append(g.route(list(chain)))
    front = [r for r in routes if not any(_dominates(o, r, objectives) for o in routes)]
    uniq = {r.objectives(objectives): r for r in front}  # one chain per objective vector
    return sorted(uniq.values(), key=lambda r: (r.latency_s, -r.throughput))


def _dominates(a: Route, b: Route, objectives: tuple[str, ...]) -> bool:
    fa, fb = a.objectives(objectives), b.objectives(objectives)
    return all(x <= y for x, y in zip(fa, fb, strict=True)) and fa != fb
