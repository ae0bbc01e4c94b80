"""Snapshot JSON: round trip, clear errors, the simulator, the pick rule."""

from __future__ import annotations

import json

import pytest
from llmswarm.routing import Route, RoutingError, ServerInfo, Snapshot, solve
from llmswarm.routing.choose import choose
from llmswarm.routing.simulate import parse_size, simulate_swarm


def test_snapshot_json_round_trips(tmp_path):
    snap = simulate_swarm(50, 20, seed=4)
    path = tmp_path / "snap.json"
    snap.dump(path)
    back = Snapshot.load(path)
    assert back == snap
    assert solve(back, "exact").front == solve(snap, "exact").front


def test_simulator_is_deterministic_and_heterogeneous():
    a, b = simulate_swarm(200, 40, seed=1), simulate_swarm(200, 40, seed=1)
    assert a == b and a != simulate_swarm(200, 40, seed=2)
    assert len({s.region for s in a.servers}) >= 3
    assert len({s.end - s.start for s in a.servers}) >= 5
    assert any(s.cache_tokens_left == 0 for s in a.servers)


@pytest.mark.parametrize("text, match", [
    ("{not json", "not valid JSON"),
    ("[]", "must be an object"),
    ('{"servers": []}', "missing 'num_blocks'"),
    ('{"num_blocks": 4, "servers": [{"peer_id": "a", "start": 0, "end": 9, "inference_rps": 1,'
     ' "throughput": 1}]}', "outside 0..4"),
    ('{"num_blocks": 4, "servers": [{"peer_id": "a", "start": 0, "end": 4, "inference_rps": 0,'
     ' "throughput": 1}]}', "inference_rps > 0"),
    ('{"num_blocks": 4, "servers": [{"peer_id": "a", "start": 0, "end": 4, "inference_rps": 1}]}',
     "missing 'throughput'"),
    ('{"num_blocks": 4, "servers": [{"peer_id": "a", "start": "0", "end": 4, "inference_rps": 1,'
     ' "throughput": 1}]}', "'start' must be an integer"),
    ('{"num_blocks": 4, "servers": [{"peer_id": "a", "start": 0, "end": 4, "inference_rps": 1,'
     ' "throughput": 1, "next_rtts": {"b": -1}}]}', "finite number|bad RTT"),
    ('{"format": "other/9", "num_blocks": 4, "servers": []}', "format"),
])
def test_invalid_snapshot_json_is_a_clear_routing_error(text, match):
    with pytest.raises(RoutingError, match=match):
        Snapshot.loads(text)


def test_duplicate_peer_and_missing_file(tmp_path):
    data = {"num_blocks": 2, "servers": [{"peer_id": "a", "start": 0, "end": 2, "inference_rps": 1,
                                          "throughput": 1}] * 2}
    with pytest.raises(RoutingError, match="twice"):
        Snapshot.loads(json.dumps(data))
    with pytest.raises(RoutingError, match="cannot read"):
        Snapshot.load(tmp_path / "nope.json")


def test_parse_size():
    assert parse_size("500x80") == (500, 80)
    with pytest.raises(RoutingError):
        parse_size("500")


def _r(lat, thr):
    return Route(chain=[], latency_s=lat, throughput=thr, hops=1, risk=0.0)


def test_pick_rule_says_why():
    front = [_r(1.0, 10), _r(1.1, 80), _r(2.0, 90), _r(3.0, 100)]
    assert choose(front, "latency")[0] is front[0]
    assert choose(front, "throughput")[0] is front[3]
    knee, why = choose(front, "balanced")
    assert knee is front[1] and "knee" in why
    with pytest.raises(RoutingError):
        choose(front, "cheapest")


def test_bad_solver_name():
    snap = Snapshot(num_blocks=1, servers=[ServerInfo("a", 0, 1, 1.0, 1.0)])
    with pytest.raises(RoutingError, match="--solver"):
        solve(snap, "annealing")
