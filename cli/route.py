"""`llmswarm route` and `llmswarm bench route`: snapshot -> front -> one chain, shown or as JSON."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from llmswarm.cli import output


def route(
    model: Annotated[str, typer.Option("--model", "-m", help="Model to route (live swarm).")] = "",
    peers: Annotated[list[str] | None, typer.Option("--peers", envvar="LLMSWARM_PEERS",
                                                    help="Bootstrap multiaddrs (live swarm).")] = None,
    solver: Annotated[str, typer.Option(help="nsga2 | exact | dijkstra")] = "nsga2",
    prefer: Annotated[str, typer.Option(help="latency | throughput | balanced (knee)")] = "balanced",
    simulate: Annotated[str | None, typer.Option(help="Synthetic swarm SERVERSxBLOCKS, e.g. 500x80.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the simulator and of NSGA-II.")] = 0,
    snapshot: Annotated[Path | None, typer.Option(help="Read the swarm from this snapshot JSON.")] = None,
    dump: Annotated[Path | None, typer.Option(help="Write the snapshot used to this JSON file.")] = None,
    ban: Annotated[list[str] | None, typer.Option(help="Peer id never to use (repeatable).")] = None,
    need_cache_tokens: Annotated[int, typer.Option(help="KV-cache tokens a server must have free.")] = 0,
    exact_weights: Annotated[bool, typer.Option("--exact-weights",
                                                help="Leave out servers with quantised weights.")] = False,
    time_budget: Annotated[float, typer.Option(help="NSGA-II time budget, seconds.")] = 1.0,
    pop_size: Annotated[int, typer.Option(help="NSGA-II population.")] = 50,
    generations: Annotated[int, typer.Option(help="NSGA-II generations (at most).")] = 300,
    objective: Annotated[list[str] | None,
                         typer.Option(help="Extra objective: hops | risk (repeatable).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON record, nothing else.")] = False,
    plot: Annotated[Path | None, typer.Option(help="Write a scatter of the front to this PNG.")] = None,
    relay: Annotated[bool, typer.Option("--relay/--no-relay",
                                        help="Price chains as `chat` or `chat --no-relay`.")] = True,
    host: Annotated[str, typer.Option("--host", help="Listen address (0.0.0.0: servers behind NAT can be "
                                                     "hole-punched to direct connections).")] = "127.0.0.1",
) -> None:
    """Show the Pareto front of chains through the swarm and the chain picked from it."""
    from llmswarm.routing import solve

    snap = _load_snapshot(model, peers or [], simulate, seed, snapshot, host)
    if dump:
        snap.dump(dump)
        output.info(f"snapshot written to {dump}")
    objectives = ("latency", "throughput", *(objective or []))
    res = solve(snap, solver, prefer, seed=seed, banned=set(ban or []), need_cache_tokens=need_cache_tokens,
                time_budget_s=time_budget, pop_size=pop_size, generations=generations, objectives=objectives,
                exact_weights=exact_weights, relay=relay)
    record = _record(res, snap)
    if plot:
        _plot(res, plot, snap, banned=set(ban or []), need_cache_tokens=need_cache_tokens)
        output.info(f"front plotted to {plot}")
    if json_out:
        output.print_json(record)
    else:
        _render(record)


def bench_route(
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON record, nothing else.")] = False,
    sizes: Annotated[str, typer.Option(help="Server counts, comma-separated.")] = "100,500,2000",
    blocks: Annotated[int, typer.Option(help="Blocks of the simulated model.")] = 80,
    seeds: Annotated[str, typer.Option(help="Simulator seeds, comma-separated (median and worst "
                                            "are reported per size).")] = "0,1,2",
    time_budget: Annotated[float, typer.Option(help="NSGA-II time budget, seconds.")] = 1.0,
    pop_size: Annotated[int, typer.Option(help="NSGA-II population.")] = 50,
    no_seed_chains: Annotated[bool, typer.Option(help="Start NSGA-II from random chains only.")] = False,
    no_local_search: Annotated[bool, typer.Option(help="Switch off NSGA-II's memetic segment re-route "
                                                       "(plain genetic operators only).")] = False,
) -> None:
    """Time exact, Dijkstra and NSGA-II on simulated swarms; NSGA-II's share of the exact hypervolume."""
    from llmswarm.routing.bench import bench, summary
    from llmswarm.routing.nsga import SEED_KINDS

    try:
        size_list = tuple(int(x) for x in sizes.split(","))
        seed_list = tuple(int(x) for x in seeds.split(","))
    except ValueError:
        raise typer.BadParameter("--sizes and --seeds take comma-separated integers") from None
    with output.progress(enabled=not json_out) as report:
        rows = bench(size_list, blocks, seed_list, time_budget, pop_size,
                     () if no_seed_chains else SEED_KINDS, local_search=not no_local_search, progress=report)
    record = {"nsga2_seed_chains": [] if no_seed_chains else list(SEED_KINDS),
              "nsga2_local_search": rows[0]["nsga2_local_search"] if rows else "",
              "note": "NSGA-II is never seeded from exact-front points", "runs": rows, "summary": summary(rows)}
    if json_out:
        output.print_json(record)
        return
    from rich.table import Table

    table = Table(title=f"route solvers, {blocks} blocks; NSGA-II seeds: "
                        f"{', '.join(record['nsga2_seed_chains']) or 'none (random only)'}; "
                        f"memetic step: {record['nsga2_local_search']}")
    for col in ("servers", "seed", "exact s", "pts", "dijk s", "nsga2 s", "gens", "pts ", "HV", "HV loose",
                "lat gap"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r["servers"]), str(r["seed"]), f"{r['exact_time_s']:.3f}", str(r["exact_points"]),
                      f"{r['dijkstra_time_s']:.3f}", f"{r['nsga2_time_s']:.2f}", str(r["nsga2_generations"]),
                      str(r["nsga2_points"]), f"{r['hv_ratio']:.4f}", f"{r['hv_ratio_loose_ref']:.4f}",
                      f"{r['nsga2_max_latency_gap']:.1%}")
    output.console.print(table)
    summ = Table(title="per size over seeds: median (worst)")
    for col in ("servers", "seeds", "exact s", "nsga2 s", "HV", "HV loose", "lat gap"):
        summ.add_column(col, justify="right")
    for s in record["summary"]:
        summ.add_row(str(s["servers"]), ",".join(map(str, s["seeds"])),
                     f"{s['median_exact_time_s']:.3f} ({s['worst_exact_time_s']:.3f})",
                     f"{s['median_nsga2_time_s']:.2f} ({s['worst_nsga2_time_s']:.2f})",
                     f"{s['median_hv_ratio']:.4f} ({s['worst_hv_ratio']:.4f})",
                     f"{s['median_hv_ratio_loose_ref']:.4f}", f"{s['median_nsga2_max_latency_gap']:.1%}")
    output.console.print(summ)
    output.console.print("[dim]times include building the chain graph; HV = NSGA-II / exact hypervolume, "
                         "reference worst+10% of range; HV loose: (1.1 x worst latency, 0 tok/s); lat gap: "
                         "worst NSGA-II latency excess at an exact point's throughput; dijkstra = exact "
                         f"min latency in all runs: {all(r['dijkstra_matches_exact'] for r in rows)}[/dim]")


