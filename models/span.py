"""A span of transformer blocks [start, end) and the client's parts, loaded from a checkpoint.

`Span.forward(hidden, cache, position)` is the one code path every block runs through: servers,
`chat --local` and the tests. Blocks are built on the meta device and take the checkpoint's
tensors directly (`assign=True`), so nothing but the span's own weights is ever allocated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .checkpoint import Checkpoint, Progress, _noop
from .config import ModelConfig
from .cpu_layout import lay_out_blocks, transpose_head
from .device import resolve_dtype
from .errors import CheckpointError
from .families import family_of
from .kv_cache import KVCache
from .paged_cache import PagedSequence, PagePool
from .threads import FEW_ROWS_PROBE, StepThreads, threads, tune_step_threads


def parse_dtype(name: str | None, device: str) -> torch.dtype:
    """float32 on CPU unless asked; bfloat16 on GPUs that support it, else float16 (models/device.py)."""
    return resolve_dtype(name, device)


@dataclass(frozen=True)
class SpanRange:
    start: int
    end: int  # exclusive

    @property
    def length(self) -> int:
        return self.end - self.start

    def __str__(self) -> str:
        return f"{self.start}:{self.end}"


class Span:
    def __init__(self, cfg: ModelConfig, start: int, end: int, blocks: nn.ModuleList, dtype: torch.dtype,
                 device: str, context: object | None = None, quant: str = "none",
                 step_threads: StepThreads | None = None):
        self.cfg, self.start, self.end = cfg, start, end
        self.blocks = blocks
        self.dtype, self.device = dtype, device
        self.quant = quant  # "none" | "int8" | "nf4": how the linear layers' weights are stored
        self.context = context or family_of(cfg).Context(cfg, dtype, device)
        # CPU threads for small steps (models/threads.py); None: the process's count
        self.step_threads = step_threads

    def sub(self, start: int, end: int) -> Span:
        """Blocks [start, end) (absolute indices) of this span, sharing its weights: a client may
        enter a server's span in the middle, where the previous server's span ended."""
        if not self.start <= start < end <= self.end:
            raise CheckpointError(f"blocks {start}:{end} are not inside this span {self.start}:{self.end}")
        if (start, end) == (self.start, self.end):
            return self
        blocks = nn.ModuleList(self.blocks[start - self.start : end - self.start])
        return Span(self.cfg, start, end, blocks, self.dtype, self.device, self.context, self.quant,
                    self.step_threads)

    @property
    def num_blocks(self) -> int:
        return self.end - self.start

    @property
    def nbytes(self) -> int:
        """Bytes of the span's weights as stored (quantisation scales included)."""
        from .quant import weight_bytes

        return weight_bytes(self.blocks)

    def new_cache(self, max_length: int) -> KVCache:
        c = self.cfg
        return KVCache(self.num_blocks, c.num_kv_heads, c.head_dim, max_length, self.dtype, self.device)

    def new_pool(self, num_pages: int, page_size: int = 16) -> PagePool:
        """The KV budget for this span's sessions: `num_pages` pages of `page_size` tokens."""
        c = self.cfg
        return PagePool(self.num_blocks, c.num_kv_heads, c.head_dim, num_pages, page_size, self.dtype, self.device)

    def cache_bytes_per_token(self) -> int:
        c = self.cfg
        return 2 * self.num_blocks * c.num_kv_heads * c.head_dim * torch.finfo(self.dtype).bits // 8

    @torch.inference_mode()
    def forward(self, hidden: torch.Tensor, cache: KVCache | PagedSequence, position: int) -> torch.Tensor:
        """hidden [B, T, hidden] for positions position..position+T-1 -> the span's output.

        The cache's owner has made room first (`cache.reserve(position, T)`, which also rewinds a
        session to a position below its length): the span assumes it. A `PagedSequence` is one
        session: B = 1."""
        t = hidden.shape[1]
        if hidden.shape[0] != 1 and isinstance(cache, PagedSequence):
            raise ValueError(f"a PagedSequence holds one session, but hidden has {hidden.shape[0]} rows")
        ctx = self.context(position, t)
        hidden = hidden.to(self.device, self.dtype)  # inputs arrive on the CPU (wire, embeddings)
        with threads(self.step_threads.for_rows(hidden.shape[0] * t) if self.step_threads else None):
            for i, block in enumerate(self.blocks):
                hidden = block(hidden, ctx, cache, i)
        cache.length = position + t
        return hidden

    def tune_threads(self) -> StepThreads | None:
        """Time small steps after an idle gap with 1, 2, 4... threads and keep the best counts for
        this span (models/threads.py). On a GPU the count does not matter: None."""
        if str(self.device) != "cpu":
            return None
        cache = self.new_cache(FEW_ROWS_PROBE)
        self.step_threads = None  # time every count, not the ones chosen before

        def step(rows: int) -> None:
            cache.reserve(0, rows)
            self.forward(torch.zeros(1, rows, self.cfg.hidden_size, dtype=self.dtype), cache, 0)

        self.step_threads = tune_step_threads(step)
        return self.step_threads

    @torch.inference_mode()
    def forward_batch(self, hidden: torch.Tensor, seqs: list[PagedSequence], positions: list[int]) -> torch.Tensor:
        """hidden [B, 1, hidden]: B sessions decoding one token each, row i at `positions[i]` of
        `seqs[i]`, run as one batch (every linear layer sees B rows; attention is per row).

        Each session has made room first (`seq.reserve(position, 1)`): its owner refuses the one
        that cannot, without failing the others."""
        if hidden.shape[0] != len(seqs) or hidden.shape[1] != 1:
            raise ValueError(f"hidden {tuple(hidden.shape)} is not [{len(seqs)}, 1, hidden] for {len(seqs)} sessions")
        if len(seqs) == 1:  # a lone session reads its keys in place, as KVCache does
            return self.forward(hidden, seqs[0], positions[0])
        pool = seqs[0].pool
        if pool.num_layers < self.num_blocks:
            raise ValueError(f"a pool of {pool.num_layers} layers cannot hold this span's {self.num_blocks} blocks")
        batch = pool.batch(seqs, positions)
        ctx = self.context.batch(batch.position_ids, batch.keys)
        hidden = hidden.to(self.device, self.dtype)
        with threads(self.step_threads.for_rows(len(seqs)) if self.step_threads else None):
            for i, block in enumerate(self.blocks):
                hidden = block(hidden, ctx, batch, i)
        batch.commit()
        return hidden


