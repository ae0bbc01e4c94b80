"""Addresses a host announces and dials: interface addresses, the announce factory (what
`get_addrs` returns), --announce-addr parsing, and the dialable subset of a record's addresses."""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import socket
import struct
from typing import Any

import multiaddr
from llmswarm.node import config
from llmswarm.node.errors import NodeError

_WILDCARDS = {"0.0.0.0", "::"}
_SIOCGIFADDR = 0x8915  # linux/sockios.h: an interface's IPv4 address


def interface_ipv4s() -> list[str]:
    """This machine's IPv4 addresses, one per interface that has one: routable ones first,
    link-local after them, loopback last."""
    found: list[str] = []
    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError:
        names = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for name in names:
            try:
                req = struct.pack("256s", name.encode()[:15])
                found.append(socket.inet_ntoa(fcntl.ioctl(s.fileno(), _SIOCGIFADDR, req)[20:24]))
            except OSError:  # no IPv4 address on this interface
                continue
    if not found:
        found = ["127.0.0.1"]

    def rank(ip: str) -> int:
        a = ipaddress.ip_address(ip)
        return 2 if a.is_loopback else 1 if a.is_link_local else 0

    return sorted(dict.fromkeys(found), key=rank)  # sorted() is stable: interface order within a rank


def _ip_and_port(addr: multiaddr.Multiaddr) -> tuple[str | None, str | None]:
    parts = str(addr).split("/")
    ip = parts[2] if len(parts) > 2 and parts[1] in ("ip4", "ip6") else None
    port = parts[4] if len(parts) > 4 and parts[3] == "tcp" else None
    return ip, port


def _announce_factory(raw: Any, candidates: list[multiaddr.Multiaddr],
                      extra: list[multiaddr.Multiaddr]) -> list[multiaddr.Multiaddr]:
    """What the host announces (libp2p's AddrsFactory): `extra` (--announce-addr), then each listen
    address with a wildcard IP replaced by every interface address (loopback held back to the end),
    then the IPs peers observe us at (identify, confirmed by OBSERVED_ADDR_MIN_OBSERVERS distinct
    peers) on our listen port, then loopback. Never a wildcard."""
    out: list[str] = [str(a) for a in extra]
    late: list[str] = []
    ports: list[str] = []
    for addr in candidates:
        ip, port = _ip_and_port(addr)
        if ip is None or port is None:
            continue
        ports.append(port)
        if ip in _WILDCARDS:
            for iface in interface_ipv4s():
                (late if ipaddress.ip_address(iface).is_loopback else out).append(f"/ip4/{iface}/tcp/{port}")
        elif ipaddress.ip_address(ip).is_loopback:
            late.append(str(addr))
        else:
            out.append(str(addr))
    manager = getattr(raw, "_observed_addr_manager", None)
    if manager is not None and ports:
        try:
            observed = manager.addrs(min_observers=config.OBSERVED_ADDR_MIN_OBSERVERS)
        except Exception:  # noqa: BLE001 - a py-libp2p internal: no observed addresses then
            observed = []
        for addr in observed:
            ip, _ = _ip_and_port(addr)
            if ip and ip not in _WILDCARDS and str(addr).startswith("/ip4/"):
                out.append(f"/ip4/{ip}/tcp/{ports[0]}")  # a NAT maps our dials, not our listener:
                # the observed IP with the port we listen on is what a forwarded port would be
    return [multiaddr.Multiaddr(a) for a in dict.fromkeys([*out, *late])]


def _parse_announce_addr(addr: str) -> multiaddr.Multiaddr:
    try:
        ma = multiaddr.Multiaddr(addr)
    except Exception as e:
        raise NodeError(f"bad --announce-addr {addr!r} ({e}); expected e.g. /ip4/203.0.113.7/tcp/31330") from None
    ip, port = _ip_and_port(ma)
    if ip in _WILDCARDS or port is None and not str(ma).startswith("/dns"):
        raise NodeError(f"--announce-addr {addr} must name a dialable host and TCP port "
                        "(e.g. /ip4/203.0.113.7/tcp/31330), not a wildcard")
    return ma


def dialable_addrs(peer_id: str, addrs: list[str]) -> list[str]:
    """Full multiaddrs for `peer_id` from a record's or a LINK's addresses, in order, without
    duplicates, wildcards, or addresses that name another peer."""
    out: list[str] = []
    for a in addrs:
        if not isinstance(a, str) or not a:
            continue
        if "/p2p/" in a:
            if not a.endswith(f"/p2p/{peer_id}"):
                continue
            full = a
        else:
            full = f"{a}/p2p/{peer_id}"
        if full.split("/")[2:3] and full.split("/")[2] in _WILDCARDS:
            continue
        out.append(full)
    return list(dict.fromkeys(out))[: config.MAX_RECORD_ADDRS]


def check_bindable(listen_host: str, port: int) -> None:
    """Bind the address ourselves first, without SO_REUSEPORT: py-libp2p's listener would otherwise
    share a port another process holds (two listeners, dials split between them) and report an
    address this machine does not have as a crash deep in its start-up."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart may reuse a port in TIME_WAIT
        try:
            s.bind((listen_host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise NodeError(f"port {port} on {listen_host} is already in use: pick another --port "
                                "(0 picks a free one) or stop the process holding it") from None
            if e.errno == errno.EADDRNOTAVAIL:
                raise NodeError(f"{listen_host} is not an address of this machine: use one of its own addresses, "
                                "or 0.0.0.0 for all of them") from None
            raise NodeError(f"cannot listen on {listen_host}:{port}: {e.strerror or e}") from None
