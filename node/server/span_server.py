"""The server side of inference: admit sessions, run their steps through our span, answer or relay.

One handler task per stream. A stream that begins with Open is a client's session; one that begins
with Attach is the previous server of that client's chain feeding the session relayed steps
(node/server/relay.py). Every frame is validated (node/wire/messages.py) before it touches the
model; a bad one is answered with an Error on the client's stream, whichever stream it came on,
and the session stays usable; anything else that goes wrong closes only that session.

The KV cache is a pool of fixed-size pages (models/paged_cache.py) shared by all sessions: a session
takes pages as it grows, so admission only checks that the session could fit, and the announced
cache room is the free pages. Steps go through the Scheduler, which batches concurrent decode steps
and reserves each step's pages.
"""

from __future__ import annotations

import math
import secrets
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import torch
import trio
from llmswarm.models.errors import CacheError, CacheFullError, SessionFullError
from llmswarm.models.paged_cache import PagedSequence
from llmswarm.models.span import Span
from llmswarm.node import config
from llmswarm.node.errors import ErrorCode, PeerClosed, PeerError, RemoteError, WireError
from llmswarm.node.host import Host
from llmswarm.node.locks import QuickLock
from llmswarm.node.server import relay
from llmswarm.node.server.scheduler import Job, Scheduler
from llmswarm.node.wire.codec import Frame, MsgType, torch_dtype
from llmswarm.node.wire.direct import DirectOffer
from llmswarm.node.wire.messages import Closed, Error, Open, Opened, Output, Step, seq_or_none
from llmswarm.node.wire.stream import FramedStream

NextHopLookup = Callable[[str, int], Awaitable[list[str] | None]]


@dataclass
class ServerStats:
    sessions: int = 0
    sessions_total: int = 0
    tokens_served: int = 0  # new tokens run through the span (prefill + decode)
    steps: int = 0
    errors: int = 0
    relayed: int = 0  # outputs sent on to the next server instead of back to the client
    recent_steps: deque[float] = field(default_factory=lambda: deque(maxlen=4096))  # trio clock times

    def steps_per_s(self, window_s: float = 5.0) -> float:
        now = trio.current_time()
        return sum(1 for t in self.recent_steps if now - t < window_s) / window_s


@dataclass(eq=False)
class Session:
    id: str
    span: Span
    cache: PagedSequence
    max_length: int
    client: FramedStream
    wire_dtype: torch.dtype | None
    upstream_peer: str | None
    peer: str  # the client's peer id: whose fair share this session counts against
    direct: bool = True  # its streams (the client's, the relay feed into it) may move to our data plane
    send_lock: QuickLock = field(default_factory=QuickLock)  # client stream: written by two tasks
    step_lock: QuickLock = field(default_factory=QuickLock)  # one step of a session at a time
    link: FramedStream | None = None  # to the next server, for relayed outputs
    upstream: FramedStream | None = None  # from the previous server, relayed inputs
    last_active: float = field(default_factory=trio.current_time)
    stepped: bool = False  # has run a step (a session that never does is closed after a grace)
    closed: bool = False
    # Resetting a stream does not wake our own pending read of it: tasks are ended by cancelling these.
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    upstream_scope: trio.CancelScope | None = None

    @property
    def max_body(self) -> int:
        """The largest STEP body this session can need: its longest step in float32 (the widest wire
        dtype). Bigger frames are refused before they are read."""
        return min(config.MAX_STEP_TOKENS, self.max_length) * self.span.cfg.hidden_size * 4

    async def send(self, frame: Frame) -> None:
        """To the client, whichever task answers (its own handler or the upstream feed)."""
        async with self.send_lock:
            await self.client.send(frame)


