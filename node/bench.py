"""`llmswarm bench swarm`: decode speed through a local swarm against the same model in-process.

One process holds both: the whole model as one local span, and a client session through N server
processes on 127.0.0.1 (started by LocalSwarm). Rounds alternate local / swarm on the same prompt,
greedy, a fixed number of new tokens with no early stop; the figures are medians over rounds.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import trio
from llmswarm.models.chat import Conversation
from llmswarm.models.generate import GenerationResult, Sampler, Sampling, generation_steps, run_sync
from llmswarm.models.local import LocalChain, load_client_model
from llmswarm.models.registry import resolve
from llmswarm.models.span import load_span, parse_dtype
from llmswarm.routing import Hop

from .client import drive
from .directory import open_directory
from .host import ephemeral_host, quiet_libp2p_logging
from .local_swarm import LocalSwarm, even_spans
from .session import open_session
from .snapshot import dial_records, live_records

PROMPT = "Write a short story about a lighthouse keeper."


def _row(result: GenerationResult) -> dict[str, float]:
    steps = len(result.token_ids) - 1
    return {"tokens_per_s": result.tokens_per_s, "step_ms": 1000 * result.decode_s / steps,
            "ttft_ms": 1000 * result.time_to_first_token_s}


def bench_swarm(model: str = "smollm2-135m", servers: int = 3, rounds: int = 3, new_tokens: int = 64,
                dtype: str | None = None, progress: Callable[..., None] = lambda *a: None) -> dict[str, Any]:
    quiet_libp2p_logging()
    spec = resolve(model)
    torch_dtype = parse_dtype(dtype, "cpu")
    client = load_client_model(spec, torch_dtype, "cpu", progress, with_blocks=True)
    cfg = client.cfg
    local = LocalChain([load_span(client.ckpt, 0, cfg.num_blocks, torch_dtype, "cpu", progress)],
                       max_length=new_tokens + 256)
    prompt = Conversation(client.tokenizer).prompt_ids(PROMPT)
    greedy = Sampler(Sampling())

    def steps():
        return generation_steps(client.parts, prompt, 0, new_tokens, greedy, stop_ids=set())

    spans = even_spans(cfg.num_blocks, servers)
    with LocalSwarm(spec.name, spans, announce_period_s=2.0, dtype=dtype, progress=progress) as swarm:
        announce_s = [r["seconds_to_announce"] for r in swarm.ready]
        process_s = [r["seconds_process_to_announced"] for r in swarm.ready]

        async def run() -> tuple[list, list, bool]:
            async with ephemeral_host() as host, open_directory(host, swarm.peers, [spec.name], gossip=False) as d:
                with trio.fail_after(30):
                    while len(recs := live_records(d.records(spec.name), spec.name)) < servers:
                        await trio.sleep(0.2)
                        await d.refresh()
                await dial_records(host, recs)
                by_start = {r.start: r.peer_id for r in recs}
                chain = [Hop(by_start[a], a, b) for a, b in spans]
                async with open_session(host, chain, spec.name, cfg.hidden_size, new_tokens + 256,
                                        torch_dtype) as session:
                    await drive(steps(), session.step)  # warm-up both paths once
                    run_sync(steps(), local)
                    local_rows, swarm_rows, same = [], [], True
                    for i in range(rounds):
                        progress("benchmark rounds", i, rounds)
                        a = run_sync(steps(), local)
                        b = await drive(steps(), session.step)
                        same = same and a.token_ids == b.token_ids
                        local_rows.append(_row(a))
                        swarm_rows.append(_row(b))
                    progress("benchmark rounds", rounds, rounds)
                    return local_rows, swarm_rows, same

        started = time.perf_counter()
        local_rows, swarm_rows, identical = trio.run(run)
    med = {k: {m: statistics.median(r[m] for r in rows) for m in rows[0]}
           for k, rows in (("local", local_rows), ("swarm", swarm_rows))}
    added_ms = (med["swarm"]["step_ms"] - med["local"]["step_ms"]) / servers
    return {
        "model": spec.name, "dtype": str(torch_dtype).removeprefix("torch."), "servers": servers,
        "spans": [f"{a}:{b}" for a, b in spans], "rounds": rounds, "new_tokens": new_tokens,
        "local": med["local"], "swarm": med["swarm"],
        "ratio": med["swarm"]["tokens_per_s"] / med["local"]["tokens_per_s"],
        "added_ms_per_hop_per_step": added_ms, "token_identical": identical,
        "seconds_join_to_announced": announce_s, "seconds_process_start_to_announced": process_s,
        "bench_seconds": time.perf_counter() - started,
        "rounds_detail": {"local": local_rows, "swarm": swarm_rows},
    }
