"""The data plane (node/dataplane.py) through real libp2p hosts and real TLS and Unix sockets on
127.0.0.1 (in-process servers, tiny Llama): a server whose data plane cannot be reached, or that
presents another certificate, is used over libp2p instead and the outputs stay equal to the local
span's; the listener refuses whatever is not a live offer's token over TLS, bounds every wait, and
keeps serving; malformed and oversized frames over TLS are refused like over libp2p. On one host the
streams take the Unix socket, unless its listener is not the process the offer names (then TLS).

Tests of the TLS path turn the Unix socket off (`_tls_only`): on 127.0.0.1 it would be taken first."""

from __future__ import annotations

import os
import socket
import ssl
import subprocess

import pytest
import torch
import trio
from llmswarm.node import config, dataplane
from llmswarm.node.client.session import open_session
from llmswarm.node.dataplane import DataPlane
from llmswarm.node.errors import ErrorCode, PeerError, RemoteError, WireError
from llmswarm.node.host import quiet_libp2p_logging
from llmswarm.node.wire.codec import PREFIX, Frame, MsgType
from llmswarm.node.wire.direct import Direct, DirectOffer
from llmswarm.node.wire.messages import Error, Open, Opened, Step
from llmswarm.node.wire.stream import FramedStream
from llmswarm.node.wire.tls import TlsTransport

quiet_libp2p_logging()
MODEL = "tiny"
H = 64
SPANS = [(0, 2), (2, 4), (4, 6)]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _chain_equals_local(swarm, whole) -> list[bool]:
    """A relayed session through all three servers: outputs equal the local span's, bit for bit.
    Returns which of the client's streams went direct."""
    x = torch.randn(1, 5, H)
    steps = [(5 + i, torch.randn(1, 1, H)) for i in range(4)]
    async with open_session(swarm.client, swarm.chain(0, 1, 2), MODEL, H, 64, torch.float32) as s:
        outs = [await s.step(x, 0)]
        for p, tok in steps:
            outs.append(await s.step(tok, p))
        assert s.relayed_pairs == 2
        direct = [span.stream.direct for span in s.spans]
    cache = whole.new_cache(64)
    local = [whole.forward(x, cache, 0)] + [whole.forward(tok, cache, p) for p, tok in steps]
    for remote, ref in zip(outs, local, strict=True):
        torch.testing.assert_close(remote, ref, rtol=0, atol=0)
    return direct


def _links(swarm) -> list[bool]:
    return [sess.link.direct for srv in swarm.servers for sess in srv.sessions.values() if sess.link]


def _tls_only(swarm) -> None:
    for host in swarm.hosts:
        host.dataplane.unix_path = None  # offers made from now on name no Unix socket


def test_unreachable_data_plane_falls_back_to_libp2p(tiny_llama, host_swarm):
    """Server 1 offers a port nobody listens on: the client and server 0 (relay) reach it over
    libp2p; the other streams still go direct."""
    async def fn(swarm, whole):
        _tls_only(swarm)
        swarm.hosts[1].dataplane.port = _closed_port()
        links: list[bool] = []  # the servers' relay links, seen while the session is open
        orig = swarm.servers[0].step

        async def step(session, frame):
            await orig(session, frame)
            links[:] = _links(swarm)
        swarm.servers[0].step = step
        assert await _chain_equals_local(swarm, whole) == [True, False, True]
        assert sorted(links) == [False, True]  # 0 -> 1 on libp2p, 1 -> 2 direct
        assert swarm.hosts[1].peer_id in swarm.client.direct_failed  # not dialled again for a while

    host_swarm(tiny_llama, SPANS, fn, direct=True)


def test_wrong_certificate_is_refused_before_the_token_is_sent(tiny_llama, host_swarm):
    """Server 1's offer leads to an impostor's listener (another certificate): the client refuses it
    without sending the token, and uses libp2p."""
    async def fn(swarm, whole):
        _tls_only(swarm)
        impostor = DataPlane("127.0.0.1")
        await swarm.nursery.start(impostor.serve)
        swarm.hosts[1].dataplane.port = impostor.port
        direct = await _chain_equals_local(swarm, whole)
        assert direct == [True, False, True]
        assert impostor.bound == impostor.refused == 0  # the impostor never saw a DIRECT frame

    host_swarm(tiny_llama, SPANS, fn, direct=True)


