"""What `llmswarm models` lists: registry entries and whether each is on this machine."""

from __future__ import annotations

from pathlib import Path

from .builtin import DONE_MARKER, builtin_gguf
from .checkpoint import cache_dir
from .errors import CheckpointError
from .registry import REGISTRY, ModelSpec


def availability(spec: ModelSpec) -> str:
    """'ready', 'built-in (converts on first use)', 'partial (hub cache)', or 'no'."""
    if spec.builtin:
        if (cache_dir() / "models" / spec.name / DONE_MARKER).exists():
            return "ready"
        try:
            builtin_gguf()
            return "built-in (converts on first use)"
        except CheckpointError:
            return "no (run ./install.sh)"
    hub = cache_dir() / "hub" / f"models--{spec.hub_id.replace('/', '--')}"
    return "partial (hub cache)" if Path(hub).exists() else "no (downloads from the hub)"


def list_models() -> list[dict]:
    return [
        {"name": s.name, "hub_id": s.hub_id, "family": s.family, "num_blocks": s.num_blocks,
         "hidden_size": s.hidden_size, "params_b": s.params_b, "local": availability(s)}
        for s in REGISTRY.values()
    ]
