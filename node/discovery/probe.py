"""`llmswarm probe`: round-trip times from here to every known server, over our own PING protocol."""

from __future__ import annotations

import statistics
import time

import trio
from llmswarm.node.discovery.directory import open_directory
from llmswarm.node.discovery.records import ServerRecord
from llmswarm.node.discovery.swarm_view import dial_records, require_peers
from llmswarm.node.errors import NodeError, PeerError
from llmswarm.node.host import ephemeral_host


async def probe(peers: list[str], model: str | None, count: int = 10) -> list[dict]:
    """One row per live server: median RTT, jitter (stdev), loss, and its announced next-hop RTTs."""
    require_peers(peers)
    async with ephemeral_host() as host, open_directory(host, peers, [model] if model else None, gossip=False) as d:
        now = time.time()
        records = [r for r in d.records(model) if r.state != "offline" and r.expires_at > now]
        if not records:
            raise NodeError(f"no server announces {model or 'any model'} on this swarm")
        await dial_records(host, records)
        rows: list[dict] = []

        async def one(r: ServerRecord) -> None:
            rtts, lost = [], 0
            for _ in range(count):
                try:
                    rtts.extend(await host.ping(r.peer_id, 1))
                except PeerError:
                    lost += 1
            names = {x.peer_id: x.public_name or x.peer_id[-8:] for x in records}
            rows.append({
                "public_name": r.public_name, "peer_id": r.peer_id, "model": r.model, "start": r.start,
                "end": r.end, "state": r.state, "rtt_median_s": statistics.median(rtts) if rtts else None,
                "rtt_jitter_s": statistics.pstdev(rtts) if len(rtts) > 1 else 0.0, "loss": lost / count,
                "next_rtts_s": {names.get(p, p[-8:]): v for p, v in r.next_rtts.items()},
            })

        async with trio.open_nursery() as nursery:
            for r in records:
                nursery.start_soon(one, r)
        return sorted(rows, key=lambda row: (row["model"], row["start"], row["public_name"]))
