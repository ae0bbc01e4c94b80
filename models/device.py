"""Which device and dtype a server or a chat runs on, and how many blocks fit in its memory.

`resolve_device("auto")` is CUDA when torch sees a GPU, else CPU; `cuda:N` picks one card.
`resolve_dtype("auto", device)` is bfloat16 on GPUs that support it, float16 on older ones, float32
on CPU. `plan_blocks()` is the pure arithmetic behind `join` with neither --blocks nor --num-blocks:

    n = the largest n <= model blocks with  n * weights_per_block + cache(n) + margin <= free memory
    cache(n) = min(n * cache_bytes_per_block, cache_cap)   (the server's default KV budget)

`plan_for_device()` fills its inputs from the machine: free GPU memory (torch.cuda.mem_get_info),
or on CPU the RAM psutil reports available, times CPU_RAM_FRACTION, capped at CPU_MAX_PLAN_BYTES.
Every constant is in models/registry.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import registry
from .config import ModelConfig
from .errors import DeviceError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_MIB = 1024**2


def resolve_device(name: str | None = registry.DEFAULT_DEVICE) -> str:
    """"auto" | "cpu" | "cuda" | "cuda:N" -> the concrete device to use ("cpu", "cuda:0", ...)."""
    name = (name or registry.DEFAULT_DEVICE).strip().lower()
    if name == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return "cpu"
    kind, _, index = name.partition(":")
    if kind != "cuda" or (index and not index.isdigit()):
        raise DeviceError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise DeviceError(f"{name}: no CUDA GPU is visible to torch here; use --device cpu (or auto)")
    count = torch.cuda.device_count()
    i = int(index or 0)
    if i >= count:
        raise DeviceError(f"{name}: torch sees {count} GPU(s), cuda:0..cuda:{count - 1}; pick one of those")
    return f"cuda:{i}"


def resolve_dtype(name: str | None, device: str) -> torch.dtype:
    """"auto" (or None): float32 on CPU; bfloat16 on a GPU that supports it, else float16."""
    if name is None or name == "auto":
        if not device.startswith("cuda"):
            return DTYPES[registry.CPU_DTYPE]
        with torch.cuda.device(torch.device(device)):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if name not in DTYPES:
        raise DeviceError(f"unknown dtype {name!r}: use auto or one of {', '.join(DTYPES)}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# -- how much one block weighs -----------------------------------------------------------------------
def linear_bytes(elements: int, rows: int, dtype: torch.dtype, quant: str) -> int:
    """Bytes of one linear layer's weight of `elements` values and `rows` output rows, as stored."""
    if quant == "none":
        return elements * dtype.itemsize
    if quant == "int8":  # one byte a weight, one float32 scale per output row
        return elements + 4 * rows
    if quant == "nf4":  # half a byte a weight, one float32 absmax per NF4_BLOCK_SIZE weights
        return elements // 2 + 4 * -(-elements // registry.NF4_BLOCK_SIZE)
    raise DeviceError(f"unknown quantisation {quant!r}: use one of {', '.join(registry.QUANT_MODES)}")


def block_weight_bytes(cfg: ModelConfig, dtype: torch.dtype, quant: str = "none") -> int:
    """Bytes of one transformer block's parameters once loaded (and quantised): built on the meta
    device, so this costs no memory and counts exactly what `load_span` would allocate."""
    from .families import family_of

    with torch.device("meta"):
        block = family_of(cfg).Block(cfg)
    total, in_linear = 0, set()
    for module in block.modules():
        if isinstance(module, nn.Linear):
            w = module.weight
            total += linear_bytes(w.numel(), w.shape[0], dtype, quant)
            in_linear.add(id(w))
    return total + sum(p.numel() * dtype.itemsize for p in block.parameters() if id(p) not in in_linear)


def kv_bytes_per_token_per_block(cfg: ModelConfig, dtype: torch.dtype) -> int:
    return 2 * cfg.num_kv_heads * cfg.head_dim * dtype.itemsize