def _load_snapshot(model: str, peers: list[str], simulate: str | None, seed: int, snapshot: Path | None,
                   listen_host: str = "127.0.0.1"):
    from llmswarm.routing import RoutingError, Snapshot
    from llmswarm.routing.simulate import parse_size, simulate_swarm

    if simulate and snapshot:
        raise typer.BadParameter("give --simulate or --snapshot, not both")
    if snapshot:
        return Snapshot.load(snapshot)
    if simulate:
        return simulate_swarm(*parse_size(simulate), seed=seed)
    try:
        import trio
        from llmswarm.node.discovery.swarm_view import fetch_snapshot
    except ImportError:
        raise RoutingError("live routing needs the swarm layer (llmswarm.node.discovery.swarm_view), which is not "
                           "available yet; use --simulate SERVERSxBLOCKS or --snapshot FILE") from None
    if not model:
        raise typer.BadParameter("--model is required to route through the live swarm")
    from llmswarm.node.client.reputation import Reputation
    from llmswarm.node.host import quiet_libp2p_logging

    quiet_libp2p_logging()  # py-libp2p's warnings are not the user's business
    snap = trio.run(fetch_snapshot, model, peers, listen_host)  # the node layer bounds its own waits
    return Reputation.load().annotate(snap)  # what this client measured and checked, as `chat` routes


