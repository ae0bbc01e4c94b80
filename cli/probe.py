"""`llmswarm probe`: how far away is every server, and how far apart are they."""

from __future__ import annotations

import typer

from . import output
from .params import split_peers


def probe(
    model: str = typer.Option(None, "--model", "-m", help="Only servers of this model."),
    peers: list[str] = typer.Option([], "--peers", envvar="LLMSWARM_PEERS", help="Bootstrap multiaddrs."),
    count: int = typer.Option(10, "--count", "-c", min=1, max=1000, help="Pings per server."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Measure round-trip time to every known server (median, jitter, loss) with sub-ms resolution."""
    import trio
    from llmswarm.models.registry import resolve
    from llmswarm.node.discovery.probe import probe as run_probe
    from llmswarm.node.host import quiet_libp2p_logging

    quiet_libp2p_logging()
    name = resolve(model).name if model else None
    rows = trio.run(run_probe, split_peers(peers), name, count)
    if json_out:
        output.print_json({"servers": rows})
        return
    from rich.table import Table

    table = Table(title=f"probe ({count} pings each)")
    for col in ("server", "peer", "model", "span", "median", "jitter", "loss", "next hops (announced)"):
        table.add_column(col, justify="right" if col in ("median", "jitter", "loss") else "left")
    for r in rows:
        med = f"{r['rtt_median_s'] * 1000:.3f} ms" if r["rtt_median_s"] is not None else "-"
        hops = ", ".join(f"{k} {v * 1000:.2f} ms" for k, v in r["next_rtts_s"].items()) or "-"
        table.add_row(r["public_name"] or "-", r["peer_id"][-8:], r["model"], f"{r['start']}:{r['end']}", med,
                      f"{r['rtt_jitter_s'] * 1000:.3f} ms", f"{r['loss']:.0%}", hops)
    output.console.print(table)
