"""Server, scheduler and client-session logic without sockets: trio memory streams stand in for
libp2p streams and a mock clock jumps over every wait, so timeouts of seconds or minutes are tested
in milliseconds. (What the network itself does is tested with real hosts in test_node_server.py,
test_node_relay.py and the end-to-end tests.)"""

from __future__ import annotations

import pytest
import torch
import trio
import trio.testing
from llmswarm.models.checkpoint import Checkpoint
from llmswarm.models.errors import CacheFullError
from llmswarm.models.span import load_span
from llmswarm.node import config
from llmswarm.node.client.session import open_session
from llmswarm.node.errors import ErrorCode, PeerError, RemoteError
from llmswarm.node.server.scheduler import Job, Scheduler
from llmswarm.node.server.span_server import SpanServer
from llmswarm.node.wire.codec import PREFIX, MsgType, encode_frame
from llmswarm.node.wire.messages import Close, Error, Open, Opened, Output, Step
from llmswarm.node.wire.stream import FramedStream
from llmswarm.routing import Hop

MODEL = "tiny"


class _Conn:
    def __init__(self, peer_id: str) -> None:
        self.peer_id = peer_id


class MemoryStream:
    """The part of a py-libp2p stream FramedStream uses, over one end of a trio memory stream pair."""

    def __init__(self, end: trio.abc.HalfCloseableStream, remote_peer: str) -> None:
        self.end, self.muxed_conn = end, _Conn(remote_peer)

    async def read(self, n: int) -> bytes:
        try:
            return await self.end.receive_some(n)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            return b""

    async def write(self, data: bytes) -> None:
        await self.end.send_all(data)

    async def close(self) -> None:
        await self.end.send_eof()

    async def reset(self) -> None:
        await self.end.aclose()


class FakeHost:
    """Opens streams straight into in-process SpanServers; `down` servers refuse like a dead peer."""

    def __init__(self, nursery: trio.Nursery, servers: dict[str, SpanServer], peer_id: str = "client") -> None:
        self.nursery, self.servers, self.down = nursery, servers, set()
        self.peer_id = peer_id
        self.use_direct = False  # memory streams: no data plane to move to

    async def open_stream(self, peer_id: str, protocol: str) -> FramedStream:
        if peer_id in self.down:
            raise PeerError(f"cannot open {protocol} to peer {peer_id}")
        a, b = trio.testing.memory_stream_pair()
        self.nursery.start_soon(self._serve, peer_id, FramedStream(MemoryStream(b, self.peer_id)))
        return FramedStream(MemoryStream(a, peer_id))

    async def _serve(self, peer_id: str, stream: FramedStream) -> None:
        try:
            await self.servers[peer_id].handle(stream)
        except Exception as e:  # what host.set_handler's guard does: answer, then close
            await stream.send(Error.of(e).to_frame())
        await stream.close()

    def peer_addrs(self, peer_id: str) -> list[str]:
        return []  # no relay between fake servers: the client relays every pair

    async def ping(self, peer_id: str, count: int = 1, *, timeout_s: float = 1.0) -> list[float]:
        if peer_id in self.down:
            raise PeerError("no pong")
        return [0.001] * count


@pytest.fixture(scope="module")
def span(tiny_llama):
    ckpt = Checkpoint.open(tiny_llama)
    return load_span(ckpt, 0, ckpt.config.num_blocks, torch.float32)


def _local(span, x, position_steps):
    cache = span.new_cache(64)
    outs = []
    for position, h in position_steps(x):
        cache.reserve(position, h.shape[1])
        outs.append(span.forward(h, cache, position))
    return outs


def _run(fn, servers: dict[str, SpanServer]):
    async def main():
        async with trio.open_nursery() as nursery:
            for s in servers.values():
                nursery.start_soon(s.run)
            await fn(FakeHost(nursery, servers))
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_server_answers_steps_and_refuses_bad_ones_in_order(span):
    server = SpanServer(MODEL, span, cache_tokens=256)

    async def fn(host):
        stream = await host.open_stream("s", config.PROTOCOL_INFERENCE)
        opened = Opened.from_frame(await stream.request(Open(MODEL, 0, 6, 32).to_frame()))
        assert opened.max_length == 32 and opened.cache_tokens_left == 256
        x = torch.randn(1, 4, 64)
        await stream.send(Step(1, 0, x).to_frame())
        out = Output.from_frame(await stream.recv(), 64, 4)
        assert out.seq == 1
        torch.testing.assert_close(out.hidden, _local(span, x, lambda x: [(0, x)])[0], rtol=0, atol=0)
        await stream.send(Step(2, 9, x[:, :1]).to_frame())  # a gap after the cache: refused, session kept
        err = Error.from_frame(await stream.recv())
        assert (err.code, err.seq) == (ErrorCode.BAD_REQUEST, 2) and "holds 4 tokens" in err.message
        await stream.send(Step(5, 4, torch.randn(1, 29, 64)).to_frame())  # past the session's 32 tokens
        err = Error.from_frame(await stream.recv())
        assert (err.code, err.seq) == (ErrorCode.TOO_LONG, 5) and "max length 32" in err.message
        await stream.send(Step(3, 2**31, x[:, :1]).to_frame())  # absurd position: the request's fault
        err = Error.from_frame(await stream.recv())
        assert (err.code, err.seq) == (ErrorCode.BAD_REQUEST, 3) and "position" in err.message
        await stream.send(Step(4, 4, x[:, :1]).to_frame())
        assert Output.from_frame(await stream.recv(), 64, 1).seq == 4
        await stream.send(Close().to_frame())
        assert (await stream.recv()).type == MsgType.CLOSED
        await trio.sleep(0.1)
        assert server.sessions == {} and server.cache_tokens_left == 256

    _run(fn, {"s": server})


