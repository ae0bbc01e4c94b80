"""The swarm over emulated WAN links (llmswarm.bench.netbed): real processes in network namespaces,
every one started with a wildcard listen address and no --identity, talking only through the bed's
delaying, lossy switch. Needs root and `ip netns`; skipped elsewhere with the reason."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from llmswarm.bench.local_swarm import llmswarm_command
from llmswarm.bench.netbed import NetBed, available, start_swarm

pytestmark = [pytest.mark.slow, pytest.mark.skipif(available() is not None, reason=str(available()))]

MODEL = "smollm2-135m"
PROMPT = ["--prompt", "What is the capital of France?", "--json", "--max-new-tokens", "24"]
ONE_WAY_MS = 25.0
STACK_RTT_MS = 5.0  # a py-libp2p PING round trip between processes on 2 busy cores, links aside


def _chat(bed: NetBed, node: str, *args: str) -> dict:
    res = bed.run(node, llmswarm_command("chat", *PROMPT, *args), timeout_s=180)
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout)


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    return {"XDG_DATA_HOME": str(tmp_path_factory.mktemp("xdg"))}  # the bed's processes share one key folder


@pytest.fixture(scope="module")
def local(smollm2) -> dict:
    res = subprocess.run(llmswarm_command("chat", "--local", *PROMPT), capture_output=True, text=True,
                                       timeout=180)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


@pytest.fixture(scope="module")
def wan(smollm2, env):
    """boot, client and 3 servers, every namespace delaying what it sends by 25 ms (RTT 50 ms)."""
    names = ["boot", "client", "s0", "s1", "s2"]
    with NetBed({n: ONE_WAY_MS for n in names}) as bed:
        swarm = start_swarm(bed, MODEL, {"s0": (0, 10), "s1": (10, 20), "s2": (20, 30)}, env=env)
        yield bed, swarm


def test_three_servers_at_25ms_match_local_near_the_link_floor(wan, local, env):
    bed, swarm = wan
    for r in swarm.ready.values():  # announced dialable addresses: the bed's, loopback last, no wildcard
        assert r["addrs"][0].startswith("/ip4/10.77.0.") and r["addrs"][-1].startswith("/ip4/127.0.0.1/")
        assert not any("0.0.0.0" in a for a in r["addrs"])
    assert swarm.peers[0].startswith("/ip4/10.77.0.")
    assert len({r["peer_id"] for r in swarm.ready.values()}) == 3
    local_ms = 1000.0 / local["tokens_per_s"]

    def ms_per_token(*args: str) -> float:
        answer = _chat(bed, "client", "--peers", swarm.peers[0], *args)
        assert answer["token_ids"] == local["token_ids"]
        return 1000.0 / answer["tokens_per_s"]

    # The same swarm with the links at 0 ms, just before: the compute and stack cost of each path under
    # this machine's current load (2 shared cores), which the link floor adds its delays to.
    for node in bed.nodes:
        bed.set_link(node, delay_ms=0.0)
    relay0, direct0 = ms_per_token(), ms_per_token("--no-relay")
    for node in bed.nodes:
        bed.set_link(node, delay_ms=ONE_WAY_MS)
    relay, direct = ms_per_token(), ms_per_token("--no-relay")
    print(f"\nms/token: local {local_ms:.1f}; relay {relay:.1f} (0 ms links {relay0:.1f}, floor 4 x 25 ms + local "
          f"{4 * ONE_WAY_MS + local_ms:.1f}); no relay {direct:.1f} (0 ms links {direct0:.1f}, floor 6 x 25 ms + local "
          f"{6 * ONE_WAY_MS + local_ms:.1f})")
    # Per-token times are figures for the note, not asserts (a busy machine moves them by tens of ms);
    # only what load cannot fake is checked: the emulated delay is really on the path of every token.
    assert relay - relay0 >= 0.5 * 4 * ONE_WAY_MS and direct - direct0 >= 0.5 * 6 * ONE_WAY_MS


def test_two_percent_loss_on_every_link_chats_finish_identical(wan, local):
    bed, swarm = wan
    for node in bed.nodes:
        bed.set_link(node, loss=0.02)
    try:
        for args in ((), ("--no-relay",)):
            assert _chat(bed, "client", "--peers", swarm.peers[0], *args)["token_ids"] == local["token_ids"]
    finally:
        for node in bed.nodes:
            bed.set_link(node, loss=0.0)


def test_route_picks_the_near_server_and_probe_measures_the_links(smollm2, env):
    # client RTTs: near 35 ms, far 180 ms. The margin is wide because a route also adds each server's
    # announced compute, which two servers measuring at once beside other tests can get 2-3x apart.
    delays = {"boot": 5.0, "client": 30.0, "near": 5.0, "far": 150.0}
    with NetBed(delays) as bed:
        swarm = start_swarm(bed, MODEL, {"near": (0, 30), "far": (0, 30)}, env=env)
        near, far = swarm.ready["near"]["peer_id"], swarm.ready["far"]["peer_id"]
        res = bed.run("client", llmswarm_command("route", "--model", MODEL, "--peers", swarm.peers[0], "--json",
                                                 "--prefer", "latency"), timeout_s=120)
        assert res.returncode == 0, res.stderr[-2000:]
        chosen = json.loads(res.stdout)["chosen"]["chain"]
        assert [h["peer_id"] for h in chosen] == [near]
        res = bed.run("client", llmswarm_command("probe", "--peers", swarm.peers[0], "--json"), timeout_s=120)
        assert res.returncode == 0, res.stderr[-2000:]
        rtts = {r["peer_id"]: r["rtt_median_s"] * 1000 for r in json.loads(res.stdout)["servers"]}
        kernel = {near: bed.ping_rtt_ms("client", "near"), far: bed.ping_rtt_ms("client", "far")}
        print(f"\nprobe: near {rtts[near]:.1f} ms (emulated 35, kernel {kernel[near]:.1f}), "
              f"far {rtts[far]:.1f} ms (emulated 180, kernel {kernel[far]:.1f})")
        # The kernel's RTT is the bed's real one (its Python switch lags a few ms on busy cores). Load can
        # only add to an RTT, so the lower bounds are tight and the upper ones leave room for a busy machine
        # (on a quiet one probe is within 10% plus what a PING costs in py-libp2p itself).
        for pid, emulated in ((near, 35.0), (far, 180.0)):
            assert 0.95 * emulated <= kernel[pid] <= 1.5 * emulated + STACK_RTT_MS
            assert 0.95 * kernel[pid] <= rtts[pid] <= 1.5 * kernel[pid] + STACK_RTT_MS
        namespaces = [n.ns for n in bed.nodes.values()]
    left = os.popen("ip netns list").read().split()
    assert not set(namespaces) & set(left)  # torn down

