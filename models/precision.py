"""How close two computations of the same blocks must be to count as the same: the tolerance of an
output check, from each side's dtype and quantisation, and the error measure it bounds.

The measure is the relative L2 error of each position's hidden state, ||a - b|| / ||b||: hidden
states carry a few huge outlier dimensions, and a relative, per-position measure reads the same for
every model width and every position. The bounds are in models/registry.py.
"""

from __future__ import annotations

import math

import torch

from .registry import (
    MIN_RELATIVE_TOLERANCE,
    PRECISION_ERROR_FACTOR,
    QUANT_ERROR,
    UNIT_ROUNDOFF,
    UNKNOWN_QUANT_ERROR,
)


def side_error(dtype: str, quant: str = "none") -> float:
    """The relative error one honest side may carry: rounding of its dtype plus its quantisation.
    An unknown dtype is taken as bfloat16 (the coarsest the swarm runs)."""
    rounding = PRECISION_ERROR_FACTOR * UNIT_ROUNDOFF.get(dtype, UNIT_ROUNDOFF["bfloat16"])
    return math.hypot(rounding, QUANT_ERROR.get(quant, UNKNOWN_QUANT_ERROR))


def relative_tolerance(a: list[tuple[str, str]], b: list[tuple[str, str]]) -> float:
    """Largest relative error two honest results may show, given the (dtype, quant) of the servers
    that computed each (a chain, or one server). A chain is as coarse as its coarsest server: its
    rounding does not add up server by server (measured: three bfloat16 spans err as one)."""
    def worst(sides: list[tuple[str, str]]) -> float:
        return max((side_error(d, q) for d, q in sides), default=side_error("float32"))

    return max(MIN_RELATIVE_TOLERANCE, math.hypot(worst(a), worst(b)))


def relative_error(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per position: ||a - b|| / ||b|| over the hidden dimension; a, b [T, H] (or [1, T, H])."""
    a, b = a.reshape(-1, a.shape[-1]).float(), b.reshape(-1, b.shape[-1]).float()
    return (a - b).norm(dim=-1) / b.norm(dim=-1).clamp_min(1e-30)
