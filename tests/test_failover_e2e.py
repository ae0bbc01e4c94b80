"""Failover with real processes: a chain server killed (-9), killed and restarted, or frozen
(SIGSTOP) mid-chat; the chat recovers and its greedy output equals a fault-free local run."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time

import pytest
from llmswarm.bench.local_swarm import LocalSwarm, llmswarm_command

pytestmark = pytest.mark.slow
PROMPT = "Write a long story about a dragon who learns to paint."
TOKENS = "64"


def local_ids() -> list[int]:
    res = subprocess.run(llmswarm_command("chat", "--local", "-p", PROMPT, "-n", TOKENS, "--json"),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)["token_ids"]


@pytest.fixture(scope="module")
def reference(smollm2) -> list[int]:
    return local_ids()


def start_chat(peers: list[str], *extra: str) -> tuple[subprocess.Popen, str]:
    """Start a chat; return it and the name of the server it routed blocks 10:20 through."""
    proc = subprocess.Popen(
        llmswarm_command("chat", "--peers", *peers, "-p", PROMPT, "-n", TOKENS, "--json", "--show-route",
                         "--solver", "exact", *extra),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    seen = []
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        seen.append(line)
        if m := re.search(r"(server\d+) \[10:20\)", line):
            return proc, m.group(1)
    proc.kill()
    raise AssertionError("no route line: " + "".join(seen))


def finish(proc: subprocess.Popen) -> tuple[dict, str]:
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    return json.loads(out), err


@pytest.fixture(scope="module")
def redundant_swarm(smollm2):
    with LocalSwarm("smollm2-135m", [(0, 10), (10, 20), (10, 20), (20, 30)], announce_period_s=1.0) as s:
        yield s


def test_kill_9_mid_chat_with_a_replacement(redundant_swarm, reference):
    s = redundant_swarm
    proc, victim = start_chat(s.peers)
    time.sleep(1.0)  # into the generation
    index = int(victim.removeprefix("server"))
    os.kill(s.servers[index].pid, signal.SIGKILL)
    result, err = finish(proc)
    assert "recovered" in err, err
    assert result["token_ids"] == reference
    s.start_server(index, 10, 20)  # leave the swarm as the next test expects it
    json.loads(s._read_line(s.servers[index], "restarted server"))


def test_sigstop_times_out_and_reroutes(redundant_swarm, reference):
    s = redundant_swarm
    proc, victim = start_chat(s.peers, "--step-timeout", "2")
    time.sleep(1.0)
    frozen = s.servers[int(victim.removeprefix("server"))]
    os.kill(frozen.pid, signal.SIGSTOP)
    try:
        result, err = finish(proc)
    finally:
        os.kill(frozen.pid, signal.SIGCONT)
    assert "recovered" in err, err
    assert result["token_ids"] == reference


def test_killed_server_without_replacement_is_used_again_once_restarted(smollm2, reference):
    with LocalSwarm("smollm2-135m", [(0, 10), (10, 20), (20, 30)], announce_period_s=1.0) as s:
        proc, victim = start_chat(s.peers)
        time.sleep(1.0)
        os.kill(s.servers[1].pid, signal.SIGKILL)
        time.sleep(2.0)  # the chat is now waiting for a route
        s.start_server(1, 10, 20)  # same identity, so the same peer id, on a new port
        result, err = finish(proc)
        assert "recovered" in err, err
        assert result["token_ids"] == reference
