"""Route solvers against brute force and against each other, on small swarms (fast)."""

from __future__ import annotations

import random

import numpy as np
import pytest
from llmswarm.routing import NoRouteError, ServerInfo, Snapshot, solve
from llmswarm.routing.exact import exact_front, label_front
from llmswarm.routing.graph import HOP_OVERHEAD_S, ChainGraph
from llmswarm.routing.simulate import simulate_swarm

O2 = ("latency", "throughput")


def random_swarm(seed: int, n: int = 9, L: int = 12, full_rtts: bool = True) -> Snapshot:
    """Small random swarm, every block covered, every RTT measured (so brute force needs no estimates)."""
    rng = random.Random(seed)
    servers = [ServerInfo(f"p{i}", 0, rng.randint(1, 5), 0, 0) for i in range(2)]
    for i in range(2, n):
        a = rng.randrange(L)
        servers.append(ServerInfo(f"p{i}", a, min(L, a + rng.randint(1, 6)), 0, 0))
    servers.append(ServerInfo(f"p{n}", rng.randrange(L), L, 0, 0))
    covered = set().union(*(range(s.start, s.end) for s in servers))
    for b in sorted(set(range(L)) - covered):
        servers.append(ServerInfo(f"f{b}", b, b + 1, 0, 0))
    for s in servers:
        s.inference_rps = rng.choice([5.0, 10.0, 20.0, 40.0])
        s.throughput = float(rng.choice([10, 20, 30, 40, 50, 60]))  # ties on purpose
        s.rtt_s = rng.choice([0.01, 0.05, 0.1])
        if full_rtts:
            s.next_rtts = {t.peer_id: rng.choice([0.01, 0.02, 0.2]) for t in servers if t is not s}
    return Snapshot(num_blocks=L, servers=servers).validate()


def brute_force(snap: Snapshot, excluded: set[str] = frozenset()) -> list[tuple[float, float, list[str]]]:
    """Every chain by enumeration, with the latency model written out independently."""
    L = snap.num_blocks
    servers = [s for s in snap.servers if s.peer_id not in excluded]
    out = []

    def walk(p: int, chain: list[ServerInfo]) -> None:
        if p == L:
            lat = chain[0].rtt_s / 2 + chain[-1].rtt_s / 2
            entry = 0
            for i, s in enumerate(chain):
                lat += (s.end - entry) / s.inference_rps
                if i:
                    lat += chain[i - 1].next_rtts[s.peer_id] / 2 + HOP_OVERHEAD_S
                entry = s.end
            out.append((lat, min(s.throughput for s in chain), [s.peer_id for s in chain]))
            return
        for s in servers:
            if s.start <= p < s.end:
                walk(s.end, chain + [s])

    walk(0, [])
    return out


def pareto(points):
    return sorted({(round(lat, 9), thr) for lat, thr, _ in points
                   if not any(l2 <= lat + 1e-12 and t2 >= thr and (l2 < lat - 1e-12 or t2 > thr)
                              for l2, t2, _ in points)})


def as_set(front):
    return sorted({(round(r.latency_s, 9), r.throughput) for r in front})


@pytest.mark.parametrize("seed", range(25))
def test_exact_front_equals_brute_force(seed):
    snap = random_swarm(seed)
    res = solve(snap, "exact")
    assert as_set(res.front) == pareto(brute_force(snap))


@pytest.mark.parametrize("seed", range(8))
def test_label_setting_equals_threshold_method_and_brute_force(seed):
    snap = random_swarm(seed)
    g = ChainGraph(snap)
    assert as_set(label_front(g, O2)) == as_set(exact_front(g))
    # 3 objectives: every brute-force chain is weakly dominated by some label-front chain
    front = label_front(g, ("latency", "throughput", "hops"))
    for lat, thr, chain in brute_force(snap):
        assert any(r.latency_s <= lat + 1e-9 and r.throughput >= thr and r.hops <= len(chain) for r in front)


@pytest.mark.parametrize("seed", range(10))
def test_dijkstra_equals_min_latency_of_exact_front(seed):
    snap = simulate_swarm(60, 24, seed) if seed % 2 else random_swarm(seed, full_rtts=False)
    exact = solve(snap, "exact", prefer="latency")
    dijk = solve(snap, "dijkstra")
    assert dijk.chosen.latency_s == pytest.approx(min(r.latency_s for r in exact.front), rel=1e-12)
    assert exact.chosen.latency_s == pytest.approx(dijk.chosen.latency_s, rel=1e-12)