def test_idle_session_is_closed_and_its_pages_freed(span):
    server = SpanServer(MODEL, span, cache_tokens=256, idle_timeout_s=60.0)

    async def fn(host):
        stream = await host.open_stream("s", config.PROTOCOL_INFERENCE)
        Opened.from_frame(await stream.request(Open(MODEL, 0, 6, 32).to_frame()))
        await stream.send(Step(1, 0, torch.randn(1, 20, 64)).to_frame())
        Output.from_frame(await stream.recv(), 64, 20)
        assert server.cache_tokens_left == 256 - 32  # two pages of 16
        await trio.sleep(59.0)
        assert len(server.sessions) == 1
        await trio.sleep(3.0)  # over a minute without a step (the mock clock jumps there at once)
        assert server.sessions == {} and server.cache_tokens_left == 256

    _run(fn, {"s": server})


def test_open_refusals_carry_their_codes(span):
    server = SpanServer(MODEL, span, cache_tokens=64, max_sessions=1)

    async def fn(host):
        async def refused(request: Open) -> ErrorCode:
            stream = await host.open_stream("s", config.PROTOCOL_INFERENCE)
            with pytest.raises(RemoteError) as err:
                await stream.request(request.to_frame())
            return err.value.code

        assert await refused(Open("other", 0, 6, 32)) is ErrorCode.WRONG_MODEL
        assert await refused(Open(MODEL, 2, 9, 32)) is ErrorCode.WRONG_SPAN
        assert await refused(Open(MODEL, 0, 6, 65)) is ErrorCode.CACHE_FULL
        keep = await host.open_stream("s", config.PROTOCOL_INFERENCE)
        Opened.from_frame(await keep.request(Open(MODEL, 0, 6, 32).to_frame()))
        code = await refused(Open(MODEL, 0, 6, 32))
        assert code is ErrorCode.BUSY and code.transient

    _run(fn, {"s": server})


def test_scheduler_refuses_only_the_job_without_room(span):
    """Cache room is reserved in one place, the scheduler: a job that cannot get a page fails alone."""
    pool = span.new_pool(3, page_size=4)
    full, fine = pool.sequence(), pool.sequence()
    full.reserve(0, 4)
    fine.reserve(0, 4)
    full.length = fine.length = 4  # both hold 4 tokens in a page each; one page is left
    scheduler = Scheduler(window_s=0.0)
    results: dict[str, object] = {}

    async def main():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(scheduler.serve)

            async def run(name, seq, position, tokens):
                try:
                    job = Job(name, span, seq, torch.randn(1, tokens, 64), position, tokens)
                    results[name] = await scheduler.run(job)
                except CacheFullError as e:
                    results[name] = e

            async with trio.open_nursery() as jobs:
                jobs.start_soon(run, "fine", fine, 4, 1)  # needs the last page
                jobs.start_soon(run, "full", full, 4, 5)  # needs two: refused, takes none
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert isinstance(results["fine"], torch.Tensor) and results["fine"].shape == (1, 1, 64)
    assert isinstance(results["full"], CacheFullError) and "KV cache is full" in str(results["full"])
    assert (fine.length, full.length, len(full.pages), pool.free_pages) == (5, 4, 1, 0)


