"""`llmswarm trust`: what this client has learned of each server (output checks, measured speed),
kept across runs; `--clear` forgets it."""

from __future__ import annotations

import time

import typer

from . import output


def trust(
    clear: bool = typer.Option(False, "--clear", help="Forget every server (or only --peer)."),
    peer: str = typer.Option(None, "--peer", help="Only this peer id (with --clear: forget only it)."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON record, nothing else."),
) -> None:
    """Per server: output checks passed and failed, measured vs announced speed, and the verdict the
    route solver uses (distrusted servers are left out of routes; unknown ones are neutral)."""
    from llmswarm.node.client.reputation import Reputation

    rep = Reputation.load()
    if clear:
        gone = rep.clear(peer)
        record = {"path": str(rep.path), "cleared": gone}
        if json_out:
            output.print_json(record)
        else:
            output.console.print(f"forgot {gone} server(s) ({rep.path})")
        return
    peers = rep.as_dict()
    if peer is not None:
        peers = {p: v for p, v in peers.items() if p == peer}
    record = {"path": str(rep.path), "peers": peers}
    if json_out:
        output.print_json(record)
        return
    from rich.table import Table

    table = Table(title=f"what this client knows of each server ({rep.path})", title_justify="left")
    for col in ("peer", "verdict", "checks passed", "failed", "measured steps/s/block", "announced", "last seen"):
        table.add_column(col, justify="left" if col in ("peer", "verdict") else "right")
    colour = {"distrusted": "red", "trusted": "green", "neutral": "white"}
    for p, e in sorted(peers.items(), key=lambda kv: -kv[1]["last_seen"]):
        measured = f"{e['observed_rps']:.1f}" if e["observed_rps"] else "-"
        announced = f"{e['announced_rps']:.4g}" if e["announced_rps"] else "-"
        seen = time.strftime("%Y-%m-%d %H:%M", time.localtime(e["last_seen"])) if e["last_seen"] else "-"
        table.add_row(p[-8:], f"[{colour[e['verdict']]}]{e['verdict']}[/]", str(e["passed"]), str(e["failed"]),
                      measured, announced, seen)
    output.console.print(table if peers else "no server checked or measured yet")
