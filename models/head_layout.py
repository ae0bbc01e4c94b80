"""The LM head stored [hidden, vocab] on the CPU, and the embeddings it is tied to read from it.

A one-row head is the client's biggest matrix-vector product (SmolLM2: 49152 x 576, 113 MB of float32
per token). Measured inside a draft model's decode loop on this project's CPUs: `x @ W.T` with `W.T`
contiguous took 4.7-5.0 ms, `F.linear(x, W)` on the usual [vocab, hidden] layout 7.9-8.4 ms, for the
same result up to float rounding; with several rows (speculative checks, batched heads) the two are
alike. So on the CPU the head is kept transposed. When the embeddings are tied to the head (SmolLM2,
BLOOM), they become a [vocab, hidden] view of the same storage: no second copy, and a lookup gathers
one strided column per token (microseconds, once per token). GPUs keep the usual layout.
"""

from __future__ import annotations

import torch
from torch import nn


class TransposedHead(nn.Module):
    """A bias-free linear layer whose weight is stored [in, out]: `x @ weight_t`."""

    def __init__(self, weight_t: torch.Tensor) -> None:
        super().__init__()
        self.weight_t = nn.Parameter(weight_t, requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:
        """[out, in], as nn.Linear's (a view)."""
        return self.weight_t.t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight_t


def transpose_head(parts: nn.Module, head_name: str = "lm_head") -> nn.Module:
    """Replace `parts.<head_name>` (an nn.Linear without bias, on the CPU) by a TransposedHead; an
    nn.Embedding of `parts` that shares its weight reads the transposed storage. In place; returned."""
    head = getattr(parts, head_name)
    if not isinstance(head, nn.Linear) or head.bias is not None or head.weight.device.type != "cpu":
        return parts
    weight = head.weight.detach()
    weight_t = weight.t().contiguous()
    tied = [m for m in parts.modules() if isinstance(m, nn.Embedding) and m.weight.data_ptr() == weight.data_ptr()]
    setattr(parts, head_name, TransposedHead(weight_t))
    for emb in tied:
        emb.weight = nn.Parameter(weight_t.t(), requires_grad=False)
    return parts
