"""Iteration-level batching of decode steps across sessions (ORCA's idea, applied to one span).

Each session's handler submits its step as a Job and waits. One scheduler task runs what is waiting:
all waiting one-token steps of sessions that enter the span at the same blocks go through it as one
batch, each attending to its own paged cache; a multi-token step (a prefill or a replay) runs alone. The
scheduler is the one place a step's cache room is reserved: a job that cannot get it is refused
with the CacheError that says why, and the rest of its batch runs.
When other sessions stepped lately (at their own pace) and their steps have not arrived yet, the
scheduler waits a little for them (a fraction of a batch's compute, or the time its loop needs to read
that many steps, BATCH_WINDOW_S at most); a lone session never waits.

Compute runs inline on the event loop: the handlers have nothing to do until it finishes, and a
thread hand-off per step costs more than it saves on CPU (see ARCHITECTURE.md).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import trio
from llmswarm.models.errors import CacheError
from llmswarm.models.paged_cache import PagedSequence
from llmswarm.models.span import Span
from llmswarm.node import config


@dataclass(eq=False)
class Job:
    owner: object  # the session, for "who was active lately"
    span: Span  # the blocks this session runs (a server's span or a sub-span of it)
    cache: PagedSequence
    hidden: torch.Tensor  # [1, T, hidden]
    position: int
    tokens: int  # T (asking the tensor costs a cold torch call per use on the decode path)
    done: trio.Event | None = None  # made when the job is queued (one computed alone needs none)
    out: torch.Tensor | None = None
    error: BaseException | None = None
    cancelled: bool = False  # the session closed before its step ran: skip it


@dataclass
class SchedulerStats:
    """How batches formed (the server counts steps and tokens)."""

    batches: int = 0
    batched_steps: int = 0  # steps that ran in a batch of more than one
    largest_batch: int = 0


class Scheduler:
    def __init__(self, window_s: float = config.BATCH_WINDOW_S, max_batch: int = config.MAX_BATCH_SESSIONS,
                 on_step: Callable[[int, int], None] = lambda steps, tokens: None,
                 window_fraction: float = config.BATCH_WINDOW_FRACTION) -> None:
        self.window_s, self.max_batch, self.window_fraction = window_s, max_batch, window_fraction
        self.pending: list[Job] = []
        self._arrived = trio.Event()
        self.last_active: dict[object, float] = {}  # session -> when its last step ran
        self.cadence: dict[object, float] = {}  # session -> its gap between steps (s, moving average)
        self.compute_s = 0.0  # moving average of one batch's compute time
        # told (steps, new tokens, blocks, seconds) of every batch that computed without error:
        # how the server's announced speed follows what it really serves (node/server/pace.py)
        self.on_compute: Callable[[int, int, int, float], None] | None = None
        self.stats = SchedulerStats()
        self._unsettled: list[tuple[list[Job], float, float]] = []  # computed alone: (batch, seconds, when)
        self.on_step = on_step  # called with (steps, tokens) after each batch: the server's statistics

    async def run(self, job: Job) -> torch.Tensor:
        """Queue a step and wait for its output (raises what its compute raised). A step computed
        alone leaves its bookkeeping for `settle()`, which the caller runs once the output is sent
        (and which runs before any decision that reads it: here, and in the scheduler task)."""
        self.settle()
        if self._runs_alone(job):
            # computed here, in the handler's task: the hand-off to the scheduler task and back costs
            # two trips through trio's run loop (~0.2 ms per hop on a 2-core VM) and buys nothing
            self._compute([job], settle_later=True)
        else:
            await self._queued(job)
        if job.error is not None:
            raise job.error
        assert job.out is not None
        return job.out

    def _runs_alone(self, job: Job) -> bool:
        """Nothing is queued, and nothing would be worth waiting for: a multi-token step runs alone
        anyway, and a one-token step has no other session stepping lately to batch with."""
        if self.pending:
            return False
        if job.tokens != 1 or self.window_s <= 0:
            return True
        return not any(o is not job.owner for o in self._expected(trio.current_time()))

    async def _queued(self, job: Job) -> None:
        job.done = trio.Event()
        self.pending.append(job)
        self._arrived.set()
        try:
            await job.done.wait()
        finally:
            if not job.done.is_set():  # our handler was cancelled: never compute into a freed cache
                job.cancelled = True
                if job in self.pending:
                    self.pending.remove(job)

    def forget(self, owner: object) -> None:
        self.last_active.pop(owner, None)
        self.cadence.pop(owner, None)

    async def serve(self) -> None:
        """The scheduler task: runs forever in the server's nursery."""
        while True:
            if not self.pending:
                self._arrived = trio.Event()
                await self._arrived.wait()
            self.settle()
            await self._gather()
            batch = self._take()
            if batch:
                self._compute(batch)
            await trio.lowlevel.checkpoint()  # let handlers send outputs and read the next steps

    def _expected(self, now: float) -> set[object]:
        """Sessions that stepped lately: within two of their own gaps between steps once that pace is
        known (on a slow or loaded swarm a round takes longer than any fixed bound, and such a bound
        would stop batching exactly where it pays most), else within BATCH_ACTIVE_S. The pace, not a
        fixed second: a session that has ended its generation would otherwise hold every other
        session's steps back (each waiting up to half a batch's compute) for a whole BATCH_ACTIVE_S."""
        out = set()
        for o, t in self.last_active.items():  # every open session: forget() drops closed ones
            pace = self.cadence.get(o)
            if now - t <= (config.BATCH_ACTIVE_S if pace is None else config.BATCH_ACTIVE_ROUNDS * pace):
                out.add(o)
        return out

    async def _gather(self) -> None:
        """Wait briefly for the steps of other recently active sessions, when there are any."""
        if self.window_s <= 0 or self.pending[0].tokens != 1:
            return
        now = trio.current_time()
        expected = self._expected(now)
        missing = len(expected - {j.owner for j in self.pending})
        # at least the time this loop needs to read the missing steps (a short span's compute is less
        # than reading 16 steps that are already on their way: a client batching its requests sends
        # them together, and they would be split in two batches)
        window = max(self.window_fraction * self.compute_s, missing * config.BATCH_READ_S_PER_STEP)
        deadline = now + min(self.window_s, window)
        while expected - {j.owner for j in self.pending}:
            self._arrived = trio.Event()
            with trio.move_on_at(deadline):
                await self._arrived.wait()
            if trio.current_time() >= deadline:
                return

    @staticmethod
    def _reserve(batch: list[Job]) -> list[Job]:
        """Make cache room for every job, here and only here: a job that cannot get it is refused
        (CacheError) and the others run."""
        ready = []
        for j in batch:
            try:
                j.cache.reserve(j.position, j.tokens)
                ready.append(j)
            except CacheError as e:
                j.error = e
                if j.done is not None:
                    j.done.set()
        return ready

    def _take(self) -> list[Job]:
        self.pending = [j for j in self.pending if not j.cancelled]
        if not self.pending:
            return []
        first = self.pending[0]
        if first.tokens != 1:
            batch = [first]
        else:
            key = (first.span.start, first.span.end)
            batch = [j for j in self.pending
                     if j.tokens == 1 and (j.span.start, j.span.end) == key][: self.max_batch]
        taken = set(map(id, batch))
        self.pending = [j for j in self.pending if id(j) not in taken]
        return batch

    def settle(self) -> None:
        """The bookkeeping of steps computed alone (pace, activity, statistics): after their outputs
        are on their way, off the decode path (it costs ~0.07 ms per step on a cold cache)."""
        if self._unsettled:
            done, self._unsettled = self._unsettled, []
            for item in done:  # in the order they ran: each one's gap is measured from the one before
                self._settle(*item)

    def _compute(self, batch: list[Job], settle_later: bool = False) -> None:
        batch = self._reserve(batch)
        if not batch:
            return
        started = time.perf_counter()
        try:
            if len(batch) == 1:
                j = batch[0]
                j.out = j.span.forward(j.hidden, j.cache, j.position)
            else:
                hidden = torch.cat([j.hidden for j in batch])
                out = batch[0].span.forward_batch(hidden, [j.cache for j in batch], [j.position for j in batch])
                for b, j in enumerate(batch):
                    j.out = out[b : b + 1]
        except Exception as e:  # noqa: BLE001 - one bad batch fails its own steps, never the server
            for j in batch:
                j.error = e
        elapsed = time.perf_counter() - started
        for j in batch:
            if j.done is not None:
                j.done.set()
        s = self.stats
        s.batches += 1
        s.largest_batch = max(s.largest_batch, len(batch))
        if len(batch) > 1:
            s.batched_steps += len(batch)
        if settle_later:
            self._unsettled.append((batch, elapsed, trio.current_time()))
        else:
            self._settle(batch, elapsed, trio.current_time())

    def _settle(self, batch: list[Job], elapsed: float, now: float) -> None:
        self.compute_s = elapsed if self.compute_s == 0 else 0.8 * self.compute_s + 0.2 * elapsed
        tokens = 0
        for j in batch:
            if j.owner in self.last_active:
                gap, last = now - self.last_active[j.owner], self.cadence.get(j.owner)
                if last is None or gap <= 4 * last:  # a longer gap is a pause (a chat's reader), not its pace
                    self.cadence[j.owner] = gap if last is None else 0.7 * last + 0.3 * gap
            self.last_active[j.owner] = now
            tokens += j.tokens
        self.on_step(len(batch), tokens)
        if self.on_compute is not None and not any(j.error for j in batch):
            self.on_compute(len(batch), tokens, batch[0].span.num_blocks, elapsed)