def test_no_direct_client_keeps_the_whole_chain_on_libp2p(tiny_llama, host_swarm):
    async def fn(swarm, whole):
        swarm.client.use_direct = False
        direct: list[bool] = []
        orig = swarm.servers[1].step

        async def step(session, frame):
            await orig(session, frame)
            direct[:] = _links(swarm)
        swarm.servers[1].step = step
        assert await _chain_equals_local(swarm, whole) == [False, False, False]
        assert direct == [False, False]  # the servers' links into this session stay on libp2p too
        assert all(h.dataplane.bound == 0 for h in swarm.hosts)

    host_swarm(tiny_llama, SPANS, fn, direct=True)


async def _tls(port: int) -> FramedStream:
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    tls = TlsTransport(dataplane._take_socket(tcp), dataplane._client_context(), server_side=False)
    await tls.handshake()
    return FramedStream(tls)


async def _ends(fs: FramedStream) -> None:
    """The server closes this connection (clean EOF or broken)."""
    with pytest.raises(PeerError):
        with trio.fail_after(10):
            await fs.recv(timeout_s=10)


def test_listener_refuses_bad_connections_bounds_waits_and_keeps_serving(tiny_llama, host_swarm, monkeypatch):
    monkeypatch.setattr(config, "DIRECT_HANDSHAKE_TIMEOUT_S", 0.5)

    async def fn(swarm, whole):
        _tls_only(swarm)
        plane = swarm.hosts[0].dataplane
        # not TLS at all
        tcp = await trio.open_tcp_stream("127.0.0.1", plane.port)
        await tcp.send_all(b"GET / HTTP/1.0\r\n\r\n")
        with trio.fail_after(5):
            assert await _drain(tcp) == b""
        # TLS, then silence: closed after DIRECT_HANDSHAKE_TIMEOUT_S
        await _ends(await _tls(plane.port))
        # a token nobody offered; a valid frame of another type; an oversized prefix; a body on DIRECT
        fs = await _tls(plane.port)
        await fs.send(Direct("ab" * 32).to_frame())
        with pytest.raises(RemoteError) as err:
            Error.raise_if(await fs.recv(timeout_s=5))
        assert err.value.code is ErrorCode.UNKNOWN_SESSION and plane.refused == 1
        for raw in (b"".join([PREFIX.pack(b"LS", config.WIRE_VERSION, int(MsgType.CLOSE), 0, 0)]),
                    PREFIX.pack(b"LS", config.WIRE_VERSION, int(MsgType.DIRECT), 2**31, 0),
                    PREFIX.pack(b"LS", config.WIRE_VERSION, int(MsgType.STEP), 2, 10**6) + b"{}"):
            fs = await _tls(plane.port)
            await fs.stream.write(raw)
            await _ends(fs)
        # a real offer's token is good once
        stream = await swarm.client.open_stream(swarm.hosts[0].peer_id, config.PROTOCOL_INFERENCE)
        opened = Opened.from_frame(await stream.request(Open(MODEL, 0, 2, 64).to_frame()))
        token = opened.direct.token
        assert await dataplane.dial(swarm.client, stream, opened.direct) and stream.direct
        fs = await _tls(plane.port)
        await fs.send(Direct(token).to_frame())
        with pytest.raises(RemoteError):
            Error.raise_if(await fs.recv(timeout_s=5))
        # the moved stream works, and every refused connection has been let go
        await stream.send(Step(1, 0, torch.randn(1, 3, H)).to_frame())
        assert (await stream.recv(timeout_s=10)).type == MsgType.OUTPUT
        await stream.close()
        with trio.fail_after(5):
            while plane._unbound:
                await trio.sleep(0.05)
        # and the next chain still goes direct
        assert await _chain_equals_local(swarm, whole) == [True, True, True]

    host_swarm(tiny_llama, SPANS, fn, direct=True)


