"""Behind NAT, without the WAN bed: the pure parts of node/nat.py, node/server/reach.py and
node/server/pace.py, the latency model's relay flag and reach charge, and real hosts on 127.0.0.1
talking through a circuit relay (reservations, circuits, AutoNAT's dial-back)."""

from __future__ import annotations

import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.host.autonat.autonat import AutoNATService
from libp2p.host.autonat.pb.autonat_pb2 import Message
from libp2p.peer.id import ID
from llmswarm.node.discovery.records import ServerRecord, sign_record, verify_record
from llmswarm.node.errors import WireError
from llmswarm.node.host import open_host, quiet_libp2p_logging
from llmswarm.node.nat import _AutoNAT, circuit_addr, relay_of, verdict
from llmswarm.node.server.pace import ServedSpeed, rtts_changed
from llmswarm.node.server.reach import relay_candidates
from llmswarm.routing import ServerInfo, Snapshot, solve
from llmswarm.routing.graph import HOP_OVERHEAD_S, RELAYED_OVERHEAD_S

quiet_libp2p_logging()
R, S = "12D3KooWRelay", "12D3KooWSelf"


# -- pure ------------------------------------------------------------------------------------------
def test_circuit_addresses_name_the_relay_and_ourselves():
    assert circuit_addr(f"/ip4/10.0.0.1/tcp/1/p2p/{R}", R, S) == f"/ip4/10.0.0.1/tcp/1/p2p/{R}/p2p-circuit/p2p/{S}"
    assert circuit_addr("/ip4/10.0.0.1/tcp/1", R, S) == f"/p2p/{R}/p2p-circuit/p2p/{S}"
    assert relay_of(f"/p2p/{R}/p2p-circuit/p2p/{S}") == R
    assert relay_of(f"/ip4/1.2.3.4/tcp/1/p2p/{S}") is None


@pytest.mark.parametrize("answers,expected", [
    ([True], "public"), ([False], "private"), ([None], "unknown"), ([], "unknown"),
    ([False, True], "public"),  # one real dial-back proves the address works
    ([False, None], "private"), ([None, None, False], "private")])
def test_verdict(answers, expected):
    assert verdict(answers, needed=1) == expected
    assert verdict([True], needed=2) == "unknown"


def test_autonat_dials_only_the_observed_ip_on_advertised_ports():
    import multiaddr

    addrs = [multiaddr.Multiaddr(a).to_bytes() for a in
             ("/ip4/192.168.1.5/tcp/4001", "/ip4/127.0.0.1/tcp/4001", "/ip4/192.168.1.5/tcp/4002",
              f"/p2p/{'12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN'}/p2p-circuit")]
    out = [str(multiaddr.Multiaddr(a)) for a in _AutoNAT._filter_by_observed_ip(addrs, "203.0.113.9")]
    assert out == ["/ip4/203.0.113.9/tcp/4001", "/ip4/203.0.113.9/tcp/4002"]
    assert _AutoNAT._filter_by_observed_ip(addrs, None) == []


def _rec(pid: str, addrs: list[str], relay_service=False, reach="direct"):
    return ServerRecord(peer_id=pid, model="m", num_blocks=2, start=0, end=1, addrs=addrs,
                        relay_service=relay_service, reach=reach)


def test_relay_candidates_bootstrap_first_then_public_relay_servers():
    boot = f"/ip4/10.0.0.1/tcp/1/p2p/{R}"
    recs = [_rec("A", ["/ip4/10.0.0.2/tcp/2/p2p/A"], relay_service=True),
            _rec("B", ["/ip4/10.0.0.3/tcp/3/p2p/B"]),  # no relay service
            _rec("C", ["/p2p/X/p2p-circuit/p2p/C"], relay_service=True, reach="relayed"),  # itself behind NAT
            _rec(S, ["/ip4/10.0.0.4/tcp/4/p2p/" + S], relay_service=True)]  # ourselves
    assert relay_candidates([boot, boot], recs, S) == [(R, boot), ("A", "/ip4/10.0.0.2/tcp/2/p2p/A")]


