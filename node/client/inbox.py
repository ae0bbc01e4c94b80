"""Reply demultiplexing: one reader task per server stream, all feeding one inbox.

With relay, any server of the chain may be the one that answers a step (its output, an error, or
its death), so the client listens to all of them at once. Every Step and Link carries a sequence
number that its replies echo; a reply to an abandoned attempt, or from a stream the session has
dropped, is skipped here. What a wait ends in is returned as an outcome value, never raised.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import trio
from llmswarm.node.client.remote import RemoteSpan
from llmswarm.node.errors import PeerError, WireError
from llmswarm.node.wire.codec import Frame, MsgType
from llmswarm.node.wire.messages import Error


@dataclass(frozen=True)
class Reply:
    """The awaited server answered: `frame` is its Output (or Linked, Closed...)."""

    span: RemoteSpan
    frame: Frame


@dataclass(frozen=True)
class HopDown:
    """A server of the run failed: its stream broke, it answered an error, or it stalled."""

    span: RemoteSpan
    error: PeerError


@dataclass(frozen=True)
class RelayBroke:
    """A server could not forward to the next one and answered with its own output instead."""

    span: RemoteSpan
    frame: Frame


@dataclass(frozen=True)
class TimedOut:
    """Nothing decisive arrived within the deadline."""


@dataclass(frozen=True)
class Answered:
    """A run of hops computed the step: `hidden` is the last hop's output."""

    hidden: object  # torch.Tensor [1, T, hidden]


@dataclass(frozen=True)
class AllAlive:
    """A relayed step timed out, yet every server of the run answers a ping: retry without relay."""


Outcome = Reply | HopDown | RelayBroke | TimedOut


class Inbox:
    def __init__(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        self._send, self._receive = trio.open_memory_channel[tuple[RemoteSpan, Frame | PeerError]](math.inf)

    def watch(self, spans: list[RemoteSpan]) -> None:
        for s in spans:
            self._nursery.start_soon(self._read, s)

    async def _read(self, span: RemoteSpan) -> None:
        while True:
            try:
                frame = await span.stream.recv(timeout_s=math.inf)  # each wait on a reply is bounded
            except (PeerError, WireError) as e:
                if isinstance(e, WireError):
                    e = PeerError(f"server {span.name} sent a malformed frame: {e}")
                self._send.send_nowait((span, e))
                return
            self._send.send_nowait((span, frame))
            # let the task waiting for this reply run first: arming the next read (a TLS read that
            # finds nothing, an epoll registration) would otherwise come before it, on the decode path
            await trio.lowlevel.checkpoint()

    async def next(self) -> tuple[RemoteSpan, Frame | PeerError]:
        """The next thing any stream delivered; a stream's failure is recorded on its span."""
        span, item = await self._receive.receive()
        if isinstance(item, PeerError):
            span.dead = item
        return span, item

    async def reply(self, expect: RemoteSpan, seq: int, watch: list[RemoteSpan], timeout_s: float) -> Outcome:
        """How request `seq` to the run `watch` ends: `expect`'s reply, or the first failure in the run."""
        for s in watch:
            if s.dead is not None:
                return HopDown(s, s.dead)
        with trio.move_on_after(timeout_s):
            while True:
                span, item = await self.next()
                if span not in watch:
                    continue  # a stream we dropped
                if isinstance(item, PeerError):
                    return HopDown(span, item)
                if item.header.get("seq") != seq:
                    continue  # a reply to an abandoned attempt
                if item.type == MsgType.ERROR:
                    return HopDown(span, Error.from_frame(item).exception())
                if span is expect:
                    return Reply(span, item)
                if item.type == MsgType.OUTPUT and "relay_failed" in item.header:
                    return RelayBroke(span, item)
        return TimedOut()
