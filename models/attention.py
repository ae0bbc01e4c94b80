"""What every family's attention shares: the per-step context and one SDPA call over the cache."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F


class KVStore(Protocol):
    """What a block writes its keys and values to: a `KVCache` or a `PagedSequence` (returning all
    valid keys and values), or a `PagedBatch` (returning one [1, kvH, S_i, D] per row)."""

    def write(
        self, layer: int, position: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor] | tuple[list[torch.Tensor], list[torch.Tensor]]: ...


@dataclass
class StepContext:
    """Built once per step for a whole span, then read by each of its blocks."""

    position: int  # absolute position of the first new token
    length: int  # new tokens in this step
    mask: torch.Tensor | None  # additive or boolean [.., T, S] mask, None when not needed
    is_causal: bool  # let SDPA build the causal mask (prefill from position 0)
    # rotary tables (Llama family): [T, head_dim], or [B, 1, 1, head_dim] for a batch of sessions
    # each at its own position
    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None


def causal_bool_mask(position: int, length: int, device: torch.device | str) -> torch.Tensor:
    """[T, S] True where new token i (at position+i) may see key j: j <= position + i."""
    keys = torch.arange(position + length, device=device)
    queries = torch.arange(position, position + length, device=device)
    return keys[None, :] <= queries[:, None]


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    ctx: StepContext,
    cache: KVStore,
    layer: int,
    scale: float,
) -> torch.Tensor:
    """q [B, H, T, D], k/v [B, kvH, T, D] -> [B, T, H*D], after storing k/v in the cache."""
    keys, values = cache.write(layer, ctx.position, k, v)
    if isinstance(keys, list):
        return attend_rows(q, keys, values, ctx, scale)
    grouped = keys.shape[1] != q.shape[1]
    out = F.scaled_dot_product_attention(
        q, keys, values, attn_mask=ctx.mask, is_causal=ctx.is_causal, scale=scale, enable_gqa=grouped
    )
    b, h, t, d = out.shape
    return out.transpose(1, 2).reshape(b, t, h * d)


def attend_rows(
    q: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor], ctx: StepContext, scale: float
) -> torch.Tensor:
    """A batch of sessions (`PagedBatch`): q [B, H, 1, D], row i's keys and values [1, kvH, S_i, D]
    -> [B, 1, H*D]. One SDPA call per row on its keys in place: no padding, no mask, no gather. A
    shared bias by key position (ALiBi, [1, H, 1, S]) is cut to each row's length."""
    grouped = keys[0].shape[1] != q.shape[1]
    mask = ctx.mask
    # 4-D operands throughout: SDPA on CPU sends 3-D ones to its slow math path
    out = torch.cat([
        F.scaled_dot_product_attention(
            qi, ki, vi, attn_mask=None if mask is None else mask[..., : ki.shape[2]], scale=scale, enable_gqa=grouped
        )
        for qi, ki, vi in zip(q.split(1), keys, values, strict=True)
    ])
    b, h, t, d = out.shape
    return out.transpose(1, 2).reshape(b, t, h * d)
