"""`llmswarm bench verify`: what output checks cost, measured in one run.

A local swarm of two complete chains (every span held twice, so every block can be checked); one
session through one chain; rounds alternate the same greedy answer with checks off, at the default
rate and at every step (`all`): decode tokens/s of each (median over rounds, after a warm-up round),
their ratios to off, and whether the three answers are the same tokens. A checked answer opens its
checking chain at its first check, inside the timed decode, as a chat does. The reputation is kept
in memory: a benchmark leaves the user's file alone.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import trio
from llmswarm.bench.local_swarm import LocalSwarm, model_arg
from llmswarm.models.chat import ChatTurn, Conversation
from llmswarm.models.generate import GenerationResult, Sampler, Sampling
from llmswarm.models.local import load_client_model
from llmswarm.models.registry import resolve
from llmswarm.node import config
from llmswarm.node.client.chat import drive
from llmswarm.node.client.checked_turn import checked_turn
from llmswarm.node.client.observed import Observed
from llmswarm.node.client.reputation import Reputation
from llmswarm.node.client.route import plan_route
from llmswarm.node.client.session import open_session
from llmswarm.node.client.verify import Verifier
from llmswarm.node.discovery.directory import open_directory
from llmswarm.node.discovery.swarm_view import live_records
from llmswarm.node.host import ephemeral_host, quiet_libp2p_logging

PROMPT = "Write a long story about a dragon who learns to paint."


def bench_verify(model: str = "smollm2-135m", rounds: int = 3, new_tokens: int = 64,
                 progress: Callable[..., None] = lambda *a: None) -> dict[str, Any]:
    quiet_libp2p_logging()
    spec = resolve(model)
    client = load_client_model(spec, torch.float32, "cpu", progress)
    half = client.cfg.num_blocks // 2
    spans = [(0, half), (half, client.cfg.num_blocks)] * 2
    modes = {"off": 0.0, "default": config.DEFAULT_VERIFY_RATE, "all": 1.0}
    length = new_tokens + 128
    greedy = Sampler(Sampling())
    notes: list[str] = []

    async def answer(host, directory, session, observed, rate: float) -> tuple[GenerationResult, Any]:
        turn = ChatTurn(client, Conversation(client.tokenizer), PROMPT, new_tokens, greedy, max_length=length)
        if rate == 0:
            return await drive(turn.steps, session.step), None
        async with trio.open_nursery() as checks:
            verifier = Verifier(host, directory, client, session, observed, rate, length, "exact", "latency",
                                notes.append, nursery=checks)
            try:
                return await checked_turn(turn, client, greedy, new_tokens, verifier, lambda _: None), verifier.stats
            finally:
                await verifier.aclose()

    async def run() -> tuple[dict[str, list[float]], dict[str, list[int]], dict[str, Any], list]:
        async with ephemeral_host() as host, open_directory(host, swarm.peers, [spec.name], gossip=False) as d:
            with trio.fail_after(60):
                while len(live_records(d.records(spec.name), spec.name)) < len(spans):
                    await trio.sleep(0.2)
                    await d.refresh()
            observed = Observed(Reputation())  # in memory only
            result, _ = await plan_route(host, d, client, "exact", "latency", length, observed=observed)
            speeds: dict[str, list[float]] = {m: [] for m in modes}
            tokens: dict[str, list[int]] = {}
            stats: dict[str, Any] = {}
            async with open_session(host, result.chosen.chain, spec.name, client.cfg.hidden_size, length,
                                    client.dtype) as session:
                session.observer = observed
                for r in range(rounds + 1):  # round 0 warms every path up
                    progress("benchmark rounds", r, rounds + 1)
                    for mode, rate in modes.items():
                        res, st = await answer(host, d, session, observed, rate)
                        if r > 0:
                            speeds[mode].append(res.tokens_per_s)
                        tokens[mode], stats[mode] = res.token_ids, st
                progress("benchmark rounds", rounds + 1, rounds + 1)
            return speeds, tokens, stats, result.chosen.chain

    started = time.perf_counter()
    with LocalSwarm(model_arg(spec), spans, announce_period_s=2.0, progress=progress) as swarm:
        speeds, tokens, stats, chain = trio.run(run)
    med = {m: statistics.median(v) for m, v in speeds.items()}
    return {
        "model": spec.name, "servers": len(spans), "spans": [f"{a}:{b}" for a, b in spans],
        "chain": [f"{h.start}:{h.end}" for h in chain], "rounds": rounds, "new_tokens": new_tokens,
        "default_rate": config.DEFAULT_VERIFY_RATE,
        "tokens_per_s": med, "tokens_per_s_rounds": speeds,
        "ratio_default_vs_off": med["default"] / med["off"], "ratio_all_vs_off": med["all"] / med["off"],
        "token_identical": tokens["off"] == tokens["default"] == tokens["all"],
        "checks": {m: (None if s is None else {"checks": s.checks, "positions": s.positions_checked,
                                               "disagreements": s.disagreements, "worst_error": s.worst_error})
                   for m, s in stats.items()},
        "notes": sorted(set(notes)), "bench_seconds": time.perf_counter() - started,
    }
