"""`llmswarm bench swarm`: the swarm against a local run of the same model, in one run."""

from __future__ import annotations

import typer

from . import output


def bench_swarm(
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="Model name or folder."),
    servers: int = typer.Option(3, "--servers", "-s", min=1, max=16, help="Server processes."),
    rounds: int = typer.Option(5, "--rounds", "-r", min=1, help="Alternating local/swarm rounds."),
    new_tokens: int = typer.Option(64, "--tokens", "-t", min=2, help="Tokens generated per round."),
    dtype: str = typer.Option(None, "--dtype", help="float32 | bfloat16 | float16"),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Decode tokens/s through a local N-server swarm vs the same model in-process (medians)."""
    from llmswarm.node.bench import bench_swarm as run

    with output.progress(not json_out) as report:
        r = run(model, servers, rounds, new_tokens, dtype, report)
    if json_out:
        output.print_json(r)
        return
    from rich.table import Table

    t = Table(title=f"{r['model']} {r['dtype']}, {r['servers']} servers {' '.join(r['spans'])}, "
                    f"{r['new_tokens']} tokens x {r['rounds']} rounds (medians)")
    for col in ("", "tokens/s", "ms/step", "first token ms"):
        t.add_column(col, justify="right")
    for k in ("local", "swarm"):
        t.add_row(k, f"{r[k]['tokens_per_s']:.2f}", f"{r[k]['step_ms']:.2f}", f"{r[k]['ttft_ms']:.1f}")
    output.console.print(t)
    output.console.print(f"swarm / local: [bold]{r['ratio']:.3f}[/bold]   added per hop per step: "
                         f"[bold]{r['added_ms_per_hop_per_step']:.2f} ms[/bold]   token-identical: "
                         f"{r['token_identical']}   join -> announced: "
                         + ", ".join(f"{s:.1f} s" for s in r["seconds_join_to_announced"])
                         + " (process start -> announced: "
                         + ", ".join(f"{s:.1f} s" for s in r["seconds_process_start_to_announced"]) + ")")
