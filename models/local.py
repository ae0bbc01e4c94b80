"""A whole model in this process: the client's parts plus every block as a chain of spans.

This is `chat --local`, and the reference the swarm is compared with: it runs the same `Span`
code a server runs, so a swarm's greedy output must match it token for token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .chat import stop_ids
from .checkpoint import Checkpoint, Progress, _noop
from .config import ModelConfig
from .fetch import locate
from .kv_cache import KVCache
from .registry import ModelSpec
from .span import Span, load_client, load_span
from .tokenizer import load_tokenizer


@dataclass
class ClientModel:
    """What every client needs: config, tokenizer, embeddings and head."""

    spec: ModelSpec
    ckpt: Checkpoint
    cfg: ModelConfig
    tokenizer: Any
    parts: nn.Module
    stop_ids: set[int]
    dtype: torch.dtype


def load_client_model(spec: ModelSpec, dtype: torch.dtype, device: str = "cpu",
                      progress: Progress = _noop, with_blocks: bool = False) -> ClientModel:
    def want(ck: Checkpoint) -> list[str]:
        return ck.client_keys() + (ck.span_keys(0, ck.config.num_blocks) if with_blocks else [])

    ckpt = Checkpoint.open(locate(spec, progress, want))
    tokenizer = load_tokenizer(ckpt.folder)
    parts = load_client(ckpt, dtype, device, progress)
    return ClientModel(spec, ckpt, ckpt.config, tokenizer, parts, stop_ids(tokenizer, ckpt.config), dtype)


class LocalChain:
    """Spans run one after another in-process, each with its own cache."""

    def __init__(self, spans: list[Span], max_length: int) -> None:
        self.spans = spans
        self.caches: list[KVCache] = [s.new_cache(max_length) for s in spans]

    def __call__(self, hidden: torch.Tensor, position: int) -> torch.Tensor:
        for span, cache in zip(self.spans, self.caches, strict=True):
            cache.reserve(position, hidden.shape[1])
            hidden = span.forward(hidden, cache, position)
        return hidden


def load_local_chain(ckpt: Checkpoint, dtype: torch.dtype, device: str = "cpu", max_length: int = 2048,
                     splits: list[int] | None = None, progress: Progress = _noop) -> LocalChain:
    """All blocks, as one span or cut at `splits` (block indices) into several."""
    bounds = [0, *(splits or []), ckpt.config.num_blocks]
    spans = [load_span(ckpt, a, b, dtype, device, progress) for a, b in zip(bounds, bounds[1:], strict=False)]
    return LocalChain(spans, max_length)

