"""The Llama family (Llama 2/3, Mistral, Qwen2, SmolLM2): blocks, rotary tables, client parts.

Module and parameter names follow the Hugging Face checkpoints, so a block's state dict is the
checkpoint's `model.layers.{i}.*` tensors with that prefix removed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .attention import KVStore, StepContext, attend, causal_bool_mask
from .config import ModelConfig
from .errors import CheckpointError


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # the same formula as one kernel: 16 us per 576-wide row against 24 for the five ops below
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        h = x.float()  # normalise in float32 whatever the weights' dtype, as the reference does
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    FUSABLE = {"qkv": ("q_proj", "k_proj", "v_proj")}  # models/cpu_layout.py may make them one product

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=bias)
        out_bias = bias and cfg.model_type != "qwen2"  # Qwen2 has q/k/v biases but none on o_proj
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=out_bias)
        self.scale = self.head_dim**-0.5
        self.qkv: nn.Module | None = None
        self.widths = [self.n_heads * self.head_dim, self.n_kv * self.head_dim, self.n_kv * self.head_dim]

    def forward(self, x: torch.Tensor, ctx: StepContext, cache: KVStore, layer: int) -> torch.Tensor:
        b, t, _ = x.shape  # [B, T, hidden]
        if self.qkv is None:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        else:
            q, k, v = self.qkv(x).split(self.widths, dim=-1)
        q = q.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        v = v.view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        q = q * ctx.cos + rotate_half(q) * ctx.sin
        k = k * ctx.cos + rotate_half(k) * ctx.sin
        return self.o_proj(attend(q, k, v, ctx, cache, layer, self.scale))


class MLP(nn.Module):
    FUSABLE = {"gate_up": ("gate_proj", "up_proj")}

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)
        self.gate_up: nn.Module | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up is None:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, ctx: StepContext, cache: KVStore, layer: int) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), ctx, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class Rotary:
    """cos/sin tables by absolute position, grown on demand and sliced per step (no trig per step)."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str) -> None:
        inv_freq, self.scaling = rope_inv_freq(cfg)
        self.inv_freq = inv_freq.to(device)
        self.dtype, self.device = dtype, device
        self.cos = self.sin = torch.empty(0)
        self._grow(256)

    def _grow(self, n: int) -> None:
        positions = torch.arange(n, device=self.device, dtype=torch.float32)
        freqs = positions[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos = (emb.cos() * self.scaling).to(self.dtype)
        self.sin = (emb.sin() * self.scaling).to(self.dtype)

    def tables(self, position: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        end = position + length
        if end > self.cos.shape[0]:
            self._grow(max(end, 2 * self.cos.shape[0]))
        return self.cos[position:end], self.sin[position:end]


def rope_inv_freq(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and attention scaling for the rope types real checkpoints use."""
    p = cfg.rope
    dim = cfg.head_dim
    base = float(p.get("rope_theta", 10000.0))
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float) / dim))
    kind = p.get("rope_type", "default")
    if kind == "default":
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / float(p["factor"]), 1.0
    if kind == "llama3":
        factor, low, high = float(p["factor"]), float(p["low_freq_factor"]), float(p["high_freq_factor"])
        old_len = float(p["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled), 1.0
    raise CheckpointError(f"rope type {kind!r} is not supported yet (supported: default, linear, llama3)")


class Context:
    """Per-span helper that builds each step's StepContext."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str) -> None:
        self.rotary = Rotary(cfg, dtype, device)
        self.device = device

    def __call__(self, position: int, length: int) -> StepContext:
        cos, sin = self.rotary.tables(position, length)
        if length == 1:
            return StepContext(position, length, None, False, cos, sin)
        if position == 0:
            return StepContext(position, length, None, True, cos, sin)
        return StepContext(position, length, causal_bool_mask(position, length, self.device), False, cos, sin)

    def batch(self, positions: torch.Tensor, keys: int) -> StepContext:
        """B sessions, one new token each at `positions` [B], the longest seeing `keys` keys."""
        self.rotary.tables(0, keys)  # grow the tables to the longest row
        cos = self.rotary.cos.index_select(0, positions)[:, None, None, :]  # each row rotated by its own position
        sin = self.rotary.sin.index_select(0, positions)[:, None, None, :]
        return StepContext(0, 1, None, False, cos, sin)


class ClientParts(nn.Module):
    """What the client holds: token embeddings, the final norm and the LM head."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        # Built around an empty weight: nn.Embedding's own random init on the meta device imports
        # torch._dynamo (1.1 s at every client start), and the checkpoint's weight replaces it anyway.
        self.embed_tokens = nn.Embedding.from_pretrained(torch.empty(cfg.vocab_size, cfg.hidden_size), freeze=False)
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(ids)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(hidden))


def block_prefix(i: int) -> str:
    return f"model.layers.{i}."


# checkpoint key -> ClientParts key
CLIENT_KEYS = {
    "model.embed_tokens.weight": "embed_tokens.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "lm_head.weight",
}
TIED_HEAD = ("lm_head.weight", "embed_tokens.weight")  # ClientParts key, and the key it ties to
