"""Family lookup: the one place that maps a config's family name to its module."""

from __future__ import annotations

from types import ModuleType

from . import bloom, llama
from .config import ModelConfig

FAMILIES: dict[str, ModuleType] = {"llama": llama, "bloom": bloom}


def family_of(cfg: ModelConfig) -> ModuleType:
    """The module with Block, Context, ClientParts, block_prefix, CLIENT_KEYS, TIED_HEAD."""
    return FAMILIES[cfg.family]
