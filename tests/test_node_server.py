"""The inference protocol against a real server host on 127.0.0.1 (tiny Llama, in-process hosts):
bad input is answered with a clear error while a concurrent good session keeps being served, and
the output through the protocol equals the span run locally."""

from __future__ import annotations

import pytest
import torch
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from llmswarm.models.checkpoint import Checkpoint
from llmswarm.models.span import load_span
from llmswarm.node import config
from llmswarm.node.client.session import open_session
from llmswarm.node.errors import RemoteError
from llmswarm.node.host import open_host, quiet_libp2p_logging
from llmswarm.node.server.span_server import SpanServer
from llmswarm.node.wire.codec import Frame, MsgType
from llmswarm.node.wire.messages import Error, Open, Output, Step
from llmswarm.routing import Hop

quiet_libp2p_logging()
MODEL = "tiny"


def _serve(folder, fn, **server_kw):
    ckpt = Checkpoint.open(folder)
    span = load_span(ckpt, 0, ckpt.config.num_blocks, torch.float32)
    server = SpanServer(MODEL, span, **server_kw)

    async def main():
        async with open_host(port=0, key_pair=create_new_key_pair()) as srv, \
                open_host(port=0, key_pair=create_new_key_pair()) as cli, trio.open_nursery() as nursery:
            server.host = srv
            nursery.start_soon(server.run)
            srv.set_handler(config.PROTOCOL_INFERENCE, server.handle)
            await cli.connect(srv.addrs[0])
            with trio.fail_after(30):
                await fn(cli, srv.peer_id, span, server)
            nursery.cancel_scope.cancel()

    trio.run(main)


async def _open(cli, peer, start=0, end=6, max_length=32, model=MODEL):
    stream = await cli.open_stream(peer, config.PROTOCOL_INFERENCE)
    reply = await stream.request(Open(model, start, end, max_length).to_frame())
    assert reply.type == MsgType.OPENED
    return stream


async def _step(stream, position, hidden):
    await stream.send(Step(0, position, hidden).to_frame())
    return Output.from_frame(await stream.recv(), hidden.shape[-1], hidden.shape[1]).hidden


def test_protocol_output_equals_local_span(tiny_llama):
    async def fn(cli, peer, span, server):
        x = torch.randn(1, 5, 64)
        async with open_session(cli, [Hop(peer, 0, 3), Hop(peer, 3, 6)], MODEL, 64, 32, torch.float32) as s:
            remote = await s.step(x, 0)
            remote2 = await s.step(x[:, :1], 5)
        local_cache = span.new_cache(32)
        torch.testing.assert_close(remote, span.forward(x, local_cache, 0), rtol=0, atol=0)
        torch.testing.assert_close(remote2, span.forward(x[:, :1], local_cache, 5), rtol=0, atol=0)
        assert server.stats.sessions == 0 and server.cache_tokens_left == server.cache_tokens  # freed on close

    _serve(tiny_llama, fn)


BAD_STEPS = {
    "wrong hidden size": lambda: Step(0, 0, torch.zeros(1, 2, 63)).to_frame(),
    "wrong rank": lambda: Frame(MsgType.STEP, {"position": 0, "tensor": {"dtype": "float32", "shape": [2, 64]}},
                                bytes(2 * 64 * 4)),
    "bad dtype": lambda: Frame(MsgType.STEP, {"position": 0, "tensor": {"dtype": "int64", "shape": [1, 1, 64]}},
                               bytes(64 * 8)),
    "body shorter than shape": lambda: Frame(MsgType.STEP, {"position": 0,
                                             "tensor": {"dtype": "float32", "shape": [1, 1, 64]}}, bytes(10)),
    "past max length": lambda: Step(0, 30, torch.zeros(1, 5, 64)).to_frame(),
    "position beyond cache": lambda: Step(0, 7, torch.zeros(1, 1, 64)).to_frame(),
    "negative position": lambda: Frame(MsgType.STEP, {"position": -1}, b""),
    "not a step": lambda: Frame(MsgType.PING, {}),
}


@pytest.mark.parametrize("case", list(BAD_STEPS))
def test_bad_step_is_answered_and_good_session_continues(tiny_llama, case):
    async def fn(cli, peer, span, server):
        good, bad = await _open(cli, peer), await _open(cli, peer)
        x = torch.randn(1, 4, 64)
        first = await _step(good, 0, x)
        await bad.send(BAD_STEPS[case]())
        with pytest.raises(RemoteError) as err:
            Error.raise_if(await bad.recv())
        assert err.value.code in ("bad_request", "cache_full") and str(err.value)
        # the bad session is still usable, and the good one was never disturbed
        await _step(bad, 0, x)
        second = await _step(good, 4, x[:, :1])
        cache = span.new_cache(32)
        torch.testing.assert_close(first, span.forward(x, cache, 0), rtol=0, atol=0)
        torch.testing.assert_close(second, span.forward(x[:, :1], cache, 4), rtol=0, atol=0)

    _serve(tiny_llama, fn)


@pytest.mark.parametrize("raw", [b"garbage bytes that are not a frame",
                                 b"LS" + bytes([config.WIRE_VERSION, 3]) + b"\xff" * 8])
def test_garbage_and_oversized_frames_are_refused(tiny_llama, raw):
    async def fn(cli, peer, span, server):
        good = await _open(cli, peer)
        bad = await cli.open_stream(peer, config.PROTOCOL_INFERENCE)
        await bad.stream.write(raw)
        with pytest.raises(RemoteError, match="bad magic|exceeds|limit"):
            Error.raise_if(await bad.recv())
        await _step(good, 0, torch.randn(1, 2, 64))  # still served

    _serve(tiny_llama, fn)


@pytest.mark.parametrize("request_,code", [
    (Open("other-model", 0, 6, 32), "wrong_model"),
    (Open(MODEL, 2, 9, 32), "wrong_span"),
    (Open(MODEL, 0, 6, config.MAX_SESSION_LENGTH + 1), "too_long"),
    (Open(MODEL, 0, 6, 4096), "cache_full"),
])
def test_open_refusals_name_the_reason(tiny_llama, request_, code):
    async def fn(cli, peer, span, server):
        stream = await cli.open_stream(peer, config.PROTOCOL_INFERENCE)
        with pytest.raises(RemoteError) as err:
            await stream.request(request_.to_frame())
        assert err.value.code == code

    _serve(tiny_llama, fn, cache_tokens=1000)


def test_session_limit_and_idle_timeout(tiny_llama):
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

    _serve(tiny_llama, fn, max_sessions=1, idle_timeout_s=0.3)

