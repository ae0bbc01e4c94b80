"""End to end with real processes on 127.0.0.1 and the built-in model: a bootstrap, `join`
servers, and `chat` / `route` / `probe` clients, exactly as a user runs them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
from llmswarm.bench.local_swarm import LocalSwarm, llmswarm_command

pytestmark = pytest.mark.slow
PROMPT = "What is the capital of France?"


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(llmswarm_command(*args), capture_output=True, text=True, timeout=timeout)


def chat_json(*args: str) -> dict:
    res = cli("chat", "--prompt", PROMPT, "--json", "--max-new-tokens", "24", *args)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


@pytest.fixture(scope="module")
def swarm(swarm3):
    return swarm3  # the session's shared swarm (conftest.py); local_answer comes from there too


def test_chat_through_three_servers_matches_local(swarm, local_answer):
    remote = chat_json("--peers", swarm.peers[0])
    assert remote["token_ids"] == local_answer["token_ids"]
    assert remote["text"] == local_answer["text"] and "Paris" in remote["text"]


def test_chat_goes_over_the_data_plane_and_without_it_matches_too(swarm, local_answer):
    """Real processes: the client's streams move to the servers' data plane, over its Unix socket since
    they share this host (relay links too; TLS across hosts: test_dataplane.py); --no-direct keeps
    everything on libp2p. Both equal `chat --local`."""
    for flag, line in (((), "streams: 3 of 3 on the data plane (3 over Unix socket)"),
                       (("--no-direct",), "streams: 0 of 3 on")):
        res = cli("chat", "--prompt", PROMPT, "--json", "-n", "24", "--peers", swarm.peers[0], "--show-route", *flag)
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout)["token_ids"] == local_answer["token_ids"]
        assert line in res.stderr, res.stderr


def test_two_clients_at_once_both_match_local(swarm, local_answer):
    cmd = llmswarm_command("chat", "--prompt", PROMPT, "--json", "-n", "24", "--peers", swarm.peers[0])
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        assert json.loads(out)["token_ids"] == local_answer["token_ids"]


def test_no_relay_matches_local_and_wire_bfloat16_runs(swarm, local_answer):
    assert chat_json("--peers", swarm.peers[0], "--no-relay")["token_ids"] == local_answer["token_ids"]
    res = cli("chat", "--prompt", PROMPT, "--json", "-n", "24", "--peers", swarm.peers[0], "--wire-dtype", "bfloat16")
    assert res.returncode == 0, res.stderr
    assert "Paris" in json.loads(res.stdout)["text"]  # rounded on the wire: close, not necessarily identical
    res = cli("chat", "--prompt", PROMPT, "--peers", swarm.peers[0], "--wire-dtype", "int8")
    assert res.returncode != 0 and "--wire-dtype" in res.stderr and "Traceback" not in res.stderr


def test_four_clients_with_two_prompts_at_once_match_local(swarm, local_answer):
    """Concurrent sessions are batched on every server; each answer still equals its local run."""
    other = "Name three primary colors."
    reference = {PROMPT: local_answer["token_ids"],
                 other: json.loads(cli("chat", "--local", "--prompt", other, "--json", "-n", "24").stdout)["token_ids"]}
    prompts = [PROMPT, other, PROMPT, other]
    procs = [subprocess.Popen(llmswarm_command("chat", "--prompt", p, "--json", "-n", "24", "--peers", swarm.peers[0]),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for p in prompts]
    for p, prompt in zip(procs, prompts, strict=True):
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0, err
        assert json.loads(out)["token_ids"] == reference[prompt]


def test_show_route_names_the_chain(swarm):
    res = cli("chat", "--prompt", PROMPT, "-n", "4", "--peers", swarm.peers[0], "--show-route", "--solver", "exact")
    assert res.returncode == 0, res.stderr
    assert "server0 [0:10) -> server1 [10:20) -> server2 [20:30)" in res.stderr


def test_probe_and_live_route(swarm):
    res = cli("probe", "--peers", swarm.peers[0], "--json", "--count", "5")
    assert res.returncode == 0, res.stderr
    rows = json.loads(res.stdout)["servers"]
    assert sorted(r["public_name"] for r in rows) == ["server0", "server1", "server2"]
    assert all(0 < r["rtt_median_s"] < 0.5 and r["loss"] == 0 for r in rows)
    res = cli("route", "--model", "smollm2-135m", "--peers", swarm.peers[0], "--json", "--solver", "exact")
    assert res.returncode == 0, res.stderr
    chosen = json.loads(res.stdout)["chosen"]
    assert [(h["start"], h["end"]) for h in chosen["chain"]] == [(0, 10), (10, 20), (20, 30)]


def test_num_blocks_fills_the_gap_and_dead_servers_expire(smollm2, local_answer):
    with LocalSwarm("smollm2-135m", [(0, 10), (20, 30)], announce_period_s=1.0) as s:
        proc = subprocess.Popen(
            llmswarm_command("join", "--num-blocks", "10", "--peers", s.peers[0], "--identity",
                             str(s.workdir / "filler.key"), "--public-name", "filler", "--announce-period", "1",
                             "--json"),
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
        s.servers.append(proc)  # stopped with the swarm
        ready = json.loads(s._read_line(proc, "filler"))
        assert (ready["start"], ready["end"]) == (10, 20)
        assert chat_json("--peers", s.peers[0])["token_ids"] == local_answer["token_ids"]

        os.kill(proc.pid, signal.SIGKILL)  # no "offline" announcement: only expiry can tell
        time.sleep(4.0)  # record TTL is 2.5 announce periods
        res = cli("route", "--model", "smollm2-135m", "--peers", s.peers[0], "--json", "--solver", "exact")
        assert res.returncode != 0 and "10" in res.stderr  # blocks 10:20 are uncovered again
        res = cli("chat", "--prompt", PROMPT, "--peers", s.peers[0], "-n", "4", "--wait-for-swarm", "1", timeout=120)
        assert res.returncode == 4 and "10:20" in res.stderr and "waited 1 s" in res.stderr


def test_chat_without_peers_is_one_clear_line():
    for args in (("chat", "--prompt", "hi"), ("api",)):  # said before anything loads
        res = subprocess.run(llmswarm_command(*args), capture_output=True, text=True, timeout=60,
                             env={k: v for k, v in os.environ.items() if k != "LLMSWARM_PEERS"})
        assert res.returncode == 4 and "no peers to join" in res.stderr and "Traceback" not in res.stderr


def test_demo_answers(smollm2):
    res = cli("demo", "--prompt", PROMPT, "--json", "-n", "12", timeout=240)
    assert res.returncode == 0, res.stderr
    assert "Paris" in json.loads(res.stdout)["text"]
