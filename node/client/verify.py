"""Output checks: is the chain computing the model, or is a server returning something else?

The client logs, by position, what it sent into the chain (the embeddings) and what came back (the
last block's output). Every `period` steps (`chat --verify-rate R`: period 1/R; `all`: 1) it sends
every input since the last check as one batched step to a *second chain*, a session on other
servers holding the same blocks (wherever the swarm has them: a span held by one server only is
shared and cannot be checked), in the background while the answer goes on, and compares the outputs
position by position, within the tolerance
that the dtypes and quantisation of both chains allow (models/precision.py). So every position is
checked, `period` at a time, at the cost of one batched step per check.

A disagreement is settled per server (`_diagnose`): the history is replayed, server by server, into
fresh sessions on the primary chain's server and on another holder of the same blocks; where they
differ a third holder decides, and the server in the minority is distrusted: banned for the
session (node/client/failover.py), recorded as a failed check in the reputation (excluded from
routes from then on), and a primary server is marked dead so the next step fails over and replays
onto honest servers. One warning line tells the person. node/client/checked_turn.py rolls the
answer back to the first wrong position and holds text back until it is checked.
"""

from __future__ import annotations

from contextlib import AsyncExitStack
from dataclasses import dataclass, field

import torch
import trio
from llmswarm.models.local import ClientModel
from llmswarm.models.precision import relative_error, relative_tolerance
from llmswarm.node import config
from llmswarm.node.client.observed import Observed
from llmswarm.node.client.remote import open_remote_span
from llmswarm.node.client.route import plan_route
from llmswarm.node.client.session import InferenceSession, open_session
from llmswarm.node.discovery.directory import Directory
from llmswarm.node.discovery.records import ServerRecord
from llmswarm.node.discovery.swarm_view import live_records
from llmswarm.node.errors import NodeError, PeerError, UsageError
from llmswarm.node.host import Host
from llmswarm.node.wire.messages import Open, Output, Step
from llmswarm.routing import Hop, NoRouteError, RoutingError


def parse_verify_rate(text: str | float | None) -> float:
    """--verify-rate: a share of steps in [0, 1] ("all" = 1, "off" = 0); a clear error otherwise."""
    if text is None:
        return config.DEFAULT_VERIFY_RATE
    if isinstance(text, str) and text.strip().lower() in ("all", "off"):
        return 1.0 if text.strip().lower() == "all" else 0.0
    try:
        rate = float(text)
    except ValueError:
        raise UsageError(f"--verify-rate {text!r}: give a share of steps from 0 to 1, `all` or `off`") from None
    if not 0.0 <= rate <= 1.0:
        raise UsageError(f"--verify-rate {text!r}: give a share of steps from 0 to 1, `all` or `off`")
    return rate


@dataclass
class VerifyStats:
    checks: int = 0
    positions_checked: int = 0
    disagreements: int = 0
    liars: list[str] = field(default_factory=list)
    caught_at_step: list[int] = field(default_factory=list)  # the session's step count at each detection
    worst_error: float = 0.0  # largest relative error seen in a check that passed
    unchecked: str | None = None  # why some blocks or all could not be checked


@dataclass
class _Check:
    """One check in flight: positions [a, b) on the second chain."""

    a: int
    b: int
    done: trio.Event = field(default_factory=trio.Event)
    error: torch.Tensor | None = None  # relative error per position
    failed: NodeError | RoutingError | None = None
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)  # cancelled when the session ends


