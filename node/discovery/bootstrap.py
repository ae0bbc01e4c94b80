"""A bootstrap peer: a host that stores and serves every model's records (RECORDS_GET, RECORD_PUT)
and relays their gossip. Servers and clients dial it first; it never runs a model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio
from llmswarm.node import config
from llmswarm.node.discovery.directory import open_directory
from llmswarm.node.host import open_host


async def run_bootstrap(
    port: int = config.DEFAULT_PORT,
    identity_path: str | Path | None = None,
    task_status: Any = trio.TASK_STATUS_IGNORED,
    *,
    listen_host: str = config.DEFAULT_LISTEN_HOST,
    peers: list[str] | None = None,
    announce_addrs: list[str] | None = None,
    relay_service: bool = True,
) -> None:
    """Serve until cancelled. Reports the full multiaddr (…/p2p/<id>) via task_status.started.
    `peers`: other bootstrap peers to exchange snapshots with (a small replicated registry).
    The reported address is the first one the host announces: with a wildcard listen address, an
    interface address (never 0.0.0.0), or the first `announce_addrs`. `relay_service`: give servers
    behind NAT a circuit-relay slot (on by default: every server and client already reaches us)."""
    async with open_host(identity_path, port=port, listen_host=listen_host, announce_addrs=announce_addrs,
                         relay_service=relay_service) as host:
        async with open_directory(host, peers or [], models=None, require_reachable=False):
            task_status.started(host.addrs[0])
            await trio.sleep_forever()
