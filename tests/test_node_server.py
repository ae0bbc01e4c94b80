"""The inference protocol against a real server host on 127.0.0.1 (tiny Llama, in-process hosts):
bad input is answered with a clear error while a concurrent good session keeps being served, and
the output through the protocol equals the span run locally."""

from __future__ import annotations

import pytest
import torch
import trio
from llmswarm.node import config
from llmswarm.node.client.session import open_session
from llmswarm.node.errors import PeerError, RemoteError
from llmswarm.node.host import quiet_libp2p_logging
from llmswarm.node.wire.codec import Frame, MsgType
from llmswarm.node.wire.messages import Error, Open, Output, Step
from llmswarm.routing import Hop

quiet_libp2p_logging()
MODEL = "tiny"


@pytest.fixture
def serve(host_swarm):
    """One server holding every block of the tiny model: fn(client_host, server_peer_id, span, server)."""

    def run(folder, fn, **server_kw):
        async def adapt(swarm, whole):
            await fn(swarm.client, swarm.hosts[0].peer_id, whole, swarm.servers[0])

        host_swarm(folder, [(0, 6)], adapt, **server_kw)

    return run


async def _open(cli, peer, start=0, end=6, max_length=32, model=MODEL):
    stream = await cli.open_stream(peer, config.PROTOCOL_INFERENCE)
    reply = await stream.request(Open(model, start, end, max_length).to_frame())
    assert reply.type == MsgType.OPENED
    return stream


async def _step(stream, position, hidden):
    await stream.send(Step(0, position, hidden).to_frame())
    return Output.from_frame(await stream.recv(), hidden.shape[-1], hidden.shape[1]).hidden


def test_protocol_output_equals_local_span(tiny_llama, serve):
    async def fn(cli, peer, span, server):
        x = torch.randn(1, 5, 64)
        async with open_session(cli, [Hop(peer, 0, 3), Hop(peer, 3, 6)], MODEL, 64, 32, torch.float32) as s:
            remote = await s.step(x, 0)
            remote2 = await s.step(x[:, :1], 5)
        local_cache = span.new_cache(32)
        torch.testing.assert_close(remote, span.forward(x, local_cache, 0), rtol=0, atol=0)
        torch.testing.assert_close(remote2, span.forward(x[:, :1], local_cache, 5), rtol=0, atol=0)
        assert server.stats.sessions == 0 and server.cache_tokens_left == server.cache_tokens  # freed on close

    serve(tiny_llama, fn)


BAD_STEPS = {  # what the server is sent -> (the code it must answer, words its message must hold)
    "wrong hidden size": lambda: Step(0, 0, torch.zeros(1, 2, 63)).to_frame(),
    "wrong rank": lambda: Frame(MsgType.STEP, {"position": 0, "tensor": {"dtype": "float32", "shape": [2, 64]}},
                                bytes(2 * 64 * 4)),
    "bad dtype": lambda: Frame(MsgType.STEP, {"position": 0, "tensor": {"dtype": "int64", "shape": [1, 1, 64]}},
                               bytes(64 * 8)),
    "body shorter than shape": lambda: Frame(MsgType.STEP, {"position": 0,
                                             "tensor": {"dtype": "float32", "shape": [1, 1, 64]}}, bytes(10)),
    "more tokens than the session holds": lambda: Step(0, 0, torch.zeros(1, 33, 64)).to_frame(),
    "position beyond cache": lambda: Step(0, 7, torch.zeros(1, 1, 64)).to_frame(),
    "negative position": lambda: Frame(MsgType.STEP, {"position": -1}, b""),
    "not a step": lambda: Frame(MsgType.PING, {}),
}
BAD_STEP_ANSWERS = {
    "wrong hidden size": ("bad_request", "last dim is 63, expected 64"),
    "wrong rank": ("bad_request", "must be [1, tokens, 64]"),
    "bad dtype": ("bad_request", "'int64' is not allowed"),
    "body shorter than shape": ("bad_request", "body is 10 bytes"),
    "more tokens than the session holds": ("bad_request", "8448 bytes exceeds this stream's limit of 8192"),
    "position beyond cache": ("bad_request", "position 7, but the cache holds 0"),
    "negative position": ("bad_request", "position must be an integer"),
    "not a step": ("bad_request", "expected STEP, LINK or CLOSE, got PING"),
}


