"""The LM head of many generations as one call, sans-IO.

A client that drives many generations at once (the API's requests) would otherwise run the head once
per generation and token: for SmolLM2-135M that is a 49152 x 576 matrix (113 MB of fp32) read from
memory for one row each time. `batched_head` stacks the rows of every generation waiting in a round
and reads the matrix once. `HeadApplied` lets `generation_steps` (models/generate.py) run unchanged
for such a driver: it is sent the logits the driver computed, and its head passes them through.

Batched matmuls may differ from the one-row call in the last bits; sampling from the logits is the
same code either way (the generation's own `Sampler`).
"""

from __future__ import annotations

import torch
from torch import nn


def batched_head(parts: nn.Module, rows: list[torch.Tensor]) -> list[torch.Tensor]:
    """[1, 1, H] hidden states of several generations -> each one's logits [1, 1, V], in one head call."""
    hidden = rows[0] if len(rows) == 1 else torch.cat(rows)
    with torch.inference_mode():
        logits = parts.head(hidden)
    return [logits[i : i + 1] for i in range(len(rows))]


class HeadApplied(nn.Module):
    """A client's parts for a generation whose driver runs the head itself: the real embeddings, and a
    head that returns what it is given (the logits the driver sends back in place of hidden states)."""

    def __init__(self, parts: nn.Module) -> None:
        super().__init__()
        self.parts = parts  # a submodule: `parameters()` (the device) are the real parts'

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.parts.embed(ids)

    def head(self, logits: torch.Tensor) -> torch.Tensor:
        return logits
