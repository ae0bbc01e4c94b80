"""`llmswarm models`: the names users can type, and which are available on this machine."""

from __future__ import annotations

import typer

from . import output


def models(json_out: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """List known model names, their size, and whether they are available locally."""
    from llmswarm.models.catalog import list_models

    rows = list_models()
    if json_out:
        output.print_json({"models": rows})
        return
    from rich.table import Table

    table = Table(title="models")
    for col in ("name", "hub id", "family", "blocks", "hidden", "params", "local"):
        table.add_column(col, justify="right" if col in ("blocks", "hidden", "params") else "left")
    for r in rows:
        table.add_row(r["name"], r["hub_id"], r["family"], str(r["num_blocks"]), str(r["hidden_size"]),
                      f"{r['params_b']:g}B", r["local"])
    output.console.print(table)
