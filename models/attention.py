"""What every family's attention shares: the per-step context and one SDPA call over the cache."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .kv_cache import KVCache


@dataclass
class StepContext:
    """Built once per step for a whole span, then read by each of its blocks."""

    position: int  # absolute position of the first new token
    length: int  # new tokens in this step
    mask: torch.Tensor | None  # additive or boolean [.., T, S] mask, None when not needed
    is_causal: bool  # let SDPA build the causal mask (prefill from position 0)
    cos: torch.Tensor | None = None  # rotary tables [T, head_dim] (Llama family)
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
    cache: KVCache,
    layer: int,
    scale: float,
) -> torch.Tensor:
    """q [B, H, T, D], k/v [B, kvH, T, D] -> [B, T, H*D], after storing k/v in the cache."""
    keys, values = cache.write(layer, ctx.position, k, v)
    grouped = keys.shape[1] != q.shape[1]
    out = F.scaled_dot_product_attention(
        q, keys, values, attn_mask=ctx.mask, is_causal=ctx.is_causal, scale=scale, enable_gqa=grouped
    )
    b, h, t, d = out.shape
    return out.transpose(1, 2).reshape(b, t, h * d)
