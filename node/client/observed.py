"""Observed beats announced: the client times each server's decode steps itself.

A server's record says how fast it is; nothing stops it from lying (a liar announcing 1e5 steps/s
draws every route). So a session sends its first decode steps to each server it has not timed
enough on their own (not relayed: one server's answer, one timing; `InferenceSession._run_from`),
and the time of a step less the round trip measured before routing is that server's compute for
its blocks. The running figure goes into the reputation (node/client/reputation.py); once there are
`config.OBSERVED_MIN_SAMPLES` of them, the route solver routes on it in place of the claim, and
names servers that claimed far more than they delivered (`routing.graph.demoted`).
"""

from __future__ import annotations

from collections import Counter

from llmswarm.node import config
from llmswarm.node.client.reputation import Reputation
from llmswarm.routing import Hop, Snapshot


class Observed:
    """The measurements of one client process, in its reputation."""

    def __init__(self, reputation: Reputation) -> None:
        self.reputation = reputation
        self.rtts: dict[str, float] = {}  # the round trips measured when routing
        self.announced: dict[str, float] = {}  # what each server claims (inference_rps)
        self.timed = Counter[str]()  # decode steps timed alone in this process, per server

    def annotate(self, snapshot: Snapshot) -> Snapshot:
        """Take note of the claims and RTTs of a fresh snapshot, and put the reputation into it."""
        for s in snapshot.servers:
            self.announced[s.peer_id] = s.inference_rps
            if s.rtt_s is not None:
                self.rtts[s.peer_id] = s.rtt_s
        return self.reputation.annotate(snapshot)

    def wants(self, peer_id: str) -> bool:
        """Should this server's next decode step be sent to it alone, to be timed?"""
        return self.timed[peer_id] < config.OBSERVED_MIN_SAMPLES

    def sample(self, hop: Hop, seconds: float) -> None:
        """`hop` answered one decode step, sent to it alone, in `seconds` (client clock)."""
        compute = max(seconds - self.rtts.get(hop.peer_id, 0.0), 0.1 * seconds)  # a jittery RTT never reads as 0
        self.timed[hop.peer_id] += 1
        self.reputation.measured(hop.peer_id, compute / (hop.end - hop.start), self.announced.get(hop.peer_id))
