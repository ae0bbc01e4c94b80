"""`bench server` (one real server process, concurrent sessions) and `bench route` as registered in the CLI."""

from __future__ import annotations

import json
import subprocess

import pytest
from llmswarm.bench.local_swarm import llmswarm_command
from llmswarm.bench.speed import _server_args, bench_server
from llmswarm.node import config


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(llmswarm_command(*args), capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_bench_server_on_a_tiny_model(tiny_llama):
    seen = []
    r = bench_server(str(tiny_llama), sessions=(4, 1), tokens=6, prompt_tokens=8, warmup_steps=2,
                     progress=lambda task, done, total, *a: seen.append(task))
    assert [row["sessions"] for row in r["runs"]] == [1, 4]  # sorted: the first is the speedup's baseline
    assert r["blocks"] == 6 and r["prompt_tokens"] == 8 and r["speedup_baseline_sessions"] == 1
    for row in r["runs"]:
        assert row["aggregate_tokens_per_s"] > 0 and row["per_session_tokens_per_s"] > 0
        assert row["decode_tokens"] == 6 * row["sessions"]
        assert 0 < row["step_ms_median"] <= row["step_ms_p90"] and row["step_ms_mean"] > 0
        assert row["max_abs_diff_vs_single"] < 1e-4  # same input, same position: same output
    assert r["runs"][0]["speedup"] == 1.0
    assert "4 concurrent sessions" in seen and "warming up" in seen
    json.dumps(r)  # the record is plain data: what --json prints


def test_server_limits_are_raised_only_when_needed():
    assert _server_args(1, 64) == ()
    assert _server_args(16, 64) == ("--peer-share", "1")  # the bench's one client may take the whole server
    args = _server_args(config.DEFAULT_MAX_SESSIONS + 1, config.DEFAULT_CACHE_TOKENS)
    assert args[2:4] == ("--max-sessions", str(config.DEFAULT_MAX_SESSIONS + 1)) and "--cache-tokens" in args


def test_bench_server_bad_sessions_is_a_usage_error():
    res = cli("bench", "server", "--sessions", "1,x", timeout=60)
    assert res.returncode == 2 and "Traceback" not in res.stderr  # a usage error, as click reports them
    assert "--sessions" in res.stderr.strip().splitlines()[-1]


def test_bench_route_json_through_the_cli():
    res = cli("bench", "route", "--json", "--sizes", "30", "--blocks", "12", "--seeds", "0", "--time-budget", "0.2",
              timeout=60)
    assert res.returncode == 0, res.stderr
    rec = json.loads(res.stdout)
    (run,) = rec["runs"]
    assert run["servers"] > 0 and run["dijkstra_matches_exact"] and 0 < run["hv_ratio"] <= 1.0 + 1e-9
    assert run["exact_time_s"] >= 0 and run["nsga2_time_s"] > 0 and rec["summary"][0]["seeds"] == [0]


@pytest.mark.slow
def test_bench_swarm_takes_a_model_folder(smollm2, tmp_path):
    """A folder given as --model reaches the server processes as that folder (its name would not
    resolve), relative to where the user typed it."""
    folder = tmp_path / "my-hf-folder"  # a real folder (its name is the model's name), files linked in
    folder.mkdir()
    for f in smollm2.iterdir():
        (folder / f.name).symlink_to(f)
    out = subprocess.run(llmswarm_command("bench", "swarm", "--model", "./my-hf-folder", "--servers", "2",
                                          "--tokens", "4", "--rounds", "1", "--json"),
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout)
    assert r["model"] == "my-hf-folder" and r["servers"] == 2 and r["token_identical"] is True


@pytest.mark.slow
def test_local_swarm_names_why_a_child_failed(tmp_path):
    from llmswarm.bench.local_swarm import LocalSwarm
    from llmswarm.node.errors import NodeError

    with pytest.raises(NodeError, match=r"server 0 exited with code 3 before it was ready: .*no-such-model"):
        with LocalSwarm("no-such-model", [(0, 1)]):
            pass


def test_bench_hop_measures_every_transport():
    """The data-plane rows are the stream after a real dial, over TLS and over the Unix socket
    (bench_hop raises if it stayed on libp2p or took the other transport)."""
    from llmswarm.bench.hop import bench_hop

    r = bench_hop(round_trips=20, rounds=1, hidden=64)
    assert r["body_bytes"] == 256
    for k in ("libp2p", "data_plane", "data_plane_unix", "tcp"):
        assert r[k]["wall_ms"] > 0 and r[k]["cpu_ms"] > 0
