"""The client side of inference: one long-lived stream per server of the chain.

`InferenceSession.step(hidden, position)` sends the hidden states through every hop in turn and
returns the last one's output. Each hop keeps the inputs it was sent (a preallocated buffer
written by position), so a replacement server can be brought up to date by replaying them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import torch
import trio
from llmswarm.routing import Hop

from . import config
from .errors import PeerError
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


class InferenceSession:
    def __init__(self, spans: list[RemoteSpan], step_timeout_s: float = config.STEP_TIMEOUT_S) -> None:
        self.spans = spans
        self.step_timeout_s = step_timeout_s

    async def step(self, hidden: torch.Tensor, position: int) -> torch.Tensor:
        for span in self.spans:
            hidden = await span.step(hidden, position, self.step_timeout_s)
        return hidden


@asynccontextmanager
async def open_session(host: Host, chain: list[Hop], model: str, hidden_size: int, max_length: int,
                       dtype: torch.dtype) -> AsyncIterator[InferenceSession]:
    """Open a session on every hop (in parallel), yield it, and close every stream on exit."""
    opened: list[RemoteSpan | None] = [None] * len(chain)

    async def open_one(i: int, hop: Hop) -> None:
        opened[i] = await open_remote_span(host, hop, model, hidden_size, max_length, dtype)

    try:
        async with trio.open_nursery() as nursery:
            for i, hop in enumerate(chain):
                nursery.start_soon(open_one, i, hop)
        yield InferenceSession([s for s in opened if s is not None])
    finally:
        with trio.CancelScope(shield=True):
            for s in opened:
                if s is not None:
                    await s.close()
