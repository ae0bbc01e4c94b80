"""The server side of inference: admit sessions, run their steps through our span, relay or answer.

One handler task per stream. A stream that begins with OPEN is a client's session; one that begins
with ATTACH is the previous server of that client's chain feeding the session relayed steps. Every
frame is validated before it touches the model; a bad one is answered with an ERROR frame (on the
client's stream, whichever stream it came on) and the session stays usable; anything else that goes
wrong closes only that session.

The KV cache is a pool of fixed-size pages (models/paged_cache.py) shared by all sessions: a session
takes pages as it grows, so admission only checks that the session could fit, and the announced
cache room is the free pages. Steps go through the Scheduler, which batches concurrent decode steps.
"""

from __future__ import annotations

import math
import secrets
import time
from collections import deque
from dataclasses import dataclass, field

import torch
import trio
from llmswarm.models.errors import CacheFullError
from llmswarm.models.paged_cache import PagedSequence
from llmswarm.models.span import Span
from llmswarm.node import config
from llmswarm.node.errors import PeerClosed, PeerError, RemoteError, WireError
from llmswarm.node.host import Host
from llmswarm.node.server.scheduler import Job, Scheduler
from llmswarm.node.wire.codec import (
    DTYPES,
    Frame,
    FramedStream,
    MsgType,
    NextHop,
    OpenRequest,
    error_frame,
    output_frame,
    parse_seq,
    parse_session_id,
    parse_step,
    step_frame,
)


@dataclass
class ServerStats:
    sessions: int = 0
    sessions_total: int = 0
    tokens_served: int = 0  # new tokens run through the span (prefill + decode)
    steps: int = 0
    errors: int = 0
    relayed: int = 0  # outputs sent on to the next server instead of back to the client
    recent_steps: deque[float] = field(default_factory=lambda: deque(maxlen=4096))  # monotonic times

    def steps_per_s(self, window_s: float = 5.0) -> float:
        now = time.monotonic()
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
    send_lock: trio.Lock = field(default_factory=trio.Lock)  # client stream: written by two tasks
    step_lock: trio.Lock = field(default_factory=trio.Lock)  # one step of a session at a time
    link: FramedStream | None = None  # to the next server, for relayed outputs
    upstream: FramedStream | None = None  # from the previous server, relayed inputs
    last_active: float = field(default_factory=time.monotonic)
    closed: bool = False
    # Resetting a stream does not wake our own pending read of it: tasks are ended by cancelling these.
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    upstream_scope: trio.CancelScope | None = None


