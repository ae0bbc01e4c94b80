"""`llmswarm demo`: a whole swarm on this machine (bootstrap + N servers), then a chat through it."""

from __future__ import annotations

import typer

from . import output


def demo(
    servers: int = typer.Option(3, "--servers", "-s", min=1, max=16, help="Server processes to start."),
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="Model name or folder."),
    prompt: str = typer.Option(None, "--prompt", "-p", help="Answer this once and exit (else: interactive)."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", "-n", min=1, help="Most tokens per answer."),
    dtype: str = typer.Option(None, "--dtype", help="float32 | bfloat16 | float16"),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object per answer."),
    show_route: bool = typer.Option(True, "--show-route/--hide-route", help="Print the chain before answering."),
) -> None:
    """Start a local swarm that splits the model, wait until every block is served, and chat."""
    from llmswarm.bench.local_swarm import LocalSwarm, even_spans
    from llmswarm.cli.chat import ChatOptions, _ask, _render
    from llmswarm.models.checkpoint import Checkpoint, locate
    from llmswarm.models.registry import resolve
    from llmswarm.node.client.chat import run_chat

    spec = resolve(model)
    with output.progress(not json_out) as report:
        ckpt = Checkpoint.open(locate(spec, report))  # convert once here, not in every server
        spans = even_spans(ckpt.config.num_blocks, servers)
        swarm = LocalSwarm(str(spec.local_path or spec.name), spans, dtype=dtype, progress=report)
        swarm.__enter__()
    try:
        if not json_out:
            output.info(f"swarm up: bootstrap {swarm.peers[0]} and {servers} servers "
                        + ", ".join(f"{a}:{b}" for a, b in spans))
        opts = ChatOptions(model=str(spec.local_path or spec.name), prompt=prompt, max_new_tokens=max_new_tokens,
                           temperature=0.0, top_p=1.0, seed=None, dtype=dtype, device="cpu", max_length=2048,
                           system=None, json_out=json_out, peers=swarm.peers, show_route=show_route,
                           solver="nsga2", prefer="balanced", identity=None)
        run_chat(opts, ask=_ask, render=_render(opts), progress=output.progress)
    finally:
        swarm.stop()
