"""`llmswarm status`: a live view of the swarm (coverage per model, a table of servers).

The snapshot comes from node/status.py (its docstring documents the `--json` fields); this module
only renders it and reads `q` from the keyboard.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any

import typer

from . import output
from .params import split_peers

BAR_MAX_CHARS = 80  # wider models are drawn with several blocks per character


def status(
    model: str = typer.Option(None, "--model", "-m", help="Only this model (exit code 4 if not fully covered)."),
    peers: list[str] = typer.Option([], "--peers", envvar="LLMSWARM_PEERS", help="Bootstrap multiaddrs."),
    once: bool = typer.Option(False, "--once", help="Print one snapshot and exit."),
    json_out: bool = typer.Option(False, "--json", help="Print one snapshot as JSON and exit."),
    interval: float = typer.Option(1.0, "--interval", min=0.2, max=60.0, help="Seconds between refreshes."),
) -> None:
    """Live view of the swarm: block coverage per model and every server's load. `q` or Ctrl-C quits."""
    import trio
    from llmswarm.models.registry import resolve
    from llmswarm.node.discovery.status import fetch_status, watch_status
    from llmswarm.node.host import quiet_libp2p_logging

    quiet_libp2p_logging()
    name = resolve(model).name if model else None
    addrs = split_peers(peers)
    from llmswarm.node.client.reputation import Reputation

    rep = Reputation.load()  # what this client measured and checked of each server (`llmswarm trust`)
    if once or json_out:
        snap = _with_trust(trio.run(fetch_status, addrs, name), rep)
        if json_out:
            output.print_json(snap)
        else:
            output.console.print(render(snap))
        _exit_if_broken(snap, name)
        return

    from rich.live import Live

    quit_event = threading.Event()
    keys = _KeyReader(quit_event)
    keys.start()
    last: dict[str, Any] = {}
    try:
        with Live(output.console.render_str("[dim]asking the swarm...[/dim]"), console=output.console,
                  auto_refresh=False, redirect_stderr=False) as live:

            def show(snap: dict[str, Any]) -> None:
                last.update(_with_trust(snap, rep))
                live.update(render(snap, footer=True, interval=interval), refresh=True)

            trio.run(watch_status, addrs, name, show, quit_event.is_set, interval)
    except KeyboardInterrupt:
        pass
    finally:
        keys.stop()


def _with_trust(snap: dict[str, Any], rep) -> dict[str, Any]:
    for s in snap["servers"]:
        s["trust"] = rep.summary(s["peer_id"])
    return snap


def _exit_if_broken(snap: dict[str, Any], name: str | None) -> None:
    """After printing: a NodeError (one red line, exit code 4) when --model names a broken model."""
    from llmswarm.node.discovery.status import ModelNotCovered

    if name is None:
        return
    for m in snap["models"]:
        if m["name"] == name and not m["covered"]:
            gaps = ", ".join(f"{a}:{b}" for a, b in m["gaps"])
            raise ModelNotCovered(f"{name} is not fully covered: no live server holds blocks {gaps}; "
                                  "start a server for them with `llmswarm join --num-blocks N`")


# -- rendering -------------------------------------------------------------------------------------
def render(snap: dict[str, Any], *, footer: bool = False, interval: float = 1.0) -> Any:
    from rich.console import Group
    from rich.text import Text

    parts: list[Any] = []
    if not snap["models"]:
        parts.append(Text("no server announces anything on this swarm yet", style="yellow"))
    for m in snap["models"]:
        parts.append(_coverage(m))
    parts.append(_servers_table(snap["servers"]))
    if footer:
        stamp = time.strftime("%H:%M:%S", time.localtime(snap["time"]))
        parts.append(Text(f"updated {stamp} · every {interval:g} s · q or Ctrl-C quits", style="dim"))
    return Group(*parts)