class SpanServer:
    def __init__(self, model: str, span: Span, max_sessions: int = config.DEFAULT_MAX_SESSIONS,
                 cache_tokens: int | None = None,
                 idle_timeout_s: float = config.SESSION_IDLE_TIMEOUT_S, host: Host | None = None,
                 batch_window_s: float = config.BATCH_WINDOW_S,
                 batch_window_fraction: float = config.BATCH_WINDOW_FRACTION,
                 peer_share: float = config.PEER_SHARE, next_hop: NextHopLookup | None = None) -> None:
        self.model, self.span = model, span
        self.max_sessions = max_sessions
        self.peer_sessions = max(1, math.ceil(max_sessions * peer_share))
        # One pool for the whole span: a session entering mid-span uses its first layers (its pages
        # are its own, so layer i of its sub-span can live in pool layer i).
        if cache_tokens is None:  # the pool is allocated now: size the default by memory, not just tokens
            cache_tokens = min(config.DEFAULT_CACHE_TOKENS, config.DEFAULT_CACHE_BYTES // span.cache_bytes_per_token())
        self.pool = span.new_pool(max(1, cache_tokens // config.PAGE_TOKENS), config.PAGE_TOKENS)
        self.cache_tokens = self.pool.num_pages * self.pool.page_size
        self.peer_pages = max(1, math.ceil(self.pool.num_pages * peer_share))
        self.idle_timeout_s = idle_timeout_s
        self.host = host  # needed to dial next hops (relay); None: LINK is refused
        # (peer id, block) -> the addresses of that peer's live record holding the block, or None: LINK
        # goes only there. None here (in-process tests) trusts the client's addresses.
        self.next_hop = next_hop
        self.stats = ServerStats()
        self.sessions: dict[str, Session] = {}
        self.scheduler = Scheduler(batch_window_s, on_step=self._count, window_fraction=batch_window_fraction)

    @property
    def cache_tokens_left(self) -> int:
        return self.pool.free_pages * self.pool.page_size

    async def run(self) -> None:
        """The server's background work (the batch scheduler and the idle-session janitor): start it
        in a nursery before handing `handle` to the host."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.scheduler.serve)
            nursery.start_soon(self._close_idle_sessions)

    # -- streams -----------------------------------------------------------------------------------
    async def handle(self, stream: FramedStream) -> None:
        """Serve one stream: a session (Open) until Close, EOF, idle timeout or a fatal error, or a
        relay feed (Attach) until its session ends."""
        first = await stream.recv(timeout_s=config.READ_TIMEOUT_S, max_body=0)  # OPEN or ATTACH: no body
        if first.type == MsgType.ATTACH:
            await relay.serve_upstream(self, stream, first)
            return
        req = Open.from_frame(first)
        peer = stream.remote_peer_id
        span = self._admit(req, peer)
        session = Session(secrets.token_hex(16), span, self.pool.sequence(req.max_length), req.max_length, stream,
                          torch_dtype(req.wire_dtype) if req.wire_dtype else None, req.upstream, peer, req.direct)
        self.sessions[session.id] = session
        self.stats.sessions += 1
        self.stats.sessions_total += 1
        try:
            await stream.send(Opened(session.id, req.max_length, self.cache_tokens_left,
                                     self.offer_direct(session, stream)).to_frame())
            with session.scope:
                await self._serve_client(session)
        finally:
            self._end(session)

    def offer_direct(self, session: Session, stream: FramedStream) -> DirectOffer | None:
        """An offer to move a stream of `session` to our data plane (node/dataplane.py), if we run
        one and the client did not open the session with direct: false."""
        dataplane = self.host.dataplane if self.host is not None else None
        return dataplane.offer(stream) if dataplane is not None and session.direct else None

    def _admit(self, req: Open, peer: str) -> Span:
        if req.model != self.model:
            raise RemoteError(ErrorCode.WRONG_MODEL, f"this server serves {self.model}, not {req.model}")
        if not self.span.start <= req.start < req.end <= self.span.end:
            raise RemoteError(ErrorCode.WRONG_SPAN, f"blocks {req.start}:{req.end} are not all in this server's "
                                                    f"{self.span.start}:{self.span.end}")
        if not 0 < req.max_length <= config.MAX_SESSION_LENGTH:
            raise RemoteError(ErrorCode.TOO_LONG,
                              f"max_length must be 1..{config.MAX_SESSION_LENGTH}, got {req.max_length}")
        if self.stats.sessions >= self.max_sessions:
            raise RemoteError(ErrorCode.BUSY, f"server is at its limit of {self.max_sessions} sessions: try another")
        if sum(s.peer == peer for s in self.sessions.values()) >= self.peer_sessions:
            raise RemoteError(ErrorCode.BUSY, f"you hold {self.peer_sessions} sessions here, your share of this "
                                              "server: close one or try another server")
        if req.max_length > self.cache_tokens:
            raise RemoteError(ErrorCode.CACHE_FULL, f"this server's whole cache holds {self.cache_tokens} tokens, "
                                                    f"the session asks {req.max_length}: try another or a shorter "
                                                    "--max-length")
        if self.pool.free_pages == 0:
            raise RemoteError(ErrorCode.CACHE_FULL, "this server's cache is full (no free page): try another server")
        return self.span.sub(req.start, req.end)

    def _end(self, session: Session) -> None:
        session.closed = True
        self.sessions.pop(session.id, None)
        self.scheduler.forget(session)
        session.cache.release()
        if session.upstream_scope is not None:
            session.upstream_scope.cancel()
        self.stats.sessions -= 1

    async def _serve_client(self, session: Session) -> None:
        stream = session.client
        try:
            while True:
                try:
                    # idleness: see _close_idle_sessions; a frame once begun has its own deadline
                    frame = await stream.recv(timeout_s=math.inf, max_body=session.max_body)
                except PeerClosed:
                    return  # client went away: free the cache quietly
                if frame.type == MsgType.CLOSE:
                    await session.send(Closed().to_frame())
                    return
                if frame.type == MsgType.STEP:
                    await self.step(session, frame)
                elif frame.type == MsgType.LINK:
                    await relay.link(self, session, frame)
                else:
                    await session.send(Error(ErrorCode.BAD_REQUEST,
                                             f"expected STEP, LINK or CLOSE, got {frame.type.name}").to_frame())
        finally:
            for other in (session.link, session.upstream):
                if other is not None:
                    with trio.CancelScope(shield=True):
                        await other.reset()

    # -- one step ----------------------------------------------------------------------------------
    async def step(self, session: Session, frame: Frame) -> None:
        """Run one Step (from the client or relayed by the previous server); answer or relay it."""
        session.last_active = trio.current_time()
        async with session.step_lock:
            try:
                await self._step(session, frame)
            finally:
                self.scheduler.settle()

    async def _step(self, session: Session, frame: Frame) -> None:
        try:
            step = Step.from_frame(frame, session.span.cfg.hidden_size, min(config.MAX_STEP_TOKENS, session.max_length))
        except WireError as e:  # the sender's mistake: say so, keep the session
            self.stats.errors += 1
            await session.send(Error(ErrorCode.BAD_REQUEST, str(e), seq_or_none(frame)).to_frame())
            return
        tokens = step.hidden.shape[1]
        share = self._over_share(session, step.position + tokens)
        if share is not None:
            self.stats.errors += 1
            await session.send(Error(ErrorCode.CACHE_FULL, share, step.seq).to_frame())
            return
        session.stepped = True
        try:
            out = await self.scheduler.run(Job(session, session.span, session.cache, step.hidden, step.position,
                                                  tokens))
        except CacheError as e:  # the step cannot be taken; the session stays usable
            self.stats.errors += 1
            await session.send(Error(_CACHE_CODES.get(type(e), ErrorCode.BAD_REQUEST), str(e), step.seq).to_frame())
            return
        wire_dtype = session.wire_dtype or step.hidden.dtype
        if out.dtype != wire_dtype:
            out = out.to(wire_dtype)
        relay_failed = None
        if step.relay and session.link is not None:
            try:
                await session.link.send(Step(step.seq, step.position, out, relay=True).to_frame(),
                                        timeout_s=config.WRITE_TIMEOUT_S)
                self.stats.relayed += 1
                return
            except PeerError as e:  # hand our output to the client, which carries on from here
                link, session.link = session.link, None
                await link.reset()
                relay_failed = str(e)
        await session.send(Output(step.seq, out, relay_failed).to_frame())

    def _over_share(self, session: Session, end: int) -> str | None:
        """Why a step reaching position `end` would take the client past its share of the cache, or None."""
        need = -(-end // self.pool.page_size) - len(session.cache.pages)
        if need <= 0:
            return None
        held = sum(len(s.cache.pages) for s in self.sessions.values() if s.peer == session.peer)
        if held + need <= self.peer_pages:
            return None
        return (f"your sessions hold {held} of this server's {self.pool.num_pages} cache pages and this step needs "
                f"{need} more, past your share of {self.peer_pages}: close a session or try another server")

    def _count(self, steps: int, tokens: int) -> None:
        s = self.stats
        s.steps += steps
        s.tokens_served += tokens
        now = trio.current_time()
        s.recent_steps.extend([now] * steps)

    # -- housekeeping ------------------------------------------------------------------------------
    async def _close_idle_sessions(self) -> None:
        period = min(1.0, self.idle_timeout_s / 3)
        while True:
            await trio.sleep(period)
            now = trio.current_time()
            for session in list(self.sessions.values()):
                idle = now - session.last_active
                if idle > self.idle_timeout_s or (not session.stepped and idle > config.SESSION_FIRST_STEP_S):
                    session.scope.cancel()  # its handler cleans up and frees the pages


# No page free is "not now" (transient); past the session's length or a gap in positions is the request's fault.
_CACHE_CODES = {CacheFullError: ErrorCode.CACHE_FULL, SessionFullError: ErrorCode.TOO_LONG}


