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
