"""One LM head call per round for every generation a client drives on its loop (the API's requests).

Each generation, once its step came back from the swarm, asks `HeadBatcher.head()` for its logits and
waits. One task (`serve`) runs what is waiting as one batched head call (models/batched_head.py). When
other generations are decoding and have not asked yet, it waits for them, but never longer than
HEAD_WINDOW_FRACTION of a round (the time between one generation's consecutive asks) nor HEAD_WINDOW_S.
That wait is what keeps the generations in phase: they get their logits together, send their next
steps together, and so the servers find them in one batch too (their scheduler waits far less: a
fraction of a batch's compute). Generations that drifted apart meet again within two rounds, because
whichever comes first waits up to half a round. A lone generation never waits.

Profiled before this existed (16 concurrent requests, 3 servers on 2 cores): 58% of the API
process's time was the 16 separate one-row head calls of each round, and the requests' steps reached
the servers spread over a round, which formed batches of 2.2-2.5 on average.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import trio
from llmswarm.models.batched_head import batched_head
from llmswarm.node import config
from torch import nn


@dataclass(eq=False)
class _Row:
    owner: object
    hidden: torch.Tensor  # [1, 1, H]
    done: trio.Event = field(default_factory=trio.Event)
    out: torch.Tensor | None = None
    error: BaseException | None = None


@dataclass
class HeadStats:
    """How head batches formed: what `GET /v1/swarm` shows under "api" and `bench api` reports."""

    batches: int = 0
    rows: int = 0
    largest: int = 0

    def as_dict(self) -> dict[str, float]:
        return {"head_batches": self.batches, "head_rows": self.rows, "largest_head_batch": self.largest,
                "mean_head_batch": round(self.rows / self.batches, 2) if self.batches else 0.0}


class HeadBatcher:
    def __init__(self, parts: nn.Module, window_s: float = config.HEAD_WINDOW_S,
                 window_fraction: float = config.HEAD_WINDOW_FRACTION, enabled: bool = True) -> None:
        """`enabled=False`: every head runs alone, inline, as `chat` runs it (`api --no-batch-heads`, the
        baseline of `bench api --compare`)."""
        self.parts, self.window_s, self.window_fraction = parts, window_s, window_fraction
        self.enabled = enabled
        self.pending: list[_Row] = []
        self.decoding: dict[object, float] = {}  # generation -> when it last asked: expected each round
        self.round_s = 0.0  # moving average of the time between one generation's consecutive asks
        self.stats = HeadStats()
        self._arrived = trio.Event()

    @contextmanager
    def generation(self) -> Iterator[object]:
        """A generation's handle for `head()`; leaving it stops the batcher waiting for that generation."""
        owner = object()
        try:
            yield owner
        finally:
            self.decoding.pop(owner, None)
            self._arrived.set()  # the batcher may have been waiting for exactly this one

    async def head(self, owner: object, hidden: torch.Tensor) -> torch.Tensor:
        """`hidden` [1, T, H] (a step's output) -> the logits of its last position [1, 1, V]."""
        if not self.enabled:
            self._count(1)
            return batched_head(self.parts, [hidden[:, -1:]])[0]
        now = trio.current_time()
        last = self.decoding.get(owner)
        if last is not None:
            gap = now - last
            self.round_s = gap if self.round_s == 0 else 0.8 * self.round_s + 0.2 * gap
        self.decoding[owner] = now
        row = _Row(owner, hidden[:, -1:])
        self.pending.append(row)
        self._arrived.set()
        try:
            await row.done.wait()
        finally:
            if not row.done.is_set() and row in self.pending:  # cancelled (a client hung up)
                self.pending.remove(row)
        if row.error is not None:
            raise row.error
        assert row.out is not None
        return row.out

    async def serve(self) -> None:
        """The batcher's task: runs for the life of the client's nursery."""
        while True:
            if not self.pending:
                self._arrived = trio.Event()
                await self._arrived.wait()
            await self._gather()
            rows, self.pending = self.pending, []
            if rows:
                self._compute(rows)
            await trio.lowlevel.checkpoint()  # let the generations take their logits and step on

    def _due(self, now: float) -> set[object]:
        """Generations whose next ask is due: they asked within the last few rounds (one stuck in a
        failover is not awaited for long), but not within the last half round (that row already ran:
        a straggler does not wait for the batch it missed)."""
        late = 3 * self.round_s + self.window_s
        return {o for o, t in self.decoding.items() if 0.5 * self.round_s <= now - t <= late}

    async def _gather(self) -> None:
        now = trio.current_time()
        due = self._due(now)
        deadline = now + min(self.window_s, self.window_fraction * self.round_s)
        while self.pending and due - {r.owner for r in self.pending}:
            self._arrived = trio.Event()
            with trio.move_on_at(deadline):
                await self._arrived.wait()
            if trio.current_time() >= deadline:
                return
            due &= self.decoding.keys()  # a generation that ended is not awaited

    def _compute(self, rows: list[_Row]) -> None:
        try:
            outs = batched_head(self.parts, [r.hidden for r in rows])
            for r, out in zip(rows, outs, strict=True):
                r.out = out
        except Exception as e:  # noqa: BLE001 - the rows' generations raise it, the batcher carries on
            for r in rows:
                r.error = e
        for r in rows:
            r.done.set()
        self._count(len(rows))

    def _count(self, rows: int) -> None:
        s = self.stats
        s.batches += 1
        s.rows += rows
        s.largest = max(s.largest, rows)