def test_record_reach_round_trips_and_is_validated():
    kp = create_new_key_pair()
    pid = ID.from_pubkey(kp.public_key).to_base58()
    rec = _rec(pid, [f"/p2p/{R}/p2p-circuit/p2p/{pid}"], reach="relayed").stamped(60)
    back = verify_record(sign_record(rec, kp.private_key))
    assert (back.reach, back.relay_service) == ("relayed", False)
    with pytest.raises(WireError, match="reach"):
        verify_record(sign_record(rec.stamped(60, reach="teleported"), kp.private_key))


def test_served_speed_follows_served_decode_steps():
    pace = ServedSpeed(inference_rps=100.0, prefill_tps=500.0)  # startup: 10 ms per block
    for _ in range(60):  # the machine got busy: 15 blocks now take 300 ms per decode step
        pace.observe(batch=1, tokens=1, blocks=15, seconds=0.3)
    assert pace.inference_rps == pytest.approx(50.0, rel=0.01)
    assert pace.throughput(15) == pytest.approx(1 / 0.3, rel=0.01)
    pace.observe(batch=1, tokens=64, blocks=15, seconds=5.0)  # a prefill is not a decode step
    pace.observe(batch=4, tokens=4, blocks=15, seconds=0.0)  # nonsense timing is ignored
    assert pace.inference_rps == pytest.approx(50.0, rel=0.01)
    for _ in range(60):  # idle again: it recovers
        pace.observe(batch=2, tokens=2, blocks=15, seconds=0.15)
    assert pace.inference_rps == pytest.approx(100.0, rel=0.02)


def test_rtts_changed():
    old = {"a": 0.050, "b": 0.010}
    assert not rtts_changed(old, {"a": 0.055, "b": 0.0115})  # within 20% (and 3 ms)
    assert rtts_changed(old, {"a": 0.070, "b": 0.010})  # +40%
    assert not rtts_changed({"a": 0.001}, {"a": 0.0035})  # +250% but 2.5 ms: jitter
    assert rtts_changed(old, {"a": 0.050})  # a hop vanished
    assert rtts_changed({}, {"a": 0.05})  # the first measurement


# -- latency model -----------------------------------------------------------------------------------
def _chain_snapshot(reach="direct") -> Snapshot:
    # two servers, 1 block each at 100 rps (10 ms); client RTTs 40 and 60 ms; s1 -> s2 measured 20 ms
    return Snapshot(num_blocks=2, servers=[
        ServerInfo("s1", 0, 1, 100.0, 10.0, rtt_s=0.040, next_rtts={"s2": 0.020}),
        ServerInfo("s2", 1, 2, 100.0, 10.0, rtt_s=0.060, reach=reach)])


def test_relay_latency_uses_server_to_server_rtt():
    lat = solve(_chain_snapshot(), "exact").chosen.latency_s
    assert lat == pytest.approx(0.020 + 0.010 + 0.010 + HOP_OVERHEAD_S + 0.010 + 0.030)


def test_no_relay_latency_is_the_sum_of_client_rtts():
    lat = solve(_chain_snapshot(), "exact", relay=False).chosen.latency_s
    assert lat == pytest.approx(0.040 + 0.010 + 0.060 + 0.010 + HOP_OVERHEAD_S)
    for solver in ("dijkstra", "nsga2"):
        assert solve(_chain_snapshot(), solver, relay=False).chosen.latency_s == pytest.approx(lat)


def test_a_relayed_server_is_charged_each_pass_through_its_relay():
    direct = solve(_chain_snapshot(), "exact").chosen.latency_s
    relayed = solve(_chain_snapshot("relayed"), "exact").chosen.latency_s
    assert relayed - direct == pytest.approx(2 * RELAYED_OVERHEAD_S)  # hop in, output out
    snap = Snapshot.loads(_chain_snapshot("relayed").dumps())
    assert snap.servers[1].reach == "relayed"


# -- real hosts on 127.0.0.1 -------------------------------------------------------------------------
def _hosts(n: int, **kw):
    return [open_host(key_pair=create_new_key_pair(), **(kw if i == 0 else {})) for i in range(n)]


