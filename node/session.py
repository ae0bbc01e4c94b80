"""The client side of inference: one long-lived stream per server of the chain, and failover.

`InferenceSession.step(hidden, position)` sends the hidden states through every hop in turn and
returns the last one's output. Each hop keeps the inputs it was sent (a preallocated buffer
written by position). When a hop dies, stalls past the step timeout, or answers an error, the
server is banned (growing backoff), the route is solved again without it, the new hops are opened
and fed the kept inputs from position 0 (rebuilding their caches; the server side positions its
cache by the step's `position`, so a replay can never be mistaken for a continuation, the defect of
petals #587), and the step resumes at the first new hop.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import torch
import trio
from llmswarm.routing import Hop

from . import config
from .errors import PeerError, RemoteError
from .host import Host
from .wire import Frame, FramedStream, MsgType, OpenRequest, parse_output, raise_if_error, step_frame


class RemoteSpan:
    """One open session on one server."""

    def __init__(self, hop: Hop, stream: FramedStream, hidden_size: int, max_length: int, dtype: torch.dtype):
        self.hop, self.stream = hop, stream
        self.hidden_size = hidden_size
        self.history = torch.empty(max_length, hidden_size, dtype=dtype)  # inputs sent, by position
        self.length = 0  # positions of `history` that are valid

    async def step(self, hidden: torch.Tensor, position: int, timeout_s: float) -> torch.Tensor:
        t = hidden.shape[1]
        frame, _keep = step_frame(position, hidden)
        await self.stream.send(frame, timeout_s=timeout_s)
        out = parse_output(await self.stream.recv(timeout_s=timeout_s), self.hidden_size, t)
        self.history[position : position + t] = hidden[0]
        self.length = position + t
        return out

    async def close(self) -> None:
        try:
            await self.stream.send(Frame(MsgType.CLOSE), timeout_s=config.CLOSE_TIMEOUT_S)
            raise_if_error(await self.stream.recv(timeout_s=config.CLOSE_TIMEOUT_S))
        except PeerError:
            pass
        await self.stream.close()


async def open_remote_span(host: Host, hop: Hop, model: str, hidden_size: int, max_length: int,
                           dtype: torch.dtype) -> RemoteSpan:
    stream = await host.open_stream(hop.peer_id, config.PROTOCOL_INFERENCE)
    try:
        reply = await stream.request(OpenRequest(model, hop.start, hop.end, max_length).frame(),
                                     timeout_s=config.REQUEST_TIMEOUT_S)
        if reply.type != MsgType.OPENED:
            raise PeerError(f"server {hop.peer_id[-8:]} answered OPEN with {reply.type.name}")
    except BaseException:
        await stream.reset()
        raise
    return RemoteSpan(hop, stream, hidden_size, max_length, dtype)


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
                 spans: list[RemoteSpan], replan: Replan | None = None,
                 notify: Callable[[str], None] = lambda _: None,
                 step_timeout_s: float = config.STEP_TIMEOUT_S) -> None:
        self.host, self.model, self.hidden_size = host, model, hidden_size
        self.max_length, self.dtype = max_length, dtype
        self.spans = spans
        self.replan, self.notify = replan, notify
        self.step_timeout_s = step_timeout_s
        self.bans = Bans()
        self.recoveries = 0

    @property
    def chain(self) -> list[Hop]:
        return [s.hop for s in self.spans]

    async def step(self, hidden: torch.Tensor, position: int) -> torch.Tensor:
        i, attempts = 0, 0
        while i < len(self.spans):
            try:
                out = await self.spans[i].step(hidden, position, self.step_timeout_s)
            except PeerError as e:
                attempts += 1
                if self.replan is None or attempts > config.MAX_RECOVERIES_PER_STEP:
                    raise
                i, hidden = await self._recover(i, hidden, position, e)
                continue
            hidden, i = out, i + 1
        return hidden

    async def _recover(self, i: int, step_input: torch.Tensor, position: int,
                       error: PeerError) -> tuple[int, torch.Tensor]:
        """Replace hop i (and whatever the new route changes after the shared prefix), rebuild the
        replacements' caches by replaying the inputs the old hops were sent, and return where to
        resume: (index of the first new hop, this step's input to it)."""
        started = time.monotonic()
        failed = self.spans[i].hop
        duration = self.bans.ban(failed.peer_id, refused=isinstance(error, RemoteError))
        self.notify(f"server {failed.peer_id[-8:]} failed on blocks {failed.start}:{failed.end} ({error}); "
                    f"avoiding it for {duration:g} s and re-routing")
        assert self.replan is not None
        chain = await self.replan(self.bans)
        old = self.spans
        k = 0
        while k < min(i, len(chain)) and chain[k] == old[k].hop:
            k += 1
        t = step_input.shape[1]
        resume = step_input if k == i else old[k].history[position : position + t].unsqueeze(0).clone()
        past = old[k].history[:position].unsqueeze(0).clone()  # what hop k's blocks have seen so far
        for j in range(k, len(old)):
            if j != i:  # the failed stream gets no goodbye: its peer is dead or hung (the server frees
                await old[j].stream.reset()  # its cache on EOF or idle timeout); live ones are told now
        new = await _open_all(self.host, chain[k:], self.model, self.hidden_size, self.max_length, self.dtype)
        try:
            x = past
            if position > 0:
                for s in new:
                    x = await s.step(x, 0, self.step_timeout_s)
        except BaseException:
            for s in new:
                await s.stream.reset()
            raise
        self.spans = old[:k] + new
        self.recoveries += 1
        names = " -> ".join(f"{h.peer_id[-8:]} [{h.start}:{h.end})" for h in chain[k:])
        self.notify(f"recovered in {time.monotonic() - started:.2f} s: replayed {position} tokens into {names}")
        return k, resume


async def _open_all(host: Host, chain: list[Hop], model: str, hidden_size: int, max_length: int,
                    dtype: torch.dtype) -> list[RemoteSpan]:
    """Open a session on every hop, in parallel; on any failure close those that opened."""
    opened: list[RemoteSpan | None] = [None] * len(chain)

    async def open_one(i: int, hop: Hop) -> None:
        opened[i] = await open_remote_span(host, hop, model, hidden_size, max_length, dtype)

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
                       step_timeout_s: float = config.STEP_TIMEOUT_S) -> AsyncIterator[InferenceSession]:
    """Open a session on every hop, yield it, and close every stream on exit."""
    spans = await _open_all(host, chain, model, hidden_size, max_length, dtype)
    session = InferenceSession(host, model, hidden_size, max_length, dtype, spans, replan, notify, step_timeout_s)
    try:
        yield session
    finally:
        with trio.CancelScope(shield=True):
            for s in session.spans:
                await s.close()
