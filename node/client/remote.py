"""One open session on one server of a chain, and opening them.

The client keeps, per hop, the inputs it sent that hop itself (a preallocated buffer written by
position; `valid` says how far it is complete: a step that reached the hop by relay is not in it).
Failover replays them into a replacement server.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import trio
from llmswarm.node import config, dataplane
from llmswarm.node.errors import PeerError, WireError
from llmswarm.node.host import Host
from llmswarm.node.wire.codec import dtype_name
from llmswarm.node.wire.messages import Open, Opened
from llmswarm.node.wire.stream import FramedStream
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

    @property
    def name(self) -> str:
        return self.hop.peer_id[-8:]

    def fed(self, hidden: torch.Tensor, position: int) -> None:
        """We send `hidden` to this hop ourselves: keep it for a replay."""
        if position <= self.valid:
            t = hidden.shape[1]
            self.history[position : position + t] = hidden[0]
            self.valid = position + t

    def relayed(self, position: int) -> None:
        """A step reaches this hop through the previous server: our copy ends before it."""
        self.valid = min(self.valid, position)


@dataclass(frozen=True)
class OpenFailed:
    """A hop whose session could not be opened (unreachable, refused, or a bad answer)."""

    hop: Hop
    error: PeerError


async def open_remote_span(host: Host, hop: Hop, request: Open, hidden_size: int,
                           dtype: torch.dtype) -> RemoteSpan:
    stream = await host.open_stream(hop.peer_id, config.PROTOCOL_INFERENCE)
    try:
        reply = await stream.request(request.to_frame(), timeout_s=config.REQUEST_TIMEOUT_S)
        try:
            opened = Opened.from_frame(reply)
        except WireError as e:
            raise PeerError(f"server {hop.peer_id[-8:]} answered OPEN badly: {e}") from None
        await dataplane.dial(host, stream, opened.direct)  # the session's frames over TLS when it can
    except BaseException:
        await stream.reset()
        raise
    return RemoteSpan(hop, stream, opened.session, hidden_size, request.max_length, dtype)


async def open_all(host: Host, chain: list[Hop], model: str, hidden_size: int, max_length: int,
                   dtype: torch.dtype, wire_dtype: torch.dtype | None,
                   upstreams: list[str | None]) -> list[RemoteSpan] | OpenFailed:
    """Open a session on every hop, in parallel: all of them, or (having closed those that opened)
    the first hop that failed."""
    opened: list[RemoteSpan | None] = [None] * len(chain)
    failed: list[OpenFailed] = []
    wire = dtype_name(wire_dtype) if wire_dtype is not None else None

    async def open_one(i: int, hop: Hop) -> None:
        try:
            opened[i] = await open_remote_span(
                host, hop, Open(model, hop.start, hop.end, max_length, wire, upstreams[i], host.use_direct),
                hidden_size, dtype)
        except PeerError as e:
            failed.append(OpenFailed(hop, e))

    try:
        async with trio.open_nursery() as nursery:
            for i, hop in enumerate(chain):
                nursery.start_soon(open_one, i, hop)
    finally:
        if failed or any(s is None for s in opened):
            with trio.CancelScope(shield=True):
                for s in opened:
                    if s is not None:
                        await s.stream.reset()
    if failed:
        return failed[0]
    return [s for s in opened if s is not None]
