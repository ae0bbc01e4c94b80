"""Relay, batching and paging through real libp2p hosts on 127.0.0.1 (in-process servers, tiny Llama):
outputs equal the span run locally, bit for bit, whether hidden states go server to server or back
through the client, one session at a time or many at once; a dead next hop falls back to the client
and failover still recovers; a full cache is answered with a clear error while others carry on."""

from __future__ import annotations

import pytest
import torch
import trio
from llmswarm.node import config
from llmswarm.node.client.session import open_session
from llmswarm.node.errors import ErrorCode, PeerError, RemoteError
from llmswarm.node.host import quiet_libp2p_logging
from llmswarm.node.wire.codec import Frame, MsgType
from llmswarm.node.wire.messages import Error, Open

quiet_libp2p_logging()
MODEL = "tiny"
H = 64


def _local(whole, x, steps):
    cache = whole.new_cache(64)
    outs = [whole.forward(x, cache, 0)]
    for p, tok in steps:
        outs.append(whole.forward(tok, cache, p))
    return outs


@pytest.mark.parametrize("relay", [True, False])
@pytest.mark.parametrize("direct", [False, True])
def test_relayed_chain_equals_local_span(tiny_llama, relay, direct, host_swarm):
    """Over libp2p, and over the servers' TLS data plane (client -> server and server -> server)."""
    async def fn(swarm, whole):
        x = torch.randn(1, 5, H)
        steps = [(5 + i, torch.randn(1, 1, H)) for i in range(6)]
        async with open_session(swarm.client, swarm.chain(0, 1, 2), MODEL, H, 64, torch.float32,
                                relay=relay) as s:
            outs = [await s.step(x, 0)]
            for p, tok in steps:
                outs.append(await s.step(tok, p))
            assert s.relayed_pairs == (2 if relay else 0)
            assert [span.stream.direct for span in s.spans] == [direct] * 3
            links = [sess.link for srv in swarm.servers for sess in srv.sessions.values() if sess.link]
            assert [link.direct for link in links] == ([direct] * 2 if relay else [])
        for remote, local in zip(outs, _local(whole, x, steps), strict=True):
            torch.testing.assert_close(remote, local, rtol=0, atol=0)
        relayed = [srv.stats.relayed for srv in swarm.servers]
        assert relayed == ([7, 7, 0] if relay else [0, 0, 0])

    host_swarm(tiny_llama, [(0, 2), (2, 4), (4, 6)], fn, direct=direct)


@pytest.mark.parametrize("direct", [False, True])
def test_dead_next_hop_falls_back_to_client_and_failover_recovers(tiny_llama, direct, host_swarm):
    """Server 1 dies after the chain is linked: server 0's forward fails, it hands its output to the
    client, which finds server 1 dead, re-routes to the spare (server 3, same blocks), replays, and
    the outputs stay equal to the local span's."""
    notes: list[str] = []

    async def fn(swarm, whole):
        async def replan(bans):
            assert swarm.hosts[1].peer_id in bans.active()
            return swarm.chain(0, 3, 2)

        x = torch.randn(1, 4, H)
        steps = [(4 + i, torch.randn(1, 1, H)) for i in range(5)]
        async with open_session(swarm.client, swarm.chain(0, 1, 2), MODEL, H, 64, torch.float32,
                                replan=replan, notify=notes.append, step_timeout_s=5) as s:
            outs = [await s.step(x, 0)]
            for n, (p, tok) in enumerate(steps):
                if n == 2:
                    swarm.stop(1)
                    await trio.sleep(0.2)
                outs.append(await s.step(tok, p))
            assert s.recoveries == 1
            assert [h.peer_id for h in s.chain] == [swarm.hosts[i].peer_id for i in (0, 3, 2)]
            assert s.relayed_pairs == 2  # re-linked after the recovery
        for remote, local in zip(outs, _local(whole, x, steps), strict=True):
            torch.testing.assert_close(remote, local, rtol=1e-5, atol=1e-5)  # replayed as one prefill

    host_swarm(tiny_llama, [(0, 2), (2, 4), (4, 6), (2, 4)], fn, direct=direct)
    assert any("recovered" in n for n in notes)


def test_concurrent_sessions_are_batched_and_each_equals_its_local_run(tiny_llama, host_swarm):
    async def fn(swarm, whole):
        n, steps = 6, 8
        prompts = [torch.randn(1, 3 + i, H) for i in range(n)]
        tokens = [[torch.randn(1, 1, H) for _ in range(steps)] for _ in range(n)]
        results: dict[int, list[torch.Tensor]] = {}

        async def one(i):
            async with open_session(swarm.client, swarm.chain(0, 1), MODEL, H, 64, torch.float32) as s:
                outs = [await s.step(prompts[i], 0)]
                for k, tok in enumerate(tokens[i]):
                    outs.append(await s.step(tok, prompts[i].shape[1] + k))
                results[i] = outs

        async with trio.open_nursery() as nursery:
            for i in range(n):
                nursery.start_soon(one, i)
        for i in range(n):
            local = _local(whole, prompts[i], [(prompts[i].shape[1] + k, t) for k, t in enumerate(tokens[i])])
            for remote, ref in zip(results[i], local, strict=True):
                torch.testing.assert_close(remote, ref, rtol=1e-5, atol=1e-5)
        stats = [srv.scheduler.stats for srv in swarm.servers]
        assert all(s.batched_steps > 0 and s.largest_batch > 1 for s in stats), stats
        assert all(srv.cache_tokens_left == srv.cache_tokens for srv in swarm.servers)  # every page back

    # A tiny model computes in well under a millisecond: give the steps a window they can meet.
    host_swarm(tiny_llama, [(0, 3), (3, 6)], fn, batch_window_s=0.05, batch_window_fraction=1e9)


