"""Parsing shared by several commands: peer lists, devices, block ranges (usage errors exit 2)."""

from __future__ import annotations

import typer


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
