"""A server behind the bed's NAT router (iptables masquerade, every connection from outside dropped)
joins with no configuration: AutoNAT finds it private, it reserves a circuit-relay slot on the
bootstrap peer, announces its relay address, and serves chats through the relay (from the client,
and from the server before it, by LINK), token-identical to `chat --local`; then a client that
listens on a dialable address upgrades to a hole-punched direct connection (DCUtR) and chats again. Needs root and `ip
netns`; skipped elsewhere with the reason."""

from __future__ import annotations

import json
import shutil
import subprocess
import time

import pytest
from llmswarm.bench.local_swarm import llmswarm_command
from llmswarm.bench.netbed import NetBed, available, start_swarm

pytestmark = [pytest.mark.slow, pytest.mark.skipif(available() is not None, reason=str(available())),
              pytest.mark.skipif(shutil.which("iptables") is None, reason="the NAT router needs iptables "
                                                                          "(apt-get install iptables)")]

MODEL = "smollm2-135m"
PROMPT = ["--prompt", "What is the capital of France?", "--json", "--max-new-tokens", "16"]
REACH_WAIT_S = 30.0  # AutoNAT (a 3 s dial-back that the NAT drops) + reservation + one announce period


@pytest.fixture(scope="module")
def local(smollm2) -> dict:
    res = subprocess.run(llmswarm_command("chat", "--local", *PROMPT), capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def _json(bed: NetBed, node: str, *args: str) -> dict:
    res = bed.run(node, llmswarm_command(*args), timeout_s=150)
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout)


def _status_row(bed: NetBed, peers: list[str], peer_id: str) -> dict:
    rows = _json(bed, "client", "status", "--model", MODEL, "--peers", peers[0], "--json")["servers"]
    return next((r for r in rows if r["peer_id"] == peer_id), {})


def test_server_behind_nat_serves_through_the_relay(smollm2, local, tmp_path):
    env = {"XDG_DATA_HOME": str(tmp_path)}
    with NetBed({"boot": 10.0, "client": 10.0, "s0": 10.0}, nat=["home"], nat_delay_ms=10.0) as bed:
        swarm = start_swarm(bed, MODEL, {"s0": (0, 15), "home": (15, 30)}, env=env)
        home, s0 = swarm.ready["home"]["peer_id"], swarm.ready["s0"]["peer_id"]
        assert swarm.ready["home"]["addrs"][0].startswith("/ip4/192.168.77.")  # its own: nobody can dial it
        deadline = time.monotonic() + REACH_WAIT_S
        while (row := _status_row(bed, swarm.peers, home)).get("reach") != "relayed":
            assert time.monotonic() < deadline, f"home never announced a relay address: {row}"
            time.sleep(1.0)
        assert row["addrs"][0] == f"{swarm.peers[0]}/p2p-circuit/p2p/{home}"  # through the bootstrap peer
        assert _status_row(bed, swarm.peers, s0)["reach"] == "direct"  # the public server stays direct

        route = _json(bed, "client", "route", "--model", MODEL, "--peers", swarm.peers[0], "--json")
        hops = {h["peer_id"]: h["reach"] for h in route["chosen"]["chain"]}
        assert hops == {s0: "direct", home: "relayed"}  # reached through boot's relay, and shown so

        # s0 LINKs to home through the relay; home's output comes back to the client through it too
        assert _json(bed, "client", "chat", *PROMPT, "--peers", swarm.peers[0])["token_ids"] == local["token_ids"]

        # DCUtR: a client listening on a dialable address upgrades the relayed connection before it
        # opens sessions (the server behind NAT dials it back from its listen port, through the NAT).
        res = bed.run("client", llmswarm_command("chat", *PROMPT, "--peers", swarm.peers[0], "--host", "0.0.0.0",
                                                 "--show-route"), timeout_s=150)
        assert res.returncode == 0, res.stderr[-2000:]
        assert json.loads(res.stdout)["token_ids"] == local["token_ids"]
        assert "home (hole-punched) [15:30)" in res.stderr, res.stderr[-1000:]
