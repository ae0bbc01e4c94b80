"""Trust, one piece at a time: the reputation file (kept, merged between clients, cleared), measured
speed and distrust in the route solver (pure), the tolerance rule, --verify-rate parsing, and a
session that times a server's decode steps alone. End to end with real processes: test_trust_e2e.py."""

from __future__ import annotations

import json
import os
import subprocess
from types import SimpleNamespace

import pytest
import torch
import trio
from llmswarm.models.precision import relative_error, relative_tolerance
from llmswarm.node import config
from llmswarm.node.client.observed import Observed
from llmswarm.node.client.reputation import Reputation
from llmswarm.node.client.session import open_session
from llmswarm.node.client.verify import Verifier, parse_verify_rate
from llmswarm.node.errors import UsageError
from llmswarm.routing import Hop, ServerInfo, Snapshot, solve


def snapshot() -> Snapshot:
    """Two ways through blocks 0:4: a (claims 1e5 steps/s/block) or b (claims 100)."""
    return Snapshot(num_blocks=4, servers=[
        ServerInfo("a", 0, 4, inference_rps=1e5, throughput=2.5e4, rtt_s=0.01),
        ServerInfo("b", 0, 4, inference_rps=100.0, throughput=25.0, rtt_s=0.01),
    ])


def test_a_measured_speed_replaces_the_claim_and_a_big_liar_is_demoted():
    assert solve(snapshot(), "exact", "latency").chosen.chain[0].peer_id == "a"  # believed
    snap = snapshot()
    snap.servers[0].observed_rps = 20.0  # what the client measured
    result = solve(snap, "exact", "latency")
    assert result.chosen.chain[0].peer_id == "b"
    assert "a" in result.demoted and "5000x less" in result.demoted["a"]
    assert "b" not in result.demoted


def test_an_honest_measurement_is_not_a_demotion():
    snap = snapshot()
    snap.servers[1].observed_rps = 60.0  # within OVERCLAIM_FACTOR of its claim of 100
    assert solve(snap, "exact").demoted == {}


def test_a_distrusted_server_is_excluded_and_the_snapshot_keeps_it():
    snap = snapshot()
    snap.servers[0].distrusted = "failed 1 of 1 output checks"
    result = solve(snap, "exact")
    assert result.chosen.chain[0].peer_id == "b"
    assert result.excluded == {"a": "distrusted: failed 1 of 1 output checks"}
    again = Snapshot.loads(snap.dumps())  # route --dump / --snapshot reproduce it
    assert again.servers[0].distrusted == snap.servers[0].distrusted


def test_reputation_is_kept_merged_between_clients_and_cleared(tmp_path):
    path = tmp_path / "reputation.json"
    one, two = Reputation(path), Reputation(path)  # two clients at once
    for _ in range(config.OBSERVED_MIN_SAMPLES):
        one.measured("p", 0.01, announced_rps=1e5)
    one.checked("p", passed=True)
    two.checked("p", passed=False)
    two.checked("q", passed=True)
    one.save()
    two.save()
    again = Reputation(path)  # a later run
    assert (again.get("p").passed, again.get("p").failed) == (1, 1)
    assert again.get("p").observed_rps == pytest.approx(100.0)
    assert again.get("q").verdict == "trusted" and again.get("new").verdict == "neutral"
    snap = Snapshot(num_blocks=1, servers=[ServerInfo("p", 0, 1, 1e5, 1e5), ServerInfo("new", 0, 1, 10.0, 10.0)])
    again.annotate(snap)
    assert snap.servers[0].observed_rps == pytest.approx(100.0) and snap.servers[0].distrusted
    assert snap.servers[1].observed_rps is None and snap.servers[1].distrusted is None  # neutral
    assert again.clear("q") == 1 and "q" not in Reputation(path).peers
    assert again.clear() == 1 and Reputation(path).peers == {}


def test_distrust_needs_failures_beyond_a_rare_false_alarm():
    rep = Reputation()
    rep.checked("liar", passed=False)
    assert rep.get("liar").distrusted == "failed 1 of 1 output checks"
    for _ in range(20):
        rep.checked("old", passed=True)
    rep.checked("old", passed=False)
    assert rep.get("old").distrusted is None  # 1 failure in 21 checks


def test_a_damaged_reputation_file_reads_as_empty(tmp_path):
    path = tmp_path / "reputation.json"
    path.write_text('{"peers": {"p": {"passed": "x"}, "q": {"passed": 2}, "r": [1]}}')
    rep = Reputation(path)
    assert list(rep.peers) == ["q"]
    path.write_text("not json")
    assert Reputation(path).peers == {}