def _record(res, snap) -> dict:
    quant = {s.peer_id: s.quant for s in snap.servers}
    reach = {s.peer_id: s.reach for s in snap.servers}

    def point(r):
        return {"latency_s": r.latency_s, "throughput": r.throughput, "hops": r.hops, "risk": r.risk,
                "chain": [{"peer_id": h.peer_id, "start": h.start, "end": h.end, "quant": quant.get(h.peer_id, "none"),
                           "reach": reach.get(h.peer_id, "direct")}
                          for h in r.chain]}

    measured = {s.peer_id: {"observed_rps": s.observed_rps, "announced_rps": s.inference_rps,
                            "distrusted": s.distrusted}
                for s in snap.servers if s.observed_rps is not None or s.distrusted}
    return {"model": snap.model, "num_blocks": snap.num_blocks, "servers": len(snap.servers),
            "solver": res.solver, "objectives": list(res.objectives), "front": [point(r) for r in res.front],
            "chosen": point(res.chosen), "reason": res.reason, "solve_time_s": res.solve_time_s,
            "excluded": res.excluded, "demoted": res.demoted, "measured": measured, "details": res.details}


def _render(record: dict) -> None:
    from rich.table import Table

    chosen = record["chosen"]
    table = Table(title=f"Pareto front: {record['solver']}, {record['servers']} servers, "
                        f"{record['num_blocks']} blocks, {record['solve_time_s']:.3f} s")
    for col in ("", "latency ms", "tok/s", "hops", "chain (peer:start-end)"):
        table.add_column(col, justify="left" if col.startswith("chain") else "right")
    for p in record["front"]:
        mark = "*" if p == chosen else ""
        chain = " > ".join(f"{_short(h['peer_id'])}:{h['start']}-{h['end']}"
                           + ("" if h.get("quant", "none") == "none" else f"[{h['quant']}]")
                           + ("" if h.get("reach", "direct") == "direct" else f" ({h['reach']})") for h in p["chain"])
        table.add_row(mark, f"{p['latency_s'] * 1000:.1f}", f"{p['throughput']:.1f}", str(p["hops"]), chain)
    output.console.print(table)
    output.console.print(f"[bold]chosen[/bold]: {chosen['latency_s'] * 1000:.1f} ms/step, "
                         f"{chosen['throughput']:.1f} tok/s, {chosen['hops']} servers. {record['reason']}")
    if record["excluded"]:
        n = len(record["excluded"])
        why = ", ".join(sorted(set(record["excluded"].values())))
        output.console.print(f"[dim]{n} server(s) excluded: {why}[/dim]")
    for peer, why in record["demoted"].items():
        output.console.print(f"[yellow]demoted[/yellow] {_short(peer)}: {why}")
    if record["measured"]:
        output.console.print(f"[dim]{len(record['measured'])} server(s) routed on speeds this client measured "
                             "(`llmswarm trust` lists them)[/dim]")
    if record["details"].get("seeds") is not None:
        d = record["details"]
        output.console.print(f"[dim]nsga2: {d['generations']} generations x {d['pop_size']}, seeded with "
                             f"{', '.join(d['seeds']) or 'random chains only'}[/dim]")


def _short(peer_id: str) -> str:
    return peer_id if len(peer_id) <= 12 else f"{peer_id[:4]}..{peer_id[-6:]}"


def _plot(res, path: Path, snap=None, banned: set[str] = frozenset(), need_cache_tokens: int = 0) -> None:
    """Scatter the front; for NSGA-II on two objectives also the exact front (hollow markers, computed
    here: one DAG pass per front point) and NSGA-II's hypervolume share in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    title = res.reason
    if res.solver == "nsga2" and snap is not None and len(res.objectives) == 2:
        from llmswarm.routing import solve
        from llmswarm.routing.hypervolume import hypervolume, latency_gap, reference_point

        exact = solve(snap, "exact", banned=banned, need_cache_tokens=need_cache_tokens).front
        ref = reference_point([exact, res.front], res.objectives)
        ratio = hypervolume(res.front, res.objectives, ref) / max(hypervolume(exact, res.objectives, ref), 1e-300)
        ax.scatter([r.latency_s * 1000 for r in exact], [r.throughput for r in exact], s=110,
                   facecolors="none", edgecolors="black", label=f"exact front ({len(exact)} chains)", zorder=3)
        title = (f"NSGA-II vs exact: hypervolume ratio {ratio:.4f}, worst latency gap "
                 f"{latency_gap(res.front, exact):.1%}\n{res.reason}")
    ax.scatter([r.latency_s * 1000 for r in res.front], [r.throughput for r in res.front], s=25,
               label=f"front ({res.solver}, {len(res.front)} chains)", zorder=4)
    ax.scatter([res.chosen.latency_s * 1000], [res.chosen.throughput], marker="*", s=250, c="red",
               label="chosen", zorder=5)
    ax.set_xlabel("latency per decode step (ms)")
    ax.set_ylabel("chain throughput (tokens/s)")
    ax.set_title(title, fontsize=8, wrap=True)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
