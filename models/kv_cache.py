"""A session's attention cache for one span: preallocated buffers written by position.

One layout for every family, `[layer, batch, kv_head, position, head_dim]`, so no step ever
concatenates or converts. `length` is how many positions hold valid keys and values; writing at a
position below it rewinds the session (a client replaying or re-sending a turn), never an error.
"""

from __future__ import annotations

import torch

from .errors import CachePositionError, SessionFullError


class KVCache:
    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        max_length: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        batch: int = 1,
    ) -> None:
        shape = (num_layers, batch, num_kv_heads, max_length, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_length = max_length
        self.length = 0

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    def check_room(self, position: int, new_tokens: int) -> None:
        if not 0 <= position <= self.length:
            raise CachePositionError(f"step at position {position}, but the cache holds {self.length} tokens")
        if position + new_tokens > self.max_length:
            raise SessionFullError(
                f"session is full: {position} + {new_tokens} tokens exceeds its max length {self.max_length}; "
                "start a new session with a larger --max-length"
            )

    def reserve(self, position: int, new_tokens: int) -> None:
        """What a step calls first, on any cache; all of this one's room is already allocated."""
        self.check_room(position, new_tokens)

    def write(
        self, layer: int, position: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store `k, v` [B, kv_heads, T, D] at `position`; return views of all valid keys and values."""
        end = position + k.shape[2]
        self.k[layer, :, :, position:end] = k
        self.v[layer, :, :, position:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]
