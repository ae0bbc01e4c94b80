"""Where a new server should go: the span that raises the swarm's weakest block.

Pure computation over per-block throughput (the sum of the throughputs of the servers covering each
block). Uncovered blocks count 0, so a swarm with a gap always gets it filled first.
"""

from __future__ import annotations

from collections.abc import Iterable


def block_throughputs(num_blocks: int, spans: Iterable[tuple[int, int, float]]) -> list[float]:
    """spans: (start, end, throughput) of each live server -> summed throughput per block."""
    per_block = [0.0] * num_blocks
    for start, end, throughput in spans:
        for b in range(max(0, start), min(end, num_blocks)):
            per_block[b] += throughput
    return per_block


def choose_start(num_blocks: int, length: int, spans: Iterable[tuple[int, int, float]]) -> int:
    """Start of the window of `length` blocks whose sorted throughputs are lexicographically smallest
    (petals' rule: raise the weakest block first; ties go to the lowest start)."""
    if not 0 < length <= num_blocks:
        raise ValueError(f"a span of {length} blocks does not fit a model of {num_blocks}")
    per_block = block_throughputs(num_blocks, spans)
    return min(range(num_blocks - length + 1), key=lambda s: (sorted(per_block[s : s + length]), s))


def coverage_key(per_block: list[float]) -> tuple[int, float]:
    """How healthy a swarm is, worst first: (uncovered blocks, weakest block's throughput)."""
    return sum(1 for t in per_block if t <= 0), min(per_block) if per_block else 0.0


def better_start(num_blocks: int, start: int, length: int, throughput: float,
                 others: list[tuple[int, int, float]], min_gain: float = 1.5) -> int | None:
    """Where a server at [start, start+length) should move, or None to stay.

    It moves only if that covers more blocks, or raises the weakest block's throughput by at least
    `min_gain` times: small differences are measurement noise, and a move costs a reload."""
    target = choose_start(num_blocks, length, others)
    if target == start:
        return None
    here = coverage_key(block_throughputs(num_blocks, [*others, (start, start + length, throughput)]))
    there = coverage_key(block_throughputs(num_blocks, [*others, (target, target + length, throughput)]))
    if there[0] < here[0] or (there[0] == here[0] and there[1] >= min_gain * here[1] > 0):
        return target
    return None
