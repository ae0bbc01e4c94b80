"""Weights stored the way this project's CPUs multiply them fastest: layouts and fused siblings.

A one-row decode step is a chain of matrix-vector products bound by memory, and on the CPUs measured
here (AMD EPYC, AVX2, torch's MKL, one thread) the layout of the weight moves their speed a lot:

- a *widening* product (more outputs than inputs: the LM head, q/k/v, gate/up, BLOOM's h->4h) runs
  faster as `x @ W.T` with `W.T` stored contiguous: SmolLM2's gate [1536, 576] took 183 us against
  262 us for `F.linear` on the usual [out, in] storage (19 vs 13.5 GB/s); its 49152 x 576 head
  4.6 ms against 8.0 ms;
- a *narrowing* one (down projections, BLOOM's 4h->h) is the reverse (183 vs 241 us): kept as is;
- siblings that read the same input are one wider product: q, k, v (162 -> 119 us) and gate, up
  (358 -> 304 us); one call's ramp-up instead of two or three.

Together: 30 SmolLM2 blocks 40.4 -> ~32 ms per one-row step, 8 BLOOM-27M blocks 8.8 -> ~7 ms, with
steps of 8-64 rows unchanged. Every CPU float32 span goes through `lay_out_blocks` when it loads, so
a swarm and `chat --local` compute the same thing the same way (token-identical). GPUs, other dtypes
and quantised spans keep the checkpoint's layout (not measured faster there).

The head: when the embeddings are tied to it (SmolLM2, BLOOM), they become a [vocab, hidden] view of
the transposed storage: no second copy, and a lookup gathers one strided column per token.

Model code opts in to fusing by naming the siblings in a `FUSABLE` class attribute
({"qkv": ("q_proj", "k_proj", "v_proj")}) and using `self.qkv` when it is set.
"""

from __future__ import annotations

import torch
from torch import nn


class TransposedLinear(nn.Module):
    """A linear layer whose weight is stored [in, out]: `x @ weight_t (+ bias)`."""

    def __init__(self, weight_t: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.weight_t = nn.Parameter(weight_t, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:
        """[out, in], as nn.Linear's (a view)."""
        return self.weight_t.t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is None:
            return x @ self.weight_t
        flat = torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight_t)
        return flat.view(*x.shape[:-1], flat.shape[-1])


def _fastest(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """[out, in] weight -> the module that multiplies it fastest on the CPU (see the docstring)."""
    out_features, in_features = weight.shape
    if out_features > in_features:
        return TransposedLinear(weight.t().contiguous(), bias)
    linear = nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias, requires_grad=False)
    return linear


def _fuse(module: nn.Module) -> None:
    for fused, names in getattr(module, "FUSABLE", {}).items():
        parts = [getattr(module, n) for n in names]
        if not all(isinstance(p, nn.Linear) for p in parts):
            continue
        if any(p.bias is not None for p in parts) and not all(p.bias is not None for p in parts):
            continue  # one bias for some and none for others: leave them apart
        weight = torch.cat([p.weight.detach() for p in parts])
        bias = torch.cat([p.bias.detach() for p in parts]) if parts[0].bias is not None else None
        for n in names:
            delattr(module, n)
        setattr(module, fused, _fastest(weight, bias))


def lay_out_blocks(blocks: nn.Module) -> nn.Module:
    """Fuse the siblings each module declares FUSABLE and store every widening nn.Linear transposed.
    CPU float32 blocks only (anything else is returned as it is). In place; returned."""
    params = list(blocks.parameters())
    if not params or params[0].device.type != "cpu" or params[0].dtype != torch.float32:
        return blocks
    for module in list(blocks.modules()):
        _fuse(module)
    for module in list(blocks.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear and child.weight.shape[0] > child.weight.shape[1]:
                bias = None if child.bias is None else child.bias.detach()
                setattr(module, name, _fastest(child.weight.detach(), bias))
    return blocks


def transpose_head(parts: nn.Module, head_name: str = "lm_head") -> nn.Module:
    """Replace `parts.<head_name>` (an nn.Linear without bias, on the CPU) by a TransposedLinear; an
    nn.Embedding of `parts` that shares its weight reads the transposed storage. In place; returned."""
    head = getattr(parts, head_name)
    if not isinstance(head, nn.Linear) or head.bias is not None or head.weight.device.type != "cpu":
        return parts
    weight = head.weight.detach()
    weight_t = weight.t().contiguous()
    tied = [m for m in parts.modules() if isinstance(m, nn.Embedding) and m.weight.data_ptr() == weight.data_ptr()]
    setattr(parts, head_name, TransposedLinear(weight_t))
    for emb in tied:
        emb.weight = nn.Parameter(weight_t.t(), requires_grad=False)
    return parts
