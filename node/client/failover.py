"""Failover: which servers to avoid for how long, and how a session replaces a failed hop.

When a hop dies, stalls past the step timeout, or answers an error, the server is banned (growing
backoff), the route is solved again without it, and the new hops are opened and fed, from position
0, the kept inputs of the latest hop whose history is complete (with relay, usually the first),
rebuilding their caches. The server positions its cache by the step's `position`, so a replay is
never mistaken for a continuation (the defect of petals #587).
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from llmswarm.node import config
from llmswarm.node.client.inbox import Answered, HopDown
from llmswarm.node.client.remote import OpenFailed, RemoteSpan, open_all
from llmswarm.node.errors import PeerError, RemoteError
from llmswarm.routing import Hop

if TYPE_CHECKING:
    from llmswarm.node.client.session import InferenceSession


class Bans:
    """Servers to avoid, each for a while that doubles with every further failure. A server that
    died (no answer) is usable again as soon as it answers a ping (restarted, same peer id); one that
    refused us (an ERROR reply) stays avoided until its time is up."""

    def __init__(self, base_s: float = config.BAN_BASE_S) -> None:
        self.base_s = base_s
        self.until: dict[str, float] = {}
        self.failures: dict[str, int] = {}
        self.refused: set[str] = set()
        self.distrusted: set[str] = set()  # caught returning wrong outputs: avoided for the whole session

    def distrust(self, peer_id: str) -> None:
        self.distrusted.add(peer_id)
        self.refused.add(peer_id)
        self.until[peer_id] = math.inf

    def ban(self, peer_id: str, error: PeerError) -> float:
        if peer_id in self.distrusted:
            return math.inf
        refused = isinstance(error, RemoteError)
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


@dataclass(frozen=True)
class Resume:
    """Recovered: carry the step on at hop `index` with `hidden` as its input."""

    index: int
    hidden: torch.Tensor


async def open_with_failover(session: InferenceSession, chain: list[Hop],
                             upstream: str | None = None) -> list[RemoteSpan]:
    """Open `chain`; a hop that cannot be opened is banned and the chain re-planned, like a failed step."""
    for _ in range(config.MAX_RECOVERIES_PER_STEP + 1):
        ups = [upstream if i == 0 else chain[i - 1].peer_id for i in range(len(chain))]
        opened = await open_all(session.host, chain, session.model, session.hidden_size, session.max_length,
                                session.dtype, session.wire_dtype, ups)
        if not isinstance(opened, OpenFailed):
            return opened
        if session.replan is None:
            raise opened.error
        _ban(session, opened.hop, opened.error)
        chain = await session.replan(session.bans)
    raise opened.error


async def recover(session: InferenceSession, down: HopDown, step_input: torch.Tensor,
                  position: int) -> Resume | HopDown:
    """Replace the failed hop (and whatever the new route changes after the shared prefix), rebuild
    the replacements' caches by replaying the inputs kept for the latest hop whose history is
    complete, and say where to resume. A replacement that fails in turn is returned as a HopDown."""
    assert session.replan is not None
    started = time.monotonic()
    old = session.spans
    m = old.index(down.span)
    _ban(session, down.span.hop, down.error)
    chain = await session.replan(session.bans)
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
    new = await open_with_failover(session, chain[k:], upstream=chain[k - 1].peer_id if k > 0 else None)
    session.inbox.watch(new)
    session.spans = old[:k] + new
    session.needs_link = session.relay
    if position > 0:
        x = past
        for s in new:
            outcome = await session.run([s], x, 0)
            if not isinstance(outcome, Answered):  # a single hop's run ends answered or down
                return outcome if isinstance(outcome, HopDown) else HopDown(s, PeerError(f"server {s.name} "
                                                                                         "failed the replay"))
            x = outcome.hidden
    session.recoveries += 1
    names = " -> ".join(f"{h.peer_id[-8:]} [{h.start}:{h.end})" for h in session.chain[k:])
    session.notify(f"recovered in {time.monotonic() - started:.2f} s: replayed {position} tokens into {names}")
    return Resume(k, resume)


def _ban(session: InferenceSession, hop: Hop, error: PeerError) -> None:
    duration = session.bans.ban(hop.peer_id, error)
    if math.isinf(duration):
        return  # distrusted: node/client/verify.py has told the person already
    session.notify(f"server {hop.peer_id[-8:]} failed on blocks {hop.start}:{hop.end} ({error}); "
                   f"avoiding it for {duration:g} s and re-routing")