async def _drain(tcp: trio.SocketStream) -> bytes:
    """Read until the server closes the connection (a TLS alert may come first); the last read."""
    try:
        while chunk := await tcp.receive_some(1024):
            pass
        return chunk
    except trio.BrokenResourceError:
        return b""


@pytest.mark.parametrize("unix", [False, True], ids=["tls", "unix"])
def test_malformed_and_oversized_frames_over_tls_are_refused_like_over_libp2p(tiny_llama, host_swarm, unix):
    async def fn(swarm, whole):
        if not unix:
            _tls_only(swarm)
        async def session() -> FramedStream:
            stream = await swarm.client.open_stream(swarm.hosts[0].peer_id, config.PROTOCOL_INFERENCE)
            opened = Opened.from_frame(await stream.request(Open(MODEL, 0, 2, 16).to_frame()))
            assert await dataplane.dial(swarm.client, stream, opened.direct)
            return stream

        stream = await session()
        # a malformed STEP is answered, and the session stays usable
        await stream.send(Frame(MsgType.STEP, {"seq": 3, "position": "x"}))
        assert Error.from_frame(await stream.recv(timeout_s=10)).code is ErrorCode.BAD_REQUEST
        await stream.send(Step(4, 0, torch.randn(1, 2, H)).to_frame())
        assert (await stream.recv(timeout_s=10)).type == MsgType.OUTPUT
        # a STEP body above this session's limit (16 tokens x 64 x 4 bytes) is refused unread
        big = Step(5, 2, torch.randn(1, 17, H)).to_frame()
        await stream.send(big)
        with pytest.raises((PeerError, WireError)):
            Error.raise_if(await stream.recv(timeout_s=10))
        # a stream cut mid-frame ends that session only; the server keeps serving others
        stream = await session()
        await stream.stream.write(PREFIX.pack(b"LS", config.WIRE_VERSION, int(MsgType.STEP), 2, 4096) + b"{}")
        await stream.reset()
        assert await _chain_equals_local(swarm, whole) == [True, True, True]

    host_swarm(tiny_llama, SPANS, fn, direct=True)


@pytest.mark.parametrize("unix", [False, True], ids=["tls", "unix"])
def test_a_reply_is_seen_arriving_before_it_is_read(tiny_llama, host_swarm, unix):
    """input_probe: what a drafting client polls between draft forwards (models/speculative.py)."""
    async def fn(swarm, whole):
        if not unix:
            _tls_only(swarm)
        stream = await swarm.client.open_stream(swarm.hosts[0].peer_id, config.PROTOCOL_INFERENCE)
        opened = Opened.from_frame(await stream.request(Open(MODEL, 0, 2, 16).to_frame()))
        assert stream.input_probe() is None  # libp2p: its bytes share the connection, it cannot say
        assert await dataplane.dial(swarm.client, stream, opened.direct)
        probe = stream.input_probe()
        assert type(stream.stream).__name__ == ("SocketTransport" if unix else "TlsTransport")
        assert probe is not None and not probe()
        await stream.send(Step(1, 0, torch.randn(1, 2, H)).to_frame())
        with trio.fail_after(10):
            while not probe():  # nothing reads the stream meanwhile: the server computes and answers
                await trio.sleep(0.01)
        assert (await stream.recv(timeout_s=10)).type == MsgType.OUTPUT
        assert not probe()  # read: nothing more has arrived
        await stream.reset()
        assert probe()  # closed: a read would return at once

    host_swarm(tiny_llama, SPANS, fn, direct=True)


def _transports(swarm) -> list[str]:
    """The transport of each server's client stream, then of each server's relay link."""
    sessions = [sess for srv in swarm.servers for sess in srv.sessions.values()]
    return ([type(sess.client.stream).__name__ for sess in sessions]
            + [type(sess.link.stream).__name__ for sess in sessions if sess.link])


