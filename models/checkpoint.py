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
from .families import family_of

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

    def span_keys(self, start: int, end: int) -> list[str]:
        """Canonical names of every tensor of blocks [start, end): all a server of that span reads."""
        fam = family_of(self.config)
        return [n for i in range(start, end) for n in self.block_keys(i, fam.block_prefix(i))]

    def client_keys(self) -> list[str]:
        """Canonical names of the client's tensors this checkpoint holds (embeddings, final norm, head)."""
        return [k for k in family_of(self.config).CLIENT_KEYS if self.has(k)]

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
            path = self.folder / filename
            try:
                with safe_open(str(path), framework="pt", device="cpu") as f:
                    for name in file_names:
                        t = f.get_tensor(self.key(name))
                        out[name] = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
                        done += 1
                        progress(task, done, len(names))
            except FileNotFoundError:
                raise CheckpointError(f"shard {path} is missing: download or convert the model again") from None
            except Exception as e:  # noqa: BLE001 - safetensors raises its own error type
                if isinstance(e, CheckpointError):
                    raise
                raise CheckpointError(f"shard {path} cannot be read ({type(e).__name__}: {str(e)[:200]}): it is "
                                      "corrupt or truncated; download or convert the model again") from None
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
        try:
            with safe_open(str(single), framework="pt") as f:
                return {k: SINGLE_FILE for k in f.keys()}
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error type
            raise CheckpointError(f"{single} cannot be read ({type(e).__name__}): it is corrupt or truncated; "
                                  "download or convert the model again") from None
    raise CheckpointError(
        f"{folder} has no {SINGLE_FILE} or {INDEX_FILE}: llmswarm reads safetensors checkpoints (or a .gguf file)"
    )


def _bloom_prefix_fix(cfg: ModelConfig, weight_map: dict[str, str]) -> Callable[[str], str]:
    """BLOOM checkpoints saved from the bare model lack the `transformer.` prefix."""
    if cfg.family == "bloom" and not any(k.startswith("transformer.") for k in weight_map):
        return lambda name: name.removeprefix("transformer.")
    return lambda name: name
