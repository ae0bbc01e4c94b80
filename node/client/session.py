"""The client side of inference: one long-lived stream per server of the chain, relay, and failover.

`InferenceSession.step(hidden, position)` sends the hidden states into the chain and returns the last
server's output. With relay on (the default), the client links each server to the next once (LINK),
and a step travels client -> s1 -> s2 -> ... -> client: one message per hop instead of two. A pair
that cannot link (unreachable, refused) is relayed by the client, as every pair is with relay off.

Failover. The client keeps, per hop, the inputs it sent that hop itself (a preallocated buffer written
by position; `valid` says how far it is complete: a step that reached the hop by relay is not in it).
When a hop dies, stalls past the step timeout, or answers an error, the server is banned (growing
backoff), the route is solved again without it, and the new hops are opened and fed, from position 0,
the kept inputs of the latest hop whose history is complete (with relay, usually the first), rebuilding
their caches. The server positions its cache by the step's `position`, so a replay is never mistaken
for a continuation (the defect of petals #587). A server whose forward to the next one fails hands
its output back to the client, which carries on from there.

Replies are read by one task per stream into one inbox: with relay, any server of the chain may be
the one that answers (its output, an error, or its death), so the client listens to all of them.
Every STEP and LINK carries a sequence number that its replies echo; a reply to an abandoned attempt
is ignored.
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import torch
import trio
from llmswarm.node import config
from llmswarm.node.errors import PeerError, RemoteError, WireError
from llmswarm.node.host import Host
from llmswarm.node.wire.codec import (
    Frame,
    FramedStream,
    MsgType,
    NextHop,
    OpenRequest,
    dtype_name,
    parse_output,
    parse_session_id,
    raise_if_error,
    step_frame,
)
from llmswarm.routing import Hop


class RemoteSpan:
    """One open session on one server."""

    def __init__(self, hop: Hop, stream: FramedStream, session_id: str, hidden_size: int, max_length: int,
                 dtype: torch.dtype) -> None:
        self.hop, self.stream, self.session_id = hop, stream, session_id
        self.history = torch.empty(max_length, hidden_size, dtype=dtype)  # inputs we sent, by position
        self.valid = 0  # history[:valid] is every input this hop has seen, as we sent it
        self.linked = False  # this server forwards relayed outputs to the next hop of the chain
        self.link_failed = False  # it could not link: the client relays this pair itself
        self.dead: PeerError | None = None  # its stream failed (reported by its reader task)

    def fed(self, hidden: torch.Tensor, position: int) -> None:
        """We send `hidden` to this hop ourselves: keep it for a replay."""
        if position <= self.valid:
            t = hidden.shape[1]
            self.history[position : position + t] = hidden[0]
            self.valid = position + t

    def relayed(self, position: int) -> None:
        """A step reaches this hop through the previous server: our copy ends before it."""
        self.valid = min(self.valid, position)


class HopFailed(Exception):
    def __init__(self, span: RemoteSpan, error: PeerError) -> None:
        super().__init__(str(error))
        self.span, self.error = span, error


class RelayBroken(Exception):
    """A server could not forward to the next one and answered with its own output instead."""

    def __init__(self, span: RemoteSpan, frame: Frame) -> None:
        super().__init__(str(frame.header.get("relay_failed")))
        self.span, self.frame = span, frame


class StepTimeout(Exception):
    pass


async def open_remote_span(host: Host, hop: Hop, model: str, hidden_size: int, max_length: int,
                           dtype: torch.dtype, wire_dtype: torch.dtype | None = None,
                           upstream: str | None = None) -> RemoteSpan:
    stream = await host.open_stream(hop.peer_id, config.PROTOCOL_INFERENCE)
    try:
        request = OpenRequest(model, hop.start, hop.end, max_length,
                              dtype_name(wire_dtype) if wire_dtype is not None else None, upstream)
        reply = await stream.request(request.frame(), timeout_s=config.REQUEST_TIMEOUT_S)
        if reply.type != MsgType.OPENED:
            raise PeerError(f"server {hop.peer_id[-8:]} answered OPEN with {reply.type.name}")
        try:
            session_id = parse_session_id(reply.header.get("session"))
        except WireError as e:
            raise PeerError(f"server {hop.peer_id[-8:]} answered OPEN badly: {e}") from None
    except BaseException:
        await stream.reset()
        raise
    return RemoteSpan(hop, stream, session_id, hidden_size, max_length, dtype)


class Bans:
    """Servers to avoid, each for a while that doubles with every further failure. A server that
    died (no answer) is usable again as soon as it answers a ping (restarted, same peer id); one that
    refused us (an ERROR reply) stays avoided until its time is up."""

    def __init__(self, base_s: float = config.BAN_BASE_S) -> None:
        self.base_s = base_s
        self.until: dict[str, float] = {}
        self.failures: dict[str, int] = {}
        self.refused: set[str] = set()

    def ban(self, peer_id: str, refused: bool) -> float:
        n = self.failures[peer_id] = self.failures.get(peer_id, 0) + 1
        duration = self.base_s * 2 ** (n - 1)
        self.until[peer_id] = time.monotonic() + duration
        (self.refused.add if refused else self.refused.discard)(peer_id)
        return duration

    def active(self) -> frozenset[str]:
        now = time.monotonic()
        return frozenset(p for p, t in self.until.items() if t > now)

    def liftable(self) -> list[str]:
        return [p for p in self.active() if p not in self.refused]

    def lift(self, peer_id: str) -> None:
        self.until.pop(peer_id, None)


Replan = Callable[[Bans], Awaitable[list[Hop]]]


class InferenceSession:
    """Steps through a chain; on a failed hop, re-routes, replays and carries on (when it can replan)."""

    def __init__(self, host: Host, model: str, hidden_size: int, max_length: int, dtype: torch.dtype,
                 nursery: trio.Nursery, replan: Replan | None = None,
                 notify: Callable[[str], None] = lambda _: None,
                 step_timeout_s: float = config.STEP_TIMEOUT_S, relay: bool = True,
                 wire_dtype: torch.dtype | None = None) -> None:
        self.host, self.model, self.hidden_size = host, model, hidden_size
        self.max_length, self.dtype = max_length, dtype
        self.wire_dtype = wire_dtype or dtype  # default: lossless for the client's dtype
        self.spans: list[RemoteSpan] = []
        self.replan, self.notify = replan, notify
        self.step_timeout_s = step_timeout_s
        self.relay = relay
        self.needs_link = relay
        self.bans = Bans()
        self.recoveries = 0
        self.seq = 0
        self._nursery = nursery
        self._inbox_send, self._inbox = trio.open_memory_channel[tuple[RemoteSpan, Frame | PeerError]](math.inf)

    @property
    def chain(self) -> list[Hop]:
        return [s.hop for s in self.spans]

    @property
    def relayed_pairs(self) -> int:
        return sum(s.linked for s in self.spans[:-1])

    # -- streams -----------------------------------------------------------------------------------
    def _watch(self, spans: list[RemoteSpan]) -> None:
        for s in spans:
            self._nursery.start_soon(self._read, s)

    async def _read(self, span: RemoteSpan) -> None:
        while True:
            try:
                frame = await span.stream.recv(timeout_s=math.inf)  # each wait on a reply is bounded
            except (PeerError, WireError) as e:
                if isinstance(e, WireError):
                    e = PeerError(f"server {span.hop.peer_id[-8:]} sent a malformed frame: {e}")
                self._inbox_send.send_nowait((span, e))
                return
            self._inbox_send.send_nowait((span, frame))

    async def _reply(self, expect: RemoteSpan, seq: int, watch: list[RemoteSpan], timeout_s: float) -> Frame:
        """The reply of `expect` to request `seq`; HopFailed as soon as any of `watch` fails."""
        for s in watch:
            if s.dead is not None:
                raise HopFailed(s, s.dead)
        with trio.move_on_after(timeout_s):
            while True:
                span, item = await self._inbox.receive()
                if isinstance(item, PeerError):
                    span.dead = item
                    if span in watch:
                        raise HopFailed(span, item)
                    continue
                if item.header.get("seq") != seq or span not in watch:
                    continue  # a reply to an abandoned attempt, or from a stream we dropped
                if item.type == MsgType.ERROR:
                    try:
                        raise_if_error(item)
                    except RemoteError as e:
                        raise HopFailed(span, e) from None
                if span is expect:
                    return item
                if item.type == MsgType.OUTPUT and "relay_failed" in item.header:
                    raise RelayBroken(span, item)
        raise StepTimeout

    # -- steps -------------------------------------------------------------------------------------
    async def step(self, hidden: torch.Tensor, position: int) -> torch.Tensor:
        if self.needs_link:
            await self._link_chain()
        i, attempts = 0, 0
        while i < len(self.spans):
            j = i
            while self.relay and j + 1 < len(self.spans) and self.spans[j].linked:
                j += 1
            try:
                out = await self._run(self.spans[i : j + 1], hidden, position)
            except RelayBroken as rb:
                m = self.spans.index(rb.span)
                rb.span.linked = False
                self.needs_link = True
                hidden, i = self._output(rb.frame, hidden.shape[1]), m + 1
                continue
            except (HopFailed, StepTimeout) as e:
                failure = e if isinstance(e, HopFailed) else await self._stalled(self.spans[i : j + 1])
                if failure is None:  # every server of the run answers a ping: retry without relay
                    for s in self.spans[i:j]:
                        s.linked = False
                    self.needs_link = True
                    continue
                attempts += 1
                if self.replan is None or attempts > config.MAX_RECOVERIES_PER_STEP:
                    raise failure.error from None
                try:
                    i, hidden = await self._recover(self.spans.index(failure.span), hidden, position, failure.error)
                except HopFailed as again:
                    raise again.error from None
                continue
            hidden, i = out, j + 1
        return hidden

    async def _run(self, run: list[RemoteSpan], hidden: torch.Tensor, position: int) -> torch.Tensor:
        """Send a step to run[0]; with more than one span it is relayed to run[-1], which answers."""
        self.seq += 1
        first = run[0]
        first.fed(hidden, position)
        for s in run[1:]:
            s.relayed(position)
        frame, _keep = step_frame(position, hidden.to(self.wire_dtype), self.seq, relay=len(run) > 1)
        try:
            await first.stream.send(frame, timeout_s=self.step_timeout_s)
        except PeerError as e:
            raise HopFailed(first, e) from None
        reply = await self._reply(run[-1], self.seq, run, self.step_timeout_s)
        try:
            return self._output(reply, hidden.shape[1])
        except WireError as e:
            raise HopFailed(run[-1], PeerError(f"server {run[-1].hop.peer_id[-8:]} sent a bad output: {e}")) from None

    def _output(self, frame: Frame, tokens: int) -> torch.Tensor:
        return parse_output(frame, self.hidden_size, tokens).to(self.dtype)

    async def _stalled(self, run: list[RemoteSpan]) -> HopFailed | None:
        """After a step timed out: the first server of the run that does not answer a ping."""
        timeout = PeerError(f"no answer within the step timeout of {self.step_timeout_s:g} s")
        if len(run) == 1:
            return HopFailed(run[0], timeout)
        answered: set[int] = set()

        async def ping(k: int, s: RemoteSpan) -> None:
            try:
                await self.host.ping(s.hop.peer_id, count=1, timeout_s=config.RELAY_PING_TIMEOUT_S)
                answered.add(k)
            except PeerError:
                pass

        async with trio.open_nursery() as nursery:
            for k, s in enumerate(run):
                nursery.start_soon(ping, k, s)
        silent = [s for k, s in enumerate(run) if k not in answered]
        return HopFailed(silent[0], timeout) if silent else None

    # -- relay links -------------------------------------------------------------------------------
    async def _link_chain(self) -> None:
        """Ask every server whose next hop it does not feed yet to link to it (in parallel)."""
        self.needs_link = False
        pending: dict[int, RemoteSpan] = {}
        for a, b in zip(self.spans, self.spans[1:], strict=False):
            if a.linked or a.link_failed or a.dead or b.dead:
                continue
            addrs = self.host.peer_addrs(b.hop.peer_id)
            if not addrs or a.hop.peer_id == b.hop.peer_id:
                a.link_failed = True
                continue
            self.seq += 1
            try:
                await a.stream.send(NextHop(b.hop.peer_id, tuple(addrs), b.session_id).frame(self.seq))
            except PeerError as e:
                a.dead = e
                continue
            pending[self.seq] = a
        with trio.move_on_after(config.LINK_TIMEOUT_S + 1):
            while pending:
                span, item = await self._inbox.receive()
                if isinstance(item, PeerError):
                    span.dead = item
                    pending = {k: s for k, s in pending.items() if s is not span}
                    continue
                a = pending.pop(item.header.get("seq"), None)  # type: ignore[arg-type]
                if a is None:
                    continue
                a.linked = item.type == MsgType.LINKED
                a.link_failed = not a.linked
        for a in pending.values():
            a.link_failed = True

    # -- failover ----------------------------------------------------------------------------------
    async def _recover(self, m: int, step_input: torch.Tensor, position: int,
                       error: PeerError) -> tuple[int, torch.Tensor]:
        """Replace hop m (and whatever the new route changes after the shared prefix), rebuild the
        replacements' caches by replaying the inputs kept for the latest hop whose history is complete,
        and return where to resume: (index of that hop, this step's input to it)."""
        started = time.monotonic()
        failed = self.spans[m].hop
        duration = self.bans.ban(failed.peer_id, refused=isinstance(error, RemoteError))
        self.notify(f"server {failed.peer_id[-8:]} failed on blocks {failed.start}:{failed.end} ({error}); "
                    f"avoiding it for {duration:g} s and re-routing")
        assert self.replan is not None
        chain = await self.replan(self.bans)
        old = self.spans
        shared = 0
        while shared < min(m, len(chain)) and chain[shared] == old[shared].hop:
            shared += 1
        t = step_input.shape[1]
        k = max(h for h in range(min(shared, len(chain) - 1) + 1) if h == 0 or old[h].valid >= position + t)
        resume = old[k].history[position : position + t].unsqueeze(0).clone()
        past = old[k].history[:position].unsqueeze(0).clone()  # what hop k's blocks have seen so far
        for j in range(k, len(old)):
            if j != m:  # the failed stream gets no goodbye: its peer is dead or hung (the server frees
                await old[j].stream.reset()  # its cache on EOF or idle timeout); live ones are told now
        if k > 0:
            old[k - 1].linked = old[k - 1].link_failed = False  # its link led to a session we dropped
        upstreams = [chain[h - 1].peer_id if h > 0 else None for h in range(k, len(chain))]
        new = await _open_all(self.host, chain[k:], self.model, self.hidden_size, self.max_length, self.dtype,
                              self.wire_dtype, upstreams)
        self._watch(new)
        self.spans = old[:k] + new
        try:
            x = past
            if position > 0:
                for s in new:
                    x = await self._run([s], x, 0)
        except (HopFailed, StepTimeout):
            for s in new:
                await s.stream.reset()
            raise
        self.recoveries += 1
        self.needs_link = self.relay
        names = " -> ".join(f"{h.peer_id[-8:]} [{h.start}:{h.end})" for h in chain[k:])
        self.notify(f"recovered in {time.monotonic() - started:.2f} s: replayed {position} tokens into {names}")
        return k, resume

    async def aclose(self) -> None:
        """CLOSE every session (bounded), then drop the streams."""
        waiting = set()
        for s in self.spans:
            if s.dead is None:
                try:
                    await s.stream.send(Frame(MsgType.CLOSE), timeout_s=config.CLOSE_TIMEOUT_S)
                    waiting.add(s)
                except PeerError:
                    pass
        with trio.move_on_after(config.CLOSE_TIMEOUT_S):
            while waiting:
                span, item = await self._inbox.receive()
                if isinstance(item, PeerError) or item.type == MsgType.CLOSED:
                    waiting.discard(span)
        self._nursery.cancel_scope.cancel()
        for s in self.spans:
            await s.stream.close()


async def _open_all(host: Host, chain: list[Hop], model: str, hidden_size: int, max_length: int,
                    dtype: torch.dtype, wire_dtype: torch.dtype | None = None,
                    upstreams: list[str | None] | None = None) -> list[RemoteSpan]:
    """Open a session on every hop, in parallel; on any failure close those that opened."""
    opened: list[RemoteSpan | None] = [None] * len(chain)
    ups = upstreams or [chain[i - 1].peer_id if i > 0 else None for i in range(len(chain))]

    async def open_one(i: int, hop: Hop) -> None:
        opened[i] = await open_remote_span(host, hop, model, hidden_size, max_length, dtype, wire_dtype, ups[i])

    try:
        async with trio.open_nursery() as nursery:
            for i, hop in enumerate(chain):
                nursery.start_soon(open_one, i, hop)
    except BaseException:
        with trio.CancelScope(shield=True):
            for s in opened:
                if s is not None:
                    await s.stream.reset()
        raise
    return [s for s in opened if s is not None]


@asynccontextmanager
async def open_session(host: Host, chain: list[Hop], model: str, hidden_size: int, max_length: int,
                       dtype: torch.dtype, replan: Replan | None = None,
                       notify: Callable[[str], None] = lambda _: None,
                       step_timeout_s: float = config.STEP_TIMEOUT_S, relay: bool = True,
                       wire_dtype: torch.dtype | None = None) -> AsyncIterator[InferenceSession]:
    """Open a session on every hop, yield it, and close every stream on exit. Errors of the caller
    and of the opening pass through as they are (not wrapped in the readers' nursery's group)."""
    error: BaseException | None = None
    async with trio.open_nursery() as nursery:
        session = InferenceSession(host, model, hidden_size, max_length, dtype, nursery, replan, notify,
                                   step_timeout_s, relay, wire_dtype)
        try:
            session.spans = await _open_all(host, chain, model, hidden_size, max_length, dtype,
                                            session.wire_dtype)
            session._watch(session.spans)
            yield session
        except BaseException as e:  # noqa: BLE001 - re-raised below, outside the nursery
            error = e
        finally:
            with trio.CancelScope(shield=True):
                await session.aclose()
    if error is not None:
        raise error
