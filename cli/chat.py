"""`llmswarm chat`: talk to a model through the swarm, or with every block in this process (--local)."""

from __future__ import annotations

import typer
from llmswarm.node import config

from . import output
from .params import check_device, draft_dtype_option, draft_tokens_option, split_peers


def chat(
    model: str = typer.Option(config.DEFAULT_MODEL, "--model", "-m",
                              help="Model name (see `llmswarm models`) or folder."),
    local: bool = typer.Option(False, "--local", help="Run every block in this process, no swarm."),
    prompt: str = typer.Option(None, "--prompt", "-p", help="Answer this once and exit (else: interactive chat)."),
    max_new_tokens: int = typer.Option(config.DEFAULT_MAX_NEW_TOKENS, "--max-new-tokens", "-n", min=1,
                                       help="Most tokens per answer."),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0 = greedy (the default)."),
    top_p: float = typer.Option(1.0, "--top-p", min=0.0, max=1.0, help="Nucleus sampling mass."),
    seed: int = typer.Option(None, "--seed", help="Seed for sampling, for repeatable answers."),
    dtype: str = typer.Option("auto", "--dtype", help="auto | float32 | bfloat16 | float16 (auto: float32 on "
                                                      "CPU, bfloat16 on GPUs that have it, else float16)."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N (auto: a GPU if torch sees one)."),
    max_length: int = typer.Option(config.DEFAULT_SESSION_LENGTH, "--max-length", min=16,
                                   max=config.MAX_SESSION_LENGTH, help="Tokens a session may hold, prompt included."),
    system: str = typer.Option(None, "--system", help="System message for the chat template."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object per answer instead of streaming."),
    peers: list[str] = typer.Option([], "--peers", envvar="LLMSWARM_PEERS", help="Bootstrap multiaddrs."),
    show_route: bool = typer.Option(False, "--show-route", help="Print the chain of servers before answering."),
    solver: str = typer.Option(config.DEFAULT_SOLVER, "--solver", help="Route solver: nsga2 | exact | dijkstra."),
    prefer: str = typer.Option(config.DEFAULT_PREFER, "--prefer", help="latency | throughput | balanced."),
    identity: str = typer.Option(None, "--identity", help="Key file for this node's peer id."),
    host: str = typer.Option(config.DEFAULT_LISTEN_HOST, "--host",
                             help="Address to listen on; 0.0.0.0 lets servers behind NAT upgrade to direct "
                                  "connections (hole punching)."),
    step_timeout: float = typer.Option(config.STEP_TIMEOUT_S, "--step-timeout", min=0.1,
                                       help="Seconds a server may take for one step before it is replaced."),
    wait_for_swarm: float = typer.Option(config.COVERAGE_WAIT_S, "--wait-for-swarm", min=0.0, metavar="SECONDS",
                                         help="How long to wait for servers to cover every block (a swarm "
                                              "still starting) before giving up; 0: at once."),
    relay: bool = typer.Option(True, "--relay/--no-relay",
                               help="Servers pass hidden states straight to the next server (else via this client)."),
    direct: bool = typer.Option(True, "--direct/--no-direct",
                                help="Steps over TLS on direct TCP connections to servers that offer it "
                                     "(else over libp2p)."),
    wire_dtype: str = typer.Option(None, "--wire-dtype",
                                   help="float32 | bfloat16 | float16 for hidden states on the wire "
                                        "(default: the model's dtype, lossless)."),
    exact_weights: bool = typer.Option(False, "--exact-weights",
                                       help="Route only through servers with full-precision (not quantised) weights."),
    draft: str = typer.Option(None, "--draft",
                              help="Speculative decoding: a small model with the same tokenizer (name or folder), "
                                   "run here, proposes tokens that one step through the swarm checks."),
    draft_tokens: int = draft_tokens_option(),
    draft_dtype: str = draft_dtype_option(),
    verify_rate: str = typer.Option(None, "--verify-rate", "--verify", metavar="RATE|all|off",
                                    help=f"Check the servers' outputs on another chain every 1/RATE steps, each "
                                         f"check covering every step since the last (default "
                                         f"{config.DEFAULT_VERIFY_RATE:g}: every 16 steps, ~1% of the tokens/s in "
                                         "`bench verify`; text is shown once checked). `all`: every step; "
                                         "`off`: no checks."),
) -> None:
    """Chat with a model: streamed, greedy by default; interactive unless --prompt is given."""
    from llmswarm.node.errors import NoPeersError

    if not local and not split_peers(peers):
        raise NoPeersError()
    from llmswarm.node.client.chat import ChatOptions

    opts = ChatOptions(model=model, prompt=prompt, local=local, max_new_tokens=max_new_tokens,
                       temperature=temperature, top_p=top_p, seed=seed, dtype=dtype, device=check_device(device),
                       max_length=max_length, system=system, peers=split_peers(peers), show_route=show_route,
                       solver=solver, prefer=prefer, identity=identity, step_timeout=step_timeout, relay=relay,
                       coverage_wait=wait_for_swarm, direct=direct, listen_host=host, wire_dtype=wire_dtype,
                       exact_weights=exact_weights, draft=draft, draft_tokens=draft_tokens, draft_dtype=draft_dtype,
                       verify_rate=verify_rate)
    run_chat_rendered(opts, json_out)


def run_chat_rendered(opts, json_out: bool) -> None:
    """Run a chat with this terminal as its person: streamed text, or one JSON record per answer."""
    from llmswarm.node.client.chat import run_chat

    with output.progress(not json_out) as report:
        events = ChatRender(json_out, report)
        if opts.prompt is None:
            output.info("interactive chat: type a message, Ctrl-D to quit")
        run_chat(opts, events)


class ChatRender:
    """How a chat reaches the person (node/client/chat.py's ChatEvents)."""

    def __init__(self, json_out: bool, report) -> None:
        self.json_out, self.report = json_out, report

    def progress(self, task: str, done: float, total: float | None) -> None:
        self.report(task, done, total)

    def ask(self) -> str | None:
        try:
            output.err.print("[bold cyan]you>[/bold cyan] ", end="")
            return input()
        except EOFError:
            return None

    def text(self, piece: str) -> None:
        if not self.json_out:
            output.stream_text(piece)

    def done(self, result) -> None:
        if self.json_out:
            output.print_json(result)
        else:
            output.stream_text("\n")
            draft = result.draft
            spec = (f", {draft['tokens_per_step']:.2f} tokens per step, {draft['acceptance_rate']:.0%} of "
                    f"{draft['drafted']} draft tokens accepted" if draft else "")
            output.info(f"{result.new_tokens} tokens, {result.tokens_per_s:.1f} tokens/s, "
                        f"first token after {result.time_to_first_token_s * 1000:.0f} ms{spec}")

    def note(self, message: str) -> None:
        output.warn(message)

    def route(self, lines: list[str]) -> None:
        for line in lines:
            output.err.print(line, soft_wrap=True)
