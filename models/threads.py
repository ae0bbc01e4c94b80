"""How many CPU threads a small step uses, measured on this machine rather than assumed.

A server in a chain computes one decode step, then waits while the other servers and the client
take their turns. Its OpenMP workers go to sleep in that wait, and waking them costs more than the
second core brings to a one-row matrix-vector product, which is bound by memory, not arithmetic:
measured on a 2-core VM, ten SmolLM2 blocks took 19 ms per step with 2 threads after a 40 ms idle
gap, 14 ms with 1 thread (and 14 ms with 2 threads back to back, as `chat --local` steps). On a
many-core machine the opposite may hold, so the choice is timed: `tune_step_threads` runs real
steps after the same kind of gap with each candidate count and keeps the fewest threads that are
within 10% of the fastest. Steps of a few rows (speculative checks, small batches) are timed as a
class of their own: with a busy machine (a client drafting beside the servers, on one machine) a
2-thread team waits at every barrier for a descheduled thread, and a 7-token check took several
times longer. Bigger steps (prefill) keep every thread: they are compute-bound.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

IDLE_GAP_S = 0.03  # a step's wait for the rest of its chain, as measured on a local 3-server swarm
TRIALS = 5
TOLERANCE = 1.10  # fewer threads win unless more are this much faster: they leave cores to others, and
#                   an OpenMP team on a busy machine waits at every barrier for its slowest thread
BUDGET_S = 4.0  # stop trying larger counts once tuning has taken this long (big spans step slowly)
FEW_ROWS = 16  # steps of 2..FEW_ROWS rows (speculative checks, small batches) are timed as a class
FEW_ROWS_PROBE = 8  # ... at this many rows


@dataclass(frozen=True)
class StepThreads:
    """Thread counts by step size: one row (decode), a few rows, and None (every thread) above."""

    one_row: int
    few_rows: int

    def for_rows(self, rows: int) -> int | None:
        if rows <= 1:
            return self.one_row
        return self.few_rows if rows <= FEW_ROWS else None


def candidates(max_threads: int) -> list[int]:
    """1, 2, 4, ... up to and including `max_threads`."""
    out, n = [], 1
    while n < max_threads:
        out.append(n)
        n *= 2
    return [*out, max_threads]


def tune_step_threads(step: Callable[[int], None], max_threads: int | None = None,
                      gap_s: float = IDLE_GAP_S) -> StepThreads:
    """Thread counts for small steps: `step(rows)` (one step of that many rows on scratch state) is
    timed after an idle gap with each candidate count; the fewest threads within TOLERANCE of the
    fastest win. The process's thread count is left as it was."""
    return StepThreads(tune_count(lambda: step(1), max_threads, gap_s),
                       tune_count(lambda: step(FEW_ROWS_PROBE), max_threads, gap_s))


def tune_count(step: Callable[[], None], max_threads: int | None = None, gap_s: float = IDLE_GAP_S) -> int:
    """The thread count for `step`: timed after an idle gap with each candidate count, the counts
    taking turns (co-located servers tune at the same moment: a burst of their work falls on every
    count alike), each count's best time kept (interference only adds time); the fewest threads
    within TOLERANCE of the fastest win."""
    total = max_threads or torch.get_num_threads()
    if total <= 1:
        return 1
    counts = candidates(total)
    for n in counts:
        with threads(n):
            step()  # warm-up at this count
    started = time.perf_counter()
    best: dict[int, float] = {}
    for _ in range(TRIALS):
        for n in counts:
            with threads(n):
                time.sleep(gap_s)
                t0 = time.perf_counter()
                step()
                elapsed = time.perf_counter() - t0
            best[n] = min(best.get(n, math.inf), elapsed)
        if time.perf_counter() - started > BUDGET_S:
            break
    fastest = min(best.values())
    return min(n for n, t in best.items() if t <= fastest * TOLERANCE)


@contextlib.contextmanager
def threads(n: int | None) -> Iterator[None]:
    """Run the body with `n` intra-op threads (None: as the process is). Setting the count costs
    well under a microsecond, so this wraps single steps."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    if n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
