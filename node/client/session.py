"""The client side of inference: step hidden states through a chain of servers, with relay and failover.

`InferenceSession.step(hidden, position)` sends the hidden states into the chain and returns the last
server's output. With relay on (the default), the client links each server to the next once (Link),
and a step travels client -> s1 -> s2 -> ... -> client: one message per hop instead of two. A pair
that cannot link (unreachable, refused) is relayed by the client, as every pair is with relay off.

Replies arrive through one inbox (node/client/inbox.py); a failed hop is replaced by
node/client/failover.py. Each attempt ends in an outcome value: Answered, RelayBroke (a server
could not forward and answered itself: carry on from there), HopDown (replace it), AllAlive (a
relayed step stalled but every server answers: retry without relay).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import torch
import trio
from llmswarm.node import config
from llmswarm.node.client import failover
from llmswarm.node.client.failover import Bans, Replan, Resume
from llmswarm.node.client.inbox import AllAlive, Answered, HopDown, Inbox, RelayBroke, Reply
from llmswarm.node.client.remote import RemoteSpan
from llmswarm.node.errors import PeerError, WireError
from llmswarm.node.host import Host
from llmswarm.node.wire.codec import MsgType
from llmswarm.node.wire.messages import Close, Link, NextHop, Output, Step
from llmswarm.routing import Hop

if TYPE_CHECKING:
    from llmswarm.node.client.observed import Observed

RunOutcome = Answered | RelayBroke | HopDown | AllAlive
# run while a step crosses the chain, given a poll for its reply (or None): Drafter.work_ahead
WhileWaiting = Callable[[Callable[[], bool] | None], None]


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
        self.inbox = Inbox(nursery)
        self._nursery = nursery
        self.observer: Observed | None = None  # times decode steps sent to one server alone

    @property
    def chain(self) -> list[Hop]:
        return [s.hop for s in self.spans]

    @property
    def relayed_pairs(self) -> int:
        return sum(s.linked for s in self.spans[:-1])

    # -- steps -------------------------------------------------------------------------------------
    async def step(self, hidden: torch.Tensor, position: int,
                   while_waiting: WhileWaiting | None = None) -> torch.Tensor:
        """The chain's output for `hidden` at `position`. `while_waiting` runs once, right after the step
        is sent (on this thread: the reply waits in the socket meanwhile), given a poll that says
        whether the reply has begun to arrive (None where its stream cannot say): a speculative client
        drafts ahead there until it has (models/speculative.py)."""
        if self.needs_link:
            await self._link_chain()
        i, recoveries = 0, 0
        timed = {s for s in self.spans if self.observer.wants(s.hop.peer_id)} \
            if self.observer is not None and hidden.shape[1] == 1 else set()
        while i < len(self.spans):
            run = self._run_from(i, timed)
            outcome = await self.run(run, hidden, position, while_waiting)
            while_waiting = None
            match outcome:
                case Answered(hidden=out):
                    hidden, i = out, i + len(run)
                case RelayBroke(span=span, frame=frame):
                    span.linked, self.needs_link = False, True
                    hidden, i = self._output(frame, hidden.shape[1]), self.spans.index(span) + 1
                case AllAlive():
                    for s in run[:-1]:
                        s.linked = False
                    self.needs_link = True
                case HopDown() as down:
                    while isinstance(down, HopDown):
                        recoveries += 1
                        if self.replan is None or recoveries > config.MAX_RECOVERIES_PER_STEP:
                            raise down.error
                        down = await failover.recover(self, down, hidden, position)
                    assert isinstance(down, Resume)
                    i, hidden = down.index, down.hidden
        return hidden

    def _run_from(self, i: int, alone: set[RemoteSpan] = frozenset()) -> list[RemoteSpan]:
        """Hops i..j where each one but the last forwards to the next (relay); a hop in `alone` (to be
        timed) is a run of its own."""
        j = i
        while (self.relay and j + 1 < len(self.spans) and self.spans[j].linked
               and not (alone and (self.spans[j] in alone or self.spans[j + 1] in alone))):
            j += 1
        return self.spans[i : j + 1]

    async def run(self, run: list[RemoteSpan], hidden: torch.Tensor, position: int,
                  while_waiting: WhileWaiting | None = None) -> RunOutcome:
        """Send a step to run[0]; with more than one span it is relayed to run[-1], which answers."""
        self.seq += 1
        first, tokens = run[0], hidden.shape[1]  # asked once: each torch call after the reply is a cold one
        wire = hidden if hidden.dtype == self.wire_dtype and hidden.is_contiguous() else \
            hidden.to(self.wire_dtype).contiguous()
        frame = Step(self.seq, position, wire, relay=len(run) > 1).to_frame()
        started = time.perf_counter()
        try:
            await first.stream.send(frame, timeout_s=self.step_timeout_s)
        except PeerError as e:
            return HopDown(first, e)
        finally:  # the replay copies, once the step is on its way: off the decode path
            first.fed(hidden, position)
            for s in run[1:]:
                s.relayed(position)
        if while_waiting is not None:
            while_waiting(run[-1].stream.input_probe())
        outcome = await self.inbox.reply(run[-1], self.seq, run, self.step_timeout_s)
        match outcome:
            case Reply(span=span, frame=reply):
                try:
                    answered = Answered(self._output(reply, tokens))
                except WireError as e:
                    return HopDown(span, PeerError(f"server {span.name} sent a bad output: {e}"))
                if self.observer is not None and len(run) == 1 and tokens == 1:
                    self.observer.sample(first.hop, time.perf_counter() - started)
                return answered
            case HopDown() | RelayBroke():
                return outcome
        return await self._stalled(run)

    def _output(self, frame, tokens: int) -> torch.Tensor:
        out = Output.from_frame(frame, self.hidden_size, tokens).hidden
        return out if out.dtype == self.dtype else out.to(self.dtype)

    async def _stalled(self, run: list[RemoteSpan]) -> HopDown | AllAlive:
        """After a step timed out: the first server of the run that does not answer a ping."""
        timeout = PeerError(f"no answer within the step timeout of {self.step_timeout_s:g} s")
        if len(run) == 1:
            return HopDown(run[0], timeout)
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
        return HopDown(silent[0], timeout) if silent else AllAlive()

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
                await a.stream.send(Link(self.seq, NextHop(b.hop.peer_id, tuple(addrs), b.session_id)).to_frame())
            except PeerError as e:
                a.dead = e
                continue
            pending[self.seq] = a
        with trio.move_on_after(config.LINK_TIMEOUT_S + 1):
            while pending:
                span, item = await self.inbox.next()
                if isinstance(item, PeerError):
                    pending = {k: s for k, s in pending.items() if s is not span}
                    continue
                a = pending.pop(item.header.get("seq"), None)  # type: ignore[arg-type]
                if a is not None:
                    a.linked = item.type == MsgType.LINKED
                    a.link_failed = not a.linked
        for a in pending.values():
            a.link_failed = True

    async def aclose(self) -> None:
        """Close every session (bounded), then drop the streams."""
        waiting = set()
        for s in self.spans:
            if s.dead is None:
                try:
                    await s.stream.send(Close().to_frame(), timeout_s=config.CLOSE_TIMEOUT_S)
                    waiting.add(s)
                except PeerError:
                    pass
        with trio.move_on_after(config.CLOSE_TIMEOUT_S):
            while waiting:
                span, item = await self.inbox.next()
                if isinstance(item, PeerError) or item.type == MsgType.CLOSED:
                    waiting.discard(span)
        self._nursery.cancel_scope.cancel()
        for s in self.spans:
            await s.stream.close()


@asynccontextmanager
async def open_session(host: Host, chain: list[Hop], model: str, hidden_size: int, max_length: int,
                       dtype: torch.dtype, replan: Replan | None = None,
                       notify: Callable[[str], None] = lambda _: None,
                       step_timeout_s: float = config.STEP_TIMEOUT_S, relay: bool = True,
                       wire_dtype: torch.dtype | None = None) -> AsyncIterator[InferenceSession]:
    """Open a session on every hop (a hop that refuses or cannot be reached is failed over when
    `replan` is given), yield it, and close every stream on exit. Errors of the caller and of the
    opening pass through as they are (not wrapped in the readers' nursery's group)."""
    error: BaseException | None = None
    async with trio.open_nursery() as nursery:
        session = InferenceSession(host, model, hidden_size, max_length, dtype, nursery, replan, notify,
                                   step_timeout_s, relay, wire_dtype)
        try:
            session.spans = await failover.open_with_failover(session, chain)
            session.inbox.watch(session.spans)
            yield session
        except BaseException as e:  # noqa: BLE001 - re-raised below, outside the nursery
            error = e
        finally:
            with trio.CancelScope(shield=True):
                await session.aclose()
    if error is not None:
        raise error