def _valid(route, snap: Snapshot) -> bool:
    by_id = {s.peer_id: s for s in snap.servers}
    p = 0
    for hop in route.chain:
        s = by_id[hop.peer_id]
        if not (hop.start == p and s.start <= p < s.end and hop.end == s.end):
            return False
        p = hop.end
    return p == snap.num_blocks


@pytest.mark.parametrize("seed", range(4))
def test_nsga2_points_valid_and_never_dominate_exact(seed):
    snap = simulate_swarm(80, 30, seed)
    exact = solve(snap, "exact").front
    res = solve(snap, "nsga2", seed=seed, generations=40, time_budget_s=None)
    for r in res.front:
        assert _valid(r, snap)
        assert not any(r.latency_s < e.latency_s - 1e-12 and r.throughput >= e.throughput or
                       r.latency_s <= e.latency_s + 1e-12 and r.throughput > e.throughput for e in exact)
    assert res.details["seeds"] == ["dijkstra", "fewest-hops", "widest"]


def test_nsga2_seeded_runs_repeat_exactly():
    snap = simulate_swarm(120, 40, 3)
    a = solve(snap, "nsga2", seed=7, generations=30, time_budget_s=None, nsga_seeds=())
    b = solve(snap, "nsga2", seed=7, generations=30, time_budget_s=None, nsga_seeds=())
    assert [(r.latency_s, r.throughput, r.chain) for r in a.front] == \
           [(r.latency_s, r.throughput, r.chain) for r in b.front]
    assert a.details["seeds"] == []


def test_nsga2_with_extra_objectives_gives_valid_chains():
    snap = simulate_swarm(40, 20, 1)
    res = solve(snap, "nsga2", objectives=("latency", "throughput", "hops", "risk"), generations=20,
                time_budget_s=None)
    assert res.front and all(_valid(r, snap) for r in res.front)


def test_three_server_local_swarm_gives_the_obvious_chain():
    servers = [ServerInfo(f"peer{i}", 10 * i, 10 * i + 10, inference_rps=50.0, throughput=100.0,
                          cache_tokens_left=10_000, rtt_s=0.001) for i in range(3)]
    snap = Snapshot(num_blocks=30, servers=servers)
    for solver in ("exact", "nsga2", "dijkstra"):
        res = solve(snap, solver, time_budget_s=None, generations=5)
        assert [(h.peer_id, h.start, h.end) for h in res.chosen.chain] == \
               [("peer0", 0, 10), ("peer1", 10, 20), ("peer2", 20, 30)]
        # 30 blocks / 50 rps + 2 * 0.5 ms client + 2 hops * (1 ms triangle bound / 2 + overhead)
        assert res.chosen.latency_s == pytest.approx(0.6 + 0.001 + 2 * (0.001 + HOP_OVERHEAD_S))


def test_mid_span_entry_only_where_previous_span_ends():
    servers = [ServerInfo("a", 0, 6, 10.0, 50.0, rtt_s=0.01), ServerInfo("b", 3, 10, 100.0, 50.0, rtt_s=0.01)]
    res = solve(Snapshot(num_blocks=10, servers=servers), "exact")
    assert [(h.peer_id, h.start, h.end) for h in res.chosen.chain] == [("a", 0, 6), ("b", 6, 10)]


def test_excluded_servers_never_appear():
    snap = simulate_swarm(150, 30, 5)
    full = {s.peer_id for s in snap.servers if s.cache_tokens_left == 0}
    low = {s.peer_id for s in snap.servers if (s.cache_tokens_left or 10**9) < 50_000}
    best = solve(snap, "exact", prefer="latency").chosen
    banned = {best.chain[0].peer_id}
    assert full  # the simulator fills some caches
    for solver in ("exact", "nsga2", "dijkstra"):
        res = solve(snap, solver, banned=banned, need_cache_tokens=50_000, generations=15, time_budget_s=None)
        used = {h.peer_id for r in res.front for h in r.chain}
        assert not used & (full | low | banned)
        assert set(res.excluded) >= full | low | banned


def test_no_route_when_blocks_uncovered():
    servers = [ServerInfo("a", 0, 5, 10.0, 10.0), ServerInfo("b", 7, 10, 10.0, 10.0)]
    with pytest.raises(NoRouteError, match="5-6"):
        solve(Snapshot(num_blocks=10, servers=servers), "exact")
    servers = [ServerInfo("a", 0, 5, 10.0, 10.0), ServerInfo("b", 5, 10, 10.0, 10.0, cache_tokens_left=0)]
    with pytest.raises(NoRouteError, match="excluded"):
        solve(Snapshot(num_blocks=10, servers=servers), "nsga2")
    with pytest.raises(NoRouteError):
        solve(Snapshot(num_blocks=10, servers=servers[:1]), "dijkstra", banned={"a"})


