"""A server's reachability, kept up to date: AutoNAT asks the bootstrap peers to dial us back; a
private server reserves a circuit-relay slot on public peers (bootstrap peers, and servers that
announce `relay_service`) and renews it; every change wakes the announcer, so the record that tells
clients how to reach us is republished at once, not a period later.

With `--reachability public|private` the check is skipped and the given answer used."""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio
from llmswarm.node import config
from llmswarm.node.discovery.directory import Directory
from llmswarm.node.discovery.swarm_view import live_records
from llmswarm.node.errors import PeerError
from llmswarm.node.host import Host
from llmswarm.node.nat import is_circuit, relay_of

log = logging.getLogger(__name__)


def peer_of(addr: str) -> str | None:
    """The peer id a full multiaddr ends with (…/p2p/ID), else None."""
    return addr.rsplit("/p2p/", 1)[1] if "/p2p/" in addr and not is_circuit(addr) else None


def relay_candidates(bootstrap_addrs: list[str], records: list, self_id: str) -> list[tuple[str, str]]:
    """(peer id, address) of the peers to reserve on, best first: bootstrap peers (they offer relay
    by default), then public servers that announce relay service."""
    out: list[tuple[str, str]] = []
    for a in bootstrap_addrs:
        if (pid := peer_of(a)) and pid != self_id:
            out.append((pid, a))
    for r in records:
        if r.relay_service and r.reach == "direct" and r.peer_id != self_id:
            direct = [a for a in r.addrs if not is_circuit(a)]
            if direct:
                out.append((r.peer_id, direct[0] if "/p2p/" in direct[0] else f"{direct[0]}/p2p/{r.peer_id}"))
    seen: set[str] = set()
    return [(p, a) for p, a in out if not (p in seen or seen.add(p))]


async def keep_reachable(host: Host, directory: Directory, model: str, wake: Callable[[], None]) -> None:
    """Run for the server's life: learn reachability, hold relay reservations while private."""
    nat = host.nat
    next_check = 0.0
    while True:
        now = trio.current_time()
        if now >= next_check:
            peers = [p for a in directory.bootstrap_addrs if (p := peer_of(a)) and p in host.connected_peers()]
            before = nat.reachability
            if peers:
                await nat.check(peers, [a for a in host.addrs if not is_circuit(a)])
                next_check = now + (config.REACHABILITY_RECHECK_S if nat.reachability != "unknown"
                                    else config.REACH_RETRY_S)
            else:
                next_check = now + config.REACH_RETRY_S
            if nat.reachability != before:
                log.info("reachability: %s", nat.reachability)
                wake()
        if nat.reachability == "private":
            await _hold_reservations(host, directory, model, wake)
        elif nat.relay_addrs:
            nat.relay_addrs = []  # public again (a port was forwarded): announce direct addresses only
            wake()
        if nat.reachability == "public":
            pause = next_check - trio.current_time()
        elif nat.reachability == "private" and nat.relay_addrs:
            pause = min(config.RELAY_RESERVATION_REFRESH_S, next_check - trio.current_time())
        else:  # unknown yet, or private with no relay: try again soon
            pause = config.REACH_RETRY_S
        await trio.sleep(max(config.REACH_RETRY_S / 4, pause))


async def _hold_reservations(host: Host, directory: Directory, model: str, wake: Callable[[], None]) -> None:
    """Reserve (or renew) on up to RELAY_MAX_RESERVED relays, re-dialing a relay we lost."""
    nat = host.nat
    before = list(nat.relay_addrs)
    records = live_records(directory.records(model), model)
    held = 0
    for relay_id, addr in relay_candidates(directory.bootstrap_addrs, records, host.peer_id):
        if held >= config.RELAY_MAX_RESERVED:
            break
        try:
            await host.connect_any(relay_id, [addr])
        except PeerError as e:
            log.debug("relay %s unreachable: %s", relay_id[-8:], e)
            nat.relay_addrs = [a for a in nat.relay_addrs if relay_of(a) != relay_id]  # stop announcing it
            continue
        held += bool(await nat.reserve(relay_id, addr))
    if nat.relay_addrs != before:
        wake()