def test_server_reached_through_a_relay_and_circuits_independent():
    async def main():
        r_cm, s_cm, c1_cm, c2_cm = _hosts(4, relay_service=True)
        async with r_cm as relay, s_cm as server, c1_cm as c1, c2_cm as c2:
            raddr = relay.addrs[0]
            await server.connect(raddr)
            assert await server.nat.reserve(relay.peer_id, raddr)
            circ = server.addrs[0]  # announced first
            assert circ == f"{raddr}/p2p-circuit/p2p/{server.peer_id}"
            for c in (c1, c2):
                await c.connect(raddr)
                await c.connect(circ)
                assert c.reach(server.peer_id) == "relayed"
                assert len(await c.ping(server.peer_id, 2)) == 2
            assert server.reach(c1.peer_id) == "relayed"
            await c1.disconnect(server.peer_id)  # one circuit ends; the other carries on
            await trio.sleep(0.3)
            assert len(await c2.ping(server.peer_id, 2)) == 2
    trio.run(main)


def test_reservation_refused_without_relay_service():
    async def main():
        r_cm, s_cm = _hosts(2)
        async with r_cm as plain, s_cm as server:
            await server.connect(plain.addrs[0])
            assert not await server.nat.reserve(plain.peer_id, plain.addrs[0])
            assert server.nat.relay_addrs == []
    trio.run(main)


def test_autonat_dial_back_tells_public_from_private():
    async def main():
        a_cm, b_cm = _hosts(2)
        async with a_cm as asker, b_cm as peer:
            await asker.connect(peer.addrs[0])
            assert await asker.nat.check([peer.peer_id], asker.addrs) == "public"
            asker.nat.reachability = "unknown"
            dead = "/ip4/127.0.0.1/tcp/9"  # nobody listens there: a NAT that drops what comes in
            assert await asker.nat.check([peer.peer_id], [dead]) == "private"
            # py-libp2p's own AutoNAT "dials back" over the connection the request came on: it
            # reports the dead address reachable (the bug node/nat.py works around).
            stock = AutoNATService(asker.libp2p, serve=False)
            peer.libp2p.set_stream_handler(*_stock_handler(peer))
            import multiaddr
            status, _ = await stock.query_server(ID.from_base58(peer.peer_id), [multiaddr.Multiaddr(dead).to_bytes()])
            assert status == Message.OK
    trio.run(main)


def _stock_handler(host):
    from libp2p.host.autonat.autonat import AUTONAT_PROTOCOL_ID

    return AUTONAT_PROTOCOL_ID, AutoNATService(host.libp2p, serve=False).handle_stream


def test_a_woken_announcer_publishes_at_once_not_a_period_later():
    from llmswarm.node.discovery.directory import announce_forever

    kp = create_new_key_pair()
    pid = ID.from_pubkey(kp.public_key).to_base58()
    published: list[ServerRecord] = []
    nudge = {"event": trio.Event()}

    class Directory:
        def __init__(self) -> None:
            self.published: set[int] = set()

        async def publish(self, data: bytes) -> None:
            published.append(verify_record(data))
            self.published.add(published[-1].seq)

        def records(self, model: str) -> list[ServerRecord]:
            return published[-1:]

    async def woken() -> None:
        await nudge["event"].wait()
        nudge["event"] = trio.Event()

    rtts = {"next": 0.010}

    def make_record() -> ServerRecord:
        return _rec(pid, [f"/ip4/10.0.0.1/tcp/1/p2p/{pid}"]).stamped(60, next_rtts=dict(rtts))

    async def main():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: announce_forever(Directory(), make_record, kp.private_key, 3600.0,
                                                        ttl_s=60.0, woken=woken))
            with trio.fail_after(5.0):
                while not published:
                    await trio.sleep(0.01)
            await trio.sleep(0.2)
            assert len(published) == 1  # and then it waits (an hour, unless woken)
            rtts["next"] = 0.050  # the link to our next hop changed; the next-hop loop wakes us
            nudge["event"].set()
            with trio.fail_after(5.0):  # an announce period is an hour here
                while len(published) < 2:
                    await trio.sleep(0.01)
            assert published[-1].next_rtts == {"next": 0.050}
            nursery.cancel_scope.cancel()
        assert published[-1].state == "offline"

    trio.run(main)