def test_full_cache_is_a_clear_error_and_others_carry_on(tiny_llama, host_swarm):
    async def fn(swarm, whole):
        server = swarm.servers[0]
        assert server.cache_tokens == 64  # 4 pages of 16
        async with open_session(swarm.client, swarm.chain(0), MODEL, H, 64, torch.float32) as a:
            await a.step(torch.randn(1, 40, H), 0)  # 3 pages
            assert server.cache_tokens_left == 16
            async with open_session(swarm.client, swarm.chain(0), MODEL, H, 64, torch.float32) as b:
                await b.step(torch.randn(1, 10, H), 0)  # the last page
                with pytest.raises(RemoteError) as err:
                    await b.step(torch.randn(1, 10, H), 10)  # needs a second page: none left
                assert err.value.code == "cache_full" and "page" in str(err.value)
                out = await a.step(torch.randn(1, 1, H), 40)  # a still has room in its pages
                assert out.shape == (1, 1, H)
            assert server.cache_tokens_left == 16  # b's page came back when b closed
        assert server.cache_tokens_left == 64

    host_swarm(tiny_llama, [(0, 6)], fn, cache_tokens=64, peer_share=1.0)  # one client may fill it here


def test_attach_is_refused_from_another_peer_or_for_an_unknown_session(tiny_llama, host_swarm):
    async def fn(swarm, whole):
        # a session on server 1 that names server 0 as its upstream
        s1 = await swarm.client.open_stream(swarm.hosts[1].peer_id, config.PROTOCOL_INFERENCE)
        opened = await s1.request(Open(MODEL, 2, 4, 32, upstream=swarm.hosts[0].peer_id).to_frame())
        session = opened.header["session"]
        for sid in (session, "0" * 32):  # the client is not server 0; an unknown id gets the same answer
            stream = await swarm.client.open_stream(swarm.hosts[1].peer_id, config.PROTOCOL_INFERENCE)
            with pytest.raises(RemoteError) as err:
                await stream.request(Frame(MsgType.ATTACH, {"session": sid}))
            assert err.value.code == "unknown_session"
        bad = await swarm.client.open_stream(swarm.hosts[1].peer_id, config.PROTOCOL_INFERENCE)
        with pytest.raises(RemoteError) as err:
            await bad.request(Frame(MsgType.ATTACH, {"session": "not hex"}))
        assert err.value.code == "bad_request"
        # LINK goes only to a server whose record holds the next block, at the record's addresses:
        # server 2 holds 4:6 and the session ends at 4, but its ATTACH fails (unknown session id), and
        # server 0 (blocks 0:2) or an arbitrary address are refused with the very same line.
        answers = []
        for seq, (peer, addrs) in enumerate([(swarm.hosts[2].peer_id, ["/ip4/127.0.0.1/tcp/1"]),
                                             (swarm.hosts[0].peer_id, swarm.hosts[0].addrs),
                                             ("12D3KooWD3eckifWpRn9wQpMG9R9hX3sD158z7EqHWmweQAJU5SA",
                                              ["/ip4/127.0.0.1/tcp/9"])], start=1):
            await s1.send(Frame(MsgType.LINK, {"seq": seq, "next": {"peer_id": peer, "addrs": addrs,
                                                                    "session": "0" * 32}}))
            reply = Error.from_frame(await s1.recv())
            assert reply.code is ErrorCode.LINK_FAILED and reply.seq == seq
            answers.append(reply.message.replace(peer[-8:], "PEER"))
        assert len(set(answers)) == 1, answers  # nothing about the target shows through
        assert swarm.servers[1].sessions  # and the session is still there

    host_swarm(tiny_llama, [(0, 2), (2, 4), (4, 6)], fn)


def test_wire_dtype_bfloat16_is_close_and_announced_in_frames(tiny_llama, host_swarm):
    async def fn(swarm, whole):
        x = torch.randn(1, 5, H)
        async with open_session(swarm.client, swarm.chain(0, 1), MODEL, H, 64, torch.float32,
                                wire_dtype=torch.bfloat16) as s:
            out = await s.step(x, 0)
        assert out.dtype == torch.float32
        local = _local(whole, x, [])[0]
        diff = (out - local).abs().max().item()
        assert 0 < diff < 0.1 * local.abs().max().item()  # rounded on the wire, not garbage

    host_swarm(tiny_llama, [(0, 3), (3, 6)], fn)


def test_a_session_with_a_dead_first_hop_raises_peer_error(tiny_llama, host_swarm):
    async def fn(swarm, whole):
        async with open_session(swarm.client, swarm.chain(0, 1), MODEL, H, 64, torch.float32,
                                step_timeout_s=3) as s:
            await s.step(torch.randn(1, 2, H), 0)
            swarm.stop(0)
            await trio.sleep(0.2)
            with pytest.raises(PeerError):
                await s.step(torch.randn(1, 1, H), 2)

    host_swarm(tiny_llama, [(0, 3), (3, 6)], fn)
