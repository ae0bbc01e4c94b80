"""Host wrappers against real hosts on 127.0.0.1: each py-libp2p trap that applies has a test here."""

import os
import signal
import stat
import subprocess
import sys
import textwrap
import time

import pytest
import trio
from llmswarm.node import config
from llmswarm.node.errors import PeerError, RemoteError
from llmswarm.node.host import open_host, quiet_libp2p_logging
from llmswarm.node.identity import load_or_create_identity, peer_id_of
from llmswarm.node.wire.codec import Frame, MsgType, encode_frame

quiet_libp2p_logging()

# A peer in its own process: serves /test/half (writes half a frame, then the process dies) and
# /test/hang (never answers); prints its address and waits.
PEER_SCRIPT = textwrap.dedent(
    """
    import os, sys, trio
    from llmswarm.node.host import open_host, quiet_libp2p_logging
    from llmswarm.node.wire.codec import Frame, MsgType, encode_frame
    quiet_libp2p_logging()

    async def half(stream):
        await stream.recv()
        data = encode_frame(Frame(MsgType.OUTPUT, {"x": 1}, b"y" * 1000))
        await stream.stream.write(data[: len(data) // 2])
        await trio.sleep(0.05)
        os._exit(1)  # killed mid-reply

    async def hang(stream):
        await trio.sleep_forever()

    async def main():
        async with open_host(sys.argv[1], port=0) as host:
            host.set_handler("/test/half", half)
            host.set_handler("/test/hang", hang)
            print(host.addrs[0], flush=True)
            await trio.sleep_forever()

    trio.run(main)
    """
)


@pytest.fixture
def peer_process(tmp_path):
    procs = []

    def start():
        p = subprocess.Popen(
            [sys.executable, "-c", PEER_SCRIPT, str(tmp_path / f"peer{len(procs)}.key")],
            stdout=subprocess.PIPE,
            text=True,
        )
        procs.append(p)
        addr = p.stdout.readline().strip()
        assert addr.startswith("/ip4/127.0.0.1/tcp/"), addr
        return p, addr

    yield start
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGCONT)
            p.kill()
        p.wait(5)


def test_identity_persists_with_mode_0600(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert config.default_identity_path() == tmp_path / "xdg" / "llmswarm" / "identity.key"
    first = peer_id_of(load_or_create_identity())
    path = config.default_identity_path()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600

    async def main():
        async with open_host() as h:
            assert h.peer_id == first
            assert h.addrs[0].endswith(f"/p2p/{first}")
        async with open_host(tmp_path / "other.key") as h:
            assert h.peer_id != first

    trio.run(main)


def test_ping_and_handler_exception_does_not_poison_connection(tmp_path):
    async def boom(stream):
        await stream.recv()
        raise ValueError("handler bug")

    async def main():
        async with open_host(tmp_path / "a.key") as a, open_host(tmp_path / "b.key") as b:
            a.set_handler("/test/boom", boom)
            await b.connect(a.addrs[0])
            for _ in range(2):  # twice: the connection's accept loop must survive: an exception escaping a
                # py-libp2p handler would kill it
                s = await b.open_stream(a.peer_id, "/test/boom")
                with pytest.raises(RemoteError) as info:
                    await s.request(Frame(MsgType.PING), timeout_s=2)
                assert info.value.code == "internal"
                await s.close()
            with trio.fail_after(3):
                rtts = await b.ping(a.peer_id, 5)
            assert len(rtts) == 5 and all(0 < r < 1 for r in rtts)
            assert len(b.libp2p.get_network().get_connections(a.libp2p.get_id())) == 1

    trio.run(main)


def test_truncated_reply_is_peer_error_in_process(tmp_path):
    async def half_then(stream, how):
        await stream.recv()
        data = encode_frame(Frame(MsgType.OUTPUT, {}, b"z" * 100))
        await stream.stream.write(data[:30])
        await (stream.stream.close() if how == "close" else stream.stream.reset())

    async def main():
        async with open_host(tmp_path / "a.key") as a, open_host(tmp_path / "b.key") as b:
            for how in ("close", "reset"):
                a.set_handler(f"/test/{how}", lambda s, how=how: half_then(s, how))
            await b.connect(a.addrs[0])
            for how in ("close", "reset"):
                s = await b.open_stream(a.peer_id, f"/test/{how}")
                with pytest.raises(PeerError, match="mid-message"):
                    await s.request(Frame(MsgType.STEP), timeout_s=3)
                await s.reset()
            assert len(await b.ping(a.peer_id, 1)) == 1

    trio.run(main)


def test_peer_killed_mid_reply_is_detected(tmp_path, peer_process):
    proc, addr = peer_process()

    async def main():
        async with open_host(tmp_path / "c.key") as c:
            peer_id = await c.connect(addr)
            s = await c.open_stream(peer_id, "/test/half")
            with pytest.raises(PeerError, match="mid-message"):
                await s.request(Frame(MsgType.STEP), timeout_s=5)

    trio.run(main)
    assert proc.wait(5) == 1


def test_hung_peer_times_out(tmp_path, peer_process):
    proc, addr = peer_process()

    async def main():
        async with open_host(tmp_path / "c.key") as c:
            peer_id = await c.connect(addr)
            s = await c.open_stream(peer_id, "/test/hang")  # handler that never answers
            t0 = time.monotonic()
            with pytest.raises(PeerError, match="did not answer"):
                await s.request(Frame(MsgType.STEP), timeout_s=0.5)
            assert time.monotonic() - t0 < 1.5
            await s.reset()
            proc.send_signal(signal.SIGSTOP)  # the whole process hangs: no keepalive notices
            t0 = time.monotonic()
            with pytest.raises(PeerError):
                await c.ping(peer_id, 1, timeout_s=0.5)
            with pytest.raises(PeerError):
                await c.open_stream(peer_id, "/test/hang", timeout_s=0.5)
            assert time.monotonic() - t0 < 3

    trio.run(main)


def test_plaintext_only_peer_is_refused(tmp_path):
    from libp2p import new_host
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.security.insecure.transport import PLAINTEXT_PROTOCOL_ID, InsecureTransport
    from multiaddr import Multiaddr

    async def main():
        kp = create_new_key_pair()
        listen = Multiaddr("/ip4/127.0.0.1/tcp/0")
        plain = new_host(
            key_pair=kp, sec_opt={PLAINTEXT_PROTOCOL_ID: InsecureTransport(kp)}, listen_addrs=[listen]
        )
        async with plain.run(listen_addrs=[listen]), open_host(tmp_path / "a.key") as a:
            plain_addr = str(plain.get_addrs()[0])
            with pytest.raises(PeerError):
                await a.connect(plain_addr, timeout_s=3)
            assert not a.connected_peers()

    trio.run(main)


def test_restarted_peer_is_redialable_at_once(tmp_path):
    """Trap 3: a failed dial puts the peer in the swarm's 60 s negative cache."""

    async def main():
        async with open_host(tmp_path / "client.key") as client:
            async with open_host(tmp_path / "server.key") as server:
                addr, port = server.addrs[0], int(server.addrs[0].split("/")[4])
                await client.connect(addr)
            await trio.sleep(0.2)
            with pytest.raises(PeerError):  # the server is down: this dial fails and is cached
                await client.connect(addr, timeout_s=2)
            t0 = time.monotonic()
            async with open_host(tmp_path / "server.key", port=port) as server:
                assert server.addrs[0] == addr
                await client.connect(addr)
                assert len(await client.ping(server.peer_id, 2)) == 2
            assert time.monotonic() - t0 < 5

    trio.run(main)