def test_scheduler_batches_sessions_at_a_slow_steady_pace(span):
    """Three sessions step every 2 s (longer than BATCH_ACTIVE_S: a slow or loaded swarm), the third
    10 ms after the others: once their pace is known the scheduler waits for it and runs one batch."""
    pool = span.new_pool(16, page_size=4)
    seqs = {name: pool.sequence() for name in "abc"}
    scheduler = Scheduler(window_s=0.03, window_fraction=1e6)  # a 30 ms window, whatever the compute took
    waited: list[float] = []

    async def session(name: str, late_s: float) -> None:
        for position in range(4):
            await trio.sleep_until(2.0 * (position + 1) + late_s)
            sent = trio.current_time()
            await scheduler.run(Job(name, span, seqs[name], torch.randn(1, 1, 64), position, 1))
            if name == "a":
                waited.append(round(trio.current_time() - sent, 4))

    async def main():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(scheduler.serve)
            async with trio.open_nursery() as jobs:
                for name, late in (("a", 0.0), ("b", 0.0), ("c", 0.01)):
                    jobs.start_soon(session, name, late)
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert scheduler.stats.largest_batch == 3
    assert waited[2:] == [0.01, 0.01]  # from the third round on, a and b wait the 10 ms for c


def test_a_session_that_stopped_stepping_is_not_waited_for(span):
    """A session steps every 20 ms, then its generation ends; another starting 0.2 s later has its
    steps run at once, not held back for the window by the first one's next step, which never comes
    (a fixed "stepped within the last second" did that for a whole second after every generation)."""
    pool = span.new_pool(16, page_size=4)
    seqs = {name: pool.sequence() for name in "ab"}
    scheduler = Scheduler(window_s=0.03, window_fraction=1e6)  # a 30 ms window, whatever the compute took
    waited: list[float] = []

    async def first() -> None:
        for position in range(5):
            await trio.sleep_until(0.02 * (position + 1))
            await scheduler.run(Job("a", span, seqs["a"], torch.randn(1, 1, 64), position, 1))

    async def second() -> None:
        for position in range(3):
            await trio.sleep_until(0.3 + 0.02 * position)
            sent = trio.current_time()
            await scheduler.run(Job("b", span, seqs["b"], torch.randn(1, 1, 64), position, 1))
            waited.append(round(trio.current_time() - sent, 4))

    async def main():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(scheduler.serve)
            async with trio.open_nursery() as jobs:
                jobs.start_soon(first)
                jobs.start_soon(second)
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert waited == [0.0, 0.0, 0.0]


