"""Trio locks for hot paths."""

from __future__ import annotations

import trio


class QuickLock:
    """A trio.Lock whose uncontended acquire is not a checkpoint: each checkpoint is a trip through
    trio's run loop, and a decode step takes several locks on its way through a server (the
    session's step and send locks, the data plane's send lock)."""

    __slots__ = ("lock",)

    def __init__(self) -> None:
        self.lock = trio.Lock()

    def locked(self) -> bool:
        return self.lock.locked()

    async def __aenter__(self) -> None:
        try:
            self.lock.acquire_nowait()
        except trio.WouldBlock:
            await self.lock.acquire()

    async def __aexit__(self, *exc: object) -> None:
        self.lock.release()
