"""Decode step time of a full-model span: KVCache vs PagedSequence vs batched PagedSequences.

    flock /tmp/llmswarm-bench.lock python benchmarks/paged_decode.py [--model smollm2-135m] [--context 100]

Every step re-sends one token at the same position (a rewind), so each timed step sees the same
context. Sessions in a batch sit at different lengths, context-8..context+7, averaging the context.
A last case runs the largest batch in a pool where no session has two consecutive pages (every
row gathered). Cases take turns (see timed_rounds). Prints one JSON line per case: median ms per step, aggregate
tokens/s, and the batch's tokens/s over B = 1's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch


def timed_rounds(cases: dict[str, Callable[[], object]], rounds: int, steps: int) -> dict[str, float]:
    """Median seconds per call of each case. Cases take turns, a few steps each round, so load from
    other processes on a shared machine falls on all of them alike and ratios stay meaningful."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    for step in cases.values():  # warm-up
        step()
    for _ in range(rounds):
        for name, step in cases.items():
            for _ in range(steps):
                t0 = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--context", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pool-pages", type=int, default=0, help="default: twice what the sessions take")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from llmswarm.models.builtin import ensure_builtin
    from llmswarm.models.checkpoint import Checkpoint
    from llmswarm.models.registry import resolve
    from llmswarm.models.span import load_span

    ckpt = Checkpoint.open(ensure_builtin(resolve(args.model)))
    span = load_span(ckpt, 0, ckpt.config.num_blocks, torch.float32)
    hidden_size = ckpt.config.hidden_size
    batches = [int(b) for b in args.batches.split(",")]
    ctx = args.context
    torch.manual_seed(0)

    def spread(i: int) -> int:
        """0, -1, 1, -2, 2, ... -8: sessions at different lengths whose mean stays the context."""
        return (-1) ** i * ((i % 16 + 1) // 2)

    def filled(cache, length: int):
        cache.reserve(0, length)  # the keys' values do not change the time; only their number does
        cache.length = length
        return cache

    def scattered(pool):
        """Take every other page for good: no session in this pool can have two consecutive pages."""
        holders = [filled(pool.sequence(), 1) for _ in range(pool.num_pages)]
        for h in holders[::2]:
            h.release()
        return pool

    pages_each = -(-(ctx + 16) // 16)
    x1 = torch.randn(1, 1, hidden_size)
    cache = filled(span.new_cache(ctx + 32), ctx)
    # a server's pool has room to spare: twice what these sessions take
    pool = span.new_pool(args.pool_pages or 2 * (1 + sum(batches)) * pages_each, page_size=16)
    seq = filled(pool.sequence(), ctx)
    cases: dict[str, Callable[[], object]] = {
        "kvcache": lambda: span.forward(x1, cache, ctx),
        "paged_forward": lambda: span.forward(x1, seq, ctx),
    }
    contiguous = {}
    biggest = max(batches)
    runs = [(f"forward_batch/{b}", b, pool) for b in batches]
    runs.append((f"forward_batch/{biggest}/scattered", biggest, scattered(span.new_pool(2 * biggest * pages_each))))
    for name, b, where in runs:
        positions = [ctx + spread(i) for i in range(b)]
        seqs = [filled(where.sequence(), p) for p in positions]
        contiguous[name] = sum(s.contiguous for s in seqs)
        x = torch.randn(b, 1, hidden_size)
        cases[name] = lambda seqs=seqs, x=x, positions=positions: span.forward_batch(x, seqs, positions)
    med = timed_rounds(cases, args.rounds, args.steps)

    base = med[f"forward_batch/{batches[0]}"] / batches[0]
    for name, seconds in med.items():
        b = int(name.split("/")[1]) if "/" in name else 1  # forward_batch/B[/variant]
        row = {"case": name, "batch": b, "ms_per_step": round(seconds * 1e3, 2), "tokens_per_s": round(b / seconds, 1)}
        if "/" in name:
            row["x_vs_b1"] = round(base * b / seconds, 2)
            row["contiguous_sessions"] = contiguous[name]
        print(json.dumps(row), flush=True)
    print(json.dumps({"paged_vs_kvcache": round(med["paged_forward"] / med["kvcache"], 3),
                      "batch1_vs_kvcache": round(med[f"forward_batch/{batches[0]}"] / med["kvcache"], 3)}))


if __name__ == "__main__":
    main()
