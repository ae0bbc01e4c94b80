"""Output read by programs is never wrapped or cut (a pipe gets whole lines, whatever its width)."""

from __future__ import annotations

import subprocess
import sys


def _run(code: str) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "COLUMNS": "40"}  # a narrow terminal's setting must not fold pipes either
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)


def test_piped_table_keeps_whole_names():
    out = _run("from llmswarm.cli.app import main; import sys; sys.argv=['llmswarm','models']; main()")
    assert out.returncode == 0, out.stderr
    assert "…" not in out.stdout
    assert any("smollm2-135m" in line and "HuggingFaceTB/SmolLM2-135M-Instruct" in line
               for line in out.stdout.splitlines())


def test_piped_diagnostic_line_is_one_line():
    addr = "/ip4/127.0.0.1/tcp/31330/p2p/12D3KooW" + "x" * 44
    out = _run("from llmswarm.cli import output; "
               f"output.err.print('[green]serving[/green] smollm2-135m blocks 0:10 (float32) as {addr}')")
    assert out.returncode == 0, out.stderr
    assert out.stderr.splitlines() == [f"serving smollm2-135m blocks 0:10 (float32) as {addr}"]
