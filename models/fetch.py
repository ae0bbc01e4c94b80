"""Finding the folder for a model: the built-in one (converted once from its GGUF), a local folder or
.gguf file, or the hub, from which only the shards holding the tensors asked for are downloaded."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from .builtin import convert_gguf, ensure_builtin
from .checkpoint import INDEX_FILE, SINGLE_FILE, Checkpoint, Progress, _noop, cache_dir
from .errors import CheckpointError
from .registry import ModelSpec


def locate(spec: ModelSpec, progress: Progress = _noop, want: Callable[[Checkpoint], list[str]] | None = None) -> Path:
    """A local folder holding `spec`'s config, tokenizer, and (for hub models) the shards that hold
    the tensors `want(checkpoint)` names: only those are downloaded."""
    if spec.builtin:
        return ensure_builtin(spec, progress)
    if spec.local_path is not None:
        path = Path(spec.local_path)
        if path.is_file() and path.suffix == ".gguf":
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
