"""Directory: records spread by RECORD_PUT, snapshots and gossip between real hosts on 127.0.0.1."""

import time

import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from llmswarm.node.discovery.bootstrap import run_bootstrap
from llmswarm.node.discovery.directory import announce_forever, open_directory
from llmswarm.node.discovery.records import ServerRecord, sign_record
from llmswarm.node.errors import RemoteError
from llmswarm.node.host import open_host, quiet_libp2p_logging
from llmswarm.node.identity import peer_id_of
from llmswarm.node.wire.codec import Frame, MsgType

quiet_libp2p_logging()
MODEL = "smollm2-135m"


async def wait_for(predicate, timeout_s=5.0, what="condition"):
    with trio.move_on_after(timeout_s):
        while not predicate():
            await trio.sleep(0.02)
        return
    pytest.fail(f"timed out waiting for {what}")


def record_of(host, **changes):
    return ServerRecord(
        peer_id=host.peer_id, model=MODEL, num_blocks=30, start=0, end=30, addrs=host.addrs, **changes
    )


def test_late_joiner_gets_snapshot_updates_and_offline(tmp_path):
    async def main():
        async with trio.open_nursery() as nursery:
            boot = await nursery.start(run_bootstrap, 0, tmp_path / "boot.key")
            sessions = [0]
            async with (
                open_host(tmp_path / "server.key") as server,
                open_directory(server, [boot], [MODEL]) as sd,
            ):
                announcer = trio.CancelScope()

                async def announce():
                    with announcer:
                        await announce_forever(
                            sd,
                            lambda: record_of(server, sessions=sessions[0]),
                            server.private_key,
                            period_s=0.2,
                        )

                nursery.start_soon(announce)
                await wait_for(lambda: sd.records(MODEL), what="own record")
                t0 = time.monotonic()
                async with (
                    open_host(tmp_path / "client.key") as client,
                    open_directory(client, [boot], [MODEL], snapshot_period_s=0.5) as cd,
                ):
                    # joined later: the first snapshot, pulled before open_directory returns, has it
                    assert [r.peer_id for r in cd.records(MODEL)] == [server.peer_id]
                    assert cd.records(MODEL)[0].state == "online"
                    sessions[0] = 7  # an update reaches the client
                    await wait_for(lambda: cd.records(MODEL)[0].sessions == 7, what="update")
                    announcer.cancel()  # clean exit: a final "offline" record
                    await wait_for(lambda: cd.records(MODEL)[0].state == "offline", what="offline")
                    assert time.monotonic() - t0 < 5
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_record_expires_when_server_stops_announcing(tmp_path):
    async def main():
        async with trio.open_nursery() as nursery:
            boot = await nursery.start(run_bootstrap, 0, tmp_path / "boot.key")
            async with open_host(tmp_path / "s.key") as server, open_directory(server, [boot], [MODEL]) as sd:
                await sd.publish(sign_record(record_of(server).stamped(4.0), server.private_key))
            # the server is gone without saying so; the bootstrap and a client drop it after its TTL
            # (4 s: time for the client to start on a loaded machine and still see it first)
            async with open_host(tmp_path / "c.key") as client, open_directory(client, [boot], [MODEL]) as cd:
                assert len(cd.records(MODEL)) == 1
                await wait_for(lambda: not cd.records(MODEL), timeout_s=6, what="expiry")
                await cd.refresh()
                assert not cd.records(MODEL)  # the bootstrap dropped it too
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_gossip_pushes_without_snapshots(tmp_path):
    """With snapshot pulls far apart, an update can only arrive by gossip (bootstrap relays it)."""

    async def main():
        async with trio.open_nursery() as nursery:
            boot = await nursery.start(run_bootstrap, 0, tmp_path / "boot.key")
            async with (
                open_host(tmp_path / "s.key") as server,
                open_directory(server, [boot], [MODEL]) as sd,
                open_host(tmp_path / "c.key") as client,
                open_directory(client, [boot], [MODEL], snapshot_period_s=3600) as cd,
            ):
                assert not cd.records(MODEL)
                await trio.sleep(1.5)  # let the gossip meshes form (heartbeat 1 s)
                t0 = time.monotonic()
                await sd.publish(sign_record(record_of(server).stamped(60), server.private_key))
                await wait_for(lambda: cd.records(MODEL), timeout_s=3, what="gossiped record")
                assert time.monotonic() - t0 < 3
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_bootstrap_refuses_forged_put(tmp_path):
    async def main():
        async with trio.open_nursery() as nursery:
            boot = await nursery.start(run_bootstrap, 0, tmp_path / "boot.key")
            async with open_host(tmp_path / "m.key") as mallory:
                victim = create_new_key_pair()
                rec = ServerRecord(
                    peer_id=peer_id_of(victim), model=MODEL, num_blocks=30, start=0, end=30, addrs=[]
                )
                data = sign_record(rec.stamped(60), victim.private_key).replace(
                    b'\\"end\\":30', b'\\"end\\":29'
                )
                assert b'\\"end\\":29' in data  # content changed after signing
                peer = await mallory.connect(boot)
                s = await mallory.open_stream(peer, "/llmswarm/records/1")
                with pytest.raises(RemoteError) as info:
                    await s.request(Frame(MsgType.RECORD_PUT, {}, data))
                assert info.value.code == "bad_record"
                s = await mallory.open_stream(peer, "/llmswarm/records/1")
                reply = await s.request(Frame(MsgType.RECORDS_GET, {"model": MODEL}))
                assert reply.type == MsgType.RECORDS and reply.header["lengths"] == []
            nursery.cancel_scope.cancel()

    trio.run(main)