def load_span(ckpt: Checkpoint, start: int, end: int, dtype: torch.dtype, device: str = "cpu",
              progress: Progress = _noop, quant: str = "none", layout: bool = True) -> Span:
    """Blocks [start, end) on `device`; with `quant` int8/nf4 their linear layers are quantised
    (loaded on CPU, then quantised one layer at a time on the way to `device`: models/quant.py).
    CPU float32 blocks are stored in the CPU's fastest layout (models/cpu_layout.py) unless `layout`
    is False (the checkpoint's nn.Linear layers, as quantisation wants them)."""
    cfg = ckpt.config
    if quant != "none":
        from .quant import check_quant, quantize_blocks

        check_quant(quant, device)
        span = load_span(ckpt, start, end, dtype, "cpu", progress, layout=False)
        progress(f"quantising blocks {start}:{end} to {quant}", 0, None)
        blocks = quantize_blocks(span.blocks, quant, device, dtype)
        return Span(cfg, start, end, blocks, dtype, device, quant=quant)
    if not 0 <= start < end <= cfg.num_blocks:
        raise CheckpointError(f"blocks {start}:{end} are outside the model's 0:{cfg.num_blocks}")
    family = family_of(cfg)
    with torch.device("meta"):
        blocks = nn.ModuleList(family.Block(cfg) for _ in range(start, end))
    tensors = ckpt.read(ckpt.span_keys(start, end), dtype, device, progress, task=f"loading blocks {start}:{end}")
    state = {}
    for j, i in enumerate(range(start, end)):
        prefix = family.block_prefix(i)
        state.update({f"{j}.{n[len(prefix):]}": t for n, t in tensors.items() if n.startswith(prefix)})
    _assign(blocks, state, f"blocks {start}:{end}")
    return Span(cfg, start, end, (lay_out_blocks(blocks) if layout else blocks).eval(), dtype, device)


def load_client(ckpt: Checkpoint, dtype: torch.dtype, device: str = "cpu", progress: Progress = _noop) -> nn.Module:
    """Embeddings, final norm and LM head: what the client holds."""
    cfg = ckpt.config
    family = family_of(cfg)
    with torch.device("meta"):
        parts = family.ClientParts(cfg)
    head_key, tied_to = family.TIED_HEAD
    wanted = {k: family.CLIENT_KEYS[k] for k in ckpt.client_keys()}
    tensors = ckpt.read(list(wanted), dtype, device, progress, task="loading embeddings and head")
    state = {wanted[k]: t for k, t in tensors.items()}
    if head_key not in state:
        if not cfg.tie_word_embeddings and cfg.family != "bloom":
            raise CheckpointError(f"{ckpt.folder} has no lm_head.weight and its embeddings are not tied")
        state[head_key] = state[tied_to]
    _assign(parts, state, "embeddings and head")
    return transpose_head(parts).eval()


def _assign(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    missing, unexpected = module.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint does not match the model's {what}: missing {missing[:4]}, unexpected {unexpected[:4]}"
        )
