"""`llmswarm status`: what the swarm looks like from here, as one plain snapshot dict.

`fetch_status()` takes one snapshot; `watch_status()` keeps a directory open and hands a fresh
snapshot to a callback every `period_s` (it survives servers coming and going). The CLI renders
the dict as a live TUI or prints it with `--json`. JSON fields (stable; new ones may be added):

    time                float   unix seconds when the snapshot was taken
    models              list    one entry per model, sorted by name:
        name                 str     registry name, e.g. "smollm2-135m"
        num_blocks           int     the model's number of transformer blocks
        covered              bool    every block is held by at least one live server ("can serve")
        gaps                 list    [start, end) block ranges no live server holds
        servers_per_block    list[int]    live servers holding each block
        throughput_per_block list[float]  sum of the announced throughput (tokens/s) of those servers
        servers              int     live servers of this model
    servers             list    one entry per server record, sorted by (model, start, public_name):
        public_name          str     the name the server chose ("" if none)
        peer_id              str     libp2p peer id (base58)
        model                str
        start, end           int     hosted blocks [start, end)
        state                str     "joining" | "online" | "offline" (as announced), or "gone":
                                     seen earlier by this `status` run, its record has expired
        throughput           float   announced decode tokens/s through its span
        inference_rps        float   announced decode steps/s per block
        rtt_s                float | null  median PING round trip from here; null if unreachable
        cache_tokens_left    int
        sessions             int
        health               dict    the server's own figures (see node/health.py): cpu_percent,
                                     ram_used_mb, gpus [...], gpu, tokens_served, ...
        version              str     llmswarm version the server runs
        dtype                str
        quant                str     "none" (weights as in dtype), "int8" or "nf4"
        expires_in_s         float   seconds until its record expires (0 for "gone")
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import trio
from llmswarm.node import config
from llmswarm.node.discovery.directory import open_directory
from llmswarm.node.discovery.records import ServerRecord
from llmswarm.node.discovery.swarm_view import coverage_gaps, dial_records, live_records, measure_rtts, require_peers
from llmswarm.node.errors import NodeError
from llmswarm.node.host import Host, ephemeral_host

STATUS_PING_COUNT = 2  # pings per server per refresh: enough for a live RTT, cheap every second
GONE_KEEP_S = 60.0  # a watched server whose record expired stays listed as "gone" this long


class ModelNotCovered(NodeError):
    """`status --model M` when some block of M has no live server (exit code 4)."""


def model_summary(name: str, num_blocks: int, records: list[ServerRecord]) -> dict[str, Any]:
    dropped: Counter[str] = Counter()
    live = live_records(records, name, num_blocks, dropped)
    per_block = [0] * num_blocks
    tput = [0.0] * num_blocks
    for r in live:
        for b in range(r.start, min(r.end, num_blocks)):
            per_block[b] += 1
            tput[b] += r.throughput
    gaps = coverage_gaps(live, num_blocks)
    return {"name": name, "num_blocks": num_blocks, "covered": not gaps, "gaps": [list(g) for g in gaps],
            "servers_per_block": per_block, "throughput_per_block": [round(t, 3) for t in tput],
            "servers": len(live), "dropped_records": dict(dropped)}


def server_row(r: ServerRecord, rtt_s: float | None, now: float, reach: str | None = None) -> dict[str, Any]:
    """`reach`: how this status client is connected to it now; without a connection, what its
    record says ("relayed": behind NAT, reached through a circuit relay)."""
    return {"reach": reach or r.reach, "addrs": list(r.addrs),
            "public_name": r.public_name, "peer_id": r.peer_id, "model": r.model, "start": r.start, "end": r.end,
            "state": r.state, "throughput": round(r.throughput, 3), "inference_rps": round(r.inference_rps, 3),
            "rtt_s": rtt_s, "cache_tokens_left": r.cache_tokens_left, "sessions": r.sessions,
            "health": dict(r.health), "version": r.version, "dtype": r.dtype, "quant": r.quant,
            "expires_in_s": round(max(0.0, r.expires_at - now), 1)}


def build_status(records: list[ServerRecord], rtts: dict[str, float], model: str | None = None,
                 num_blocks: dict[str, int] | None = None, now: float | None = None,
                 reach: dict[str, str | None] | None = None) -> dict[str, Any]:
    """The snapshot dict from records and measured RTTs. `num_blocks` names models to list even
    with no server (e.g. the one asked for with --model)."""
    now = time.time() if now is None else now
    records = [r for r in records if (model is None or r.model == model) and r.expires_at > now]
    sizes = dict(num_blocks or {})
    for r in records:
        sizes.setdefault(r.model, r.num_blocks)
    models = [model_summary(name, sizes[name], records) for name in sorted(sizes)]
    servers = [server_row(r, rtts.get(r.peer_id), now, (reach or {}).get(r.peer_id)) for r in records]
    servers.sort(key=lambda s: (s["model"], s["start"], s["public_name"], s["peer_id"]))
    return {"time": now, "models": models, "servers": servers}


def _wanted_sizes(model: str | None) -> dict[str, int]:
    if model is None:
        return {}
    from llmswarm.models.registry import resolve

    spec = resolve(model)
    return {spec.name: spec.num_blocks}


async def take_snapshot(host: Host, d: Any, model: str | None, sizes: dict[str, int],
                        refresh: bool) -> dict[str, Any]:
    """One snapshot through an open host and directory (`refresh`: pull records first); also what
    `llmswarm api` serves at GET /v1/swarm."""
    if refresh:
        await d.refresh(timeout_s=config.REQUEST_TIMEOUT_S / 2)
    records = d.records(model)
    reachable = [r for r in records if r.state != "offline"]
    with trio.move_on_after(config.REQUEST_TIMEOUT_S / 2):
        await dial_records(host, reachable)
    rtts: dict[str, float] = {}
    with trio.move_on_after(config.REQUEST_TIMEOUT_S / 2):
        rtts = await measure_rtts(host, [r.peer_id for r in reachable if r.peer_id in host.connected_peers()],
                                  STATUS_PING_COUNT)
    return build_status(records, rtts, model, sizes, reach={r.peer_id: host.reach(r.peer_id) for r in records})


async def fetch_status(peers: list[str], model: str | None = None) -> dict[str, Any]:
    """One snapshot of the swarm (every model, or `model` only)."""
    require_peers(peers)
    sizes = _wanted_sizes(model)
    async with ephemeral_host() as host, open_directory(host, peers, [model] if model else None, gossip=False) as d:
        return await take_snapshot(host, d, model, sizes, refresh=False)  # open_directory has just pulled


async def watch_status(peers: list[str], model: str | None, on_snapshot: Callable[[dict[str, Any]], None],
                       stopped: Callable[[], bool], period_s: float = 1.0) -> None:
    """Call `on_snapshot` with a fresh snapshot every `period_s` until `stopped()` is true.
    Servers whose records expired while we watch stay listed as "gone" for GONE_KEEP_S."""
    require_peers(peers)
    sizes = _wanted_sizes(model)
    seen: dict[str, tuple[dict[str, Any], float]] = {}  # (model:peer_id) -> (last row, when last seen)
    async with ephemeral_host() as host, open_directory(host, peers, [model] if model else None, gossip=False) as d:
        first = True
        while not stopped():
            started = time.monotonic()
            snap = await take_snapshot(host, d, model, sizes, refresh=not first)
            first = False
            now = snap["time"]
            current = set()
            for row in snap["servers"]:
                key = f"{row['model']}:{row['peer_id']}"
                current.add(key)
                seen[key] = (row, now)
            for key, (row, when) in list(seen.items()):
                if key in current:
                    continue
                if now - when > GONE_KEEP_S:
                    del seen[key]
                    continue
                snap["servers"].append({**row, "state": "gone", "rtt_s": None, "expires_in_s": 0.0})
            on_snapshot(snap)
            while not stopped() and time.monotonic() - started < period_s:
                await trio.sleep(0.05)
