"""Trust with real processes: a server whose attention is corrupted (tests/liar_join.py wraps the real
`join`) and that announces an impossible speed, so the route solver picks it, is caught by the output
checks, banned and distrusted, and the answer equals `chat --local`; a server that only boasts is
demoted once measured (`route --json` says why); with the liar distrusted, a chat checked at every
step is token-identical to local. One test in three stages on one swarm and one reputation file:
each stage builds on what the one before left in that file (as separate tests, xdist could run them
apart, each with fresh fixtures)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from llmswarm.bench.local_swarm import LocalSwarm, llmswarm_command

pytestmark = pytest.mark.slow
PROMPT = "Write a long story about a dragon who learns to paint."
TOKENS = "48"
LIAR = [sys.executable, str(Path(__file__).with_name("liar_join.py"))]
BOAST_RPS = "50000"  # steps/s per block: two orders of magnitude above what this machine does


@pytest.fixture(scope="module")
def liar_swarm(smollm2):
    """server1 corrupts its outputs and boasts; server4 only boasts; the rest are honest. Every span
    of the liar is also held by two honest servers (server2, server3), so a majority exists."""
    with LocalSwarm("smollm2-135m", [(0, 10), (10, 20), (10, 20), (10, 30), (0, 10)], announce_period_s=1.0,
                    server_kwargs={1: {"launcher": LIAR, "env": {"LIAR_NOISE": "2", "LIAR_RPS": BOAST_RPS}},
                                   4: {"launcher": LIAR, "env": {"LIAR_RPS": BOAST_RPS}}}) as s:
        yield s


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    """The clients' reputation file, shared by the tests of this module (kept across their runs)."""
    return {**os.environ, "LLMSWARM_REPUTATION": str(tmp_path_factory.mktemp("trust") / "reputation.json")}


@pytest.fixture(scope="module")
def reference(smollm2) -> list[int]:
    res = subprocess.run(llmswarm_command("chat", "--local", "-p", PROMPT, "-n", TOKENS, "--json"),
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)["token_ids"]


def chat(swarm: LocalSwarm, env: dict[str, str], *extra: str) -> tuple[dict, str]:
    res = subprocess.run(llmswarm_command("chat", "--peers", *swarm.peers, "-p", PROMPT, "-n", TOKENS, "--json",
                                          "--show-route", "--solver", "exact", *extra),
                         capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout), res.stderr


def peer(swarm: LocalSwarm, i: int) -> str:
    return swarm.ready[i]["peer_id"]


def test_a_liar_is_caught_a_boaster_demoted_and_a_checked_chat_leaves_the_liar_out(liar_swarm, env, reference):
    # 1. the liar's boast makes it the solver's choice; the default checks catch it, the answer is local's
    result, err = chat(liar_swarm, env)
    route = next(line for line in err.splitlines() if line.startswith("route:"))
    assert "server1 [10:20)" in route, err
    warnings = [line for line in err.splitlines() if "returned wrong outputs" in line]
    assert len(warnings) == 1 and "server1" in warnings[0], err  # one line, naming the liar
    caught = int(re.search(r"caught at step (\d+)", warnings[0]).group(1))
    assert caught <= 32, warnings[0]  # the default rate checks every 16 steps
    assert "recovered" not in err, err  # the failover after a detection is not a second message
    assert result["token_ids"] == reference
    trust = json.loads(subprocess.run(llmswarm_command("trust", "--json"), capture_output=True, text=True,
                                      env=env, timeout=60).stdout)["peers"]
    assert trust[peer(liar_swarm, 1)]["verdict"] == "distrusted"
    assert trust[peer(liar_swarm, 1)]["failed"] == 1
    assert trust[peer(liar_swarm, 2)]["failed"] == 0 and trust[peer(liar_swarm, 2)]["passed"] >= 1

    # 2. the server that only boasted served that chat's [0:10): measured, it is demoted; the liar excluded
    res = subprocess.run(llmswarm_command("route", "--model", "smollm2-135m", "--peers", *liar_swarm.peers,
                                          "--solver", "exact", "--json"),
                         capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stderr
    record = json.loads(res.stdout)
    boaster = peer(liar_swarm, 4)
    assert boaster in record["demoted"], record
    assert "announces 5e+04 steps/s per block, measured" in record["demoted"][boaster]
    assert record["measured"][boaster]["observed_rps"] < float(BOAST_RPS) / 10
    assert record["excluded"][peer(liar_swarm, 1)].startswith("distrusted"), record
    assert all(h["peer_id"] != peer(liar_swarm, 1) for h in record["chosen"]["chain"])

    # 3. checked at every step, through the honest servers only: no alarm, the answer is local's
    result, err = chat(liar_swarm, env, "--verify", "all")
    route = next(line for line in err.splitlines() if line.startswith("route:"))
    assert "server1" not in route, err  # distrusted: left out of the route from the reputation file
    assert "wrong outputs" not in err and "disagrees" not in err, err
    assert result["token_ids"] == reference
