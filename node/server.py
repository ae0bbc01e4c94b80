"""The server side of inference: admit sessions, run their steps through our span, answer.

One handler task per stream (= per client session). Every frame is validated before it touches the
model; a bad one is answered with an ERROR frame and the session stays usable; anything else that
goes wrong closes only that session. The span's compute runs one step at a time, either inline on
the event loop (config.SERVER_COMPUTE_INLINE: no thread hand-off on the hot path) or in a worker
thread behind a CapacityLimiter of 1 (two steps at once would only fight over the same cores).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import torch
import trio
from llmswarm.models.errors import CacheFullError
from llmswarm.models.span import Span

from . import config
from .errors import PeerClosed, RemoteError, WireError
from .wire import Frame, FramedStream, MsgType, OpenRequest, error_frame, output_frame, parse_step


@dataclass
class ServerStats:
    sessions: int = 0
    sessions_total: int = 0
    tokens_served: int = 0  # new tokens run through the span (prefill + decode)
    steps: int = 0
    errors: int = 0
    recent_steps: deque[float] = field(default_factory=lambda: deque(maxlen=4096))  # monotonic times

    def steps_per_s(self, window_s: float = 5.0) -> float:
        now = time.monotonic()
        return sum(1 for t in self.recent_steps if now - t < window_s) / window_s


class SpanServer:
    def __init__(self, model: str, span: Span, max_sessions: int = config.DEFAULT_MAX_SESSIONS,
                 cache_tokens: int = config.DEFAULT_CACHE_TOKENS,
                 idle_timeout_s: float = config.SESSION_IDLE_TIMEOUT_S) -> None:
        self.model, self.span = model, span
        self.max_sessions = max_sessions
        self.cache_tokens = cache_tokens  # budget: sum of admitted sessions' max_length
        self.cache_tokens_reserved = 0
        self.idle_timeout_s = idle_timeout_s
        self.stats = ServerStats()
        self.compute = trio.CapacityLimiter(1)

    @property
    def cache_tokens_left(self) -> int:
        return self.cache_tokens - self.cache_tokens_reserved

    # -- one session ------------------------------------------------------------------------------
    async def handle(self, stream: FramedStream) -> None:
        """Serve one session stream until CLOSE, EOF, idle timeout or a fatal error."""
        req = OpenRequest.parse(await stream.recv(timeout_s=config.READ_TIMEOUT_S))
        span = self._admit(req)
        cache = span.new_cache(req.max_length)
        self.cache_tokens_reserved += req.max_length
        self.stats.sessions += 1
        self.stats.sessions_total += 1
        try:
            await stream.send(Frame(MsgType.OPENED, {"max_length": req.max_length,
                                                     "cache_tokens_left": self.cache_tokens_left}))
            await self._serve_steps(stream, span, cache)
        finally:
            self.stats.sessions -= 1
            self.cache_tokens_reserved -= req.max_length
            del cache

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
        if req.max_length > self.cache_tokens_left:
            raise RemoteError("cache_full", f"server has room for {self.cache_tokens_left} more cache tokens, "
                                            f"the session asks {req.max_length}: try another or a shorter --max-length")
        return self.span.sub(req.start, req.end)

    async def _serve_steps(self, stream: FramedStream, span: Span, cache) -> None:
        hidden_size = span.cfg.hidden_size
        while True:
            try:
                frame = await stream.recv(timeout_s=self.idle_timeout_s)
            except PeerClosed:
                return  # client went away: free the cache quietly
            if frame.type == MsgType.CLOSE:
                await stream.send(Frame(MsgType.CLOSED))
                return
            if frame.type != MsgType.STEP:
                await stream.send(error_frame("bad_request", f"expected STEP or CLOSE, got {frame.type.name}"))
                continue
            try:
                position, hidden = parse_step(frame, hidden_size, min(config.MAX_STEP_TOKENS, cache.max_length))
                cache.check_room(position, hidden.shape[1])
            except (WireError, CacheFullError) as e:  # the client's mistake: say so, keep the session
                self.stats.errors += 1
                await stream.send(error_frame("cache_full" if isinstance(e, CacheFullError) else "bad_request", str(e)))
                continue
            out = await self._run(span, hidden, cache, position)
            reply, _keep = output_frame(out.to(hidden.dtype))
            await stream.send(reply)

    async def _run(self, span: Span, hidden: torch.Tensor, cache, position: int) -> torch.Tensor:
        if config.SERVER_COMPUTE_INLINE:
            out = span.forward(hidden, cache, position)  # one step at a time: the loop is ours meanwhile
        else:
            async with self.compute:
                out = await trio.to_thread.run_sync(span.forward, hidden, cache, position)
        s = self.stats
        s.steps += 1
        s.tokens_served += hidden.shape[1]
        s.recent_steps.append(time.monotonic())
        return out