class Verifier:
    """The log of one session's inputs and outputs, the second chain, checks and their settling."""

    def __init__(self, host: Host, directory: Directory, model: ClientModel, session: InferenceSession,
                 observed: Observed, rate: float, max_length: int, solver: str, prefer: str,
                 notify, relay: bool = True, nursery: trio.Nursery | None = None, asked: bool = True) -> None:
        """`nursery`: where checks run beside the answer (None: each check is awaited). It must be
        opened before the verifier's first check and outlive `aclose()`: the second chain's session is
        opened inside it, in the caller's task, and trio nests scopes strictly. `asked`: the person
        asked for checks (--verify-rate); when they are only the default, a swarm where no second
        server holds the blocks (a user's own swarm, `demo`) is not worth a warning on every chat."""
        self.host, self.directory, self.model, self.session = host, directory, model, session
        self.observed, self.max_length, self.notify = observed, max_length, notify
        self.solver, self.prefer, self.relay = solver, prefer, relay
        self.period = max(1, round(1.0 / rate))
        h = model.cfg.hidden_size
        self.inputs = torch.zeros(max_length, h, dtype=model.dtype)
        self.outputs = torch.zeros(max_length, h, dtype=model.dtype)
        self.end = 0  # inputs and outputs are logged for positions [0, end)
        self.checked = 0  # outputs [0, checked) agree with the second chain
        self.since = 0  # steps since the last check
        self.steps = 0  # steps through the primary chain so far (a prefill is one)
        self.stats = VerifyStats()
        self.pending: _Check | None = None  # the check in flight
        self.nursery = nursery
        self.asked = asked
        self._second: InferenceSession | None = None
        self._why_not: dict[str, str] = {}  # peer -> why it could not give an opinion
        self._known: dict[str, ServerRecord] = {}  # every live record seen: records lapse between pulls
        self._stack: AsyncExitStack | None = None

    # -- the log ---------------------------------------------------------------------------------
    def log(self, hidden: torch.Tensor, position: int, out: torch.Tensor) -> None:
        t = hidden.shape[1]
        self.inputs[position : position + t] = hidden[0]
        self.outputs[position : position + t] = out[0]
        self.end = position + t
        self.checked = min(self.checked, position)  # a rewind (or a replay) is checked again
        self.since += 1
        self.steps += 1
        if self._hopeless is not None and self._hopeless == self.session.chain:
            self.checked = self.end  # nothing can check this chain: hold nothing back (text streams)

    def due(self) -> bool:
        return self.since >= self.period

    # -- checks ----------------------------------------------------------------------------------
    async def start(self, background: bool = True) -> None:
        """Check every unchecked position on the second chain: in the background (the answer goes on
        meanwhile; `collect` reads the verdict) when the verifier has a nursery, else at once. Opening
        the second chain happens here, in the caller's task."""
        self.since = 0
        if self.checked >= self.end or self.pending is not None:
            return
        if self._second is None and not await self._open_second():
            self.checked = self.end  # nothing to check against: said once in _open_second
            return
        a, b = self.checked, self.end
        if self._second_end < a:  # a fresh second chain starts from position 0
            a = 0
        check = _Check(a, b)
        self.pending = check
        inputs, outputs = self.inputs[a:b].clone(), self.outputs[a:b].clone()
        if background and self.nursery is not None:
            self.nursery.start_soon(self._compare, check, inputs, outputs)
        else:
            await self._compare(check, inputs, outputs)

    async def _compare(self, check: _Check, inputs: torch.Tensor, outputs: torch.Tensor) -> None:
        assert self._second is not None
        with check.scope:
            try:
                ref = await self._second.step(inputs.unsqueeze(0), check.a)
                check.error = relative_error(outputs, ref[0])
            except (NodeError, RoutingError) as e:
                check.failed = e
        if check.scope.cancelled_caught:
            check.failed = NodeError("cancelled")
        check.done.set()

    async def collect(self, wait: bool = False) -> int | None:
        """The verdict of the check in flight once it is in (waiting for it with `wait`): the first wrong
        position, or None (all agree, still running, or nothing to check)."""
        check = self.pending
        if check is None or not (check.done.is_set() or wait):
            return None
        await check.done.wait()
        self.pending = None
        if check.failed is not None:
            await self._close_second()
            self.notify(f"verification: the checking chain failed ({check.failed}); trying another at the next check")
            return None
        self._second_end = check.b
        err = check.error
        tol = relative_tolerance(self._sides(self.session.chain), self._sides(self._second_chain))
        wrong = torch.nonzero(err > tol)
        self.stats.checks += 1
        self.stats.positions_checked += check.b - check.a
        if len(wrong) == 0:
            self.stats.worst_error = max(self.stats.worst_error, float(err.max()))
            both = [h for h in self.session.chain if h in self._second_chain]  # the same server twice: unchecked
            for peer in {h.peer_id for h in self.session.chain + self._second_chain if h not in both}:
                self.observed.reputation.checked(peer, True)
            self.checked = max(self.checked, check.b)
            return None
        self.stats.disagreements += 1
        return check.a + int(wrong[0])

    async def finish(self) -> int | None:
        """At the end of an answer: the check in flight, then every position still unchecked."""
        wrong = await self.collect(wait=True)
        if wrong is None:
            await self.start(background=False)
            wrong = await self.collect(wait=True)
        return wrong

    async def settle(self, wrong_at: int) -> None:
        """After a check failed at `wrong_at`: find the server(s) in the minority, distrust them, make
        the session fail over away from them, and say so in one line."""
        await self.directory.refresh()  # a client pulls records rarely: they may have lapsed since routing
        liars, judged = await self._diagnose(self.end)
        primary = {s.hop.peer_id: s for s in self.session.spans}
        for peer in judged - {h.peer_id for h in liars}:
            self.observed.reputation.checked(peer, True)
        for hop in liars:
            self.session.bans.distrust(hop.peer_id)
            self.observed.reputation.checked(hop.peer_id, False)
            self.stats.liars.append(hop.peer_id)
            self.stats.caught_at_step.append(self.steps)
            if (span := primary.get(hop.peer_id)) is not None:
                span.dead = PeerError(f"server {span.name} returned wrong outputs")
        self.observed.reputation.save()
        await self._close_second()  # it may hold a liar, or be ahead of the rollback: a fresh one next time
        recomputed = self.end - wrong_at
        if liars:
            names = ", ".join(f"{self._name(h.peer_id)} (blocks {h.start}:{h.end})" for h in liars)
            self.notify(f"server {names} returned wrong outputs (outvoted by other servers holding the same "
                        f"blocks; caught at step {self.steps}): banned for this session and distrusted; "
                        f"recomputing the last {recomputed} positions on honest servers")
        else:
            self.notify(f"the checking chain disagrees from position {wrong_at} but no single server could be "
                        "blamed (no third server holds the blocks in question); recomputing them")
            for span in self.session.spans:  # replay anyway: a flaky server gets another chance
                if span.hop.peer_id not in {h.peer_id for h in self._second_chain}:
                    span.dead = PeerError(f"server {span.name}'s outputs were disputed")
                    break
        self.checked = min(self.checked, wrong_at)

    # -- settling a disagreement -----------------------------------------------------------------
    async def _diagnose(self, upto: int) -> tuple[list[Hop], set[str]]:
        """Replay positions [0, upto) server by server; return the servers outvoted, and every server
        whose output was compared with another's."""
        liars: list[Hop] = []
        judged: set[str] = set()
        for chain in (self.session.chain, self._second_chain):
            x = self.inputs[:upto].unsqueeze(0)
            for hop in chain:
                if any(hop.peer_id == h.peer_id for h in liars):
                    continue
                x = await self._judge(hop, x, liars, judged)
                if x is None:
                    break
            if liars:
                break  # the primary chain is settled: the second chain is only suspect when it is clean
        return liars, judged

    async def _judge(self, hop: Hop, x: torch.Tensor, liars: list[Hop], judged: set[str]) -> torch.Tensor | None:
        """Opinions on blocks hop.start:hop.end for input x: the hop's own, another's, and a third one if
        they differ. Appends the outvoted server to `liars`; returns the majority's output."""
        mine = await self._solo(hop.peer_id, hop, x)
        others = self._holders(hop, exclude={hop.peer_id, *(h.peer_id for h in liars)})
        opinions = [(hop.peer_id, mine)] if mine is not None else []
        for peer in others:
            if len(opinions) >= 3:
                break
            y = await self._solo(peer, hop, x)
            if y is not None:
                opinions.append((peer, y))
            if len(opinions) == 2 and self._agree(opinions[0], opinions[1], hop):
                judged.update(p for p, _ in opinions)
                return opinions[0][1]
        if len(opinions) < 3:
            return opinions[0][1] if opinions else None  # one opinion, or two and no judge: go on as we can
        judged.update(p for p, _ in opinions)
        for i, (peer, y) in enumerate(opinions):
            rest = [o for j, o in enumerate(opinions) if j != i]
            if self._agree(rest[0], rest[1], hop) and not self._agree((peer, y), rest[0], hop):
                liars.append(Hop(peer, hop.start, hop.end))
                return rest[0][1]
        return opinions[0][1]

    def _agree(self, a: tuple[str, torch.Tensor], b: tuple[str, torch.Tensor], hop: Hop) -> bool:
        tol = relative_tolerance(self._sides([Hop(a[0], hop.start, hop.end)]),
                                 self._sides([Hop(b[0], hop.start, hop.end)]))
        return bool((relative_error(a[1], b[1]) <= tol).all())

    async def _solo(self, peer: str, hop: Hop, x: torch.Tensor) -> torch.Tensor | None:
        """Blocks hop.start:hop.end of `peer` on x from position 0, in a session of its own; None when
        it cannot be asked (unreachable, refused)."""
        record = self._records().get(peer)
        try:
            if record is not None and peer not in self.host.connected_peers():
                await self.host.connect_any(peer, record.addrs)
            span = await open_remote_span(
                self.host, Hop(peer, hop.start, hop.end),
                Open(self.model.spec.name, hop.start, hop.end, self.max_length), self.model.cfg.hidden_size,
                self.model.dtype)
        except PeerError as e:
            self._why_not[peer] = str(e)
            return None
        try:
            reply = await span.stream.request(Step(1, 0, x.contiguous(), relay=False).to_frame(),
                                              timeout_s=self.session.step_timeout_s)
            return Output.from_frame(reply, self.model.cfg.hidden_size, x.shape[1]).hidden.to(self.model.dtype)
        except (PeerError, NodeError) as e:
            self._why_not[peer] = str(e)
            return None
        finally:
            with trio.CancelScope(shield=True):
                await span.stream.reset()

    # -- the second chain ------------------------------------------------------------------------
    async def _open_second(self) -> bool:
        """A chain avoiding the primary's servers wherever another server holds their blocks."""
        primary = self.session.chain
        if self._hopeless == primary:
            return False  # looked for this chain already: ask again once it changes (a failover)
        await self.directory.refresh()  # a client pulls records rarely: they may have lapsed since routing
        chain = await self._second_route()
        if chain is None or chain == primary:
            self._say_unchecked("no other server holds any block of this chain: its outputs cannot be checked "
                                "(a second server for any of its blocks makes them checkable; --verify off)")
            self._hopeless = list(primary)
            return False
        shared = [h for h in chain if h in primary]
        if shared:
            self._say_unchecked("blocks " + ", ".join(f"{h.start}:{h.end}" for h in shared)
                                + " are held by one server only and are not checked")
        self._stack = AsyncExitStack()
        try:
            self._second = await self._stack.enter_async_context(open_session(
                self.host, chain, self.model.spec.name, self.model.cfg.hidden_size, self.max_length,
                self.model.dtype, step_timeout_s=self.session.step_timeout_s, relay=self.relay))
        except (NodeError, RoutingError) as e:
            await self._close_second()
            self.notify(f"verification: could not open a checking chain ({e}); trying again at the next check")
            return False
        self._second_chain, self._second_end = chain, -1
        return True

    async def _second_route(self) -> list[Hop] | None:
        primary = {h.peer_id for h in self.session.chain}
        banned = set(self.session.bans.active())
        others = [r for r in self._records().values() if r.peer_id not in primary | banned]
        covered = [any(r.start <= b < r.end for r in others) for b in range(self.model.cfg.num_blocks)]
        if not any(covered):  # no other server holds any block: routing could only give the chain back
            return None
        needed = {h.peer_id for h in self.session.chain if not all(covered[h.start : h.end])}
        try:
            result, _ = await plan_route(self.host, self.directory, self.model, self.solver, self.prefer,
                                         self.max_length, frozenset(banned | (primary - needed)), coverage_wait_s=0.0,
                                         relay=self.relay, known_rtts=self.observed.rtts, observed=self.observed)
        except NoRouteError:
            return None
        return result.chosen.chain

    async def _close_second(self) -> None:
        if self._stack is not None:
            stack, self._stack, self._second = self._stack, None, None
            try:  # no cancel scope of ours around it: the session's nursery must exit where it was entered
                await stack.aclose()
            except (NodeError, RoutingError):
                pass

    async def aclose(self) -> None:
        if self.pending is not None:  # an answer that ended in an error: its check is moot
            self.pending.scope.cancel()
            await self.pending.done.wait()
            self.pending = None
        await self._close_second()

    # -- what the records say --------------------------------------------------------------------
    def _records(self) -> dict[str, ServerRecord]:
        """Live records, and those seen live lately: a client pulls records rarely (a swarm announcing
        every second has records that lapse between pulls), and a server that left fails its open."""
        name = self.model.spec.name
        self._known.update((r.peer_id, r) for r in live_records(self.directory.records(name), name,
                                                                self.model.cfg.num_blocks))
        return self._known

    def _holders(self, hop: Hop, exclude: set[str]) -> list[str]:
        """Other live servers holding all of hop's blocks, fastest claim first (not banned)."""
        banned = self.session.bans.active()
        found = [r for r in self._records().values()
                 if r.start <= hop.start and hop.end <= r.end and r.peer_id not in exclude and r.peer_id not in banned
                 and not self.observed.reputation.get(r.peer_id).distrusted]
        return [r.peer_id for r in sorted(found, key=lambda r: -r.inference_rps)]

    def _sides(self, chain: list[Hop]) -> list[tuple[str, str]]:
        records = self._records()
        return [(records[h.peer_id].dtype, records[h.peer_id].quant) if h.peer_id in records else ("", "none")
                for h in chain]

    def _name(self, peer: str) -> str:
        r = self._records().get(peer)
        return (r.public_name if r is not None and r.public_name else "") or peer[-8:]

    def _say_unchecked(self, why: str) -> None:
        if self.stats.unchecked != why:
            self.stats.unchecked = why
            if self.asked:
                self.notify(f"verification: {why}")

    _second_chain: list[Hop] = []  # noqa: RUF012 - replaced per instance when a second chain opens
    _second_end: int = -1  # the second chain's caches hold positions [0, _second_end)
    _hopeless: list[Hop] | None = None  # a primary chain no second chain could be found for
