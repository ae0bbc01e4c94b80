"""Checkpoints: find a model's files and read only the tensors a span (or the client) needs.

Sources: a local Hugging Face folder (safetensors, sharded or not), a hub repository (only the
shards holding the requested tensors are downloaded), or a GGUF file (converted once into a cached
safetensors folder). Reads go through `safe_open`, which maps the file and copies only the tensors
asked for: a server's peak memory is its span plus the runtime, never the whole model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors import safe_open

from .config import ModelConfig
from .errors import CheckpointError
from .registry import ModelSpec

Progress = Callable[[str, float, float | None], None]
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def _noop(task: str, done: float, total: float | None) -> None:
    pass


def cache_dir() -> Path:
    """Where converted and downloaded models live: $LLMSWARM_CACHE, else the XDG cache dir."""
    if os.environ.get("LLMSWARM_CACHE"):
        return Path(os.environ["LLMSWARM_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "llmswarm"


class Checkpoint:
    """A local folder of safetensors files and the map from tensor name to file."""

    def __init__(self, folder: Path, weight_map: dict[str, str]) -> None:
        self.folder = folder
        self.weight_map = weight_map
        self.config = ModelConfig.from_folder(folder)
        self.prefix_fix = _bloom_prefix_fix(self.config, weight_map)

    @classmethod
    def open(cls, folder: Path) -> Checkpoint:
        folder = Path(folder)
        if not folder.is_dir():
            raise CheckpointError(f"model folder {folder} does not exist: pass an existing folder or a model name")
        return cls(folder, _weight_map(folder))

    def key(self, name: str) -> str:
        """The checkpoint's spelling of a canonical tensor name."""
        return self.prefix_fix(name)

    def has(self, name: str) -> bool:
        return self.key(name) in self.weight_map

    def files_for(self, names: Iterable[str]) -> set[str]:
        return {self.weight_map[self.key(n)] for n in names if self.has(n)}

    def block_keys(self, index: int, block_prefix: str) -> list[str]:
        """Canonical names of every tensor of block `index`."""
        wanted = self.key(block_prefix)
        keys = [k for k in self.weight_map if k.startswith(wanted)]
        if not keys:
            raise CheckpointError(f"{self.folder} holds no tensors for block {index} ({block_prefix}*)")
        canon = block_prefix
        return [canon + k[len(wanted) :] for k in keys]

    def read(
        self, names: list[str], dtype: torch.dtype, device: str, progress: Progress = _noop, task: str = "loading"
    ) -> dict[str, torch.Tensor]:
        """Read exactly these tensors (canonical names), converted to dtype, grouped by file."""
        by_file: dict[str, list[str]] = {}
        for name in names:
            key = self.key(name)
            if key not in self.weight_map:
                raise CheckpointError(f"{self.folder} has no tensor {key}")
            by_file.setdefault(self.weight_map[key], []).append(name)
        out: dict[str, torch.Tensor] = {}
        done = 0
        for filename, file_names in sorted(by_file.items()):
            with safe_open(str(self.folder / filename), framework="pt", device="cpu") as f:
                for name in file_names:
                    t = f.get_tensor(self.key(name))
                    out[name] = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
                    done += 1
                    progress(task, done, len(names))
        return out


def _weight_map(folder: Path) -> dict[str, str]:
    index = folder / INDEX_FILE
    if index.exists():
        try:
            return dict(json.loads(index.read_text())["weight_map"])
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index ({e})") from None
    single = folder / SINGLE_FILE
    if single.exists():
        with safe_open(str(single), framework="pt") as f:
            return {k: SINGLE_FILE for k in f.keys()}
    raise CheckpointError(
        f"{folder} has no {SINGLE_FILE} or {INDEX_FILE}: llmswarm reads safetensors checkpoints (or a .gguf file)"
    )


