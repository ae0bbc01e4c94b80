"""What a host announces and how it dials, with real hosts: a wildcard listen address is never
announced (interface addresses, loopback last, --announce-addr first), and `connect_any` tries a
record's addresses in order under one deadline."""

from __future__ import annotations

import socket
import time

import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from llmswarm.node.errors import NodeError, PeerError
from llmswarm.node.host import dialable_addrs, interface_ipv4s, open_host, quiet_libp2p_logging

quiet_libp2p_logging()


def _host(**kw):
    return open_host(key_pair=create_new_key_pair(), **kw)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_wildcard_listen_announces_interfaces_loopback_last_and_announce_addr_first():
    async def main():
        async with _host(listen_host="0.0.0.0", announce_addrs=["/ip4/203.0.113.7/tcp/4001"]) as h:
            addrs = h.addrs
            assert addrs[0] == f"/ip4/203.0.113.7/tcp/4001/p2p/{h.peer_id}"
            assert not any("/0.0.0.0/" in a for a in addrs)
            port = addrs[-1].split("/")[4]
            assert addrs[-1] == f"/ip4/127.0.0.1/tcp/{port}/p2p/{h.peer_id}"
            assert [a.split("/")[2] for a in addrs[1:]] == interface_ipv4s()
            async with _host() as c:  # the printed (first interface) address is dialable
                assert await c.connect_any(h.peer_id, addrs[1:]) == h.peer_id

    trio.run(main)


def test_bad_announce_addr_is_one_clear_error():
    async def main():
        with pytest.raises(NodeError, match="not a wildcard"):
            async with _host(announce_addrs=["/ip4/0.0.0.0/tcp/1"]):
                pass

    trio.run(main)


def test_connect_any_skips_dead_and_foreign_addresses_in_order():
    async def main():
        async with _host() as server, _host() as other, _host() as client:
            good = server.addrs[0]
            dead = f"/ip4/127.0.0.1/tcp/{_closed_port()}/p2p/{server.peer_id}"
            wildcard = f"/ip4/0.0.0.0/tcp/{good.split('/')[4]}"
            assert dialable_addrs(server.peer_id, [wildcard, other.addrs[0], dead, good]) == [dead, good]
            assert await client.connect_any(server.peer_id, [wildcard, other.addrs[0], dead, good]) == server.peer_id
            assert server.peer_id in client.connected_peers()
            assert other.peer_id not in client.connected_peers()

    trio.run(main)


def test_connect_any_gives_up_within_its_deadline():
    async def main():
        async with _host() as client:
            pid = "12D3KooWJaiSLc6e6djrH4HGhFWUM2cnp5tsGBgVkTLskBrzmFWE"
            # 10.255.255.1 drops SYNs (no route answers): each dial would wait its own timeout
            addrs = [f"/ip4/10.255.255.{i}/tcp/9/p2p/{pid}" for i in range(1, 6)]
            t0 = time.monotonic()
            with pytest.raises(PeerError, match="could not reach peer"):
                await client.connect_any(pid, addrs, deadline_s=1.5)
            assert time.monotonic() - t0 < 3.0
            with pytest.raises(PeerError, match="no address we can dial"):
                await client.connect_any(pid, ["/ip4/0.0.0.0/tcp/9"])

    trio.run(main)