def test_unreachable_servers_are_pruned_so_every_genome_is_valid():
    # no chain can enter "x" (nobody's span ends inside [2, 5)), nor "b" (entered only after x)
    servers = [ServerInfo("a", 0, 10, 10.0, 10.0), ServerInfo("x", 2, 5, 90.0, 90.0),
               ServerInfo("b", 5, 10, 10.0, 10.0)]
    g = ChainGraph(Snapshot(num_blocks=10, servers=servers))
    assert {s.peer_id for s in g.servers} == {"a"}


def test_archive_front_is_valid_and_non_dominated_across_objectives():
    snap = simulate_swarm(150, 30, 6)
    for objectives in (O2, ("latency", "throughput", "hops")):
        res = solve(snap, "nsga2", seed=1, generations=30, time_budget_s=None, objectives=objectives)
        assert res.details["archive"] is True and res.front
        vecs = [r.objectives(objectives) for r in res.front]
        assert len(set(vecs)) == len(vecs)
        for r in res.front:
            assert _valid(r, snap)
            f = r.objectives(objectives)
            assert not any(all(a <= b for a, b in zip(o, f, strict=True)) and o != f for o in vecs)


def test_nondominated_matches_brute_force():
    from llmswarm.routing.nsga import nondominated

    rng = np.random.default_rng(0)
    for d in (2, 3):
        F = rng.integers(0, 6, size=(60, d)).astype(float)  # many ties on purpose
        keep = set(nondominated(F).tolist())
        for i in range(len(F)):
            dominated = any((F[j] <= F[i]).all() and (F[j] < F[i]).any() for j in range(len(F)))
            first_equal = all(not (F[j] == F[i]).all() for j in range(i))
            assert (i in keep) == (not dominated and first_equal)


def test_segment_reroute_keeps_throughput_and_never_adds_latency():
    from llmswarm.routing.nsga import decode, reroute_segment, sample

    g = ChainGraph(simulate_swarm(300, 40, 2))
    rng = np.random.default_rng(3)
    X = sample(g, 40, rng, {})
    changed = 0
    for x in X:
        before, chains = decode(g, x[None])
        chain = [int(j) for j in chains[0] if j >= 0]
        changed += reroute_segment(g, x, chain, rng, max_hops=3)
        after, new_chains = decode(g, x[None])
        assert after["latency"][0] <= before["latency"][0] + 1e-12
        assert after["throughput"][0] <= before["throughput"][0]  # (negated) bottleneck kept or raised
        route = g.route([int(j) for j in new_chains[0] if j >= 0])  # raises if the chain is invalid
        assert route.latency_s == pytest.approx(after["latency"][0], rel=1e-12)
    assert changed > 0


def test_nsga2_without_local_search_or_archive_still_valid():
    snap = simulate_swarm(100, 30, 4)
    res = solve(snap, "nsga2", generations=20, time_budget_s=None,
                nsga_options={"local": 0.0, "archive": False, "from_archive": 0.0})
    assert res.details["local_search"] == "none" and all(_valid(r, snap) for r in res.front)


def test_nsga2_gives_up_quickly_on_a_swarm_with_few_chains(monkeypatch):
    """pymoo re-mates up to 100 times per generation looking for chains it has not seen; a 3-server
    swarm has one chain, and those retries made every chat's route take 1-2 s. Now a few rounds."""
    import llmswarm.routing.nsga as nsga

    calls = []
    real = nsga.ChainMutation._do
    monkeypatch.setattr(nsga.ChainMutation, "_do", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    servers = [ServerInfo(f"peer{i}", 10 * i, 10 * i + 10, inference_rps=50.0, throughput=100.0,
                          cache_tokens_left=10_000, rtt_s=0.001) for i in range(3)]
    res = solve(Snapshot(num_blocks=30, servers=servers), "nsga2", time_budget_s=None, generations=50)
    assert [h.peer_id for h in res.chosen.chain] == ["peer0", "peer1", "peer2"]
    assert res.details["generations"] <= 3  # nothing new to find: the run ends
    assert len(calls) <= 15, len(calls)  # pymoo's own default retries: 100 rounds
