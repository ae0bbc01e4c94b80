"""Where servers go: the weakest span first, and a move only when it markedly helps."""

from __future__ import annotations

import json
import subprocess
import time

import pytest
from llmswarm.routing.balance import better_start, block_throughputs, choose_start


def test_gap_is_filled_first():
    assert choose_start(30, 10, [(0, 10, 5.0), (20, 30, 5.0)]) == 10
    assert choose_start(30, 10, []) == 0


def test_weakest_window_wins():
    # blocks 10:20 are served at 2 tok/s, the rest at 10: a new 10-block server goes to 10:20
    assert choose_start(30, 10, [(0, 10, 10.0), (10, 20, 2.0), (20, 30, 10.0)]) == 10


def test_block_throughputs_sum_overlaps():
    assert block_throughputs(4, [(0, 2, 1.0), (1, 4, 2.0)]) == [1.0, 3.0, 2.0, 2.0]


def test_duplicate_moves_to_an_uncovered_span():
    others = [(0, 10, 5.0), (10, 20, 5.0)]  # we are a second server on 0:10; 20:30 is empty
    assert better_start(30, 0, 10, 5.0, others) == 20


def test_never_moves_out_of_a_span_only_it_holds():
    others = [(10, 20, 5.0), (10, 20, 5.0), (20, 30, 5.0)]
    assert better_start(30, 0, 10, 5.0, others) is None


def test_small_gains_are_noise_not_a_reason_to_move():
    # moving would raise the weakest block from 8 to 9 tok/s: not worth a reload
    others = [(0, 10, 4.0), (10, 20, 9.0), (20, 30, 8.0)]
    assert better_start(30, 0, 10, 4.0, others) is None
    # ... but from 2 to 8 is
    assert better_start(30, 0, 10, 6.0, [(0, 10, 6.0), (10, 20, 8.0), (20, 30, 2.0)]) == 20


@pytest.mark.slow
def test_a_server_moves_to_fill_a_gap(smollm2):
    from llmswarm.bench.local_swarm import LocalSwarm, llmswarm_command

    with LocalSwarm("smollm2-135m", [(0, 10), (0, 10), (10, 20)], announce_period_s=1.0,
                    rebalance_period_s=2.0) as s:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            res = subprocess.run(llmswarm_command("status", "--peers", *s.peers, "--json", "--once"),
                                 capture_output=True, text=True, timeout=60)
            spans = sorted((x["start"], x["end"]) for x in json.loads(res.stdout)["servers"] if x["state"] == "online")
            if (20, 30) in spans and (0, 10) in spans:
                break
            time.sleep(1.0)
        assert (20, 30) in spans and (0, 10) in spans, spans
        res = subprocess.run(llmswarm_command("chat", "--peers", *s.peers, "-p", "What is the capital of France?",
                                              "-n", "12", "--json"), capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        assert "Paris" in json.loads(res.stdout)["text"]
