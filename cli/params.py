"""Parsing shared by several commands: peer lists, devices, block ranges, the draft model's options
(usage errors exit 2)."""

from __future__ import annotations

from typing import Any

import typer
from llmswarm.models.registry import DEFAULT_DRAFT_TOKENS, MAX_DRAFT_TOKENS


def split_peers(peers: list[str]) -> list[str]:
    """--peers may repeat, and LLMSWARM_PEERS may hold several addresses separated by spaces or commas."""
    return [p for item in peers for p in item.replace(",", " ").split()]


def check_device(device: str) -> str:
    """--device as given -> the concrete device (models/device.py decides; DeviceError -> exit 3)."""
    from llmswarm.models.device import resolve_device

    return resolve_device(device)


def parse_blocks(blocks: str | None) -> tuple[int, int] | None:
    if blocks is None:
        return None
    try:
        a, b = (int(x) for x in blocks.split(":"))
    except ValueError:
        raise typer.BadParameter(f"{blocks!r} is not START:END (e.g. 0:10)", param_hint="--blocks") from None
    if not 0 <= a < b:
        raise typer.BadParameter(f"{blocks!r}: need 0 <= START < END", param_hint="--blocks")
    return a, b


def draft_tokens_option() -> Any:
    """`--draft-tokens`, as `chat` and `api` take it."""
    return typer.Option(DEFAULT_DRAFT_TOKENS, "--draft-tokens", min=1, max=MAX_DRAFT_TOKENS,
                        help="Most draft tokens per step (fewer while they are refused).")


def draft_dtype_option() -> Any:
    """`--draft-dtype`, as `chat` and `api` take it."""
    return typer.Option("auto", "--draft-dtype",
                        help="auto (the model's) | float32 | bfloat16 | float16 for the draft model: a faster "
                             "draft; only how many drafts stand depends on it.")
