"""The one place that prints: results to stdout (rich or JSON), progress and diagnostics to stderr.

Commands build a plain record (dict / dataclass) and hand it here; `--json` renders the same record
that the table shows, so scripts and people see the same facts.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

# Output read by a program (a pipe, a file) is never wrapped or cut: rich would otherwise fold lines and
# shrink table columns to 80 characters ("smollm2-13…", a multiaddr split over two lines). A terminal
# keeps its own width.
_UNBOUNDED = 100_000


def _width(stream: object) -> int | None:
    return None if getattr(stream, "isatty", lambda: False)() else _UNBOUNDED


console = Console(highlight=False, soft_wrap=True, width=_width(sys.stdout))  # stdout: results
err = Console(stderr=True, highlight=False, width=_width(sys.stderr))  # stderr: progress, warnings, errors


def _plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {k: _plain(v) for k, v in dataclasses.asdict(obj).items()}
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    return obj


def print_json(record: Any) -> None:
    """One JSON document on stdout, nothing else: what `--json` promises to scripts."""
    sys.stdout.write(json.dumps(_plain(record), indent=2, sort_keys=False) + "\n")
    sys.stdout.flush()


def print_json_line(record: Any) -> None:
    """One compact JSON document on one line: for machine readers that read line by line."""
    sys.stdout.write(json.dumps(_plain(record), separators=(",", ":")) + "\n")
    sys.stdout.flush()


def warn(message: str) -> None:
    err.print(f"[yellow]warning:[/yellow] {message}")


def info(message: str) -> None:
    err.print(f"[dim]{message}[/dim]")


def error_line(message: str) -> None:
    err.print(f"[bold red]error:[/bold red] {message}", soft_wrap=True)


def stream_text(piece: str) -> None:
    """Streamed generation output: raw text, flushed at once."""
    sys.stdout.write(piece)
    sys.stdout.flush()


@contextmanager
def progress(enabled: bool = True) -> Iterator[Any]:
    """A stderr progress display; yields a callback `report(task, done, total, unit)`.

    Library code (models/, node/) takes such a callback and never prints itself.
    """
    if not enabled:
        yield lambda *a, **k: None
        return
    columns = [TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%")]
    with Progress(*columns, DownloadColumn(), TimeRemainingColumn(), console=err, transient=True) as bar:
        tasks: dict[str, Any] = {}

        def report(task: str, done: float, total: float | None, unit: str = "") -> None:
            if task not in tasks:
                tasks[task] = bar.add_task(task, total=total)
            bar.update(tasks[task], completed=done, total=total)

        yield report
