"""`llmswarm api`: an OpenAI-compatible endpoint onto the swarm and a live swarm page (node/api/)."""

from __future__ import annotations

import typer
from llmswarm.node import config

from . import output
from .params import check_device, draft_dtype_option, draft_tokens_option, split_peers


def api(
    model: str = typer.Option(config.DEFAULT_MODEL, "--model", "-m",
                              help="Model name (see `llmswarm models`) or folder."),
    peers: list[str] = typer.Option([], "--peers", envvar="LLMSWARM_PEERS", help="Bootstrap multiaddrs."),
    host: str = typer.Option(config.API_DEFAULT_HOST, "--host", help="Address to listen on (0.0.0.0: every one)."),
    port: int = typer.Option(config.API_DEFAULT_PORT, "--port", min=0, max=65535, help="TCP port (0 = any free port)."),
    max_concurrent: int = typer.Option(config.API_MAX_CONCURRENT, "--max-concurrent", min=1,
                                       help="Requests in flight at once; one more is answered 429."),
    api_key: str = typer.Option(None, "--api-key", envvar="LLMSWARM_API_KEY",
                                help="Require `Authorization: Bearer KEY` on /v1 (the page and /v1/swarm stay open)."),
    max_length: int = typer.Option(config.DEFAULT_SESSION_LENGTH, "--max-length", min=16,
                                   max=config.MAX_SESSION_LENGTH, help="Tokens one request may hold, prompt included."),
    dtype: str = typer.Option("auto", "--dtype", help="auto | float32 | bfloat16 | float16 (auto: float32 on "
                                                      "CPU, bfloat16 on GPUs that have it, else float16)."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N (auto: a GPU if torch sees one)."),
    solver: str = typer.Option(config.DEFAULT_SOLVER, "--solver", help="Route solver: nsga2 | exact | dijkstra."),
    prefer: str = typer.Option(config.DEFAULT_PREFER, "--prefer", help="latency | throughput | balanced."),
    identity: str = typer.Option(None, "--identity", help="Key file for this node's peer id."),
    step_timeout: float = typer.Option(config.STEP_TIMEOUT_S, "--step-timeout", min=0.1,
                                       help="Seconds a server may take for one step before it is replaced."),
    relay: bool = typer.Option(True, "--relay/--no-relay",
                               help="Servers pass hidden states straight to the next server (else via this process)."),
    exact_weights: bool = typer.Option(False, "--exact-weights",
                                       help="Route only through servers with full-precision (not quantised) weights."),
    batch_heads: bool = typer.Option(True, "--batch-heads/--no-batch-heads",
                                     help="Run the LM heads of concurrent requests as one call per round "
                                          "(off: each request's alone, as `chat` does; for comparison)."),
    draft: str = typer.Option(None, "--draft",
                              help="Speculative decoding, as `chat --draft`: a small model with the same tokenizer, "
                                   "run here; each request gets its own draft cache."),
    draft_tokens: int = draft_tokens_option(),
    draft_dtype: str = draft_dtype_option(),
) -> None:
    """Serve an OpenAI-compatible API (/v1/chat/completions, /v1/completions, /v1/models) and a live
    swarm page (/) until Ctrl-C. Prints the URL on its first line."""
    from llmswarm.node.errors import NoPeersError

    if not split_peers(peers):
        raise NoPeersError()
    from llmswarm.node.api.serve import ApiOptions, load_draft, load_model, run_api
    from llmswarm.node.api.sessions import BackendOptions

    backend = BackendOptions(max_length=max_length, max_concurrent=max_concurrent, solver=solver, prefer=prefer,
                             step_timeout=step_timeout, relay=relay, exact_weights=exact_weights,
                             batch_heads=batch_heads, draft=draft, draft_tokens=draft_tokens,
                             draft_dtype=draft_dtype)
    opts = ApiOptions(model=model, peers=split_peers(peers), host=host, port=port, api_key=api_key or None,
                      dtype=dtype, device=check_device(device), identity=identity, backend=backend)

    def ready(url: str) -> None:
        output.stream_text(url + "\n")
        output.info(f"OpenAI-compatible API at {url}/v1, swarm page at {url}/ (Ctrl-C stops)")

    with output.progress() as report:
        client = load_model(opts, report)
        drafter = load_draft(opts, client, report)
    run_api(opts, client, ready, drafter)