REFUSED_UNREAD = {"more tokens than the session holds"}  # a body larger than the session can need is never read


@pytest.mark.parametrize("case", list(BAD_STEPS))
def test_bad_step_is_answered_and_good_session_continues(tiny_llama, case, serve):
    async def fn(cli, peer, span, server):
        good, bad = await _open(cli, peer), await _open(cli, peer)
        x = torch.randn(1, 4, 64)
        first = await _step(good, 0, x)
        await bad.send(BAD_STEPS[case]())
        with pytest.raises(RemoteError) as err:
            Error.raise_if(await bad.recv())
        code, words = BAD_STEP_ANSWERS[case]
        assert err.value.code == code and words in str(err.value)
        # the bad session is still usable (unless the frame was refused unread: its stream ends), and
        # the good one was never disturbed
        if case in REFUSED_UNREAD:
            with pytest.raises(PeerError):
                await _step(bad, 0, x)
        else:
            await _step(bad, 0, x)
        second = await _step(good, 4, x[:, :1])
        cache = span.new_cache(32)
        torch.testing.assert_close(first, span.forward(x, cache, 0), rtol=0, atol=0)
        torch.testing.assert_close(second, span.forward(x[:, :1], cache, 4), rtol=0, atol=0)

    serve(tiny_llama, fn)


@pytest.mark.parametrize("raw", [b"garbage bytes that are not a frame",
                                 b"LS" + bytes([config.WIRE_VERSION, 3]) + b"\xff" * 8])
def test_garbage_and_oversized_frames_are_refused(tiny_llama, raw, serve):
    async def fn(cli, peer, span, server):
        good = await _open(cli, peer)
        bad = await cli.open_stream(peer, config.PROTOCOL_INFERENCE)
        await bad.stream.write(raw)
        expected = "bad magic" if raw.startswith(b"garbage") else "header of 4294967295 bytes exceeds"
        with pytest.raises(RemoteError, match=expected):
            Error.raise_if(await bad.recv())
        await _step(good, 0, torch.randn(1, 2, 64))  # still served

    serve(tiny_llama, fn)


@pytest.mark.parametrize("request_,code", [
    (Open("other-model", 0, 6, 32), "wrong_model"),
    (Open(MODEL, 2, 9, 32), "wrong_span"),
    (Open(MODEL, 0, 6, config.MAX_SESSION_LENGTH + 1), "too_long"),
    (Open(MODEL, 0, 6, 4096), "cache_full"),
])
def test_open_refusals_name_the_reason(tiny_llama, request_, code, serve):
    async def fn(cli, peer, span, server):
        stream = await cli.open_stream(peer, config.PROTOCOL_INFERENCE)
        with pytest.raises(RemoteError) as err:
            await stream.request(request_.to_frame())
        assert err.value.code == code

    serve(tiny_llama, fn, cache_tokens=1000)


def test_session_limit_and_idle_timeout(tiny_llama, serve):
    async def fn(cli, peer, span, server):
        first = await _open(cli, peer)
        stream = await cli.open_stream(peer, config.PROTOCOL_INFERENCE)
        with pytest.raises(RemoteError) as err:
            await stream.request(Open(MODEL, 0, 6, 32).to_frame())
        assert err.value.code == "busy"
        await trio.sleep(0.6)  # idle past the timeout: the server closes the session, frees its cache
        assert server.stats.sessions == 0 and server.cache_tokens_left == server.cache_tokens
        await _open(cli, peer)  # room again
        del first

    serve(tiny_llama, fn, max_sessions=1, idle_timeout_s=0.3)

