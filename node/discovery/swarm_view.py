"""From signed records to a routing snapshot: the bridge between the directory and the solvers."""

from __future__ import annotations

import statistics
from collections import Counter

import trio
from llmswarm.node import config
from llmswarm.node.discovery.directory import is_live
from llmswarm.node.discovery.records import ServerRecord
from llmswarm.node.errors import NodeError, NoPeersError, PeerError, UsageError
from llmswarm.node.host import Host, parse_peer_addr
from llmswarm.routing import ServerInfo, Snapshot


def require_peers(peers: list[str]) -> None:
    """At least one --peers address, and every one of them well-formed (named when it is not)."""
    if not peers:
        raise NoPeersError()
    for addr in peers:
        try:
            parse_peer_addr(addr)
        except PeerError as e:
            raise UsageError(f"--peers: {e}") from None


def live_records(records: list[ServerRecord], model: str, num_blocks: int | None = None,
                 dropped: Counter[str] | None = None) -> list[ServerRecord]:
    """The live records of `model` that make sense for it: a record that names another size of the
    model, a span past its end, or no speed is dropped (and counted in `dropped` by reason), never
    fatal to what is built from the rest. `num_blocks` None: the size most records agree on."""
    live = [r for r in records if r.model == model and is_live(r)]
    if num_blocks is None and live:
        num_blocks = Counter(r.num_blocks for r in live).most_common(1)[0][0]
    good = []
    for r in live:
        why = _unusable(r, num_blocks)
        if why is None:
            good.append(r)
        elif dropped is not None:
            dropped[why] += 1
    return good


def _unusable(r: ServerRecord, num_blocks: int | None) -> str | None:
    if r.num_blocks != num_blocks:
        return "model size"
    if r.end > r.num_blocks:
        return "span"
    return "no speed" if r.inference_rps <= 0 else None


def coverage_gaps(records: list[ServerRecord], num_blocks: int) -> list[tuple[int, int]]:
    """Block ranges no live server covers."""
    covered = [False] * num_blocks
    for r in records:
        for b in range(r.start, min(r.end, num_blocks)):
            covered[b] = True
    gaps, start = [], None
    for b, c in enumerate([*covered, True]):
        if not c and start is None:
            start = b
        elif c and start is not None:
            gaps.append((start, b))
            start = None
    return gaps


async def measure_rtts(host: Host, peer_ids: list[str], count: int = config.CLIENT_PING_COUNT) -> dict[str, float]:
    """Median PING round trip to each peer, concurrently; unreachable peers are left out."""
    rtts: dict[str, float] = {}

    async def one(pid: str) -> None:
        try:
            rtts[pid] = statistics.median(await host.ping(pid, count))
        except PeerError:
            pass

    async with trio.open_nursery() as nursery:
        for pid in peer_ids:
            nursery.start_soon(one, pid)
    return rtts


async def dial_records(host: Host, records: list[ServerRecord]) -> None:
    """Connect to every server we have no connection to yet, concurrently: each through the first of
    its record's addresses that answers, under one overall deadline per server (Host.connect_any)."""
    connected = set(host.connected_peers())

    async def one(r: ServerRecord) -> None:
        try:
            await host.connect_any(r.peer_id, r.addrs)
        except PeerError:
            pass  # left out of the snapshot: it cannot be pinged either

    async with trio.open_nursery() as nursery:
        for r in records:
            if r.peer_id not in connected:
                nursery.start_soon(one, r)


async def punch_holes(host: Host, peer_ids: list[str]) -> None:
    """Try to turn every relayed connection into a direct one (DCUtR), concurrently, before any
    session stream is opened on it; those that fail stay relayed. Needs a dialable listener."""
    if not host.nat.dialable_listener():
        return
    async with trio.open_nursery() as nursery:
        for pid in peer_ids:
            if host.reach(pid) == "relayed":
                nursery.start_soon(host.nat.punch, pid)


def to_snapshot(records: list[ServerRecord], model: str, num_blocks: int, rtts: dict[str, float],
                reach: dict[str, str | None] | None = None) -> Snapshot:
    """`reach`: how we are connected to each server (Host.reach); unknown ones read as their record says."""
    reach = reach or {}
    servers = [
        ServerInfo(
            peer_id=r.peer_id, start=r.start, end=r.end, inference_rps=r.inference_rps, throughput=r.throughput,
            cache_tokens_left=r.cache_tokens_left, rtt_s=rtts.get(r.peer_id), next_rtts=dict(r.next_rtts),
            public_name=r.public_name or None, quant=r.quant, reach=reach.get(r.peer_id) or r.reach,
        )
        for r in records
        if r.peer_id in rtts  # a server we cannot ping cannot serve us either
        and _unusable(r, num_blocks) is None  # one bad record never breaks the snapshot
    ]
    return Snapshot(num_blocks=num_blocks, servers=servers, model=model)


async def fetch_snapshot(model: str, peers: list[str], listen_host: str = config.DEFAULT_LISTEN_HOST) -> Snapshot:
    """A snapshot of `model`'s swarm as seen from here: for `llmswarm route` on a live swarm. With a
    dialable `listen_host`, relayed servers are hole-punched first where DCUtR gets through."""
    from llmswarm.models.registry import resolve
    from llmswarm.node.discovery.directory import open_directory
    from llmswarm.node.host import ephemeral_host

    require_peers(peers)
    name = resolve(model).name
    async with ephemeral_host(listen_host=listen_host) as host, open_directory(host, peers, [name], gossip=False) as d:
        records = live_records(d.records(name), name, resolve(model).num_blocks or None)
        if not records:
            raise NodeError(f"no server announces {name} on this swarm yet")
        await dial_records(host, records)
        await punch_holes(host, [r.peer_id for r in records])
        rtts = await measure_rtts(host, [r.peer_id for r in records])
        return to_snapshot(records, name, records[0].num_blocks, rtts, {p: host.reach(p) for p in rtts})