def _coverage(m: dict[str, Any]) -> Any:
    from rich.text import Text

    n, per = m["num_blocks"], m["servers_per_block"]
    step = max(1, -(-n // BAR_MAX_CHARS))
    bar = Text()
    for i in range(0, n, step):
        count = min(per[i : i + step])
        style = "bold red" if count == 0 else ("green" if count == 1 else "bold green")
        bar.append("█" if count else "░", style=style)
    verdict = Text(" can serve", style="bold green") if m["covered"] else Text(" broken", style="bold red")
    head = Text(f"{m['name']}", style="bold")
    head.append(f"  {n} blocks · {m['servers']} live servers ·")
    head.append_text(verdict)
    counts = Text("".join(str(min(9, min(per[i : i + step]))) for i in range(0, n, step)), style="dim")
    tput = m["throughput_per_block"]
    lines = [head, Text("  ").append_text(bar), Text("  ").append_text(counts)]
    detail = Text(f"  servers per block (above) · throughput per block min {min(tput, default=0):.1f} "
                  f"max {max(tput, default=0):.1f} tok/s")
    if m["gaps"]:
        detail.append("  gaps: " + ", ".join(f"{a}:{b}" for a, b in m["gaps"]), style="red")
    lines.append(detail)
    return Text("\n").join(lines)


def _load(h: dict[str, Any]) -> str:
    gpus = h.get("gpus") or []
    if gpus:
        return " ".join(f"{g.get('name', 'gpu')[:14]} {g.get('util_percent', '?')}% "
                        f"{g.get('mem_used_mb', 0) / 1024:.1f}/{g.get('mem_total_mb', 0) / 1024:.0f}G"
                        f"{' ' + str(g['temp_c']) + 'C' if 'temp_c' in g else ''}"
                        f"{' ' + str(g['power_w']) + 'W' if 'power_w' in g else ''}" for g in gpus)
    cpu = h.get("cpu_percent")
    ram = f" ram {h['ram_used_mb'] / 1024:.1f}G" if "ram_used_mb" in h else ""
    return f"cpu {cpu:.0f}%{ram}" if isinstance(cpu, int | float) else "-"


def _weights(s: dict[str, Any]) -> str:
    """dtype, and the quantisation when there is one: "bfloat16", "bfloat16 int8"."""
    quant = s.get("quant", "none")
    return (s.get("dtype") or "-") + ("" if quant in ("none", "") else f" [yellow]{quant}[/yellow]")


def _trust(t: dict[str, Any] | None) -> str:
    """What this client knows of the server: verdict, checks passed/failed, measured speed."""
    if not t or t["verdict"] == "neutral" and not t["measured_rps"]:
        return "[dim]neutral[/dim]"
    colour = {"distrusted": "red", "trusted": "green"}.get(t["verdict"], "white")
    measured = f" {t['measured_rps']:.0f}/s/blk" if t["measured_rps"] else ""
    return f"[{colour}]{t['verdict']}[/] {t['checks_passed']}/{t['checks_failed']}{measured}"


def _servers_table(servers: list[dict[str, Any]]) -> Any:
    from rich.table import Table

    table = Table(title="servers", title_justify="left", expand=False)
    right = {"throughput", "rtt", "cache left", "sessions"}
    for col in ("server", "peer", "model", "span", "weights", "state", "reach", "throughput", "rtt", "cache left",
                "sessions", "trust", "load", "version"):
        table.add_column(col, justify="right" if col in right else "left", no_wrap=col in ("server", "state"))
    colours = {"online": "green", "joining": "yellow", "offline": "red", "gone": "red"}
    for s in servers:
        dead = s["state"] in ("offline", "gone")
        rtt = f"{s['rtt_s'] * 1000:.2f} ms" if s["rtt_s"] is not None else "-"
        table.add_row(s["public_name"] or "-", s["peer_id"][-8:], s["model"], f"{s['start']}:{s['end']}", _weights(s),
                      f"[{colours.get(s['state'], 'white')}]{s['state']}[/]", s.get("reach", "direct"),
                      f"{s['throughput']:.1f} tok/s",
                      rtt, str(s["cache_tokens_left"]), str(s["sessions"]), _trust(s.get("trust")),
                      _load(s["health"]),
                      s["version"] or "-", style="dim" if dead else None)
    return table


# -- keyboard --------------------------------------------------------------------------------------
class _KeyReader:
    """Sets `event` when `q` is typed: stdin in cbreak mode, read in a daemon thread (TTY only)."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event
        self._saved: Any = None
        self._thread: threading.Thread | None = None
        self._done = threading.Event()

    def start(self) -> None:
        if not sys.stdin.isatty():
            return
        import termios
        import tty

        fd = sys.stdin.fileno()
        try:
            self._saved = termios.tcgetattr(fd)
            tty.setcbreak(fd)
        except termios.error:
            return
        self._thread = threading.Thread(target=self._run, args=(fd,), daemon=True, name="status-keys")
        self._thread.start()

    def _run(self, fd: int) -> None:
        import select

        while not self._done.is_set():
            ready, _, _ = select.select([fd], [], [], 0.2)
            if not ready:
                continue
            ch = os.read(fd, 1)
            if ch in (b"q", b"Q") or not ch:
                self.event.set()
                return

    def stop(self) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)
        if self._saved is not None:
            import termios

            termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN, self._saved)