def test_session_replaces_a_hung_server_and_replays_into_the_spare(span):
    """A server that stops answering is found by the step timeout (30 s, jumped over by the mock
    clock), banned, and replaced by the spare; the output equals the local span's."""
    servers = {name: SpanServer(MODEL, span, cache_tokens=256) for name in ("a", "b", "spare")}
    x = torch.randn(1, 5, 64)
    steps = lambda x: [(0, x), (5, x[:, :1]), (6, x[:, 1:2])]  # noqa: E731
    expected = _local(span, x, steps)
    notes: list[str] = []

    async def fn(host):
        async def replan(bans):
            return [Hop("a", 0, 3), Hop("spare", 3, 6)] if "b" in bans.active() else [Hop("a", 0, 3), Hop("b", 3, 6)]

        async with open_session(host, [Hop("a", 0, 3), Hop("b", 3, 6)], MODEL, 64, 32, torch.float32,
                                replan=replan, notify=notes.append) as s:
            outs = [await s.step(*reversed(steps(x)[0]))]
            hang = trio.Event()
            original = servers["b"].step

            async def stalled(session, frame):
                await hang.wait()  # b accepts the step and never answers

            servers["b"].step = stalled
            host.down.add("b")
            outs.append(await s.step(*reversed(steps(x)[1])))
            outs.append(await s.step(*reversed(steps(x)[2])))
            servers["b"].step = original
            assert [h.peer_id for h in s.chain] == ["a", "spare"] and s.recoveries == 1
        for got, want in zip(outs, expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert any("server b failed" in n and "step timeout" in n for n in notes)

    _run(fn, servers)


def test_failed_open_fails_over_to_another_server(span):
    servers = {"a": SpanServer(MODEL, span, cache_tokens=256), "full": SpanServer(MODEL, span, cache_tokens=16)}
    tried: list[list[str]] = []

    async def fn(host):
        async def replan(bans):
            chain = [Hop("a", 0, 6)] if "full" in bans.active() else [Hop("full", 0, 6)]
            tried.append([h.peer_id for h in chain])
            return chain

        async with open_session(host, [Hop("full", 0, 6)], MODEL, 64, 32, torch.float32, replan=replan) as s:
            assert [h.peer_id for h in s.chain] == ["a"]
            x = torch.randn(1, 3, 64)
            torch.testing.assert_close(await s.step(x, 0), _local(span, x, lambda x: [(0, x)])[0], rtol=0, atol=0)
        assert tried == [["a"]]

    _run(fn, servers)


def test_one_client_gets_its_share_and_another_client_the_rest(span):
    """A client may hold half the sessions and half the cache pages of a server (the default share):
    past that it is refused, and a second client is served as if the first were not there."""
    server = SpanServer(MODEL, span, cache_tokens=128, max_sessions=4)  # 8 pages of 16, 2 sessions each

    async def fn(host):
        other = FakeHost(host.nursery, host.servers, peer_id="other")

        async def open_(h):
            stream = await h.open_stream("s", config.PROTOCOL_INFERENCE)
            Opened.from_frame(await stream.request(Open(MODEL, 0, 6, 128).to_frame()))
            return stream

        hog = [await open_(host), await open_(host)]
        with pytest.raises(RemoteError, match="your share") as err:
            await open_(host)
        assert err.value.code is ErrorCode.BUSY
        await hog[0].send(Step(1, 0, torch.randn(1, 64, 64)).to_frame())  # 4 pages: the hog's whole share
        Output.from_frame(await hog[0].recv(), 64, 64)
        await hog[1].send(Step(2, 0, torch.randn(1, 1, 64)).to_frame())  # a 5th page: past the share
        err = Error.from_frame(await hog[1].recv())
        assert err.code is ErrorCode.CACHE_FULL and "your share of 4" in err.message
        mine = [await open_(other), await open_(other)]  # the other client still gets its half
        for i, stream in enumerate(mine):
            await stream.send(Step(i, 0, torch.randn(1, 32, 64)).to_frame())
            assert Output.from_frame(await stream.recv(), 64, 32).seq == i
        assert server.cache_tokens_left == 0

    _run(fn, {"s": server})


def test_session_that_never_steps_is_closed_after_its_grace(span):
    server = SpanServer(MODEL, span, cache_tokens=128, max_sessions=2, peer_share=1.0)

    async def fn(host):
        for _ in range(2):  # hoard every slot, never step
            stream = await host.open_stream("s", config.PROTOCOL_INFERENCE)
            Opened.from_frame(await stream.request(Open(MODEL, 0, 6, 32).to_frame()))
        assert server.stats.sessions == 2
        await trio.sleep(config.SESSION_FIRST_STEP_S + 2)
        assert server.stats.sessions == 0 and server.sessions == {}

    _run(fn, {"s": server})


def test_half_sent_frame_is_dropped_at_its_deadline(span):
    """A STEP whose body never finishes arriving does not hold the session (or its buffer) forever."""
    server = SpanServer(MODEL, span, cache_tokens=128)

    async def fn(host):
        stream = await host.open_stream("s", config.PROTOCOL_INFERENCE)
        Opened.from_frame(await stream.request(Open(MODEL, 0, 6, 32).to_frame()))
        data = encode_frame(Step(1, 0, torch.randn(1, 8, 64)).to_frame())
        await stream.stream.write(data[:-1])  # one byte short, then silence
        await trio.sleep(config.FRAME_TIMEOUT_S + 1)
        assert server.sessions == {}  # the server gave up on the frame and closed the session

    _run(fn, {"s": server})


def test_step_body_larger_than_the_session_could_need_is_refused_unread(span):
    server = SpanServer(MODEL, span, cache_tokens=128)

    async def fn(host):
        stream = await host.open_stream("s", config.PROTOCOL_INFERENCE)
        Opened.from_frame(await stream.request(Open(MODEL, 0, 6, 32).to_frame()))
        prefix = PREFIX.pack(b"LS", config.WIRE_VERSION, int(MsgType.STEP), 0, 200 * 1024 * 1024)
        await stream.stream.write(prefix)  # announces 200 MiB; a 32-token session needs 8 KiB at most
        with pytest.raises(RemoteError, match="exceeds this stream's limit of 8192") as err:
            Error.raise_if(await stream.recv())
        assert err.value.code is ErrorCode.BAD_REQUEST

    _run(fn, {"s": server})


def test_a_lone_step_runs_in_its_handler_and_a_step_with_company_waits_for_the_batch(span):
    """With nothing queued and no other session stepping lately, a step is computed at once in the
    caller's task (no scheduler task is running here to take it); once a second session is active,
    its step is queued for the scheduler and batched instead."""
    pool = span.new_pool(16, page_size=4)
    a, b = pool.sequence(), pool.sequence()
    scheduler = Scheduler(window_s=0.03, window_fraction=1e6)

    async def main():
        with trio.fail_after(5):
            out = await scheduler.run(Job("a", span, a, torch.randn(1, 1, 64), 0, 1))
        assert out.shape == (1, 1, 64) and scheduler.stats.batches == 1
        with trio.move_on_after(5) as waiting:  # "a" stepped just now: b's step waits for the scheduler
            await scheduler.run(Job("b", span, b, torch.randn(1, 1, 64), 0, 1))
        assert waiting.cancelled_caught and scheduler.stats.batches == 1
        async with trio.open_nursery() as nursery:
            nursery.start_soon(scheduler.serve)
            await scheduler.run(Job("b", span, b, torch.randn(1, 1, 64), 0, 1))
            nursery.cancel_scope.cancel()
        assert scheduler.stats.batches == 2

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