class SpanServer:
    def __init__(self, model: str, span: Span, max_sessions: int = config.DEFAULT_MAX_SESSIONS,
                 cache_tokens: int | None = None,
                 idle_timeout_s: float = config.SESSION_IDLE_TIMEOUT_S, host: Host | None = None,
                 batch_window_s: float = config.BATCH_WINDOW_S,
                 batch_window_fraction: float = config.BATCH_WINDOW_FRACTION) -> None:
        self.model, self.span = model, span
        self.max_sessions = max_sessions
        # One pool for the whole span: a session entering mid-span uses its first layers (its pages
        # are its own, so layer i of its sub-span can live in pool layer i).
        if cache_tokens is None:  # the pool is allocated now: size the default by memory, not just tokens
            cache_tokens = min(config.DEFAULT_CACHE_TOKENS, config.DEFAULT_CACHE_BYTES // span.cache_bytes_per_token())
        self.pool = span.new_pool(max(1, cache_tokens // config.PAGE_TOKENS), config.PAGE_TOKENS)
        self.cache_tokens = self.pool.num_pages * self.pool.page_size
        self.idle_timeout_s = idle_timeout_s
        self.host = host  # needed to dial next hops (relay); None: LINK is refused
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
        """Serve one stream: a session (OPEN) until CLOSE, EOF, idle timeout or a fatal error, or a
        relay feed (ATTACH) until its session ends."""
        first = await stream.recv(timeout_s=config.READ_TIMEOUT_S)
        if first.type == MsgType.ATTACH:
            await self._serve_upstream(stream, first)
            return
        req = OpenRequest.parse(first)
        span = self._admit(req)
        session = Session(secrets.token_hex(16), span, self.pool.sequence(req.max_length), req.max_length, stream,
                          DTYPES[req.wire_dtype] if req.wire_dtype else None, req.upstream)
        self.sessions[session.id] = session
        self.stats.sessions += 1
        self.stats.sessions_total += 1
        try:
            await stream.send(Frame(MsgType.OPENED, {"session": session.id, "max_length": req.max_length,
                                                     "cache_tokens_left": self.cache_tokens_left}))
            with session.scope:
                await self._serve_client(session)
        finally:
            self._end(session)

    def _admit(self, req: OpenRequest) -> Span:
        if req.model != self.model:
            raise RemoteError("wrong_model", f"this server serves {self.model}, not {req.model}")
        if not self.span.start <= req.start < req.end <= self.span.end:
            raise RemoteError("wrong_span", f"blocks {req.start}:{req.end} are not all in this server's "
                                            f"{self.span.start}:{self.span.end}")
        if not 0 < req.max_length <= config.MAX_SESSION_LENGTH:
            raise RemoteError("too_long", f"max_length must be 1..{config.MAX_SESSION_LENGTH}, got {req.max_length}")
        if self.stats.sessions >= self.max_sessions:
            raise RemoteError("busy", f"server is at its limit of {self.max_sessions} sessions: try another")
        if req.max_length > self.cache_tokens:
            raise RemoteError("cache_full", f"this server's whole cache holds {self.cache_tokens} tokens, the "
                                            f"session asks {req.max_length}: try another or a shorter --max-length")
        if self.pool.free_pages == 0:
            raise RemoteError("cache_full", "this server's cache is full (no free page): try another server")
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
                    frame = await stream.recv(timeout_s=math.inf)  # idleness: see _close_idle_sessions
                except PeerClosed:
                    return  # client went away: free the cache quietly
                if frame.type == MsgType.CLOSE:
                    await self._send_client(session, Frame(MsgType.CLOSED))
                    return
                if frame.type == MsgType.STEP:
                    await self._step(session, frame)
                elif frame.type == MsgType.LINK:
                    await self._link(session, frame)
                else:
                    await self._send_client(session, error_frame(
                        "bad_request", f"expected STEP, LINK or CLOSE, got {frame.type.name}"))
        finally:
            for other in (session.link, session.upstream):
                if other is not None:
                    with trio.CancelScope(shield=True):
                        await other.reset()

    async def _serve_upstream(self, stream: FramedStream, first: Frame) -> None:
        """A stream from the previous server of a chain: relayed STEPs for one of our sessions."""
        session = self.sessions.get(parse_session_id(first.header.get("session")))
        if session is None or session.upstream_peer != stream.remote_peer_id:
            raise RemoteError("unknown_session", "no such session for this peer")  # same answer: no oracle
        if session.upstream_scope is not None:  # a re-link replaces the old feed
            session.upstream_scope.cancel()
        session.upstream, session.upstream_scope = stream, trio.CancelScope()
        await stream.send(Frame(MsgType.ATTACHED))
        with session.upstream_scope:
            while not session.closed:
                try:
                    frame = await stream.recv(timeout_s=math.inf)
                except PeerError:
                    return  # the previous server went away or was replaced: the client will notice
                if frame.type == MsgType.STEP and not session.closed:
                    await self._step(session, frame)
                elif frame.type == MsgType.CLOSE:
                    return
                # anything else from a server is ignored: only the client may be answered
        await stream.reset()

    # -- one step ----------------------------------------------------------------------------------
    async def _step(self, session: Session, frame: Frame) -> None:
        session.last_active = time.monotonic()
        async with session.step_lock:
            try:
                seq = parse_seq(frame)
            except WireError as e:
                self.stats.errors += 1
                await self._send_client(session, error_frame("bad_request", str(e)))
                return
            try:
                position, hidden = parse_step(frame, session.span.cfg.hidden_size,
                                              min(config.MAX_STEP_TOKENS, session.max_length))
                session.cache.reserve(position, hidden.shape[1])  # pages now, or a clear refusal
            except (WireError, CacheFullError) as e:  # the client's mistake or no page left: say so
                self.stats.errors += 1
                code = "cache_full" if isinstance(e, CacheFullError) else "bad_request"
                await self._send_client(session, error_frame(code, str(e), seq))
                return
            try:
                out = await self.scheduler.run(Job(session, session.span, session.cache, hidden, position))
            except CacheFullError as e:
                await self._send_client(session, error_frame("cache_full", str(e), seq))
                return
            out = out.to(session.wire_dtype or hidden.dtype)
            if frame.header.get("relay") is True and session.link is not None:
                relay, _keep = step_frame(position, out, seq, relay=True)
                try:
                    await session.link.send(relay, timeout_s=config.WRITE_TIMEOUT_S)
                    self.stats.relayed += 1
                    return
                except PeerError as e:  # hand our output to the client, which carries on from here
                    link, session.link = session.link, None
                    await link.reset()
                    reply, _keep = output_frame(out, seq, relay_failed=str(e))
            else:
                reply, _keep = output_frame(out, seq)
            await self._send_client(session, reply)

    def _count(self, steps: int, tokens: int) -> None:
        s = self.stats
        s.steps += steps
        s.tokens_served += tokens
        now = time.monotonic()
        s.recent_steps.extend([now] * steps)

    async def _send_client(self, session: Session, frame: Frame) -> None:
        async with session.send_lock:
            await session.client.send(frame)

    # -- relay -------------------------------------------------------------------------------------
    async def _link(self, session: Session, frame: Frame) -> None:
        """Dial the next server and attach to the client's session there."""
        seq = None
        try:
            seq = parse_seq(frame)
            nxt = NextHop.parse(frame)
            if self.host is None:
                raise RemoteError("no_relay", "this server does not relay")
            stream = await self._attach(nxt)
        except (WireError, PeerError) as e:
            self.stats.errors += 1
            code = e.code if isinstance(e, RemoteError) else ("bad_request" if isinstance(e, WireError)
                                                               else "link_failed")
            await self._send_client(session, error_frame(code, f"cannot relay to the next server: {e}", seq))
            return
        if session.closed:
            await stream.reset()
            return
        if session.link is not None:
            await session.link.reset()
        session.link = stream
        await self._send_client(session, Frame(MsgType.LINKED, {"seq": seq}))

    async def _attach(self, nxt: NextHop) -> FramedStream:
        host = self.host
        with trio.move_on_after(config.LINK_TIMEOUT_S) as scope:
            await host.connect_any(nxt.peer_id, list(nxt.addrs), deadline_s=config.LINK_TIMEOUT_S)
            stream = await host.open_stream(nxt.peer_id, config.PROTOCOL_INFERENCE)
        if scope.cancelled_caught:
            raise PeerError(f"could not reach the next server within {config.LINK_TIMEOUT_S:g} s")
        try:
            reply = await stream.request(Frame(MsgType.ATTACH, {"session": nxt.session}),
                                         timeout_s=config.LINK_TIMEOUT_S)
            if reply.type != MsgType.ATTACHED:
                raise PeerError(f"next server answered ATTACH with {reply.type.name}")
        except BaseException:
            await stream.reset()
            raise
        return stream

    # -- housekeeping ------------------------------------------------------------------------------
    async def _close_idle_sessions(self) -> None:
        period = min(1.0, self.idle_timeout_s / 3)
        while True:
            await trio.sleep(period)
            now = time.monotonic()
            for session in list(self.sessions.values()):
                if now - session.last_active > self.idle_timeout_s:
                    session.scope.cancel()  # its handler cleans up and frees the pages
