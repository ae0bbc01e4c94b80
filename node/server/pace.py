"""How fast this server really is, and when its record is worth republishing early. Pure: no I/O.

`ServedSpeed` starts from the startup measurement (a few steps, often taken while other servers on
the machine were loading) and then follows the decode steps the server actually serves: each
batch's compute time per block moves an exponential average, so the announced speed tracks load
(a busy machine announces less, an idle one recovers). `rtts_changed` says whether freshly measured
next-hop RTTs differ enough from the announced ones to announce now rather than a period later.
"""

from __future__ import annotations

from llmswarm.node import config


class ServedSpeed:
    """Per-block decode step time, from the startup measurement and then from served steps."""

    def __init__(self, inference_rps: float, prefill_tps: float, alpha: float = config.SERVED_SPEED_ALPHA) -> None:
        if inference_rps <= 0:
            raise ValueError("inference_rps must be positive")
        self.block_s = 1.0 / inference_rps  # one decode step through one block, seconds
        self.prefill_tps = prefill_tps
        self.alpha = alpha
        self.served_steps = 0

    def observe(self, batch: int, tokens: int, blocks: int, seconds: float) -> None:
        """One computed batch: `batch` steps carrying `tokens` new tokens through `blocks` blocks in
        `seconds`. Only decode batches (one token per step) count: a prefill's time is not a step's.
        Each session in the batch waited the whole batch, so that is its step time."""
        if batch <= 0 or tokens != batch or blocks <= 0 or not seconds > 0:
            return
        sample = seconds / blocks
        self.block_s += self.alpha * (sample - self.block_s)
        self.served_steps += batch

    @property
    def inference_rps(self) -> float:
        return 1.0 / self.block_s

    def throughput(self, blocks: int) -> float:
        """Decode tokens/s of one session through `blocks` blocks."""
        return 1.0 / (self.block_s * blocks)


def rtts_changed(old: dict[str, float], new: dict[str, float],
                 fraction: float = config.NEXT_HOP_CHANGE_FRACTION,
                 floor_s: float = config.NEXT_HOP_CHANGE_FLOOR_S) -> bool:
    """True when a next hop appeared or vanished, or an RTT moved by more than `fraction` of the
    announced value and by more than `floor_s` (jitter on a fast LAN is not a change)."""
    if old.keys() != new.keys():
        return True
    return any(abs(new[p] - old[p]) > max(fraction * old[p], floor_s) for p in new)