def test_streams_on_one_host_take_the_unix_socket_unless_its_listener_is_another_process(tiny_llama, host_swarm):
    """Every stream of a relayed chain goes over the servers' Unix sockets, outputs equal to local;
    a server whose offer names another process than the one listening there is reached over TLS."""
    async def fn(swarm, whole):
        assert all(h.dataplane.unix_path for h in swarm.hosts)
        seen: list[list[str]] = []
        orig = swarm.servers[2].step

        async def step(session, frame):  # the last server: every link is made by the time it steps
            await orig(session, frame)
            seen.append(_transports(swarm))
        swarm.servers[2].step = step
        assert await _chain_equals_local(swarm, whole) == [True, True, True]
        assert seen[-1] == ["SocketTransport"] * 5  # 3 client streams, 2 relay links
        # the offers of server 1 now name another process: its client stream and the link into it
        # go over TLS instead; the others stay on the Unix sockets
        swarm.hosts[1].dataplane.pid += 1
        seen.clear()
        assert await _chain_equals_local(swarm, whole) == [True, True, True]
        assert seen[-1] == ["SocketTransport", "TlsTransport", "SocketTransport", "TlsTransport", "SocketTransport"]
        assert swarm.hosts[1].peer_id not in swarm.client.direct_failed  # TLS worked: no penalty

    host_swarm(tiny_llama, SPANS, fn, direct=True)


def test_offer_fields_are_validated():
    good = {"port": 4001, "cert": "a" * 64, "token": "b" * 64}
    assert DirectOffer.parse(good) == DirectOffer(4001, "a" * 64, "b" * 64)
    assert DirectOffer.parse(None) is None
    local = {**good, "unix": "/tmp/llmswarm-x/data-plane", "pid": 42}
    assert DirectOffer.parse(local) == DirectOffer(4001, "a" * 64, "b" * 64, "/tmp/llmswarm-x/data-plane", 42)
    assert DirectOffer.parse(DirectOffer.parse(local).to_header()) == DirectOffer.parse(local)
    for bad in ([], {**good, "port": 0}, {**good, "port": 70000}, {**good, "port": "1"}, {**good, "cert": "A" * 64},
                {**good, "token": "b" * 63}, {**good, "cert": None}, {**local, "unix": "relative/path"},
                {**local, "unix": "/" + "x" * 200}, {**local, "unix": "/a\0b"}, {**local, "pid": 0},
                {**local, "pid": "42"}, {**good, "pid": 42}, {**good, "unix": "/tmp/x"}):
        with pytest.raises(WireError):
            DirectOffer.parse(bad)
    with pytest.raises(WireError):
        Opened.from_frame(Frame(MsgType.OPENED, {"session": "0" * 32, "max_length": 1, "cache_tokens_left": 1,
                                                 "direct": {"port": 1}}))
    with pytest.raises(WireError):
        Open.from_frame(Frame(MsgType.OPEN, {"model": "m", "start": 0, "end": 1, "max_length": 8, "direct": 1}))
    assert Open.from_frame(Open("m", 0, 1, 8, direct=False).to_frame()).direct is False


def test_certificate_is_pinned_by_hash():
    ctx, cert = dataplane._server_context()
    assert isinstance(ctx, ssl.SSLContext) and len(cert) == 64 and cert != dataplane._server_context()[1]


def test_folders_of_killed_servers_are_swept_and_live_ones_kept(tmp_path):
    """A server killed with -9 leaves its Unix-socket folder; the next server on the host removes it."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    folders = {name: tmp_path / name for name in (
        f"{dataplane.UNIX_FOLDER_PREFIX}{dead.pid}-a1", f"{dataplane.UNIX_FOLDER_PREFIX}{os.getpid()}-b2",
        f"{dataplane.UNIX_FOLDER_PREFIX}{dead.pid}-c3", f"{dataplane.UNIX_FOLDER_PREFIX}x-d4", "llmswarm-other")}
    for folder in folders.values():
        folder.mkdir()
        (folder / "data-plane").touch()
    (folders[f"{dataplane.UNIX_FOLDER_PREFIX}{dead.pid}-c3"] / "notes.txt").touch()  # not only the socket
    assert dataplane.sweep_stale_folders(str(tmp_path)) == 1
    stale = f"{dataplane.UNIX_FOLDER_PREFIX}{dead.pid}-a1"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(set(folders) - {stale})
