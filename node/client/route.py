"""Choosing a chain for a chat: wait until the swarm covers the model, measure, solve; and re-plan
after a failure without the servers that failed (or with those that came back)."""

from __future__ import annotations

import time

import torch
import trio
from llmswarm.models.local import ClientModel
from llmswarm.node import config
from llmswarm.node.client.failover import Bans, Replan
from llmswarm.node.client.observed import Observed
from llmswarm.node.discovery.directory import Directory
from llmswarm.node.discovery.swarm_view import (
    coverage_gaps,
    dial_records,
    live_records,
    measure_rtts,
    punch_holes,
    to_snapshot,
)
from llmswarm.node.errors import WireError
from llmswarm.node.host import Host
from llmswarm.node.wire.codec import WIRE_DTYPES, torch_dtype
from llmswarm.routing import Hop, NoRouteError, SolveResult, solve


async def wait_for_coverage(directory: Directory, model: str, num_blocks: int,
                            timeout_s: float = config.COVERAGE_WAIT_S) -> list:
    """Live records of `model` once they cover every block; NoRouteError naming the gap otherwise."""
    deadline = time.monotonic() + timeout_s
    while True:
        records = live_records(directory.records(model), model, num_blocks)
        gaps = coverage_gaps(records, num_blocks)
        if records and not gaps:
            return records
        if time.monotonic() > deadline:
            where = ", ".join(f"{a}:{b}" for a, b in gaps) if records else f"0:{num_blocks}"
            raise NoRouteError(f"no server of {model} covers blocks {where} (waited {timeout_s:g} s): "
                               f"start one with `llmswarm join --model {model} --blocks {where.split(',')[0]}`")
        await trio.sleep(0.25)
        await directory.refresh()


async def plan_route(host: Host, directory: Directory, model: ClientModel, solver: str, prefer: str,
                     max_length: int, banned: frozenset[str] = frozenset(),
                     coverage_wait_s: float = config.COVERAGE_WAIT_S,
                     exact_weights: bool = False, relay: bool = True,
                     known_rtts: dict[str, float] | None = None,
                     observed: Observed | None = None) -> tuple[SolveResult, dict[str, str]]:
    """Measure the live servers and solve; `relay=False` (`--no-relay`) prices every hop through the
    client. `names` says how each server is called and reached (e.g. "home (relayed)"). `known_rtts`:
    round trips measured lately by the caller (`llmswarm api` measures every server every few seconds
    for all its requests); only the servers missing from it are pinged now. `observed`: what this client
    measured and checked itself (speeds in place of claims, distrusted servers left out)."""
    name, num_blocks = model.spec.name, model.cfg.num_blocks
    records = await wait_for_coverage(directory, name, num_blocks, coverage_wait_s)
    usable = [r for r in records if r.peer_id not in banned]  # excluded anyway: no dial, no ping timeout
    await dial_records(host, usable)
    await punch_holes(host, [r.peer_id for r in usable])
    rtts = {p: t for p, t in (known_rtts or {}).items() if p in host.connected_peers()}
    if missing := [r.peer_id for r in usable if r.peer_id not in rtts]:
        rtts.update(await measure_rtts(host, missing))
    reach = {pid: host.reach(pid) for pid in rtts}
    snapshot = to_snapshot(records, name, num_blocks, rtts, reach)
    if observed is not None:
        observed.annotate(snapshot)
    result = solve(snapshot, solver=solver, prefer=prefer, seed=0, banned=banned, need_cache_tokens=max_length,
                   time_budget_s=config.CHAT_SOLVE_BUDGET_S, exact_weights=exact_weights, relay=relay)
    names = {r.peer_id: (r.public_name or r.peer_id[-8:]) + (f" ({r.quant})" if r.quant != "none" else "")
             + (f" ({reach[r.peer_id]})" if reach.get(r.peer_id) not in (None, "direct") else "")
             for r in records}
    return result, names


def make_replan(host: Host, directory: Directory, model: ClientModel, solver: str, prefer: str,
                max_length: int, exact_weights: bool = False, relay: bool = True,
                observed: Observed | None = None) -> Replan:
    """How a session finds a new chain after a failure: without the banned servers, except those that
    died and answer again (restarted), waiting up to FAILOVER_WAIT_S for a route to exist."""
    name = model.spec.name

    async def replan(bans: Bans) -> list[Hop]:
        deadline = time.monotonic() + config.FAILOVER_WAIT_S
        while True:
            await directory.refresh()
            try:
                result, _ = await plan_route(host, directory, model, solver, prefer, max_length, bans.active(),
                                             coverage_wait_s=0.0, exact_weights=exact_weights, relay=relay,
                                             observed=observed)
                return result.chosen.chain
            except NoRouteError as e:
                if time.monotonic() > deadline:
                    raise NoRouteError(f"no route for {name} without the failed servers after waiting "
                                       f"{config.FAILOVER_WAIT_S:g} s ({e})") from None
            # No route without them: has a server that died come back (restarted, same peer id)?
            if liftable := bans.liftable():
                records = [r for r in live_records(directory.records(name), name, model.cfg.num_blocks)
                           if r.peer_id in liftable]
                for r in records:
                    await host.disconnect(r.peer_id)
                await dial_records(host, records)
                for peer_id in await measure_rtts(host, [r.peer_id for r in records], count=1):
                    bans.lift(peer_id)
            await trio.sleep(0.2)

    return replan


def route_lines(result: SolveResult, names: dict[str, str]) -> list[str]:
    chain = " -> ".join(f"{names.get(h.peer_id, h.peer_id[-8:])} [{h.start}:{h.end})" for h in result.chosen.chain)
    lines = [f"route: {chain}",
             f"  {result.chosen.latency_s * 1000:.1f} ms/step estimated, {result.solver}: {result.reason}"]
    lines += [f"  demoted {names.get(p, p[-8:])}: {why}" for p, why in result.demoted.items()]
    lines += [f"  left out {names.get(p, p[-8:])}: {why}" for p, why in result.excluded.items()
              if why.startswith("distrusted")]
    return lines


def wire_dtype(name: str | None) -> torch.dtype | None:
    """--wire-dtype: None (the model's dtype) or one of the wire's dtypes; a clear error otherwise."""
    if name is None:
        return None
    if name not in WIRE_DTYPES:
        raise WireError(f"unknown --wire-dtype {name!r}: use one of {', '.join(WIRE_DTYPES)}")
    return torch_dtype(name)
