"""`llmswarm join` and `llmswarm bootstrap`: serve blocks of a model, or help peers meet."""

from __future__ import annotations

import sys
from typing import Any

import typer
from llmswarm.node import config

from . import output
from .params import check_device, parse_blocks, split_peers


def join(
    model: str = typer.Option(config.DEFAULT_MODEL, "--model", "-m", help="Model name or folder."),
    blocks: str = typer.Option(None, "--blocks", help="Serve blocks START:END (end exclusive)."),
    num_blocks: int = typer.Option(None, "--num-blocks", min=1,
                                   help="Serve N blocks where the swarm is weakest (default: as many as fit)."),
    peers: list[str] = typer.Option([], "--peers", envvar="LLMSWARM_PEERS", help="Bootstrap multiaddrs."),
    port: int = typer.Option(0, "--port", min=0, max=65535, help="TCP port (0 = any free port)."),
    host: str = typer.Option(config.DEFAULT_LISTEN_HOST, "--host",
                             help="Address to listen on (0.0.0.0 for other machines)."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N (auto: a GPU if torch sees one)."),
    dtype: str = typer.Option("auto", "--dtype", help="auto | float32 | bfloat16 | float16 (auto: float32 on CPU, "
                                                      "bfloat16 on GPUs that have it, else float16)."),
    quant: str = typer.Option("none", "--quant", help="none | int8 | nf4: store the span's weights quantised "
                                                      "(bitsandbytes; nf4 needs a GPU)."),
    public_name: str = typer.Option("", "--public-name", help="Name shown to others in routes and status."),
    peer_share: float = typer.Option(config.PEER_SHARE, "--peer-share", min=0.01, max=1.0,
                                     help="Most of the sessions and KV cache one client may hold (1: all)."),
    max_sessions: int = typer.Option(config.DEFAULT_MAX_SESSIONS, "--max-sessions", min=1,
                                     help="Concurrent sessions admitted."),
    cache_tokens: int | None = typer.Option(None, "--cache-tokens", min=16,
                                            help=f"KV-cache budget in tokens (default: up to "
                                                 f"{config.DEFAULT_CACHE_TOKENS}, at most "
                                                 f"{config.DEFAULT_CACHE_BYTES // 2**20} MiB)."),
    announce_period: float = typer.Option(config.ANNOUNCE_PERIOD_S, "--announce-period", min=0.2,
                                          help="Seconds between announcements."),
    identity: str = typer.Option(None, "--identity", help="Key file (default: a free one in the user's data dir)."),
    announce_addr: list[str] = typer.Option([], "--announce-addr",
                                            help="Multiaddr others can dial (a forwarded port); repeatable."),
    rebalance_period: float = typer.Option(config.REBALANCE_PERIOD_S, "--rebalance-period", min=0.0,
                                           help="Seconds between checks whether to move to weaker blocks (0: never)."),
    reachability: str = typer.Option("auto", "--reachability",
                                      help="auto | public | private: auto asks peers to dial back (AutoNAT); "
                                           "private serves through a relay (circuit relay v2)."),
    relay_service: bool = typer.Option(False, "--relay-service",
                                       help="Also relay for servers behind NAT (useful on a public server)."),
    direct: bool = typer.Option(config.USE_DIRECT, "--direct/--no-direct",
                                help="Carry sessions' steps over TLS on a direct TCP connection when the peer "
                                     "can reach it (libp2p otherwise)."),
    direct_port: int = typer.Option(0, "--direct-port", min=0, max=65535,
                                    help="TCP port of that data plane (0 = any free port; forward it with --port)."),
    json_out: bool = typer.Option(False, "--json", help="Print the ready record as JSON on stdout."),
) -> None:
    """Serve a span of a model's blocks to the swarm until Ctrl-C."""
    import trio
    from llmswarm.models.quant import check_quant
    from llmswarm.node.host import quiet_libp2p_logging
    from llmswarm.node.server.process import ServeOptions, serve

    if blocks is not None and num_blocks is not None:
        raise typer.BadParameter("give --blocks or --num-blocks, not both")
    device = check_device(device)
    check_quant(quant, device)
    if reachability not in ("auto", "public", "private"):
        raise typer.BadParameter(f"--reachability {reachability!r}: use auto, public or private")
    quiet_libp2p_logging()
    opts = ServeOptions(model=model, blocks=parse_blocks(blocks), num_blocks=num_blocks, peers=split_peers(peers),
                        port=port, listen_host=host, device=device, dtype=dtype, public_name=public_name,
                        max_sessions=max_sessions, peer_share=peer_share, cache_tokens=cache_tokens,
                        announce_period_s=announce_period,
                        identity=identity, rebalance_period_s=rebalance_period, quant=quant,
                        announce_addrs=announce_addr, reachability=reachability, relay_service=relay_service,
                        direct=direct, direct_port=direct_port)
    with output.progress(True) as report:
        trio.run(serve, opts, _JoinEvents(report, json_out))


class _JoinEvents:
    def __init__(self, report: Any, json_out: bool) -> None:
        self.report, self.json_out = report, json_out
        self.live = sys.stderr.isatty()

    def progress(self, task: str, done: float, total: float | None) -> None:
        self.report(task, done, total)

    def planned(self, line: str) -> None:
        output.err.print(f"[green]chose[/green] {line}")

    def ready(self, info: dict) -> None:
        if self.json_out:
            output.print_json_line(info)
        output.err.print(f"[green]serving[/green] {info['model']} blocks {info['start']}:{info['end']} "
                         f"({info['dtype']}{'' if info.get('quant', 'none') == 'none' else ', ' + info['quant']}, "
                         f"{info['device']}, {info['throughput']:.1f} tokens/s) as {info['addrs'][0]} "
                         f"- announced {info['seconds_to_announce']:.1f} s after start")

    def status(self, info: dict) -> None:
        if self.live:
            output.err.print(f"\r[dim]sessions {info['sessions']}  tokens served {info['tokens_served']}  "
                             f"{info['steps_per_s']:.1f} steps/s  cache left {info['cache_tokens_left']}[/dim]",
                             end="")

    def moved(self, info: dict) -> None:
        output.err.print(f"\n[green]moved[/green] from blocks {info['from']} to {info['to']}, "
                         "where the swarm was weakest")

    def stopping(self) -> None:
        output.err.print("\nleaving the swarm (announcing offline)")


def bootstrap(
    port: int = typer.Option(config.DEFAULT_PORT, "--port", min=0, max=65535, help="TCP port to listen on."),
    host: str = typer.Option(config.DEFAULT_LISTEN_HOST, "--host",
                             help="Address to listen on (0.0.0.0 for other machines)."),
    peers: list[str] = typer.Option([], "--peers", envvar="LLMSWARM_PEERS", help="Other bootstrap peers."),
    identity: str = typer.Option(None, "--identity", help="Key file (default: a free one in the user's data dir)."),
    announce_addr: list[str] = typer.Option([], "--announce-addr",
                                            help="Multiaddr others can dial (a forwarded port); repeatable."),
    relay_service: bool = typer.Option(True, "--relay-service/--no-relay-service",
                                       help="Relay for servers behind NAT (circuit relay v2; on by default)."),
) -> None:
    """Run a node that only helps others meet; prints its multiaddr on the first line."""
    import trio
    from llmswarm.node.discovery.bootstrap import run_bootstrap
    from llmswarm.node.host import quiet_libp2p_logging

    quiet_libp2p_logging()

    async def main() -> None:
        import signal

        async with trio.open_nursery() as nursery:
            addr = await nursery.start(lambda task_status: run_bootstrap(
                port, identity, task_status, listen_host=host, peers=split_peers(peers),
                announce_addrs=announce_addr, relay_service=relay_service))
            output.console.print(addr, soft_wrap=True)
            output.err.print("bootstrap peer running: give the line above to `join` and `chat` as --peers; "
                             "Ctrl-C stops")
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    break
            nursery.cancel_scope.cancel()

    trio.run(main)
