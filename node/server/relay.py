"""Server-to-server relay: a Link from the client makes us dial the next server and Attach to the
session the client opened there; an Attach from the previous server feeds one of our sessions.

A Link names the next server's peer id; we relay only to a server that a live record says holds
the block after the session's span, and we dial the addresses of that record, not the ones the
client sent: a client cannot make us dial anything else. Every failure is answered with the same
line, so nothing about the target's ports shows through (details go to the debug log).
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import trio
from llmswarm.node import config, dataplane
from llmswarm.node.errors import ErrorCode, PeerError, RemoteError, WireError
from llmswarm.node.wire.codec import Frame, MsgType
from llmswarm.node.wire.messages import Attach, Attached, Error, Link, Linked, NextHop, seq_or_none
from llmswarm.node.wire.stream import FramedStream

if TYPE_CHECKING:
    from llmswarm.node.server.span_server import Session, SpanServer

log = logging.getLogger(__name__)


async def link(server: SpanServer, session: Session, frame: Frame) -> None:
    """Dial the next server and attach to the client's session there; answer Linked or Error."""
    try:
        request = Link.from_frame(frame)
    except WireError as e:
        server.stats.errors += 1
        await session.send(Error(ErrorCode.BAD_REQUEST, str(e), seq_or_none(frame)).to_frame())
        return
    try:
        if server.host is None:
            raise RemoteError(ErrorCode.NO_RELAY, "this server does not relay")
        nxt = request.next
        if server.next_hop is not None:
            addrs = await server.next_hop(nxt.peer_id, session.span.end)
            if not addrs:
                raise PeerError(f"no live record of {nxt.peer_id[-8:]} holding block {session.span.end}")
            nxt = NextHop(nxt.peer_id, tuple(addrs), nxt.session)
        stream = await _attach(server, nxt)
    except PeerError as e:
        server.stats.errors += 1
        log.debug("LINK to %s refused or failed: %s", request.next.peer_id[-8:], e)
        if isinstance(e, RemoteError) and e.code is ErrorCode.NO_RELAY:
            await session.send(Error(e.code, str(e), request.seq).to_frame())
        else:
            await session.send(Error(ErrorCode.LINK_FAILED, f"cannot relay to {request.next.peer_id[-8:]}: "
                                     "the client relays this pair itself", request.seq).to_frame())
        return
    if session.closed:
        await stream.reset()
        return
    if session.link is not None:
        await session.link.reset()
    session.link = stream
    await session.send(Linked(request.seq).to_frame())


async def _attach(server: SpanServer, nxt: NextHop) -> FramedStream:
    host = server.host
    assert host is not None
    with trio.move_on_after(config.LINK_TIMEOUT_S) as scope:
        await host.connect_any(nxt.peer_id, list(nxt.addrs), deadline_s=config.LINK_TIMEOUT_S)
        stream = await host.open_stream(nxt.peer_id, config.PROTOCOL_INFERENCE)
    if scope.cancelled_caught:
        raise PeerError(f"could not reach the next server within {config.LINK_TIMEOUT_S:g} s")
    try:
        reply = await stream.request(Attach(nxt.session).to_frame(), timeout_s=config.LINK_TIMEOUT_S)
        try:
            offer = Attached.from_frame(reply).direct
        except WireError as e:
            raise PeerError(f"next server answered ATTACH badly: {e}") from None
        await dataplane.dial(host, stream, offer)  # relayed steps go over TLS when it can; else libp2p
    except BaseException:
        await stream.reset()
        raise
    return stream


async def serve_upstream(server: SpanServer, stream: FramedStream, first: Frame) -> None:
    """A stream from the previous server of a chain: relayed Steps for one of our sessions."""
    session = server.sessions.get(Attach.from_frame(first).session)
    if session is None or session.upstream_peer != stream.remote_peer_id:
        raise RemoteError(ErrorCode.UNKNOWN_SESSION, "no such session for this peer")  # same answer: no oracle
    if session.upstream_scope is not None:  # a re-link replaces the old feed
        session.upstream_scope.cancel()
    session.upstream, session.upstream_scope = stream, trio.CancelScope()
    await stream.send(Attached(server.offer_direct(session, stream)).to_frame())
    with session.upstream_scope:
        while not session.closed:
            try:
                frame = await stream.recv(timeout_s=math.inf, max_body=session.max_body)
            except PeerError:
                return  # the previous server went away or was replaced: the client will notice
            if frame.type == MsgType.STEP and not session.closed:
                await server.step(session, frame)
            elif frame.type == MsgType.CLOSE:
                return
            # anything else from a server is ignored: only the client may be answered
    await stream.reset()

