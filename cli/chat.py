"""`llmswarm chat`: talk to a model through the swarm, or with every block in this process (--local)."""

from __future__ import annotations

from dataclasses import dataclass

import typer

from . import output

DEFAULT_MODEL = "smollm2-135m"


@dataclass
class ChatOptions:
    model: str
    prompt: str | None
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    dtype: str | None
    device: str
    max_length: int
    system: str | None
    json_out: bool
    peers: list[str]
    show_route: bool
    solver: str
    prefer: str
    identity: str | None
    step_timeout: float = 30.0
    relay: bool = True
    wire_dtype: str | None = None
    exact_weights: bool = False


def chat(
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help="Model name (see `llmswarm models`) or folder."),
    local: bool = typer.Option(False, "--local", help="Run every block in this process, no swarm."),
    prompt: str = typer.Option(None, "--prompt", "-p", help="Answer this once and exit (else: interactive chat)."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", "-n", min=1, help="Most tokens per answer."),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0 = greedy (the default)."),
    top_p: float = typer.Option(1.0, "--top-p", min=0.0, max=1.0, help="Nucleus sampling mass."),
    seed: int = typer.Option(None, "--seed", help="Seed for sampling, for repeatable answers."),
    dtype: str = typer.Option("auto", "--dtype", help="auto | float32 | bfloat16 | float16 (auto: float32 on "
                                                      "CPU, bfloat16 on GPUs that have it, else float16)."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N (auto: a GPU if torch sees one)."),
    max_length: int = typer.Option(2048, "--max-length", min=16, help="Tokens a session may hold, prompt included."),
    system: str = typer.Option(None, "--system", help="System message for the chat template."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object per answer instead of streaming."),
    peers: list[str] = typer.Option([], "--peers", envvar="LLMSWARM_PEERS", help="Bootstrap multiaddrs."),
    show_route: bool = typer.Option(False, "--show-route", help="Print the chain of servers before answering."),
    solver: str = typer.Option("nsga2", "--solver", help="Route solver: nsga2 | exact | dijkstra."),
    prefer: str = typer.Option("balanced", "--prefer", help="latency | throughput | balanced."),
    identity: str = typer.Option(None, "--identity", help="Key file for this node's peer id."),
    step_timeout: float = typer.Option(30.0, "--step-timeout", min=0.1,
                                       help="Seconds a server may take for one step before it is replaced."),
    relay: bool = typer.Option(True, "--relay/--no-relay",
                               help="Servers pass hidden states straight to the next server (else via this client)."),
    wire_dtype: str = typer.Option(None, "--wire-dtype",
                                   help="float32 | bfloat16 | float16 for hidden states on the wire "
                                        "(default: the model's dtype, lossless)."),
    exact_weights: bool = typer.Option(False, "--exact-weights",
                                       help="Route only through servers with full-precision (not quantised) weights."),
) -> None:
    """Chat with a model: streamed, greedy by default; interactive unless --prompt is given."""
    opts = ChatOptions(model, prompt, max_new_tokens, temperature, top_p, seed, dtype, _check_device(device),
                       max_length, system, json_out, _split_peers(peers), show_route, solver, prefer, identity,
                       step_timeout, relay, wire_dtype, exact_weights)
    if local:
        _chat_local(opts)
    else:
        from llmswarm.node.client.chat import run_chat

        run_chat(opts, ask=_ask, render=_render(opts), progress=output.progress)


def _split_peers(peers: list[str]) -> list[str]:
    # LLMSWARM_PEERS may hold several addresses separated by spaces or commas.
    return [p for item in peers for p in item.replace(",", " ").split()]


def _ask() -> str | None:
    """The next user message, or None at end of input."""
    try:
        output.err.print("[bold cyan]you>[/bold cyan] ", end="")
        return input()
    except EOFError:
        return None


class _render:
    """How answers reach the person: streamed text, or one JSON record per answer."""

    def __init__(self, opts: ChatOptions) -> None:
        self.opts = opts

    def text(self, piece: str) -> None:
        if not self.opts.json_out:
            output.stream_text(piece)

    def done(self, result) -> None:
        if self.opts.json_out:
            output.print_json(result)
        else:
            output.stream_text("\n")
            output.info(f"{result.new_tokens} tokens, {result.tokens_per_s:.1f} tokens/s, "
                        f"first token after {result.time_to_first_token_s * 1000:.0f} ms")

    def note(self, message: str) -> None:
        output.warn(message)

    def route(self, lines: list[str]) -> None:
        for line in lines:
            output.err.print(line)


def _chat_local(opts: ChatOptions) -> None:
    from llmswarm.models.chat import ChatTurn, Conversation
    from llmswarm.models.generate import Sampler, Sampling, run_sync
    from llmswarm.models.local import LocalChain, load_client_model
    from llmswarm.models.registry import resolve
    from llmswarm.models.span import load_span, parse_dtype

    spec = resolve(opts.model)
    dtype = parse_dtype(opts.dtype, opts.device)
    with output.progress(not opts.json_out) as report:
        model = load_client_model(spec, dtype, opts.device, report, with_blocks=True)
        span = load_span(model.ckpt, 0, model.cfg.num_blocks, dtype, opts.device, report)
    chain = LocalChain([span], opts.max_length)
    sampler = Sampler(Sampling(opts.temperature, opts.top_p, opts.seed))
    conv = Conversation(model.tokenizer, opts.system)
    render = _render(opts)
    for user_text in _turns(opts):
        turn = ChatTurn(model, conv, user_text, opts.max_new_tokens, sampler, render.text)
        render.done(turn.finish(run_sync(turn.steps, chain)))


def _turns(opts: ChatOptions):
    if opts.prompt is not None:
        yield opts.prompt
        return
    output.info("interactive chat: type a message, Ctrl-D to quit")
    while (text := _ask()) is not None:
        if text.strip():
            yield text


def _check_device(device: str) -> str:
    """--device as given -> the concrete device (models/device.py decides; DeviceError -> exit 3)."""
    from llmswarm.models.device import resolve_device

    return resolve_device(device)