def _bloom_prefix_fix(cfg: ModelConfig, weight_map: dict[str, str]) -> Callable[[str], str]:
    """BLOOM checkpoints saved from the bare model lack the `transformer.` prefix."""
    if cfg.family == "bloom" and not any(k.startswith("transformer.") for k in weight_map):
        return lambda name: name.removeprefix("transformer.")
    return lambda name: name


# ---------------------------------------------------------------------------------------------
# Finding the folder for a model: built-in, local path, GGUF file, or the hub.


def locate(spec: ModelSpec, progress: Progress = _noop, want: Callable[[Checkpoint], list[str]] | None = None) -> Path:
    """A local folder holding `spec`'s config, tokenizer, and (for hub models) the shards that hold
    the tensors `want(checkpoint)` names: only those are downloaded."""
    if spec.builtin:
        from .builtin import ensure_builtin

        return ensure_builtin(spec, progress)
    if spec.local_path is not None:
        path = Path(spec.local_path)
        if path.is_file() and path.suffix == ".gguf":
            from .builtin import convert_gguf

            return convert_gguf(path, cache_dir() / "converted" / path.stem.lower(), progress)
        return path
    return download_from_hub(spec.hub_id, progress, want)


def _check_hub_reachable(repo_id: str, timeout_s: float = 3.0) -> None:
    """huggingface_hub retries an unreachable host for ~25 s; one TCP connect answers in at most 3."""
    import socket
    from urllib.parse import urlparse

    hint = "connect to the internet, or download the model and pass its local folder as --model PATH"
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise CheckpointError(f"HF_HUB_OFFLINE is set, so {repo_id} cannot be fetched: {hint}")
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname or "huggingface.co", port), timeout=timeout_s).close()
    except OSError as e:
        raise CheckpointError(
            f"cannot reach the Hugging Face hub ({endpoint.hostname}: {e.strerror or e}) to fetch {repo_id}: {hint}"
        ) from None


HUB_SMALL_FILES = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
]


def download_from_hub(
    repo_id: str, progress: Progress = _noop, want: Callable[[Checkpoint], list[str]] | None = None
) -> Path:
    """Fetch config, tokenizer and only the safetensors shards holding the wanted tensors."""
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, GatedRepoError, RepositoryNotFoundError
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
        raise CheckpointError("huggingface_hub is not installed: run ./install.sh again") from None

    _check_hub_reachable(repo_id)
    local = cache_dir() / "hub"

    def fetch(filename: str, required: bool = True) -> Path | None:
        try:
            return Path(hf_hub_download(repo_id, filename, cache_dir=str(local), etag_timeout=5))
        except EntryNotFoundError:
            if required:
                raise CheckpointError(f"{repo_id} has no {filename} on the hub") from None
            return None
        except RepositoryNotFoundError:
            raise CheckpointError(f"{repo_id} was not found on the Hugging Face hub: check the name") from None
        except GatedRepoError:
            raise CheckpointError(
                f"{repo_id} is gated: accept its licence on huggingface.co, then `huggingface-cli login`"
            ) from None
        except Exception as e:  # offline, DNS, proxy, timeouts: one clear line
            raise CheckpointError(
                f"cannot reach the Hugging Face hub to fetch {repo_id} ({type(e).__name__}): "
                "connect to the internet, or download the model and pass its local folder as --model PATH"
            ) from None

    config_path = fetch("config.json")
    assert config_path is not None
    for name in HUB_SMALL_FILES[1:]:
        fetch(name, required=False)
    folder = config_path.parent
    if fetch(INDEX_FILE, required=False) is None:
        fetch(SINGLE_FILE)
        return folder
    weight_map = json.loads((folder / INDEX_FILE).read_text())["weight_map"]
    ckpt = Checkpoint(folder, weight_map)
    files = sorted(ckpt.files_for(want(ckpt))) if want else sorted(set(weight_map.values()))
    for i, filename in enumerate(files):
        progress(f"downloading {repo_id}", i, len(files))
        fetch(filename)
    progress(f"downloading {repo_id}", len(files), len(files))
    return folder
