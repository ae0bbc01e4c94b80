"""`llmswarm demo`: a whole swarm on this machine (bootstrap + N servers), then a chat through it."""

from __future__ import annotations

import typer
from llmswarm.models.registry import DEFAULT_DRAFT_TOKENS, MAX_DRAFT_TOKENS
from llmswarm.node import config

from . import output


def demo(
    servers: int = typer.Option(config.DEFAULT_DEMO_SERVERS, "--servers", "-s", min=1, max=16,
                                help="Server processes to start."),
    model: str = typer.Option(config.DEFAULT_MODEL, "--model", "-m", help="Model name or folder."),
    prompt: str = typer.Option(None, "--prompt", "-p", help="Answer this once and exit (else: interactive)."),
    max_new_tokens: int = typer.Option(config.DEFAULT_MAX_NEW_TOKENS, "--max-new-tokens", "-n", min=1,
                                       help="Most tokens per answer."),
    dtype: str = typer.Option(None, "--dtype", help="float32 | bfloat16 | float16"),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object per answer."),
    show_route: bool = typer.Option(True, "--show-route/--hide-route", help="Print the chain before answering."),
    draft: str = typer.Option(None, "--draft", help="Speculative decoding with this draft model (see `chat --draft`)."),
    draft_tokens: int = typer.Option(DEFAULT_DRAFT_TOKENS, "--draft-tokens", min=1, max=MAX_DRAFT_TOKENS,
                                     help="Most draft tokens per step."),
) -> None:
    """Start a local swarm that splits the model, wait until every block is served, and chat."""
    from llmswarm.bench.local_swarm import LocalSwarm, even_spans, model_arg
    from llmswarm.models.checkpoint import Checkpoint
    from llmswarm.models.fetch import locate
    from llmswarm.models.registry import resolve
    from llmswarm.node.client.chat import ChatOptions

    from .chat import run_chat_rendered

    spec = resolve(model)
    with output.progress(not json_out) as report:
        ckpt = Checkpoint.open(locate(spec, report))  # convert once here, not in every server
        spans = even_spans(ckpt.config.num_blocks, servers)
        swarm = LocalSwarm(model_arg(spec), spans, dtype=dtype, progress=report)
        swarm.__enter__()  # stops every process it started if it cannot start them all
    try:
        if not json_out:
            output.info(f"swarm up: bootstrap {swarm.peers[0]} and {servers} servers "
                        + ", ".join(f"{a}:{b}" for a, b in spans))
        opts = ChatOptions(model=model_arg(spec), prompt=prompt, max_new_tokens=max_new_tokens, dtype=dtype,
                           peers=swarm.peers, show_route=show_route, draft=draft, draft_tokens=draft_tokens)
        run_chat_rendered(opts, json_out)
    finally:
        swarm.stop()