def test_trust_command_lists_and_clears(tmp_path):
    from llmswarm.bench.local_swarm import llmswarm_command

    path = tmp_path / "reputation.json"
    rep = Reputation(path)
    rep.checked("12D3KooWexample", passed=False)
    rep.save()
    env = {**os.environ, "LLMSWARM_REPUTATION": str(path)}
    shown = json.loads(subprocess.run(llmswarm_command("trust", "--json"), capture_output=True, text=True,
                                      env=env, timeout=60, check=True).stdout)
    assert shown["peers"]["12D3KooWexample"]["verdict"] == "distrusted"
    cleared = json.loads(subprocess.run(llmswarm_command("trust", "--clear", "--json"), capture_output=True,
                                        text=True, env=env, timeout=60, check=True).stdout)
    assert cleared["cleared"] == 1 and Reputation(path).peers == {}


def test_verify_rate_parsing():
    assert parse_verify_rate(None) == config.DEFAULT_VERIFY_RATE
    assert parse_verify_rate("all") == 1.0 and parse_verify_rate("off") == 0.0
    assert parse_verify_rate("0.25") == 0.25
    for bad in ("2", "-0.1", "often"):
        with pytest.raises(UsageError):
            parse_verify_rate(bad)


def test_tolerance_follows_precision_and_quantisation():
    f32, b16, i8 = ("float32", "none"), ("bfloat16", "none"), ("bfloat16", "int8")
    assert relative_tolerance([f32], [f32]) == config_min()
    assert relative_tolerance([f32], [b16]) < relative_tolerance([b16], [b16]) < relative_tolerance([b16], [i8])
    assert relative_tolerance([f32, f32, b16], [f32]) == relative_tolerance([b16], [f32])  # a chain: its worst
    a = torch.ones(3, 8)
    b = a.clone()
    b[1] *= 1.5
    assert relative_error(b, a).tolist() == pytest.approx([0.0, 0.5, 0.0])


def config_min() -> float:
    from llmswarm.models.registry import MIN_RELATIVE_TOLERANCE

    return MIN_RELATIVE_TOLERANCE


def test_a_session_times_each_server_alone_for_its_first_decode_steps(tiny_llama, host_swarm):
    """With relay, a step is one message through the chain; the first decode steps of a server not yet
    timed go to it alone, so the client knows each server's own speed (and the outputs are unchanged)."""
    observed = Observed(Reputation())

    async def check(swarm, whole):
        chain = swarm.chain(0, 1)
        hidden = swarm.spans[0].cfg.hidden_size
        cache = whole.new_cache(64)
        async with open_session(swarm.client, chain, "tiny", hidden, 64, torch.float32) as session:
            session.observer = observed
            x = torch.randn(1, 5, hidden)
            cache.reserve(0, 5)
            torch.testing.assert_close(await session.step(x, 0), whole.forward(x, cache, 0))
            for pos in range(5, 5 + config.OBSERVED_MIN_SAMPLES + 2):
                x = torch.randn(1, 1, hidden)
                cache.reserve(pos, 1)
                torch.testing.assert_close(await session.step(x, pos), whole.forward(x, cache, pos))
            assert session.relayed_pairs == 1  # the link stays: timed steps only skip it
        for hop in chain:
            assert observed.timed[hop.peer_id] == config.OBSERVED_MIN_SAMPLES
            assert observed.reputation.get(hop.peer_id).observed_rps > 0

    host_swarm(tiny_llama, [(0, 3), (3, 6)], check)


def test_no_checking_chain_is_routed_where_no_other_server_holds_a_block(monkeypatch):
    """The default checks in a swarm without spare servers (`demo`, a user's own) cost no route plan:
    planning one at the end of every first answer made a 7-token answer take twice as long."""
    import llmswarm.node.client.verify as verify_mod

    planned = []

    async def plan_route(*args, **kw):
        planned.append(args[6])  # the servers left out
        return SimpleNamespace(chosen=SimpleNamespace(chain=[Hop("c", 0, 2), Hop("b", 2, 4)])), None

    monkeypatch.setattr(verify_mod, "plan_route", plan_route)
    chain = [Hop("a", 0, 2), Hop("b", 2, 4)]
    model = SimpleNamespace(cfg=SimpleNamespace(hidden_size=4, num_blocks=4), dtype=torch.float32)
    session = SimpleNamespace(chain=chain, bans=SimpleNamespace(active=lambda: set()))
    verifier = Verifier(None, None, model, session, SimpleNamespace(rtts={}), 0.5, 8, "exact", "balanced", print)
    held = {h.peer_id: SimpleNamespace(peer_id=h.peer_id, start=h.start, end=h.end) for h in chain}
    verifier._records = lambda: held
    assert trio.run(verifier._second_route) is None and planned == []
    held["c"] = SimpleNamespace(peer_id="c", start=0, end=2)  # a second holder of blocks 0:2
    assert trio.run(verifier._second_route) == [Hop("c", 0, 2), Hop("b", 2, 4)]
    assert planned == [frozenset({"a"})]  # a is left out, b (the only holder of 2:4) kept