# -- how many blocks fit -------------------------------------------------------------------------------
@dataclass(frozen=True)
class MemoryPlan:
    num_blocks: int  # blocks to serve (>= 1)
    model_blocks: int
    free_bytes: int  # memory we planned with (after the CPU share and cap)
    weight_bytes_per_block: int
    cache_bytes: int  # KV budget for num_blocks blocks
    margin_bytes: int
    where: str  # "cuda:0 (NVIDIA H100, 79.1 GiB free)", "CPU RAM (...)"

    def reason(self) -> str:
        """One line: what was chosen and why."""
        used = self.num_blocks * self.weight_bytes_per_block
        limit = "all the model's blocks" if self.num_blocks == self.model_blocks else "as many as fit"
        return (f"{self.num_blocks} of {self.model_blocks} blocks ({limit}): {self.where}; "
                f"{self.weight_bytes_per_block / _MIB:.1f} MiB of weights per block ({used / _MIB:.0f} MiB), "
                f"{self.cache_bytes / _MIB:.0f} MiB KV cache, {self.margin_bytes / _MIB:.0f} MiB margin")


def plan_blocks(model_blocks: int, free_bytes: int, weight_bytes_per_block: int, cache_bytes_per_block: int,
                cache_cap_bytes: int | None, margin_bytes: int, where: str = "") -> MemoryPlan:
    """The most blocks (never more than the model has) whose weights, KV cache and margin fit in
    `free_bytes`. cache(n) = n * cache_bytes_per_block, at most `cache_cap_bytes` (None: no cap).
    DeviceError when not even one block fits."""
    if model_blocks < 1 or weight_bytes_per_block <= 0 or cache_bytes_per_block < 0 or margin_bytes < 0:
        raise ValueError("plan_blocks needs model_blocks >= 1, positive block weights, non-negative cache and margin")

    def cache(n: int) -> int:
        c = n * cache_bytes_per_block
        return c if cache_cap_bytes is None else min(c, cache_cap_bytes)

    def fits(n: int) -> bool:
        return n * weight_bytes_per_block + cache(n) + margin_bytes <= free_bytes

    if not fits(1):
        need = weight_bytes_per_block + cache(1) + margin_bytes
        raise DeviceError(f"one block needs {need / _MIB:.0f} MiB (weights, KV cache, margin) but "
                          f"{where or 'the device'} has {max(free_bytes, 0) / _MIB:.0f} MiB free: free memory, "
                          "try --quant int8, or set --num-blocks / --cache-tokens yourself")
    n = 1
    while n < model_blocks and fits(n + 1):  # at most a few hundred blocks: a scan is clear and fast
        n += 1
    return MemoryPlan(n, model_blocks, free_bytes, weight_bytes_per_block, cache(n), margin_bytes, where)


def available_memory(device: str) -> tuple[int, int, str]:
    """(bytes to plan with, margin bytes, description) for `device` as it is now."""
    if device.startswith("cuda"):
        free, total = torch.cuda.mem_get_info(torch.device(device))
        name = torch.cuda.get_device_name(torch.device(device))
        margin = max(registry.CUDA_MARGIN_BYTES, int(registry.CUDA_MARGIN_FRACTION * free))
        return free, margin, f"{device} ({name}, {free / 1024**3:.1f} of {total / 1024**3:.1f} GiB free)"
    import psutil

    avail = psutil.virtual_memory().available
    budget = min(int(avail * registry.CPU_RAM_FRACTION), registry.CPU_MAX_PLAN_BYTES)
    return budget, registry.CPU_MARGIN_BYTES, (
        f"CPU RAM ({avail / 1024**3:.1f} GiB available, planning with {budget / 1024**3:.1f} GiB: "
        f"{registry.CPU_RAM_FRACTION:.0%}, at most {registry.CPU_MAX_PLAN_BYTES / 1024**3:.0f} GiB)")


def plan_for_device(cfg: ModelConfig, device: str, dtype: torch.dtype, quant: str, cache_tokens: int,
                    cache_cap_bytes: int | None) -> MemoryPlan:
    """How many blocks of `cfg` to serve on `device` with `cache_tokens` of KV cache per block
    (at most `cache_cap_bytes` in all; None: no cap)."""
    free, margin, where = available_memory(device)
    return plan_blocks(cfg.num_blocks, free, block_weight_bytes(cfg, dtype, quant),
                       cache_tokens * kv_bytes_per_token_per_block(cfg, dtype), cache_cap_bytes, margin, where)
