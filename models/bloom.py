"""The BLOOM family: blocks with ALiBi position biases, and the client parts.

Checkpoints name blocks `transformer.h.{i}.*` (or `h.{i}.*` when saved from the bare model, as
bigscience/bloom-560m is); `checkpoint.py` finds which prefix a checkpoint uses.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .attention import KVStore, StepContext, attend, causal_bool_mask
from .config import ModelConfig


def gelu(x: torch.Tensor) -> torch.Tensor:
    # BLOOM's tanh approximation as one kernel: its own formula in seven elementwise ops took 36 us
    # per 2048-wide row against 9 us, for a difference of one float32 rounding (2.4e-7)
    return F.gelu(x, approximate="tanh")


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.query_key_value = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=True)
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=True)
        self.scale = 1.0 / math.sqrt(self.head_dim)

    def forward(self, x: torch.Tensor, ctx: StepContext, cache: KVStore, layer: int) -> torch.Tensor:
        b, t, _ = x.shape
        # fused layout: [B, T, heads, (q, k, v), head_dim]
        qkv = self.query_key_value(x).view(b, t, self.n_heads, 3, self.head_dim)
        q, k, v = (qkv[..., i, :].transpose(1, 2) for i in range(3))
        return self.dense(attend(q, k, v, ctx, cache, layer, self.scale))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.dense_h_to_4h = nn.Linear(cfg.hidden_size, 4 * cfg.hidden_size)
        self.dense_4h_to_h = nn.Linear(4 * cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(gelu(self.dense_h_to_4h(x)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.self_attention = Attention(cfg)
        self.post_attention_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)
        self.post_ln_residual = cfg.residual_post_layernorm

    def forward(self, x: torch.Tensor, ctx: StepContext, cache: KVStore, layer: int) -> torch.Tensor:
        h = self.input_layernorm(x)
        x = (h if self.post_ln_residual else x) + self.self_attention(h, ctx, cache, layer)
        h = self.post_attention_layernorm(x)
        return (h if self.post_ln_residual else x) + self.mlp(h)


def alibi_slopes(num_heads: int) -> torch.Tensor:
    closest = 2 ** math.floor(math.log2(num_heads))
    base = 2 ** (-(2 ** -(math.log2(closest) - 3)))
    slopes = torch.pow(torch.tensor(base, dtype=torch.float32), torch.arange(1, 1 + closest, dtype=torch.int32))
    if closest != num_heads:
        extra_base = 2 ** (-(2 ** -(math.log2(2 * closest) - 3)))
        n_extra = min(closest, num_heads - closest)
        extra = torch.pow(
            torch.tensor(extra_base, dtype=torch.float32), torch.arange(1, 1 + 2 * n_extra, 2, dtype=torch.int32)
        )
        slopes = torch.cat([slopes, extra])
    return slopes


class Context:
    """ALiBi: an additive bias slope[h] * key_position, plus -inf above the diagonal when T > 1."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str) -> None:
        self.slopes = alibi_slopes(cfg.num_heads).to(device)[:, None, None]  # [H, 1, 1]
        self.dtype, self.device = dtype, device

    def __call__(self, position: int, length: int) -> StepContext:
        keys = torch.arange(position + length, device=self.device, dtype=torch.float32)
        bias = self.slopes * keys  # [H, 1, S]
        if length > 1:
            allowed = causal_bool_mask(position, length, self.device)
            bias = bias.masked_fill(~allowed, float("-inf"))  # [H, T, S]
        return StepContext(position, length, bias.to(self.dtype)[None], False)

    def batch(self, positions: torch.Tensor, keys: int) -> StepContext:
        """B sessions, one new token each, the longest seeing `keys` keys: the bias is by key
        position, so every row reads the first S_i keys' part of one [1, H, 1, keys] bias."""
        return self(keys - 1, 1)


class ClientParts(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        # Built around an empty weight: nn.Embedding's own random init on the meta device imports
        # torch._dynamo (1.1 s at every client start), and the checkpoint's weight replaces it anyway.
        self.word_embeddings = nn.Embedding.from_pretrained(torch.empty(cfg.vocab_size, cfg.hidden_size), freeze=False)
        self.word_embeddings_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.ln_f = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.word_embeddings_layernorm(self.word_embeddings(ids))

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.ln_f(hidden))


def block_prefix(i: int) -> str:
    return f"transformer.h.{i}."


CLIENT_KEYS = {
    "transformer.word_embeddings.weight": "word_embeddings.weight",
    "transformer.word_embeddings_layernorm.weight": "word_embeddings_layernorm.weight",
    "transformer.word_embeddings_layernorm.bias": "word_embeddings_layernorm.bias",
    "transformer.ln_f.weight": "ln_f.weight",
    "transformer.ln_f.bias": "ln_f.bias",
    "lm_head.weight": "lm_head.weight",
}
TIED_HEAD = ("lm_head.weight", "word_embeddings.weight")
